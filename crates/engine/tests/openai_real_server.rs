//! The `openai` engine against a real OpenAI-compatible server that someone started by hand
//! (see docs/deploy.md, "Real-server check"). Ignored by default: it needs that server.
//!
//! ```sh
//! KIBITZ_OPENAI_URL=http://127.0.0.1:8000/v1 \
//!     cargo test -p kibitz-engine --test openai_real_server -- --ignored --nocapture
//! ```

use std::time::Duration;

use kibitz_engine::openai::{OpenAiConfig, OpenAiEngine};
use kibitz_engine::{Engine, Frame, Image, Output, Request};
use kibitz_frames::Rgb;

/// A 448x448 picture (one slice for MiniCPM-o), a gradient that moves with `t`.
fn frame(t: u32) -> Frame {
    let size = 448u32;
    let data: Vec<u8> = (0..size * size)
        .flat_map(|i| {
            let (x, y) = (i % size, i / size);
            [((x + 40 * t) % 256) as u8, (y % 256) as u8, 128]
        })
        .collect();
    Frame {
        image: Image::Rgb(Rgb {
            width: size,
            height: size,
            data: data.into(),
        }),
        pts: Duration::from_millis(500 * u64::from(t)),
    }
}

#[tokio::test]
#[ignore = "needs a running OpenAI-compatible server: set KIBITZ_OPENAI_URL (docs/deploy.md)"]
async fn describe_through_a_real_server() {
    let url = std::env::var("KIBITZ_OPENAI_URL").expect(
        "set KIBITZ_OPENAI_URL to a running server's base URL, e.g. one started as docs/deploy.md's \
         'Real-server check' describes",
    );
    let mut config = OpenAiConfig::new([url]);
    config.model = std::env::var("KIBITZ_OPENAI_MODEL").ok();
    // CPU servers on a shared machine are slow to start answering.
    config.first_token_timeout = Duration::from_secs(300);
    config.total_timeout = Duration::from_secs(600);
    let engine = OpenAiEngine::connect(config)
        .await
        .expect("the server lists a model");
    println!("engine: {:?}", engine.info());
    assert!(engine.health().await, "the server answers GET /models");

    let mut request = Request::new(
        (0..2).map(frame).collect(),
        "You are a sports commentator. One short sentence.",
        "What happens in these frames?",
    );
    request.max_tokens = 16;
    // A random-weight model may pick end-of-text first; ask for a fixed length.
    request.ignore_eos = true;
    let mut generation = engine.submit(request).unwrap();
    let mut pieces = Vec::new();
    let stats = loop {
        match generation
            .next()
            .await
            .expect("the answer ended without Done")
        {
            Ok(Output::Text(t)) => pieces.push(t),
            Ok(Output::Done(stats)) => break stats,
            Err(e) => panic!("the request failed: {e}"),
        }
    };
    println!("text: {:?}", pieces.concat());
    println!("stats: {stats:?}");
    println!("status: {}", engine.status());
    assert!(stats.generated_tokens > 0, "{stats:?}");
    assert_eq!(stats.images, 2);
    assert!(stats.total_ms >= stats.first_token_ms);
}
