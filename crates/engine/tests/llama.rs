//! The real llama.cpp engine on a tiny random-weight model of MiniCPM-o 4.5's layout, on
//! the CPU. Random weights write gibberish, so these tests check structure, stats and
//! events, never wording.
#![cfg(feature = "llama")]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kibitz_engine::llama::{LlamaConfig, LlamaEngine};
use kibitz_engine::models::{check_pair, ModelFiles};
use kibitz_engine::{Engine, EngineError, Frame, Generation, Image, Output, Request, Stats};
use kibitz_frames::{Jpeg, Rgb};
use kibitz_synthetic_model::{write_pair, Spec};

/// One tiny pair for the whole test binary.
fn tiny() -> &'static ModelFiles {
    static PAIR: OnceLock<(tempfile::TempDir, ModelFiles)> = OnceLock::new();
    &PAIR
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let pair = write_pair(dir.path(), &Spec::tiny()).unwrap();
            (
                dir,
                ModelFiles {
                    llm: pair.llm,
                    mmproj: pair.mmproj,
                },
            )
        })
        .1
}

fn engine() -> LlamaEngine {
    let files = tiny();
    let mut config = LlamaConfig::new(&files.llm, &files.mmproj);
    // One thread: tests run side by side on small CI machines, and llama.cpp's spinning
    // thread pool slows to a crawl when its threads outnumber free cores.
    config.threads = Some(1);
    config.context_size = 2048;
    LlamaEngine::load(config).expect("the tiny model loads")
}

fn frame(width: u32, height: u32, seed: u8, pts_ms: u64) -> Frame {
    let data: Vec<u8> = (0..width * height * 3)
        .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
        .collect();
    Frame {
        image: Image::Rgb(Rgb {
            width,
            height,
            data: data.into(),
        }),
        pts: Duration::from_millis(pts_ms),
    }
}

fn request(frames: Vec<Frame>, max_tokens: u32) -> Request {
    let mut r = Request::new(frames, "You are a live commentator.", "What is new?");
    r.max_tokens = max_tokens;
    r
}

