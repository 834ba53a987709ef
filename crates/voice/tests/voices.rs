//! The engines for real: espeak-ng (installed by scripts/setup.sh), the piper joe voice and
//! ONNX Runtime (fetched by scripts/fixtures.sh), a stand-in speech server on loopback, and
//! the Ogg/Opus stream read back by ffmpeg. Every wait has a deadline.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kibitz_voice::{
    build, phonemize, speak, OggMuxer, OggOpusWriter, OpusEncoder, Pcm, Piper, Voice, VoiceError,
    VoiceOptions, VoiceSpec,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// Runs `f` on its own thread and fails the test if it takes longer than `seconds`.
fn within<T: Send + 'static>(seconds: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(seconds))
        .unwrap_or_else(|_| panic!("no result within {seconds} s"))
}

fn rms(samples: &[i16]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    (samples.iter().map(|&s| (s as f64).powi(2)).sum::<f64>() / samples.len() as f64).sqrt()
}

fn espeak() -> Arc<dyn Voice> {
    within(60, || {
        build(&VoiceSpec::Espeak, &VoiceOptions::default())
            .expect("espeak-ng runs (scripts/setup.sh installs it)")
            .unwrap()
    })
}

#[test]
fn espeak_speaks_a_sentence() {
    let voice = espeak();
    let info = voice.info();
    assert_eq!((info.engine, info.sample_rate), ("espeak", 22050));
    let pcm = within(60, move || {
        voice.synthesize("The rabbit wakes up under the tree.")
    })
    .unwrap();
    assert_eq!(pcm.sample_rate, 22050);
    let seconds = pcm.duration().as_secs_f64();
    assert!((1.0..5.0).contains(&seconds), "{seconds} s");
    assert!(rms(&pcm.samples) > 500.0, "rms {}", rms(&pcm.samples));
}

