//! `kibitz selftest`: proves an install works without downloading anything, by building a
//! tiny random-weight model of MiniCPM-o 4.5's layout and running the real engine on it.
//! Random weights make gibberish, so the checks are on structure and stats, never wording.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kibitz_engine::{Engine, Frame, Image, Output, Request, Stats};
use kibitz_frames::Rgb;
use kibitz_synthetic_model::{write_pair, write_pair_with_progress, Quant, Spec};

use crate::flags::{EngineArgs, MakeTestModelArgs, ModelSize, SelftestArgs};

pub async fn run(args: SelftestArgs) -> anyhow::Result<ExitCode> {
    let temp;
    let dir = match &args.keep {
        Some(dir) => dir.clone(),
        None => {
            temp = tempdir()?;
            temp.0.clone()
        }
    };
    let pair = write_pair(&dir, &Spec::tiny())
        .with_context(|| format!("cannot write the tiny model into '{}'", dir.display()))?;
    println!(
        "tiny model: {} + {}",
        pair.llm.display(),
        pair.mmproj.display()
    );

    let engine_args = EngineArgs {
        model: dir.display().to_string(),
        threads: args.threads,
        gpu_layers: args.gpu_layers,
        ..default_engine_args()
    };
    let engine = crate::engine::build(&engine_args).await?;
    println!("backend: {}", engine.info().backend);

    let mut failures = Vec::new();
    one_request(&engine, &mut failures).await?;
    two_streams(&engine, &mut failures).await?;

    if let Some(dir) = &args.keep {
        println!(
            "kept the tiny model in {} (use it with --model {})",
            dir.display(),
            dir.display()
        );
    }
    if failures.is_empty() {
        println!("PASS");
        Ok(ExitCode::SUCCESS)
    } else {
        for f in &failures {
            println!("failed check: {f}");
        }
        println!("FAIL");
        Ok(ExitCode::FAILURE)
    }
}

/// One request of 4 frames: counts, times and a bounded answer; then the same system prompt
/// again, which must come from the cache.
async fn one_request(engine: &Arc<dyn Engine>, failures: &mut Vec<String>) -> anyhow::Result<()> {
    let frames: Vec<Frame> = (0..4)
        .map(|i| Frame {
            image: Image::Rgb(test_frame(448, 448, i)),
            pts: Duration::from_millis(500 * i as u64),
        })
        .collect();
    let (pieces, stats) = ask(engine, frames.clone()).await?;
    println!("answer: {:?}", pieces.concat());
    println!("[{}] {stats}", engine.info().backend);
    check(
        failures,
        stats.images == 4,
        format!("4 images counted, got {}", stats.images),
    );
    check(
        failures,
        stats.image_tokens == 4 * 64,
        format!("4 x 64 image tokens, got {}", stats.image_tokens),
    );
    check(
        failures,
        stats.generated_tokens > 0,
        "at least one generated token".into(),
    );
    check(
        failures,
        stats.generated_tokens <= 16,
        format!("at most 16 tokens, got {}", stats.generated_tokens),
    );
    check(
        failures,
        stats.vision_ms > 0.0 && stats.prefill_ms > 0.0,
        "vision and prefill times measured".into(),
    );
    check(
        failures,
        stats.total_ms >= stats.vision_ms + stats.prefill_ms,
        "total covers vision + prefill".into(),
    );

    // The same system prompt again: its KV entries must be reused.
    let (_, again) = ask(engine, frames).await?;
    check(
        failures,
        again.cached_tokens > 0,
        format!(
            "system prompt reused from the cache, {} tokens",
            again.cached_tokens
        ),
    );
    Ok(())
}

