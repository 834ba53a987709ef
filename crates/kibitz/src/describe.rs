//! `kibitz describe FILE...`: the engine on still images, text streamed to stdout.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use kibitz_engine::{Frame, Image, Output, Request};

use crate::flags::DescribeArgs;

pub async fn run(args: DescribeArgs) -> anyhow::Result<ExitCode> {
    // Read the images first: a typo in a file name should not cost a model load.
    let mut frames = Vec::with_capacity(args.files.len());
    for (i, path) in args.files.iter().enumerate() {
        let rgb = kibitz_media::load_image(path)?;
        // Still images have no capture time; space them a second apart, in the given order.
        frames.push(Frame {
            image: Image::Rgb(rgb),
            pts: Duration::from_secs(i as u64),
        });
    }
    let engine = crate::engine::build(&args.engine).await?;
    let mut request = Request::new(frames, args.system.clone(), args.prompt.clone());
    request.sampling = crate::engine::sampling(&args.sampling);
    request.max_tokens = args.sampling.max_tokens;
    let mut generation = engine.submit(request)?;

    let mut stdout = std::io::stdout().lock();
    let mut text = String::new();
    let stats = loop {
        match generation
            .next()
            .await
            .context("the engine stopped without an answer")??
        {
            Output::Text(piece) => {
                if !args.json {
                    stdout.write_all(piece.as_bytes())?;
                    stdout.flush()?;
                }
                text.push_str(&piece);
            }
            Output::Done(stats) => break stats,
        }
    };
    let info = engine.info();
    if args.json {
        let out = serde_json::json!({ "text": text, "stats": stats, "engine": info });
        writeln!(stdout, "{out}")?;
    } else {
        writeln!(stdout)?;
        eprintln!("[{}] {stats}", info.backend);
    }
    Ok(ExitCode::SUCCESS)
}
