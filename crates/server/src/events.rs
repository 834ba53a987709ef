//! The commentary as it happens. Per stream, `/api/streams/{id}/stream` (Server-Sent
//! Events) and `/api/streams/{id}/ws` (WebSocket) carry that stream's JSON events, one per
//! message; `/api/events` carries every stream's, each with a `stream` field, so a page
//! showing many streams holds one connection.
//!
//! Each client reads its own broadcast receiver. A client too slow for the buffer loses
//! the oldest events and carries on from the newest (a `lagged` notice says how many);
//! the `cycle_end` event repeats the whole text, so the page heals itself. A stream's
//! clients end when the stream is removed.

use std::convert::Infallible;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::Response;
use futures::{stream, Stream};
use kibitz_commentator::Event;
use kibitz_stream::{Output, OutputContext, StreamEvent};
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use crate::state::{Meters, Target};
use crate::AppState;

/// Largest WebSocket message (and frame) from a client allowed to change settings: a
/// selection is well under it. Bigger ones close the socket (1009) before they are kept.
pub(crate) const MAX_MESSAGE: usize = 64 * 1024;

/// Largest message from a client that may not change anything: every message it sends is
/// rejected unread, so it gets no room to make the server hold much.
const MAX_MESSAGE_READ_ONLY: usize = 1024;

/// A ping this often keeps a quiet socket's path open and finds peers that vanished.
const PING_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

type EventStream = std::pin::Pin<Box<dyn Stream<Item = Result<sse::Event, Infallible>> + Send>>;
type SseStream = Sse<sse::KeepAliveStream<EventStream>>;

/// `?sound=on`: the client plays the stream's speech clips, so it counts as a listener
/// (speech is synthesized only while someone listens).
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct Listen {
    sound: Option<String>,
}

impl Listen {
    fn attach(&self, handle: &kibitz_stream::StreamHandle) -> Option<OutputContext> {
        matches!(self.sound.as_deref(), Some("on" | "1" | "true"))
            .then(|| handle.attach(Listener, now()))
    }
}

/// A page with its sound on: it plays the speech clips itself, so this output only counts
/// it (as [`kibitz_stream::speech::LISTENER`]) for as long as its connection lasts, which
/// keeps the stream's speaker running.
struct Listener;

impl Output for Listener {
    type Running = OutputContext;

    fn name(&self) -> &'static str {
        kibitz_stream::speech::LISTENER
    }

    fn build(self, cx: OutputContext) -> OutputContext {
        cx
    }
}

/// Per-stream events as Server-Sent Events, one output per client.
struct SseEvents {
    state: AppState,
    listening: Option<OutputContext>,
}

impl Output for SseEvents {
    type Running = EventStream;

    fn name(&self) -> &'static str {
        "sse"
    }

    fn build(self, cx: OutputContext) -> EventStream {
        let events = stream::unfold(
            (cx, self.state, self.listening),
            |(mut cx, state, listening)| async move {
                let item = tokio::select! {
                    _ = state.shutdown().cancelled() => return None,
                    _ = cx.stopped.cancelled() => return None,
                    item = cx.events.recv() => item,
                };
                let message = match item {
                    Ok(event) => {
                        let value = serde_json::to_value(&event).expect("events serialize");
                        sse_message(&value)
                    }
                    Err(RecvError::Lagged(skipped)) => lagged(&state, skipped),
                    Err(RecvError::Closed) => return None,
                };
                Some((Ok(message), (cx, state, listening)))
            },
        );
        Box::pin(events)
    }
}

/// Per-stream events over a WebSocket, one output per client; runs once upgraded.
struct WsEvents {
    state: AppState,
    may_change: bool,
}

impl Output for WsEvents {
    type Running = WsSession;

    fn name(&self) -> &'static str {
        "ws"
    }

    fn build(self, cx: OutputContext) -> WsSession {
        WsSession {
            cx,
            state: self.state,
            may_change: self.may_change,
        }
    }
}

struct WsSession {
    cx: OutputContext,
    state: AppState,
    may_change: bool,
}

