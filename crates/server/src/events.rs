//! The commentary as it happens: `/api/stream` (Server-Sent Events) and `/api/ws`
//! (WebSocket) carry the same JSON events, one per message.
//!
//! Each client reads its own broadcast receiver. A client too slow for the broadcast
//! buffer loses the oldest events and carries on from the newest (a `lagged` notice says
//! how many); the `cycle_end` event repeats the whole text, so the page heals itself.

use std::convert::Infallible;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::Response;
use futures::{stream, Stream};
use kibitz_commentator::Event;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use crate::state::{Change, Client};
use crate::AppState;

pub(crate) async fn stream(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<sse::Event, Infallible>>> {
    let connected = state.connected(Client::Sse);
    let events = state.shared().events.subscribe();
    let stream = stream::unfold(
        (events, state, connected),
        |(mut events, state, connected)| async move {
            let item = tokio::select! {
                _ = state.shutdown().cancelled() => return None,
                item = events.recv() => item,
            };
            let message = match item {
                Ok(event) => {
                    let (kind, data) = wire(&event);
                    sse::Event::default().event(kind).data(data)
                }
                Err(RecvError::Lagged(skipped)) => {
                    state
                        .shared()
                        .meters
                        .lagged
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    sse::Event::default()
                        .event("lagged")
                        .data(json!({ "skipped": skipped }).to_string())
                }
                Err(RecvError::Closed) => return None,
            };
            Some((Ok(message), (events, state, connected)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

pub(crate) async fn ws(upgrade: WebSocketUpgrade, State(state): State<AppState>) -> Response {
    upgrade.on_upgrade(move |socket| session(socket, state))
}

/// Sends every event as a JSON text message; takes `{"profile"?, "instruction"?}` messages
/// and answers each with `{"type":"selection",..}` or `{"type":"rejected","reason":..}`.
async fn session(mut socket: WebSocket, state: AppState) {
    let _connected = state.connected(Client::Ws);
    let mut events = state.shared().events.subscribe();
    loop {
        let outgoing = tokio::select! {
            _ = state.shutdown().cancelled() => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
            item = events.recv() => match item {
                Ok(event) => wire(&event).1,
                Err(RecvError::Lagged(skipped)) => {
                    state.shared().meters.lagged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    json!({ "type": "lagged", "skipped": skipped }).to_string()
                }
                Err(RecvError::Closed) => return,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => reply(&state, text.as_str()),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                // Pings are answered by the library; binary messages mean nothing here.
                Some(Ok(_)) => continue,
            },
        };
        if socket.send(Message::Text(outgoing.into())).await.is_err() {
            return;
        }
    }
}

fn reply(state: &AppState, text: &str) -> String {
    let applied = serde_json::from_str::<Change>(text)
        .map_err(|e| crate::ApiError::BadRequest(format!("not a change request: {e}")))
        .and_then(|change| state.apply(change));
    match applied {
        Ok(selection) => json!({
            "type": "selection",
            "profile": selection.profile,
            "instruction": selection.instruction,
        })
        .to_string(),
        Err(e) => json!({ "type": "rejected", "reason": e.to_string() }).to_string(),
    }
}

/// The event's `type` tag and its JSON.
fn wire(event: &Event) -> (String, String) {
    let value = serde_json::to_value(event).expect("events serialize to JSON");
    let kind = value
        .get("type")
        .and_then(|t| t.as_str())
        .unwrap_or("event")
        .to_string();
    (kind, value.to_string())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::{header, Request, StatusCode};
    use futures::{SinkExt, StreamExt};
    use kibitz_commentator::{Control, CycleEnd};
    use tokio_tungstenite::tungstenite;
    use tower::ServiceExt;

    use super::*;
    use crate::fake::Harness;

    fn cycle_end(cycle: u64, text: &str) -> Event {
        Event::CycleEnd(CycleEnd {
            cycle,
            text: text.into(),
            skipped: false,
            frames: vec![1.0, 2.0],
            latency: 1.5,
            inference_ms: 900.0,
            target_delay: 4.0,
            first_token_latency: None,
        })
    }

    /// Reads SSE frames from a body until `count` events (not comments) are seen.
    async fn read_sse(body: Body, count: usize) -> Vec<(String, serde_json::Value)> {
        let mut stream = body.into_data_stream();
        let mut text = String::new();
        let mut events = Vec::new();
        while events.len() < count {
            let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("SSE event in time")
                .expect("stream open")
                .unwrap();
            text.push_str(std::str::from_utf8(&chunk).unwrap());
            while let Some(end) = text.find("\n\n") {
                let block: String = text.drain(..end + 2).collect();
                let field = |name: &str| {
                    block
                        .lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(str::to_string)
                };
                if let (Some(kind), Some(data)) = (field("event: "), field("data: ")) {
                    events.push((kind, serde_json::from_str(&data).unwrap()));
                }
            }
        }
        events
    }

    #[tokio::test]
    async fn sse_carries_events_named_by_type() {
        let harness = Harness::new();
        let response = harness
            .router()
            .oneshot(Request::get("/api/stream").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        // The handler subscribed before returning, so nothing sent from here is lost.
        harness
            .events
            .send(Event::Token {
                cycle: 7,
                text: " ball".into(),
            })
            .unwrap();
        harness.events.send(cycle_end(7, "a ball")).unwrap();
        let events = read_sse(response.into_body(), 2).await;
        assert_eq!(events[0].0, "token");
        assert_eq!(events[0].1["text"], " ball");
        assert_eq!(events[1].0, "cycle_end");
        assert_eq!(events[1].1["text"], "a ball");
        assert_eq!(events[1].1["type"], "cycle_end");
    }

    #[tokio::test]
    async fn a_lagging_sse_client_skips_ahead() {
        let harness = Harness::with_capacity(4);
        let response = harness
            .router()
            .oneshot(Request::get("/api/stream").body(Body::empty()).unwrap())
            .await
            .unwrap();
        for cycle in 0..10 {
            harness
                .events
                .send(cycle_end(cycle, &format!("comment {cycle}")))
                .unwrap();
        }
        let events = read_sse(response.into_body(), 5).await;
        assert_eq!(events[0].0, "lagged");
        assert_eq!(events[0].1["skipped"], 6);
        let cycles: Vec<_> = events[1..]
            .iter()
            .map(|(_, e)| e["cycle"].as_u64().unwrap())
            .collect();
        assert_eq!(cycles, [6, 7, 8, 9]);
    }

    #[tokio::test]
    async fn sse_ends_on_shutdown() {
        let harness = Harness::new();
        let response = harness
            .router()
            .oneshot(Request::get("/api/stream").body(Body::empty()).unwrap())
            .await
            .unwrap();
        harness.state.shutdown().cancel();
        let mut body = response.into_body().into_data_stream();
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            while body.next().await.is_some() {}
        })
        .await;
        assert!(end.is_ok(), "the SSE stream stayed open after shutdown");
    }

    type Socket = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    /// The next text message, as JSON.
    async fn next_json(socket: &mut Socket) -> serde_json::Value {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
                .await
                .expect("a message in time")
                .expect("socket open")
                .unwrap();
            if let tungstenite::Message::Text(text) = message {
                return serde_json::from_str(text.as_str()).unwrap();
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn websocket_carries_events_and_takes_changes() {
        let mut harness = Harness::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(crate::serve(listener, harness.state.clone()));
        let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/api/ws"))
            .await
            .unwrap();

        // The session subscribes after the upgrade; keep sending until one arrives.
        let sender = harness.events.clone();
        let pusher = tokio::spawn(async move {
            loop {
                let _ = sender.send(cycle_end(3, "a dog runs"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let event = next_json(&mut socket).await;
        pusher.abort();
        assert_eq!(event["type"], "cycle_end");
        assert_eq!(event["text"], "a dog runs");

        socket
            .send(tungstenite::Message::text(r#"{"profile":"sports"}"#))
            .await
            .unwrap();
        let reply = loop {
            let message = next_json(&mut socket).await;
            if message["type"] != "cycle_end" {
                break message;
            }
        };
        assert_eq!(reply["type"], "selection");
        assert_eq!(reply["profile"], "sports");
        let control = tokio::time::timeout(Duration::from_secs(10), harness.controls.recv())
            .await
            .unwrap();
        assert_eq!(control, Some(Control::SetProfile("sports".into())));

        socket
            .send(tungstenite::Message::text(r#"{"profile":"opera"}"#))
            .await
            .unwrap();
        let reply = next_json(&mut socket).await;
        assert_eq!(reply["type"], "rejected");
        assert!(
            reply["reason"]
                .as_str()
                .unwrap()
                .contains("unknown profile 'opera'"),
            "{reply}"
        );

        harness.state.shutdown().cancel();
        tokio::time::timeout(Duration::from_secs(30), server)
            .await
            .expect("serve returns")
            .unwrap()
            .unwrap();
    }
}