/// Every item of a generation, in order.
async fn drain(mut g: Generation) -> (Vec<String>, Result<Stats, EngineError>) {
    let mut pieces = Vec::new();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(120), g.next())
        .await
        .expect("no stall")
    {
        match item {
            Ok(Output::Text(t)) => pieces.push(t),
            Ok(Output::Done(stats)) => {
                assert!(g.next().await.is_none(), "nothing may follow Done");
                return (pieces, Ok(stats));
            }
            Err(e) => return (pieces, Err(e)),
        }
    }
    panic!("the generation ended without Done or an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_text_then_sane_stats() {
    let engine = engine();
    let frames = vec![frame(448, 448, 1, 0), frame(448, 448, 2, 1000)];
    let (pieces, stats) = drain(engine.submit(request(frames, 16)).unwrap()).await;
    let stats = stats.unwrap();
    assert_eq!(stats.images, 2);
    assert_eq!(stats.image_tokens, 2 * 64, "one 64-token slice a frame");
    assert!(
        stats.prompt_tokens > stats.image_tokens,
        "text tokens around the images"
    );
    assert!((1..=16).contains(&stats.generated_tokens), "{stats:?}");
    assert!(
        stats.vision_ms > 0.0 && stats.prefill_ms > 0.0 && stats.decode_ms > 0.0,
        "{stats:?}"
    );
    assert!(
        stats.total_ms >= stats.vision_ms + stats.prefill_ms + stats.decode_ms * 0.99,
        "{stats:?}"
    );
    assert!(stats.first_token_ms <= stats.total_ms, "{stats:?}");
    let text = pieces.concat();
    for special in [
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_start|>",
        "<think>",
        "<image>",
        "</slice>",
    ] {
        assert!(
            !text.contains(special),
            "special token {special} leaked into {text:?}"
        );
    }
    assert_eq!(engine.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_eos_generates_exactly_max_tokens_and_reuses_the_prefix() {
    let engine = engine();
    let mut r = request(vec![frame(448, 448, 3, 0)], 24);
    r.ignore_eos = true;
    let (_, first) = drain(engine.submit(r.clone()).unwrap()).await;
    let first = first.unwrap();
    assert_eq!(first.generated_tokens, 24);
    assert_eq!(first.reused_images, 0);
    let (_, second) = drain(engine.submit(r).unwrap()).await;
    let second = second.unwrap();
    assert_eq!(second.generated_tokens, 24);
    assert!(
        second.cached_tokens > 5,
        "the system prompt's KV entries are reused: {second:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_generation_stops_it_and_frees_the_engine() {
    let engine = engine();
    let mut long = request(vec![frame(448, 448, 4, 0)], 100_000);
    long.ignore_eos = true;
    let mut g = engine.submit(long).unwrap();
    let mut seen = 0;
    while seen < 2 {
        if let Some(Ok(Output::Text(_))) = g.next().await {
            seen += 1;
        }
    }
    drop(g);
    // The next request is served, which can only happen once the first one has stopped
    // (the context can't hold 100 000 tokens, but the engine would run until full).
    let started = Instant::now();
    let (_, stats) = drain(
        engine
            .submit(request(vec![frame(448, 448, 5, 0)], 4))
            .unwrap(),
    )
    .await;
    assert!(stats.is_ok());
    assert!(stats.unwrap().queue_ms < started.elapsed().as_secs_f64() * 1e3 + 1.0);
    assert_eq!(engine.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_get_their_own_answers() {
    let engine = Arc::new(engine());
    let make = |i: u8| {
        let mut r = request(
            vec![frame(448, 448, 10 + i, 0), frame(448, 448, 20 + i, 500)],
            12,
        );
        r.sampling.temperature = 0.0; // greedy: the same request gives the same answer
        r.user = format!("Request number {i}: what is new?");
        r
    };
    // Alone first...
    let mut alone = Vec::new();
    for i in 0..4 {
        let (pieces, stats) = drain(engine.submit(make(i)).unwrap()).await;
        alone.push((pieces.concat(), stats.unwrap().generated_tokens));
    }
    // ...then all four at once.
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move { drain(engine.submit(make(i)).unwrap()).await })
        })
        .collect();
    for (i, handle) in handles.into_iter().enumerate() {
        let (pieces, stats) = handle.await.unwrap();
        let stats = stats.unwrap();
        assert_eq!(
            (pieces.concat(), stats.generated_tokens),
            alone[i],
            "request {i} got another's answer"
        );
        assert_eq!(stats.images, 2);
    }
    assert_eq!(engine.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_images_are_handled_or_rejected_clearly() {
    let engine = engine();
    for (w, h) in [(1, 1), (4000, 100), (100, 4000), (13, 7), (1920, 1080)] {
        let (_, stats) = drain(engine.submit(request(vec![frame(w, h, 7, 0)], 2)).unwrap()).await;
        let stats = stats.unwrap_or_else(|e| panic!("{w}x{h}: {e}"));
        assert_eq!(stats.image_tokens, 64, "{w}x{h} fits one slice");
    }
    let empty = Frame {
        image: Image::Rgb(Rgb {
            width: 0,
            height: 0,
            data: Vec::new().into(),
        }),
        pts: Duration::ZERO,
    };
    let (_, err) = drain(engine.submit(request(vec![empty], 2)).unwrap()).await;
    assert!(
        matches!(&err, Err(EngineError::BadRequest(m)) if m.contains("frame 0")),
        "{err:?}"
    );
    let broken = Frame {
        image: Image::Jpeg(Jpeg {
            width: 10,
            height: 10,
            bytes: bytes::Bytes::from_static(b"\xff\xd8 not a jpeg"),
        }),
        pts: Duration::ZERO,
    };
    let (_, err) = drain(engine.submit(request(vec![broken], 2)).unwrap()).await;
    assert!(
        matches!(&err, Err(EngineError::BadRequest(m)) if m.contains("JPEG")),
        "{err:?}"
    );
    // The engine is still fine.
    let (_, ok) = drain(
        engine
            .submit(request(vec![frame(64, 64, 9, 0)], 2))
            .unwrap(),
    )
    .await;
    assert!(ok.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_larger_than_the_context_is_refused() {
    let files = tiny();
    let mut config = LlamaConfig::new(&files.llm, &files.mmproj);
    config.threads = Some(1);
    config.context_size = 256;
    let engine = LlamaEngine::load(config).unwrap();
    let frames = (0..8).map(|i| frame(448, 448, i, i as u64 * 500)).collect();
    let (_, err) = drain(engine.submit(request(frames, 8)).unwrap()).await;
    assert!(
        matches!(&err, Err(EngineError::BadRequest(m)) if m.contains("--context-size")),
        "{err:?}"
    );
}

fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn bad_model_files_give_one_clear_error() {
    let files = tiny();
    let dir = tempfile::tempdir().unwrap();
    let llm = std::fs::read(&files.llm).unwrap();
    let truncated = write(dir.path(), "truncated.gguf", &llm[..llm.len() / 2]);
    let garbage = write(dir.path(), "garbage.gguf", b"definitely not a model");
    let cases = [
        (
            ModelFiles {
                llm: dir.path().join("missing.gguf"),
                mmproj: files.mmproj.clone(),
            },
            "cannot open",
        ),
        (
            ModelFiles {
                llm: truncated,
                mmproj: files.mmproj.clone(),
            },
            "is truncated",
        ),
        (
            ModelFiles {
                llm: garbage,
                mmproj: files.mmproj.clone(),
            },
            "GGUF magic",
        ),
        (
            ModelFiles {
                llm: files.mmproj.clone(),
                mmproj: files.mmproj.clone(),
            },
            "is a vision projector, not an LLM",
        ),
        (
            ModelFiles {
                llm: files.llm.clone(),
                mmproj: files.llm.clone(),
            },
            "is not a vision projector",
        ),
    ];
    for (pair, expected) in cases {
        let err = check_pair(&pair).unwrap_err().to_string();
        assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
    check_pair(files).unwrap();
}
