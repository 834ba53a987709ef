//! `kibitz bench`: times commentary cycles the way the live loop runs them: a few frames,
//! a system prompt that stays the same between cycles (so its KV entries are reused), a
//! user text that changes, and a fixed number of generated tokens (end-of-sequence ignored,
//! so every cycle does the same work whatever the weights say).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kibitz_engine::{Engine, Frame, Image, Request, Stats};

use crate::flags::BenchArgs;
use crate::selftest::test_frame;

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.cycles > 0, "--cycles must be at least 1");
    anyhow::ensure!(
        args.frames > 0 && args.frame_size >= 14,
        "--frames must be at least 1 and --frame-size at least 14"
    );
    let engine = crate::engine::build(&args.engine).await?;
    if let Some(cycles) = args.live {
        return live(engine, cycles, args.generate, args.json).await;
    }
    let info = engine.info();
    eprintln!(
        "bench: {} on {}, {} cycles after {} warm-up",
        info.model, info.backend, args.cycles, args.warmup
    );

    // ~1 token a word for a real BPE vocabulary; the count used is reported from the stats.
    let system = padded_system_prompt(args.prompt_tokens.saturating_sub(40));
    let mut all = Vec::new();
    for cycle in 0..args.warmup + args.cycles {
        // The window slides by `new_frames` a cycle; the frames it shares with the last
        // cycle are the same frames (same time, same pixels), as in the live loop.
        let first = cycle * args.new_frames.unwrap_or(args.frames);
        let frames = (first..first + args.frames)
            .map(|i| Frame {
                image: Image::Rgb(test_frame(args.frame_size, args.frame_size, i as u32)),
                pts: Duration::from_millis(i as u64 * 1000),
            })
            .collect();
        let user = format!(
            "Your last comment was: \"The runner in red takes the lead at cycle {cycle}.\" Do not repeat it. \
             What is new in these frames? One short sentence."
        );
        let mut request = Request::new(frames, system.clone(), user);
        request.max_tokens = args.generate;
        request.ignore_eos = true;
        request.sampling.seed = cycle as u32;
        let (_, stats) = engine
            .submit(request)?
            .collect()
            .await
            .context("a bench cycle failed")?;
        if cycle >= args.warmup {
            all.push(stats);
        }
    }
    let report = Report::new(&all);
    println!("{}", report.table(&info.backend, &all[0], args.generate));
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(ExitCode::SUCCESS)
}

fn padded_system_prompt(words: usize) -> String {
    let base = "You are a live sports commentator watching a video stream. You see the last few seconds as \
                frames in time order. Say in one short sentence what is new. If nothing changed, answer '...'. ";
    let filler = "Keep the tone lively and precise, name colours, positions and movements, avoid guessing names. ";
    let mut s = String::from(base);
    while s.split_whitespace().count() < words {
        s.push_str(filler);
    }
    s
}

#[derive(Debug, serde::Serialize)]
struct Percentiles {
    p50: f64,
    p95: f64,
    mean: f64,
}

impl Percentiles {
    fn of(mut values: Vec<f64>) -> Percentiles {
        values.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
        Percentiles {
            p50: at(0.5),
            p95: at(0.95),
            mean: values.iter().sum::<f64>() / values.len() as f64,
        }
    }
}

#[derive(Debug, serde::Serialize)]
struct Report {
    cycles: usize,
    vision_ms: Percentiles,
    prefill_ms: Percentiles,
    decode_ms: Percentiles,
    first_token_ms: Percentiles,
    total_ms: Percentiles,
    decode_tokens_per_s: Percentiles,
}

impl Report {
    fn new(all: &[Stats]) -> Report {
        let of = |f: fn(&Stats) -> f64| Percentiles::of(all.iter().map(f).collect());
        Report {
            cycles: all.len(),
            vision_ms: of(|s| s.vision_ms),
            prefill_ms: of(|s| s.prefill_ms),
            decode_ms: of(|s| s.decode_ms),
            first_token_ms: of(|s| s.first_token_ms),
            total_ms: of(|s| s.total_ms),
            decode_tokens_per_s: of(|s| s.decode_tokens_per_s),
        }
    }

