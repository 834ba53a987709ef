//! `kibitz bench`: times commentary cycles the way the live loop runs them: a few frames,
//! a system prompt that stays the same between cycles (so its KV entries are reused), a
//! user text that changes, and a fixed number of generated tokens (end-of-sequence ignored,
//! so every cycle does the same work whatever the weights say).
//!
//! `--live` runs the real commentary loop on one synthetic source; `--streams 1,2,4` runs
//! N of them at once on one engine, through the scheduler, one session each, as `serve`
//! does, and reports per-stream cycle rates and latencies for each N.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kibitz_commentator::{CommentatorConfig, ConfigError};
use kibitz_engine::{Engine, Frame, Image, Request, Stats};

use crate::flags::{flag, BenchArgs, CommentaryArgs};
use crate::selftest::test_frame;

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.cycles > 0, "--cycles must be at least 1");
    anyhow::ensure!(
        args.frames > 0 && args.frame_size >= 14,
        "--frames must be at least 1 and --frame-size at least 14"
    );
    if args.print_prompt {
        return print_prompt(&args);
    }
    if !args.streams.is_empty() {
        return streams(&args).await;
    }
    let live_config = match args.live {
        Some(_) => Some(live_config(&args.commentary, args.generate)?),
        None => None,
    };
    let engine = crate::engine::build(&args.engine).await?;
    if let (Some(cycles), Some(config)) = (args.live, live_config) {
        return live(
            engine,
            cycles,
            config,
            args.commentary.capture_fps,
            args.json,
        )
        .await;
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

/// `--live`'s loop from the shared commentary flags, up to `generate` tokens an answer.
/// Checked by the commentator's own rules (this build may lack the stream crate that
/// `serve` checks with; the rules and their words are the same), named by flag.
fn live_config(c: &CommentaryArgs, generate: u32) -> anyhow::Result<CommentatorConfig> {
    use kibitz_commentator::{check_capture_fps, check_cycle_timeout, check_interval};
    let mut problems: Vec<ConfigError> = [
        check_capture_fps(c.capture_fps),
        check_interval(c.inference_interval),
        check_cycle_timeout(c.cycle_timeout),
    ]
    .into_iter()
    .filter_map(Result::err)
    .collect();
    if problems.is_empty() {
        let config = CommentatorConfig {
            frames_per_inference: c.frames_per_inference,
            frame_stride: c.frame_stride,
            interval: Duration::from_secs_f64(c.inference_interval),
            max_tokens: generate,
            cycle_timeout: Duration::from_secs_f64(c.cycle_timeout),
            profile: c.profile.clone(),
            instruction: c.instruction.clone(),
            scene_change_threshold: c.scene_change_threshold,
            ..CommentatorConfig::default()
        };
        match config.validate() {
            Ok(()) => return Ok(config),
            Err(e) => problems.extend(e.problems().into_iter().cloned()),
        }
    }
    let lines: Vec<String> = problems
        .iter()
        .map(|p| format!("{}: {p}", flag(p.field())))
        .collect();
    anyhow::bail!("{}", lines.join("\nkibitz: "))
}

/// The real commentary loop on a synthetic source that captures a new 448x252 frame
/// `fps` times a second: what a viewer waits from a picture to the first word about it.
async fn live(
    engine: Arc<dyn Engine>,
    cycles: usize,
    config: CommentatorConfig,
    fps: f64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use kibitz_commentator::{Commentator, Event};
    use kibitz_frames::{InferenceWindow, Stamp};

    let window = Arc::new(InferenceWindow::new(32));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let source = {
        let (window, stop) = (window.clone(), shutdown.clone());
        tokio::spawn(async move {
            let period = Duration::from_secs_f64(1.0 / fps);
            let mut tick = tokio::time::interval(period);
            for i in 0u32.. {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let stamp = Stamp {
                    pts: period * i,
                    captured: Instant::now(),
                };
                window.push(stamp, test_frame(448, 252, i));
            }
        })
    };
    let generate = config.max_tokens;
    let commentator = Commentator::new(config, Instant::now())?;
    let (events, mut rx) = tokio::sync::broadcast::channel(1024);
    let (snapshot, _) = tokio::sync::watch::channel(commentator.snapshot());
    let (_controls, controls_rx) = tokio::sync::mpsc::channel(1);
    let run = tokio::spawn(kibitz_commentator::run(
        commentator,
        window,
        kibitz_engine::Scheduler::new(engine.clone()).open_session("bench"),
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
        "{}: live loop, {} cycles, frames at {fps} fps, up to {generate} tokens\n\n",
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

/// What one stream saw during the measured seconds.
#[derive(Default)]
struct StreamTally {
    cycles: usize,
    first_token_ms: Vec<f64>,
    cycle_ms: Vec<f64>,
    pieces: usize,
    errors: usize,
}

/// `--streams`: for each N, N live commentary loops (interval 0) on N synthetic sources
/// sharing one engine through the scheduler.
///
/// A source captures a 448x252 frame every 0.5 s; the loop samples every second capture
/// (stride 2), so the bench keeps the sampled set on a fixed phase as a stream does: the
/// sampled captures (one a second) go into the inference window and, unless `--serial`,
/// are pushed to the engine as they arrive, and the loop samples that set with stride 1.
async fn streams(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.streams.iter().all(|&n| n > 0),
        "--streams takes counts of at least 1"
    );
    let mut backend = String::new();
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for &n in &args.streams {
        // An engine sized for N streams each time: the KV cache holds N sequences.
        let engine = streams_engine(args, n).await?;
        let info = engine.info();
        if backend.is_empty() {
            eprintln!(
                "bench: {} on {}, {} engine, streams {:?}, {} s each after {} s warm-up",
                info.model,
                info.backend,
                if args.serial { "serial" } else { "batched" },
                args.streams,
                args.seconds,
                args.warmup
            );
        }
        backend = info.backend;
        let tallies = run_streams(engine.clone(), n, args).await?;
        // STEP PROFILE (issue 14, item 1): the engine's step breakdown comes through
        // `status()` ("steps"). When the llama engine's config gains a synchronising
        // profile (`profile_sync`: GPU time apart from host time, n_kv, graph rebuilds,
        // shifts a second), `streams_engine` sets it from a bench flag; it then reaches
        // scripts/gpu-bench.sh in this N's JSON line below, under "engine".
        let status = engine.status();
        eprintln!("engine steps for {n} streams: {status}");
        drop(engine);
        let all = |f: fn(&StreamTally) -> &Vec<f64>| -> Vec<f64> {
            tallies.iter().flat_map(|t| f(t).iter().copied()).collect()
        };
        let rates: Vec<f64> = tallies
            .iter()
            .map(|t| t.cycles as f64 / args.seconds as f64)
            .collect();
        let first = all(|t| &t.first_token_ms);
        let cycle = all(|t| &t.cycle_ms);
        let pieces: usize = tallies.iter().map(|t| t.pieces).sum();
        let errors: usize = tallies.iter().map(|t| t.errors).sum();
        let min_rate = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let mean_rate = rates.iter().sum::<f64>() / n as f64;
        let p = |v: Vec<f64>| (!v.is_empty()).then(|| Percentiles::of(v));
        let (first, cycle) = (p(first), p(cycle));
        let cell = |p: &Option<Percentiles>| match p {
            Some(p) => format!("{:>7.0} / {:>7.0}", p.p50, p.p95),
            None => "      - / -      ".into(),
        };
        let row = format!(
            "| {n:>7} | {mean_rate:>6.2} ({min_rate:>4.2}) | {} | {} | {:>8.0} | {errors:>6} |",
            cell(&first),
            cell(&cycle),
            pieces as f64 / args.seconds as f64,
        );
        let line = serde_json::json!({
            "streams": n, "cycles_per_s_mean": mean_rate, "cycles_per_s_min": min_rate,
            "first_token_ms": first, "cycle_ms": cycle,
            "decode_tokens_per_s": pieces as f64 / args.seconds as f64, "errors": errors,
        });
        // Each N as soon as it is measured, so a later N that fails (out of memory, say)
        // costs only its own row: the table row on stderr, the JSON line on stdout.
        eprintln!("bench: {n} streams: {row}");
        if args.json {
            let mut with_engine = line.clone();
            with_engine["engine"] = status;
            println!("bench-streams {with_engine}");
        }
        rows.push(row);
        json.push(line);
    }
    println!(
        "{}: {} engine, live loops at interval 0, up to {} tokens a cycle\n",
        backend,
        if args.serial { "serial" } else { "batched" },
        args.generate
    );
    println!("| streams | cycles/s per stream (min) | newest frame -> first token ms p50 / p95 | cycle ms p50 / p95 | tokens/s (all) | errors |");
    println!("|---------|------------------|-------------------|-------------------|----------|--------|");
    for row in rows {
        println!("{row}");
    }
    if args.json {
        println!("{}", serde_json::to_string(&json)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// The prompt text `--streams` sends each cycle, as JSON, so a client that drives another
/// server (scripts/peer-client.py) sends exactly the same words: `system`, the `first`
/// cycle's question and the `next` ones' with `{last}` where the previous answer goes.
/// Frames are labelled by the engine (`Frame at 12.0s: <image>`), not here.
fn print_prompt(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let profile = kibitz_commentator::Profiles::get(kibitz_commentator::DEFAULT_PROFILE)?;
    let question = |last: Option<&str>| {
        if args.long_question {
            // The bench's frames are a second apart, so 4 of them span 3 seconds.
            profile.user_prompt(args.frames, (args.frames as f64 - 1.0).max(0.0), last, "")
        } else {
            profile.cue(last, "")
        }
    };
    let prompt = serde_json::json!({
        "system": profile.system_prompt(),
        "first": question(None),
        "next": question(Some("{last}")),
    });
    println!("{prompt}");
    Ok(ExitCode::SUCCESS)
}

async fn run_streams(
    engine: Arc<dyn Engine>,
    n: usize,
    args: &BenchArgs,
) -> anyhow::Result<Vec<StreamTally>> {
    use kibitz_commentator::{Commentator, CommentatorConfig, Event};
    use kibitz_frames::{InferenceWindow, Stamp};

    let engine: Arc<dyn Engine> = if args.serial {
        Arc::new(Serial(engine))
    } else {
        engine
    };
    let scheduler = kibitz_engine::Scheduler::new(engine);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let measure_from = started + Duration::from_secs(args.warmup as u64);
    let measure_to = measure_from + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    let mut tallies = Vec::new();
    for i in 0..n {
        let window = Arc::new(InferenceWindow::new(32));
        let session = scheduler.open_session(&format!("bench{i}"));
        let source = {
            let (window, stop, session) = (window.clone(), shutdown.clone(), session.clone());
            let push = !args.serial;
            tokio::spawn(async move {
                // Streams start a little apart, as real ones do.
                tokio::time::sleep(Duration::from_millis(37 * i as u64 % 500)).await;
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                for k in 0u32.. {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    if k % 2 == 1 {
                        continue; // not in the sampled set
                    }
                    let pts = Duration::from_millis(500 * u64::from(k));
                    let rgb = test_frame(448, 252, k + 1000 * i as u32);
                    if push {
                        session.push_frame(Frame {
                            image: Image::Rgb(rgb.clone()),
                            pts,
                        });
                    }
                    window.push(
                        Stamp {
                            pts,
                            captured: Instant::now(),
                        },
                        rgb,
                    );
                }
            })
        };
        let config = CommentatorConfig {
            max_tokens: args.generate,
            interval: Duration::ZERO,
            frame_stride: 1,
            scene_change_threshold: 0.0,
            short_question: !args.long_question,
            ..CommentatorConfig::default()
        };
        let commentator = Commentator::new(config, Instant::now())?;
        let (events, mut rx) = tokio::sync::broadcast::channel(1024);
        let (snapshot, _) = tokio::sync::watch::channel(commentator.snapshot());
        let (controls, controls_rx) = tokio::sync::mpsc::channel(1);
        let run = tokio::spawn(kibitz_commentator::run(
            commentator,
            window,
            session,
            events,
            controls_rx,
            snapshot,
            shutdown.clone(),
        ));
        let tally = tokio::spawn(async move {
            let _controls = controls;
            let mut t = StreamTally::default();
            loop {
                let event = match tokio::time::timeout_at(measure_to.into(), rx.recv()).await {
                    Err(_) => break,
                    Ok(Ok(e)) => e,
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => continue,
                    Ok(Err(_)) => break,
                };
                if Instant::now() < measure_from {
                    continue;
                }
                match event {
                    Event::Token { .. } => t.pieces += 1,
                    Event::CycleEnd(end) if !end.skipped => {
                        t.cycles += 1;
                        t.cycle_ms.push(end.inference_ms);
                        if let Some(s) = end.first_token_latency {
                            t.first_token_ms.push(s * 1e3);
                        }
                    }
                    Event::Error { .. } => t.errors += 1,
                    _ => {}
                }
            }
            t
        });
        tasks.push((source, run));
        tallies.push(tally);
    }
    let mut out = Vec::new();
    for tally in tallies {
        out.push(tally.await?);
    }
    shutdown.cancel();
    for (source, run) in tasks {
        let _ = tokio::join!(source, run);
    }
    Ok(out)
}

/// `--serial`: the same engine saying it takes one request at a time, so the scheduler in
/// front runs them one after another (the engine before batching).
struct Serial(Arc<dyn Engine>);

impl Engine for Serial {
    fn submit(
        &self,
        request: Request,
    ) -> Result<kibitz_engine::Generation, kibitz_engine::EngineError> {
        self.0.submit(request)
    }
    fn submit_for(
        &self,
        stream: &kibitz_engine::StreamKey,
        priority: kibitz_engine::Priority,
        request: Request,
    ) -> Result<kibitz_engine::Generation, kibitz_engine::EngineError> {
        self.0.submit_for(stream, priority, request)
    }
    fn close_stream(&self, stream: &kibitz_engine::StreamKey) {
        self.0.close_stream(stream)
    }
    fn info(&self) -> kibitz_engine::EngineInfo {
        self.0.info()
    }
    fn in_flight(&self) -> usize {
        self.0.in_flight()
    }
    fn health(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
        self.0.health()
    }
    fn status(&self) -> serde_json::Value {
        self.0.status()
    }
    fn parallelism(&self) -> usize {
        1
    }
}

/// The engine for `--streams`: the llama engine sized for the largest N (one KV sequence a
/// stream), or whatever `--engine` builds.
async fn streams_engine(args: &BenchArgs, most: usize) -> anyhow::Result<Arc<dyn Engine>> {
    #[cfg(feature = "llama")]
    if args.engine.engine == crate::flags::EngineKind::Llama {
        use crate::flags::FlashAttn;
        use kibitz_engine::llama::{FlashAttention, LlamaConfig, LlamaEngine};
        let e = &args.engine;
        let files = kibitz_engine::models::resolve(&crate::engine::model_query(e)).await?;
        let mut config = LlamaConfig::new(files.llm, files.mmproj);
        config.gpu_layers = e.gpu_layers;
        // Per stream: derived from the system prompt, 4 frames, the question and the answer
        // unless --context-size says otherwise.
        config.context_size = e.context_size.unwrap_or(0);
        config.profile_sync = args.profile_sync;
        config.share_system = !args.no_share_system;
        config.lazy_shifts = !args.eager_shifts;
        config.threads = e.threads;
        config.max_slices = e.max_slice_nums;
        config.max_streams = most as u32;
        config.kv_unified = !args.kv_split;
        config.flash_attention = match e.flash_attn {
            FlashAttn::Auto => FlashAttention::Auto,
            FlashAttn::On => FlashAttention::On,
            FlashAttn::Off => FlashAttention::Off,
        };
        if let Some(spec) = &e.gpus {
            let choice = crate::engine::parse_gpus(spec).map_err(anyhow::Error::msg)?;
            let gpus = crate::engine::resolve_gpus(&choice, &LlamaEngine::gpus())
                .map_err(anyhow::Error::msg)?;
            config.max_streams = most.div_ceil(gpus.len()) as u32;
            let replicas =
                tokio::task::spawn_blocking(move || LlamaEngine::load_replicas(&config, &gpus))
                    .await
                    .context("the model loader stopped")??;
            return Ok(Arc::new(replicas));
        }
        let engine = tokio::task::spawn_blocking(move || LlamaEngine::load(config))
            .await
            .context("the model loader stopped")??;
        return Ok(Arc::new(engine));
    }
    let _ = most;
    crate::engine::build(&args.engine).await
}
