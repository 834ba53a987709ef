//! Time to first audio and real-time factor of a voice on typical comments (the numbers in
//! docs/benchmarks.md, "Voices"):
//!
//! ```sh
//! cargo run --release -p kibitz-voice --example timing -- espeak piper:fixtures/en_US-joe-medium.onnx
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use kibitz_voice::{speak, Voice, VoiceOptions, VoiceSpec};

const COMMENTS: &[&str] = &[
    "The rabbit wakes up under the big oak tree and stretches.",
    "A bird lands on a branch right above him. He looks up, curious.",
    "Three rodents watch from behind a rock, grinning.",
    "The squirrel drops an acorn on the rabbit's head! He rubs it and frowns.",
    "A butterfly circles the meadow, and the rabbit follows it slowly.",
];
const ROUNDS: usize = 3;

#[tokio::main]
async fn main() {
    for arg in std::env::args().skip(1) {
        let spec = VoiceSpec::parse(&arg).expect("a voice");
        let started = Instant::now();
        let voice = tokio::task::spawn_blocking(move || {
            kibitz_voice::build(&spec, &VoiceOptions::default())
        })
        .await
        .expect("the build thread")
        .expect("the voice")
        .expect("not off");
        let loaded = started.elapsed();
        let (mut first, mut rtf) = (Vec::new(), Vec::new());
        let mut spoken = Vec::new();
        for _ in 0..ROUNDS {
            for comment in COMMENTS {
                let (f, r, s) = time(voice.clone(), comment).await;
                first.push(f);
                rtf.push(r);
                spoken.push(s);
            }
        }
        first.sort();
        rtf.sort_by(f64::total_cmp);
        spoken.sort_by(f64::total_cmp);
        let info = voice.info();
        println!(
            "{} ({}): {} comments of {:.1}-{:.1} s; first audio median {} ms, p90 {} ms; RTF median {:.3}, p90 {:.3}; loaded in {} ms",
            info.engine,
            info.name,
            first.len(),
            spoken[0],
            spoken[spoken.len() - 1],
            first[first.len() / 2].as_millis(),
            first[first.len() * 9 / 10].as_millis(),
            rtf[rtf.len() / 2],
            rtf[rtf.len() * 9 / 10],
            loaded.as_millis()
        );
        // What the speech stream costs: its comments, resampled to 48 kHz and Opus-encoded.
        let mut pcm = kibitz_voice::Pcm::default();
        for comment in COMMENTS {
            let voice = voice.clone();
            let text = comment.to_string();
            let clip = tokio::task::spawn_blocking(move || voice.synthesize(&text))
                .await
                .expect("the thread")
                .expect("speech");
            pcm.append(&clip);
        }
        let started = Instant::now();
        let mut writer = kibitz_voice::OggOpusWriter::new(1).expect("an encoder");
        let mut bytes = writer.push(&pcm).expect("encoded").len();
        bytes += writer.finish().expect("encoded").len();
        let took = started.elapsed();
        println!(
            "  Ogg/Opus 48 kHz: {:.1} s of it in {} ms ({:.4} of real time), {} bytes",
            pcm.duration().as_secs_f64(),
            took.as_millis(),
            took.as_secs_f64() / pcm.duration().as_secs_f64(),
            bytes
        );
    }
}

/// Time to the first sentence's audio, real-time factor, seconds spoken.
async fn time(voice: Arc<dyn Voice>, text: &str) -> (Duration, f64, f64) {
    let started = Instant::now();
    let mut utterance = speak(voice, text);
    let mut first = None;
    let (mut working, mut seconds) = (Duration::ZERO, 0.0);
    while let Some(clip) = utterance.next().await {
        let clip = clip.expect("speech");
        first.get_or_insert(started.elapsed());
        working += clip.took;
        seconds += clip.pcm.duration().as_secs_f64();
    }
    (
        first.expect("some speech"),
        working.as_secs_f64() / seconds,
        seconds,
    )
}