    fn table(&self, backend: &str, sample: &Stats, generate: u32) -> String {
        let row = |name: &str, p: &Percentiles| {
            format!(
                "| {name:<22} | {:>9.1} | {:>9.1} | {:>9.1} |\n",
                p.p50, p.p95, p.mean
            )
        };
        let mut t = format!(
            "{backend}: {} cycles of {} images ({} image tokens, {} images reused from the last cycle) + {} text prompt tokens ({} of them reused) + {generate} generated\n\n",
            self.cycles,
            sample.images,
            sample.image_tokens,
            sample.reused_images,
            sample.prompt_tokens - sample.image_tokens,
            sample.cached_tokens,
        );
        t.push_str("| stage                  |       p50 |       p95 |      mean |\n");
        t.push_str("|------------------------|-----------|-----------|-----------|\n");
        t.push_str(&row("vision encode (ms)", &self.vision_ms));
        t.push_str(&row("prefill (ms)", &self.prefill_ms));
        t.push_str(&row("decode (ms)", &self.decode_ms));
        t.push_str(&row("first token (ms)", &self.first_token_ms));
        t.push_str(&row("total cycle (ms)", &self.total_ms));
        t.push_str(&row("decode (tokens/s)", &self.decode_tokens_per_s));
        t
    }
}

/// The real commentary loop (default settings) on a synthetic source that captures a new
/// 448x252 frame every 0.5 s: what a viewer waits from a picture to the first word about it.
async fn live(
    engine: Arc<dyn Engine>,
    cycles: usize,
    generate: u32,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use kibitz_commentator::{Commentator, CommentatorConfig, Event};
    use kibitz_frames::{InferenceWindow, Stamp};

    let window = Arc::new(InferenceWindow::new(32));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let source = {
        let (window, stop) = (window.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            for i in 0u32.. {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let stamp = Stamp {
                    pts: Duration::from_millis(500 * u64::from(i)),
                    captured: Instant::now(),
                };
                window.push(stamp, test_frame(448, 252, i));
            }
        })
    };
    let config = CommentatorConfig {
        max_tokens: generate,
        ..CommentatorConfig::default()
    };
    let commentator = Commentator::new(config, Instant::now())?;
    let (events, mut rx) = tokio::sync::broadcast::channel(1024);
    let (snapshot, _) = tokio::sync::watch::channel(commentator.snapshot());
    let (_controls, controls_rx) = tokio::sync::mpsc::channel(1);
    let run = tokio::spawn(kibitz_commentator::run(
        commentator,
        window,
        kibitz_engine::Scheduler::new(engine.clone(), 1).open_session("bench"),
        events,
        controls_rx,
        snapshot,
        shutdown.clone(),
    ));
    let mut ends = Vec::new();
    while ends.len() < cycles {
        match rx.recv().await {
            Ok(Event::CycleEnd(end)) => ends.push(end),
            Ok(Event::Error { message, .. }) => anyhow::bail!("a live cycle failed: {message}"),
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(e) => anyhow::bail!("the commentary loop stopped: {e}"),
        }
    }
    shutdown.cancel();
    let _ = tokio::join!(run, source);
    let first = Percentiles::of(
        ends.iter()
            .filter_map(|e| e.first_token_latency)
            .map(|s| s * 1e3)
            .collect(),
    );
    let end = Percentiles::of(ends.iter().map(|e| e.latency * 1e3).collect());
    let age = Percentiles::of(
        ends.iter()
            .map(|e| e.latency * 1e3 - e.inference_ms)
            .collect(),
    );
    let inference = Percentiles::of(ends.iter().map(|e| e.inference_ms).collect());
    let row = |name: &str, p: &Percentiles| {
        format!(
            "| {name:<28} | {:>9.1} | {:>9.1} | {:>9.1} |\n",
            p.p50, p.p95, p.mean
        )
    };
    let mut t = format!(
        "{}: live loop, {} cycles, frames at 2 fps, up to {generate} tokens\n\n",
        engine.info().backend,
        ends.len()
    );
    t.push_str("| ms                           |       p50 |       p95 |      mean |\n");
    t.push_str("|------------------------------|-----------|-----------|-----------|\n");
    t.push_str(&row("newest frame -> first token", &first));
    t.push_str(&row("newest frame -> answer end", &end));
    t.push_str(&row("frame age at cycle start", &age));
    t.push_str(&row("cycle (engine)", &inference));
    println!("{t}");
    if json {
        println!(
            "{}",
            serde_json::json!({ "first_token": first, "answer_end": end, "frame_age": age, "inference": inference })
        );
    }
    Ok(ExitCode::SUCCESS)
}
