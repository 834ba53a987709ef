//! A Piper voice's `.onnx.json`, as `Piper::open` reads it before loading the model, then the
//! model input for some phonemes, and its audio rate through the speech encoder (as every
//! clip of the voice goes). JSON and phonemes are separated by NUL. Any bytes give a voice
//! or one error, never a panic.
#![no_main]

use kibitz_voice::{read_piper_config, OpusEncoder, Pcm};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (json, phonemes) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &b"h\xc9\x99l\xcb\x88o\xca\x8a"[..]),
    };
    let phonemes = String::from_utf8_lossy(phonemes);
    let Ok((sample_rate, _ids)) = read_piper_config(json, &phonemes) else {
        return;
    };
    let mut encoder = OpusEncoder::new().expect("an encoder");
    let pcm = Pcm {
        samples: vec![1000; 64],
        sample_rate,
    };
    let _ = encoder.push(&pcm);
});
