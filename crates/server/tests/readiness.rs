//! A first run: the engine's model is still downloading when the server starts. The
//! picture is served at once, `/healthz` says alive, `/readyz` and the status say what the
//! engine waits for; the commentary waits (no failed cycles) and starts once the engine is
//! there.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::http::Request;
use axum::Router;
use kibitz_engine::fake::FakeEngine;
use kibitz_engine::models::Transfer;
use kibitz_engine::{Engine, EngineInfo, EngineSlot, Readiness, ReadyState};
use kibitz_server::fake::{Harness, Options};
use serde_json::Value;
use tower::ServiceExt;

/// Generous: CI machines are small and busy.
const WAIT: Duration = Duration::from_secs(30);

async fn get(router: &Router, path: &str) -> (u16, Vec<u8>) {
    let request = Request::get(path).body(Body::empty()).unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, body.to_vec())
}

async fn get_json(router: &Router, path: &str) -> (u16, Value) {
    let (status, body) = get(router, path).await;
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (status, json)
}

/// Polls `/api/status` until `check` holds, or fails after [`WAIT`].
async fn status_until(router: &Router, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, status) = get_json(router, "/api/status").await;
        if code == 200 && check(&status) {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: {what}; last status {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_picture_comes_at_once_and_the_commentary_when_the_engine_is_there() {
    let slot = Arc::new(EngineSlot::new(EngineInfo {
        kind: "llama".into(),
        model: "owner/model".into(),
        backend: "not loaded".into(),
    }));
    let harness = Harness::with(Options {
        engine_override: Some(slot.clone()),
        ..Options::default()
    })
    .await;
    let router = harness.router();

    let (code, body) = get(&router, "/healthz").await;
    assert_eq!((code, body.as_slice()), (200, b"ok\n".as_slice()));
    slot.set(Readiness::downloading(Transfer {
        file: "model-Q4_K_M.gguf".into(),
        index: 1,
        files: 2,
        bytes: 1 << 20,
        total: 4 << 20,
        bytes_per_s: (1 << 20) as f64,
        eta_s: Some(3.0),
    }));
    let (code, ready) = get_json(&router, "/readyz").await;
    assert_eq!(code, 503, "{ready}");
    assert_eq!(ready["ready"], false);
    assert_eq!(ready["state"], "downloading");
    assert_eq!(ready["download"]["bytes"], 1 << 20);
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .starts_with("downloading model-Q4_K_M.gguf (file 1 of 2): 1.00 MiB of 4.00 MiB"),
        "{ready}"
    );

    // The picture does not wait for the engine.
    let status = status_until(&router, "a frame", |s| {
        s["buffers"]["display_frames"].as_u64().unwrap_or(0) > 0
    })
    .await;
    assert_eq!(status["engine"]["readiness"]["state"], "downloading");
    let (code, jpeg) = get(&router, "/api/streams/s1/frame").await;
    assert_eq!(code, 200);
    assert_eq!(&jpeg[..2], [0xFF, 0xD8], "a JPEG");
    let (_, list) = get_json(&router, "/api/streams").await;
    assert_eq!(list["engine"]["readiness"]["state"], "downloading");

    // The commentary waits for the engine rather than failing cycles.
    tokio::time::sleep(Duration::from_millis(600)).await; // three intervals
    let (_, status) = get_json(&router, "/api/status").await;
    assert_eq!(
        status["commentary"]["phase"], "waiting_for_engine",
        "{status}"
    );
    assert_eq!(status["commentary"]["cycles_failed"], 0, "{status}");
    assert_eq!(status["commentary"]["cycles_done"], 0, "{status}");

    slot.set(Readiness::new(ReadyState::Loading, "loading the model"));
    let (code, ready) = get_json(&router, "/readyz").await;
    assert_eq!((code, &ready["state"]), (503, &Value::from("loading")));

    let engine = FakeEngine::saying(
        "a ball rolls",
        Duration::from_millis(20),
        Duration::from_millis(5),
    );
    slot.fill(Arc::new(engine.clone()));
    harness.streams.scheduler().wake();
    assert!(slot.is_ready());
    let (code, ready) = get_json(&router, "/readyz").await;
    assert_eq!(
        (code, &ready["ready"]),
        (200, &Value::from(true)),
        "{ready}"
    );
    let status = status_until(&router, "a comment", |s| {
        s["commentary"]["cycles_done"].as_u64().unwrap_or(0) > 0
    })
    .await;
    assert_eq!(status["engine"]["readiness"]["state"], "ready");
    assert_eq!(status["engine"]["kind"], "fake");
    assert_eq!(status["commentary"]["cycles_failed"], 0, "{status}");
    assert!(!engine.requests().is_empty());
}