/// `GET /api/streams/{id}/stream[?sound=on]`.
pub(crate) async fn stream(
    State(state): State<AppState>,
    Target(handle): Target,
    Query(listen): Query<Listen>,
) -> SseStream {
    let listening = listen.attach(&handle);
    let events = handle.attach(SseEvents { state, listening }, now());
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// `GET /api/events`: every stream's events, tagged, and streams coming and going.
pub(crate) async fn bus(State(state): State<AppState>) -> SseStream {
    let _counted = BusClient::new(&state);
    let receiver = state.streams().subscribe();
    let events = stream::unfold(
        (receiver, state, _counted),
        |(mut receiver, state, counted): (broadcast::Receiver<StreamEvent>, _, _)| async move {
            let item = tokio::select! {
                _ = state.shutdown().cancelled() => return None,
                item = receiver.recv() => item,
            };
            let message = match item {
                Ok(event) => sse_message(&event.to_json()),
                Err(RecvError::Lagged(skipped)) => lagged(&state, skipped),
                Err(RecvError::Closed) => return None,
            };
            Some((Ok(message), (receiver, state, counted)))
        },
    );
    Sse::new(Box::pin(events) as EventStream).keep_alive(KeepAlive::default())
}

/// `GET /api/streams/{id}/ws[?sound=on]`.
pub(crate) async fn ws(
    upgrade: WebSocketUpgrade,
    State(state): State<AppState>,
    Target(handle): Target,
    Query(listen): Query<Listen>,
    headers: HeaderMap,
) -> Response {
    // Decided before the upgrade: a browser's WebSocket carries the session cookie, not a
    // header the page could set later. The message cap follows, so a client without the
    // token cannot make the server buffer anything big.
    let may_change = state.shared().access.is_authorized(&headers);
    let cap = if may_change {
        MAX_MESSAGE
    } else {
        MAX_MESSAGE_READ_ONLY
    };
    let session = handle.attach(WsEvents { state, may_change }, now());
    let listening = listen.attach(&handle);
    let upgrade = upgrade.max_message_size(cap).max_frame_size(cap);
    upgrade.on_upgrade(move |socket| async move {
        session.run(socket).await;
        drop(listening);
    })
}

/// Sends every event as a JSON text message; takes `{"profile"?, "instruction"?}`
/// messages and answers each with `{"type":"selection",..}` or
/// `{"type":"rejected","reason":..}`.
impl WsSession {
    async fn run(self, socket: WebSocket) {
        let WsSession {
            cx,
            state,
            may_change,
        } = self;
        session(socket, state, cx, may_change).await;
    }
}

async fn session(mut socket: WebSocket, state: AppState, mut a: OutputContext, may_change: bool) {
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.reset();
    loop {
        let outgoing = tokio::select! {
            _ = ping.tick() => {
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
                continue;
            }
            _ = state.shutdown().cancelled() => break,
            _ = a.stopped.cancelled() => break,
            item = a.events.recv() => match item {
                Ok(event) => wire(&event),
                Err(RecvError::Lagged(skipped)) => {
                    state.count(|m: &Meters| &m.lagged);
                    json!({ "type": "lagged", "skipped": skipped }).to_string()
                }
                Err(RecvError::Closed) => break,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    reply(&state, &a, text.as_str(), may_change).await
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                // Pings are answered by the library; binary messages mean nothing here.
                Some(Ok(_)) => continue,
            },
        };
        if socket.send(Message::Text(outgoing.into())).await.is_err() {
            return;
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}

async fn reply(state: &AppState, a: &OutputContext, text: &str, may_change: bool) -> String {
    if !may_change {
        return json!({
            "type": "rejected",
            "reason": "changes need the token: sign in first (POST /api/session)",
        })
        .to_string();
    }
    match crate::api::apply_selection_message(state, a.handle.id().as_str(), text).await {
        Ok(summary) => json!({
            "type": "selection",
            "profile": summary.profile,
            "instruction": summary.instruction,
        })
        .to_string(),
        Err(e) => json!({ "type": "rejected", "reason": e.to_string() }).to_string(),
    }
}

fn wire(event: &Event) -> String {
    serde_json::to_string(event).expect("events serialize to JSON")
}

fn sse_message(value: &Value) -> sse::Event {
    let kind = value
        .get("type")
        .and_then(|t| t.as_str())
        .unwrap_or("event");
    sse::Event::default().event(kind).data(value.to_string())
}

fn lagged(state: &AppState, skipped: u64) -> sse::Event {
    state.count(|m: &Meters| &m.lagged);
    sse::Event::default()
        .event("lagged")
        .data(json!({ "skipped": skipped }).to_string())
}

/// Counts an `/api/events` client while it is connected.
struct BusClient(AppState);

impl BusClient {
    fn new(state: &AppState) -> BusClient {
        state.count(|m: &Meters| &m.bus_clients);
        BusClient(state.clone())
    }
}

impl Drop for BusClient {
    fn drop(&mut self) {
        self.0
            .shared()
            .meters
            .bus_clients
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Tokio's clock, so tests with paused time drive the pacing.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}
