//! A new kind of output plugs into a stream without a line of the product changed: the
//! outputs here exist only in this test, are built from the stream's context, run while
//! they should, and are counted by their own names in status and `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::http::Request;
use kibitz_server::fake::Harness;
use kibitz_stream::{Output, OutputContext, StreamHandle, StreamOutput, Task};
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;
use tower::ServiceExt;

/// An output the stream runs itself: counts the events it sees.
#[derive(Clone)]
struct Counting {
    name: &'static str,
    events: Arc<AtomicU64>,
}

impl Output for Counting {
    type Running = Task;

    fn name(&self) -> &'static str {
        self.name
    }

    fn build(self, mut cx: OutputContext) -> Task {
        Box::pin(async move {
            loop {
                tokio::select! {
                    _ = cx.stopped.cancelled() => return,
                    event = cx.events.recv() => match event {
                        Ok(_) => { self.events.fetch_add(1, Ordering::Relaxed); }
                        Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => return,
                    },
                }
            }
        })
    }
}

/// An output a client attaches: it holds its context and looks at the delayed picture.
struct Peek;

impl Output for Peek {
    type Running = OutputContext;

    fn name(&self) -> &'static str {
        "peek"
    }

    fn build(self, cx: OutputContext) -> OutputContext {
        cx
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get_text(harness: &Harness, path: &str) -> String {
    let request = Request::get(path).body(Body::empty()).unwrap();
    let response = harness.router().oneshot(request).await.unwrap();
    let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
    String::from_utf8(body.to_vec()).unwrap()
}

fn running(handle: &StreamHandle, name: &str) -> u64 {
    handle.status().running(name)
}

#[tokio::test]
async fn a_new_output_kind_is_built_run_and_counted_by_its_name() {
    let harness = Harness::new().await;
    let stream = harness.stream("s1");
    let seen = Arc::new(AtomicU64::new(0));
    harness.streams.add_output(StreamOutput::new(Counting {
        name: "counting",
        events: seen.clone(),
    }));
    eventually("the counting output runs and sees the commentary", || {
        running(&stream, "counting") == 1 && seen.load(Ordering::Relaxed) > 0
    })
    .await;

    let status: Value = serde_json::from_str(&get_text(&harness, "/api/streams/s1/status").await)
        .expect("status is JSON");
    assert_eq!(status["outputs"]["counting"]["running"], 1, "{status}");
    assert_eq!(
        status["outputs"]["counting"]["per_stream"], true,
        "{status}"
    );
    let metrics = get_text(&harness, "/metrics").await;
    assert!(
        metrics.contains("kibitz_outputs{stream=\"s1\",output=\"counting\"} 1"),
        "{metrics}"
    );

    // A client's output: counted while held, its pictures counted under its name.
    let mut peek = stream.attach(Peek, tokio::time::Instant::now().into_std());
    assert_eq!(running(&stream, "peek"), 1);
    assert_eq!(
        stream.status().viewers(),
        1,
        "a client's output is a viewer"
    );
    let mut shown = 0;
    for _ in 0..500 {
        shown += u64::from(peek.show(tokio::time::Instant::now().into_std()).is_some());
        if shown >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(shown >= 2, "the picture reaches the output");
    assert_eq!(stream.status().frames_sent("peek"), shown);
    drop(peek);
    assert_eq!(running(&stream, "peek"), 0);

    // Removing the stream ends its outputs before `remove` returns.
    harness.streams.remove("s1").await.unwrap();
    assert_eq!(running(&stream, "counting"), 0);
}

#[tokio::test]
async fn an_output_on_demand_runs_only_while_its_clients_are_attached() {
    let harness = Harness::new().await;
    let stream = harness.stream("s1");
    let seen = Arc::new(AtomicU64::new(0));
    harness.streams.add_output(
        StreamOutput::new(Counting {
            name: "counting_for_peek",
            events: seen.clone(),
        })
        .while_attached(&["peek"]),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(running(&stream, "counting_for_peek"), 0, "nobody asked");
    assert_eq!(seen.load(Ordering::Relaxed), 0);

    for round in 0..2 {
        let first = stream.attach(Peek, tokio::time::Instant::now().into_std());
        let second = stream.attach(Peek, tokio::time::Instant::now().into_std());
        eventually("it starts with the first client", || {
            running(&stream, "counting_for_peek") == 1
        })
        .await;
        let before = seen.load(Ordering::Relaxed);
        eventually("it sees the stream's events while it runs", || {
            seen.load(Ordering::Relaxed) > before
        })
        .await;
        drop(first);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            running(&stream, "counting_for_peek"),
            1,
            "round {round}: one is left"
        );
        drop(second);
        eventually("it stops with the last", || {
            running(&stream, "counting_for_peek") == 0
        })
        .await;
    }
    assert!(
        seen.load(Ordering::Relaxed) > 0,
        "it saw events while it ran"
    );
}