/// Two streams at once through the scheduler, frames pushed ahead: both answer, and each
/// finds its pushed frames already in its sequence.
async fn two_streams(engine: &Arc<dyn Engine>, failures: &mut Vec<String>) -> anyhow::Result<()> {
    let scheduler = kibitz_engine::Scheduler::new(engine.clone());
    let runs: Vec<_> = (0..2u32)
        .map(|s| {
            let session = scheduler.open_session(&format!("selftest{s}"));
            tokio::spawn(async move {
                let frames: Vec<Frame> = (0..4)
                    .map(|i| Frame {
                        image: Image::Rgb(test_frame(448, 252, 10 * s + i)),
                        pts: Duration::from_millis(500 * u64::from(i)),
                    })
                    .collect();
                for f in &frames {
                    session.push_frame(f.clone());
                }
                let mut request =
                    Request::new(frames, "You are a live commentator.", "What is new?");
                request.max_tokens = 8;
                let turn = session
                    .turn(kibitz_engine::Priority::Commentary, None)
                    .await?;
                let answer = turn.submit(request)?.collect().await;
                session.close();
                anyhow::Ok(answer?.1)
            })
        })
        .collect();
    for (s, run) in runs.into_iter().enumerate() {
        let stats = tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .context("two streams at once took over 2 minutes")???;
        println!("[stream {s} of 2] {stats}");
        check(
            failures,
            stats.generated_tokens > 0,
            format!("stream {s} of 2 answered"),
        );
    }
    Ok(())
}

fn check(failures: &mut Vec<String>, ok: bool, what: String) {
    if !ok {
        failures.push(what);
    }
}

async fn ask(engine: &Arc<dyn Engine>, frames: Vec<Frame>) -> anyhow::Result<(Vec<String>, Stats)> {
    let mut request = Request::new(frames, "You are a live commentator.", "What is happening?");
    request.max_tokens = 16;
    let mut generation = engine.submit(request)?;
    let mut pieces = Vec::new();
    loop {
        match generation
            .next()
            .await
            .context("the engine stopped without an answer")??
        {
            Output::Text(t) => pieces.push(t),
            Output::Done(stats) => return Ok((pieces, stats)),
        }
    }
}

/// A gradient with a bright square that moves with `step`, so frames differ.
pub fn test_frame(width: u32, height: u32, step: u32) -> Rgb {
    let mut data = vec![0u8; (width * height * 3) as usize];
    let side = (width.min(height) / 4).max(1);
    let x0 = (step * side / 2) % width.max(1);
    for y in 0..height {
        for x in 0..width {
            let i = ((y * width + x) * 3) as usize;
            let inside = x >= x0 && x < x0 + side && y >= height / 3 && y < height / 3 + side;
            data[i] = if inside {
                250
            } else {
                (x * 255 / width.max(1)) as u8
            };
            data[i + 1] = if inside {
                240
            } else {
                (y * 255 / height.max(1)) as u8
            };
            data[i + 2] = if inside { 40 } else { 128 };
        }
    }
    Rgb {
        width,
        height,
        data: data.into(),
    }
}

/// Engine flags at their defaults, for commands that build an engine themselves.
pub fn default_engine_args() -> EngineArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Defaults {
        #[command(flatten)]
        engine: EngineArgs,
    }
    Defaults::parse_from(["kibitz"]).engine
}

/// A temporary folder removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> anyhow::Result<TempDir> {
    let dir = std::env::temp_dir().join(format!("kibitz-selftest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create '{}'", dir.display()))?;
    Ok(TempDir(dir))
}

pub async fn make_test_model(args: MakeTestModelArgs) -> anyhow::Result<ExitCode> {
    let quant = match args
        .quant
        .as_deref()
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        None => None,
        Some("Q4_K_M") => Some(Quant::Q4_K_M),
        Some("Q8_0") => Some(Quant::Q8_0),
        Some("F16") => Some(Quant::F16),
        Some("F32") => Some(Quant::F32),
        Some(other) => anyhow::bail!("--quant {other} is not one of Q4_K_M, Q8_0, F16, F32"),
    };
    let spec = match args.size {
        ModelSize::Tiny => Spec {
            quant: quant.unwrap_or(Spec::tiny().quant),
            ..Spec::tiny()
        },
        ModelSize::Full => Spec::minicpm_o_4_5(quant.unwrap_or(Quant::Q4_K_M)),
    };
    let dir = args.dir.clone();
    let started = std::time::Instant::now();
    let pair = tokio::task::spawn_blocking(move || {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "writing {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("valid template"),
        );
        let result = write_pair_with_progress(&dir, &spec, &mut |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        });
        bar.finish_and_clear();
        result
    })
    .await??;
    let size = |p: &PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) as f64 / 1e6;
    println!(
        "wrote {} ({:.1} MB) and {} ({:.1} MB) in {:.1} s",
        pair.llm.display(),
        size(&pair.llm),
        pair.mmproj.display(),
        size(&pair.mmproj),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