#[test]
fn a_missing_espeak_is_a_clear_error() {
    let options = VoiceOptions {
        espeak_program: "/nonexistent/espeak-ng".into(),
        ..VoiceOptions::default()
    };
    let e = within(60, move || build(&VoiceSpec::Espeak, &options))
        .err()
        .expect("an error");
    assert!(matches!(e, VoiceError::ProgramMissing { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("/nonexistent/espeak-ng") && text.contains("apt-get install espeak-ng"),
        "{text}"
    );
}

#[test]
fn an_unknown_espeak_voice_is_a_clear_error() {
    let options = VoiceOptions {
        language: "xx-nope".into(),
        ..VoiceOptions::default()
    };
    let e = within(60, move || build(&VoiceSpec::Espeak, &options))
        .err()
        .expect("an error");
    assert!(matches!(e, VoiceError::Espeak(_)), "{e:?}");
}

/// piper-phonemize 1.1.0's answers (`phonemize_espeak(text, "en-us")`, sentences joined),
/// recorded on 2026-11-30. Where the Python package is installed the test also asks it.
const PIPER_PHONEMES: &[(&str, &[&str])] = &[
    (
        "Hello, world! How are you today?",
        &["həlˈoʊ, wˈɜːld!", "hˌaʊ ɑːɹ juː tədˈeɪ?"],
    ),
    (
        "The rabbit jumps over the log; it lands softly: wow.",
        &["ðə ɹˈæbɪt dʒˈʌmps ˌoʊvɚ ðə lˈɔɡ; ɪt lˈændz sˈɔftli: wˈaʊ."],
    ),
    (
        "A big bird sits on the branch, then flies away.",
        &["ɐ bˈɪɡ bˈɜːd sˈɪts ɔnðə bɹˈæntʃ, ðˈɛn flˈaɪz ɐwˈeɪ."],
    ),
    (
        "Is that a squirrel?! It throws an acorn at the rabbit.",
        &["ɪz ðˌæɾə skwˈɜːl?", "ɪt θɹˈoʊz ɐn ˈeɪkɔːɹn æt ðə ɹˈæbɪt."],
    ),
    (
        "Mr. Smith paid $5 at 3:30pm.",
        &[
            "mˈɪstɚ.",
            "smˈɪθ pˈeɪd dˈɑːlɚ fˈaɪv æt θɹˈiː θˈɜːɾi pˌiːˈɛm.",
        ],
    ),
    (
        "The score is 2-1, with ten minutes to go.",
        &["ðə skˈoːɹ ɪz tˈuː dˈæʃ wˈʌn, wɪð tˈɛn mˈɪnɪts tə ɡˈoʊ."],
    ),
    (
        "Three butterflies circle the tree: one yellow, one red, and one blue.",
        &["θɹˈiː bˈʌɾɚflˌaɪz sˈɜːkəl ðə tɹˈiː: wˈʌn jˈɛloʊ, wˈʌn ɹˈɛd, ænd wˈʌn blˈuː."],
    ),
    (
        "\"Look out!\" shouts the referee.",
        &["lˈʊk ˈaʊt!", "ʃˈaʊts ðə ɹˌɛfɚɹˈiː."],
    ),
    (
        "The camera pans left; nobody is in the hallway.",
        &["ðə kˈæmɹə pˈænz lˈɛft; nˈoʊbɑːdi ɪz ɪnðə hˈɔːlweɪ."],
    ),
    (
        "It's a beautiful morning in the meadow",
        &["ɪts ɐ bjˈuːɾifəl mˈɔːɹnɪŋ ɪnðə mˈɛdoʊ"],
    ),
];

/// piper-phonemize's answer for `text`, when the Python package is there.
fn piper_phonemize(text: &str) -> Option<Vec<String>> {
    let script = "import sys, json\nfrom piper_phonemize import phonemize_espeak\n\
                  print(json.dumps([''.join(s) for s in phonemize_espeak(sys.argv[1], 'en-us')]))";
    let out = Command::new("python3")
        .args(["-c", script, text])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

#[test]
fn phonemes_match_piper_phonemize() {
    let live = piper_phonemize("ok").is_some();
    if !live {
        println!("piper-phonemize is not installed (pip install piper-phonemize==1.1.0): comparing with its recorded answers only");
    }
    within(300, move || {
        for (text, expected) in PIPER_PHONEMES {
            let ours = phonemize(Path::new("espeak-ng"), "en-us", text).unwrap();
            assert_eq!(&ours, expected, "{text}");
            if live {
                assert_eq!(ours, piper_phonemize(text).unwrap(), "{text} (live)");
            }
        }
    });
}

fn joe() -> Option<PathBuf> {
    let model = fixtures().join("en_US-joe-medium.onnx");
    let json = fixtures().join("en_US-joe-medium.onnx.json");
    let runtime = fixtures().join("libonnxruntime.so.1.22.1");
    for f in [&model, &json, &runtime] {
        if !f.is_file() {
            println!(
                "skipped: {} is missing (scripts/fixtures.sh fetches it)",
                f.display()
            );
            return None;
        }
    }
    Some(model)
}

#[test]
fn piper_speaks_with_the_joe_voice() {
    let Some(model) = joe() else { return };
    let (pcm, info, took) = within(300, move || {
        let piper = Piper::open(&model, &VoiceOptions::default()).unwrap();
        let started = Instant::now();
        let pcm = piper
            .synthesize("The rabbit wakes up under the big tree, and stretches.")
            .unwrap();
        (pcm, piper.info(), started.elapsed())
    });
    assert_eq!(
        (info.engine, info.sample_rate, info.name.as_str()),
        ("piper", 22050, "en_US-joe-medium")
    );
    let seconds = pcm.duration().as_secs_f64();
    assert!((1.5..8.0).contains(&seconds), "{seconds} s");
    assert!(rms(&pcm.samples) > 500.0, "rms {}", rms(&pcm.samples));
    println!("piper: {seconds:.2} s of speech in {took:?}");
}

#[test]
fn piper_ids_interleave_pad_as_piper_does() {
    let Some(model) = joe() else { return };
    let ids = within(300, move || {
        Piper::open(&model, &VoiceOptions::default())
            .unwrap()
            .phoneme_ids("hə!")
    });
    // ^ _ h _ ə _ ! _ $ in the joe voice's map.
    assert_eq!(ids, [1, 0, 20, 0, 59, 0, 4, 0, 2]);
}

#[test]
fn a_missing_or_broken_piper_voice_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.onnx");
    let e = Piper::open(&missing, &VoiceOptions::default())
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("nope.onnx") && e.to_string().contains("no such file"),
        "{e}"
    );

    let broken = dir.path().join("broken.onnx");
    std::fs::write(&broken, b"not a model").unwrap();
    let e = Piper::open(&broken, &VoiceOptions::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("broken.onnx.json"), "{e}");

    std::fs::write(dir.path().join("broken.onnx.json"), b"{\"audio\": {}}").unwrap();
    let e = Piper::open(&broken, &VoiceOptions::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("not a Piper config"), "{e}");

    // A good config beside a model that is not one: ONNX Runtime's refusal, as an error.
    let Some(joe) = joe() else { return };
    std::fs::copy(
        joe.with_extension("onnx.json"),
        dir.path().join("broken.onnx.json"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        fixtures().join("libonnxruntime.so.1.22.1"),
        dir.path().join("libonnxruntime.so.1.22.1"),
    )
    .unwrap();
    let e = within(300, move || Piper::open(&broken, &VoiceOptions::default()))
        .err()
        .unwrap();
    assert!(matches!(e, VoiceError::PiperLoad { .. }), "{e:?}");
    assert!(e.to_string().contains("broken.onnx"), "{e}");
    println!("{e}");
}

/// A WAV of `seconds` of a 440 Hz tone at 24 kHz.
fn tone_wav(seconds: f64) -> Vec<u8> {
    let samples = (0..(24_000.0 * seconds) as usize)
        .map(|n| ((n as f64 * 440.0 * std::f64::consts::TAU / 24_000.0).sin() * 8000.0) as i16)
        .collect();
    let mut wav = Vec::new();
    kibitz_voice::write_wav(
        &Pcm {
            samples,
            sample_rate: 24_000,
        },
        &mut wav,
    )
    .unwrap();
    wav
}

/// A stand-in speech server on loopback: answers `delay` late with a WAV whose length
/// follows the input, and records the request bodies.
async fn stand_in(delay: Duration) -> (String, Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
    use axum::{routing::post, Json, Router};
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let app = Router::new().route(
        "/v1/audio/speech",
        post(move |Json(body): Json<serde_json::Value>| {
            let log = log.clone();
            async move {
                tokio::time::sleep(delay).await;
                let words = body["input"]
                    .as_str()
                    .unwrap_or("")
                    .split_whitespace()
                    .count();
                log.lock().unwrap().push(body);
                (
                    [("content-type", "audio/wav")],
                    tone_wav(0.2 * words as f64),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

fn openai_options(timeout: Duration) -> VoiceOptions {
    VoiceOptions {
        openai_model: "tts-test".into(),
        openai_voice: "nova".into(),
        timeout,
        ..VoiceOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_speaks_through_a_stand_in_server() {
    let (url, seen) = stand_in(Duration::ZERO).await;
    let spec = VoiceSpec::parse(&format!("openai:{url}/v1")).unwrap();
    let options = openai_options(Duration::from_secs(5));
    let voice = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || build(&spec, &options)),
    )
    .await
    .unwrap()
    .unwrap()
    .unwrap()
    .unwrap();
    // Sentence by sentence, through `speak`, cleaned first.
    let mut utterance = speak(
        voice.clone(),
        "The **rabbit** runs away. It hides behind a tree!",
    );
    let mut clips = Vec::new();
    while let Some(clip) = tokio::time::timeout(Duration::from_secs(10), utterance.next())
        .await
        .unwrap()
    {
        clips.push(clip.unwrap());
    }
    assert_eq!(clips.len(), 2);
    assert_eq!(clips[0].text, "The rabbit runs away.");
    assert_eq!((clips[1].index, clips[1].of), (1, 2));
    assert_eq!(clips[0].pcm.sample_rate, 24_000);
    assert_eq!(clips[0].pcm.samples.len(), 4 * 4800);
    assert!(rms(&clips[1].pcm.samples) > 1000.0);
    assert_eq!(voice.info().sample_rate, 24_000);
    let seen = seen.lock().unwrap();
    // The check at start, then the two sentences.
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1]["model"], "tts-test");
    assert_eq!(seen[1]["voice"], "nova");
    assert_eq!(seen[1]["response_format"], "wav");
    assert_eq!(seen[2]["input"], "It hides behind a tree!");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_slow_speech_server_fails_in_time() {
    let (slow, _) = stand_in(Duration::from_secs(30)).await;
    for (url, expect) in [
        ("http://127.0.0.1:9".to_string(), "cannot connect"),
        (slow, "no answer within"),
    ] {
        let spec = VoiceSpec::parse(&format!("openai:{url}")).unwrap();
        let options = openai_options(Duration::from_millis(500));
        let started = Instant::now();
        let result = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::task::spawn_blocking(move || build(&spec, &options)),
        )
        .await
        .expect("the voice's own timeout fires first")
        .unwrap();
        let e = result.err().expect("an error");
        assert!(matches!(e, VoiceError::Server { .. }), "{e:?}");
        assert!(e.to_string().contains(expect), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_to_say_is_no_clip() {
    let voice = tokio::task::spawn_blocking(espeak).await.unwrap();
    let mut utterance = speak(voice, "...");
    let next = tokio::time::timeout(Duration::from_secs(5), utterance.next())
        .await
        .unwrap();
    assert!(next.is_none());
}

/// Decodes Ogg/Opus with the ffmpeg program to 48 kHz mono s16.
fn ffmpeg_decode(ogg: &[u8]) -> Vec<i16> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.ogg");
    std::fs::write(&path, ogg).unwrap();
    let path2 = path.clone();
    let out = within(120, move || {
        Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-i"])
            .arg(&path2)
            .args(["-f", "s16le", "-ac", "1", "-ar", "48000", "-"])
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "ffmpeg complained: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// RMS of 50 ms windows lying wholly inside `from..to` seconds (shrunk by 60 ms each side).
fn windows(pcm: &[i16], from: f64, to: f64) -> Vec<f64> {
    let w = 2400;
    let (a, b) = (
        ((from + 0.06) * 48_000.0) as usize,
        ((to - 0.06) * 48_000.0) as usize,
    );
    (a..b.saturating_sub(w))
        .step_by(w)
        .map(|s| rms(&pcm[s..s + w]))
        .collect()
}

#[test]
fn the_ogg_stream_decodes_to_speech_and_silence() {
    let voice = espeak();
    let (one, two) = within(60, move || {
        (
            voice.synthesize("The rabbit wakes up.").unwrap(),
            voice.synthesize("A bird flies over the meadow.").unwrap(),
        )
    });
    let mut writer = OggOpusWriter::new(1).unwrap();
    let mut ogg = Vec::new();
    // 0.5 s silence, speech, 1.2 s silence, speech, 0.5 s silence.
    let mut plan = Vec::new();
    let mut t = 0.0;
    for (what, seconds) in [
        (None, 0.5),
        (Some(&one), one.duration().as_secs_f64()),
        (None, 1.2),
        (Some(&two), two.duration().as_secs_f64()),
        (None, 0.5),
    ] {
        match what {
            None => ogg.extend(writer.silence(Duration::from_secs_f64(seconds)).unwrap()),
            Some(pcm) => ogg.extend(writer.push(pcm).unwrap()),
        }
        plan.push((what.is_some(), t, t + seconds));
        t += seconds;
    }
    ogg.extend(writer.finish().unwrap());
    let decoded = ffmpeg_decode(&ogg);
    let seconds = decoded.len() as f64 / 48_000.0;
    assert!(
        (seconds - t).abs() < 0.040,
        "decoded {seconds:.3} s, pushed {t:.3} s"
    );
    for (speech, from, to) in plan {
        let levels = windows(&decoded, from, to);
        if speech {
            let loud = levels.iter().filter(|&&r| r > 300.0).count();
            assert!(
                loud * 2 > levels.len(),
                "speech {from:.2}..{to:.2}: {levels:?}"
            );
        } else {
            assert!(
                levels.iter().all(|&r| r < 30.0),
                "silence {from:.2}..{to:.2}: {levels:?}"
            );
        }
    }
}

#[test]
fn a_listener_joining_late_gets_a_valid_stream() {
    let voice = espeak();
    let speech = within(60, move || {
        voice.synthesize("The rabbit wakes up.").unwrap()
    });
    let mut encoder = OpusEncoder::new().unwrap();
    let mut early = OggMuxer::new(1, encoder.pre_skip());
    let mut early_bytes = early.headers();
    early_bytes.extend(early.page(&encoder.silence(Duration::from_secs(1)).unwrap()));
    // The second listener arrives now: headers first, then the same live frames.
    let mut late = OggMuxer::new(1, encoder.pre_skip());
    let mut late_bytes = late.headers();
    for frames in [
        encoder.push(&speech).unwrap(),
        encoder.silence(Duration::from_millis(500)).unwrap(),
    ] {
        early_bytes.extend(early.page(&frames));
        late_bytes.extend(late.page(&frames));
    }
    let last = encoder.finish().unwrap();
    early_bytes.extend(early.last(&last, None));
    late_bytes.extend(late.last(&last, None));
    let early_pcm = ffmpeg_decode(&early_bytes);
    let late_pcm = ffmpeg_decode(&late_bytes);
    // The late stream is the early one without its first second.
    let expected = speech.duration().as_secs_f64() + 0.5;
    let got = late_pcm.len() as f64 / 48_000.0;
    assert!(
        (got - expected).abs() < 0.060,
        "late listener: {got:.3} s, expected about {expected:.3} s"
    );
    let gap = (early_pcm.len() as f64 - late_pcm.len() as f64) / 48_000.0;
    assert!(
        (gap - 1.0).abs() < 0.001,
        "the late stream lacks {gap:.3} s, not 1 s"
    );
    assert!(rms(&late_pcm[..(speech.duration().as_secs_f64() * 48_000.0) as usize]) > 300.0);
}
