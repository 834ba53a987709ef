//! Nothing kept: a stream added and removed 50 times through the API leaves no stream
//! state, task, thread or descriptor behind. Alone in its binary, so no other test's
//! threads or descriptors count.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use kibitz_server::fake::{Harness, Options};
use tower::ServiceExt;

const WAIT: Duration = Duration::from_secs(30);

fn entries(dir: &str) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
struct Counts {
    tasks: usize,
    threads: usize,
    descriptors: usize,
}

fn counts() -> Counts {
    Counts {
        tasks: tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
        threads: entries("/proc/self/task"),
        descriptors: entries("/proc/self/fd"),
    }
}

async fn call(router: &axum::Router, method: Method, path: &str, body: Option<&str>) -> StatusCode {
    let request = Request::builder().method(method).uri(path);
    let request = match body {
        Some(body) => request
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string())),
        None => request.body(Body::empty()),
    };
    router
        .clone()
        .oneshot(request.unwrap())
        .await
        .unwrap()
        .status()
}

/// One round: add `tmp` through the API, let it run a moment, remove it. The handle it
/// had, weakly held, is returned.
async fn round(harness: &Harness, router: &axum::Router) -> kibitz_stream::WeakStreamHandle {
    let added = call(
        router,
        Method::POST,
        "/api/streams",
        Some(r#"{"source": "rtsp://127.0.0.1:9/cam", "id": "tmp"}"#),
    )
    .await;
    assert_eq!(added, StatusCode::CREATED);
    let weak = harness.stream("tmp").downgrade();
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(
        call(router, Method::DELETE, "/api/streams/tmp", None).await,
        StatusCode::NO_CONTENT
    );
    weak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_streams_added_and_removed_leave_nothing_behind() {
    let harness = Harness::with(Options {
        history: true,
        ..Options::default()
    })
    .await;
    let router = harness.router();
    // The first round makes what is made once (the blocking pool's threads, say).
    round(&harness, &router).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = counts();
    let mut handles = Vec::new();
    for _ in 0..50 {
        handles.push(round(&harness, &router).await);
    }
    assert_eq!(harness.streams.len(), 1);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let alive = handles.iter().filter(|w| w.upgrade().is_some()).count();
        let now = counts();
        let flat = now.tasks <= before.tasks
            && now.threads <= before.threads
            && now.descriptors <= before.descriptors;
        if alive == 0 && flat {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after 50 rounds: {alive} removed streams still held; {now:?}, before {before:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
