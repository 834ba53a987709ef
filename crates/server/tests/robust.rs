//! Nothing lost, nothing kept: a comment is in the history before any viewer sees it, and
//! a stream added and removed many times leaves nothing behind.

use std::time::Duration;

use kibitz_commentator::Event;
use kibitz_server::fake::{Harness, Options};

/// Generous: CI machines are small and busy.
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_comment_is_committed_to_the_history_before_a_viewer_sees_it() {
    let harness = Harness::with(Options::default()).await;
    let history = kibitz_history::History::in_memory().unwrap();
    harness.streams.record_history(history.clone());
    let mut events = harness.stream("s1").subscribe();
    let mut seen = 0usize;
    let mut first = true;
    while seen < 6 {
        let event = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("a cycle within the wait")
            .expect("the stream runs");
        let Event::CycleEnd(end) = event else {
            continue;
        };
        if end.skipped {
            continue;
        }
        // The first may have been on its way while the history was set.
        if std::mem::take(&mut first) {
            continue;
        }
        seen += 1;
        // No flush: what a viewer was shown must already be committed, as a `kill -9`
        // now would leave it.
        let kept = history.last("s1", 100).await.unwrap();
        assert!(
            kept.len() >= seen,
            "{seen} comments shown after the first, {} in the history",
            kept.len()
        );
    }
}

#[tokio::test]
async fn on_shutdown_sse_ends_and_a_websocket_gets_close_code_1001() {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::Message;

    let harness = Harness::with(Options::default()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(kibitz_server::serve(listener, harness.state.clone()));
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/api/streams/s1/ws"))
            .await
            .unwrap();
    let sse = reqwest::get(format!("http://{addr}/api/streams/s1/stream"))
        .await
        .unwrap();
    assert!(sse.status().is_success());
    // Both are live before the stop.
    tokio::time::timeout(WAIT, socket.next())
        .await
        .expect("an event")
        .unwrap()
        .unwrap();
    harness.state.shutdown().cancel();
    let code = loop {
        match tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("a close frame")
        {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| f.code),
            Some(Ok(_)) => continue,
            other => panic!("the socket ended without a close frame: {other:?}"),
        }
    };
    assert_eq!(code, Some(CloseCode::Away));
    // The SSE body ends cleanly (no error), and so does the server.
    let body = tokio::time::timeout(WAIT, sse.bytes())
        .await
        .expect("the SSE end");
    assert!(body.is_ok(), "{body:?}");
    tokio::time::timeout(WAIT, server)
        .await
        .expect("serve returns")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn healthz_means_alive_even_while_the_engine_cannot_serve() {
    use tower::ServiceExt;
    // An OpenAI-compatible upstream that nothing listens on: the engine is not healthy.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config =
        kibitz_engine::openai::OpenAiConfig::new([format!("http://127.0.0.1:{port}/v1")]);
    config.model = Some("m".into());
    let engine = kibitz_engine::openai::OpenAiEngine::new(config).unwrap();
    assert!(!kibitz_engine::Engine::health(&engine).await);
    let harness = Harness::with(Options {
        engine_override: Some(std::sync::Arc::new(engine)),
        ..Options::default()
    })
    .await;
    let request = axum::http::Request::get("/healthz")
        .body(axum::body::Body::empty())
        .unwrap();
    let response = harness.router().oneshot(request).await.unwrap();
    assert_eq!(response.status(), axum::http::StatusCode::OK);
}
