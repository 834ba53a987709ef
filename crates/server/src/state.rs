//! What the handlers share: the pipeline seen through small traits and channels, the
//! viewer's current choice of profile and instruction, and counters for status and metrics.
//!
//! The server owns no pipeline stage. It reads the display buffer through [`DisplayFeed`],
//! the source and buffers through [`StatusReport`], the engine through
//! [`kibitz_engine::Engine`], and talks to the commentary loop only through channels, so
//! the binary wires real types in and tests wire fakes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use kibitz_commentator::{Control, Event};
use kibitz_engine::Engine;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{ApiError, ServerError};

/// Longest instruction a viewer may give, in characters.
pub const MAX_INSTRUCTION_CHARS: usize = 2000;

/// How many recent cycle latencies `/api/status` lists.
const RECENT_LATENCIES: usize = 20;

/// One picture of the display buffer: the frame stores' own type, so the binary hands
/// frames over without copying fields.
pub use kibitz_frames::DisplayFrame;

/// The display buffer as the server needs it. Calls must be cheap and never block for
/// long: every MJPEG viewer calls [`DisplayFeed::at`] once per frame period.
pub trait DisplayFeed: Send + Sync + 'static {
    /// The newest frame (real time); `None` before the first.
    fn latest(&self) -> Option<DisplayFrame>;
    /// The frame that was newest at `t` on this process's clock: the last one whose
    /// `stamp.captured <= t`. When `t` is older than everything kept, the oldest frame
    /// (a delay longer than the buffer then shows the most delayed picture there is) or
    /// `None` (no picture until time catches up). `None` when empty.
    fn at(&self, t: Instant) -> Option<DisplayFrame>;
    /// The source's frame rate, when known.
    fn fps(&self) -> Option<f64>;
}

/// The source and the frame stores, for `/api/status` and `/metrics`. The commentary
/// counters are not asked for: the server tallies them from the events.
pub trait StatusReport: Send + Sync + 'static {
    fn pipeline(&self) -> PipelineStatus;
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PipelineStatus {
    pub source: SourceStatus,
    pub buffers: BufferStatus,
    /// Anything else worth showing; left out of the JSON when null.
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SourceStatus {
    /// What the user passed (a path or URL, credentials removed).
    pub name: String,
    /// `connecting`, `live`, `reconnecting`, `ended` or `failed`.
    pub state: String,
    /// Why, in words (the last error, say).
    pub detail: Option<String>,
    /// Seconds until the next reconnect attempt, while reconnecting.
    pub retry_in: Option<f64>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Frames decoded since start.
    pub frames: u64,
    pub reconnects: u64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct BufferStatus {
    pub display_frames: usize,
    /// Seconds of picture the display buffer holds.
    pub display_seconds: f64,
    pub display_bytes: usize,
    pub window_frames: usize,
    pub window_capacity: usize,
}

/// The prompt profile and free-text instruction in use.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Selection {
    pub profile: String,
    pub instruction: String,
}

/// A viewer's change request, as `POST /api/instruction` and `/api/ws` take it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Change {
    pub profile: Option<String>,
    pub instruction: Option<String>,
}

/// Everything [`AppState::new`] needs; the binary builds one from the running pipeline.
pub struct Parts {
    pub display: Arc<dyn DisplayFeed>,
    /// The commentary loop's events; each SSE/WebSocket client subscribes.
    pub events: broadcast::Sender<Event>,
    /// To the commentary loop. Full means the loop is behind: the request gets 429.
    pub controls: mpsc::Sender<Control>,
    /// The current target delay in seconds (how late the picture is shown).
    pub delay: watch::Receiver<f64>,
    pub status: Arc<dyn StatusReport>,
    pub engine: Arc<dyn Engine>,
    /// Profile names a viewer may choose, in the order the page lists them.
    pub profiles: Vec<String>,
    /// What the loop starts with.
    pub selection: Selection,
    /// MJPEG rate when the source's is unknown (`MJPEG_FPS`).
    pub mjpeg_fps: f64,
    /// Cancelled to stop the server: streams end and `serve` returns.
    pub shutdown: CancellationToken,
}

/// The one state every handler gets. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub display: Arc<dyn DisplayFeed>,
    pub events: broadcast::Sender<Event>,
    pub controls: mpsc::Sender<Control>,
    pub delay: watch::Receiver<f64>,
    pub status: Arc<dyn StatusReport>,
    pub engine: Arc<dyn Engine>,
    pub profiles: Vec<String>,
    pub selection: Mutex<Selection>,
    pub mjpeg_fps: f64,
    pub shutdown: CancellationToken,
    pub tally: Mutex<Tally>,
    pub meters: Meters,
    pub started: Instant,
}

/// Commentary counters, kept from the events so no stage has to report them.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct Tally {
    pub cycles: u64,
    pub skipped: u64,
    pub errors: u64,
    pub last_latency: Option<f64>,
    pub last_inference_ms: Option<f64>,
    /// Newest last.
    pub latencies: VecDeque<f64>,
    #[serde(skip)]
    pub latency_sum: f64,
    #[serde(skip)]
    pub inference_ms_sum: f64,
    pub last_comment: Option<String>,
    pub last_error: Option<String>,
}

impl Tally {
    fn record(&mut self, event: &Event) {
        match event {
            Event::CycleEnd(end) => {
                self.cycles += 1;
                if end.skipped {
                    self.skipped += 1;
                } else {
                    self.last_comment = Some(end.text.clone());
                }
                self.last_latency = Some(end.latency);
                self.last_inference_ms = Some(end.inference_ms);
                self.latency_sum += end.latency;
                self.inference_ms_sum += end.inference_ms;
                if self.latencies.len() == RECENT_LATENCIES {
                    self.latencies.pop_front();
                }
                self.latencies.push_back(end.latency);
            }
            Event::Error { message, .. } => {
                self.errors += 1;
                self.last_error = Some(message.clone());
            }
            _ => {}
        }
    }
}

/// Live counts for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Meters {
    pub mjpeg_viewers: AtomicU64,
    pub mjpeg_frames: AtomicU64,
    pub sse_clients: AtomicU64,
    pub ws_clients: AtomicU64,
    pub controls: AtomicU64,
    pub lagged: AtomicU64,
}

/// Which kind of long-lived client a [`Connected`] counts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Client {
    Mjpeg,
    Sse,
    Ws,
}

/// Counts a client while it is connected; the count drops with it.
pub(crate) struct Connected {
    state: AppState,
    kind: Client,
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.state.gauge(self.kind).fetch_sub(1, Ordering::Relaxed);
    }
}

impl AppState {
    /// Checks the parts and starts the task that tallies commentary events; call it inside
    /// the tokio runtime.
    pub fn new(parts: Parts) -> Result<AppState, ServerError> {
        if !(parts.mjpeg_fps.is_finite() && parts.mjpeg_fps > 0.0) {
            return Err(ServerError::Config(format!(
                "MJPEG_FPS must be a positive number of frames a second, not {}",
                parts.mjpeg_fps
            )));
        }
        if !parts.profiles.contains(&parts.selection.profile) {
            return Err(ServerError::Config(format!(
                "the starting profile '{}' is not one of the profiles offered ({})",
                parts.selection.profile,
                parts.profiles.join(", ")
            )));
        }
        let state = AppState {
            shared: Arc::new(Shared {
                display: parts.display,
                events: parts.events,
                controls: parts.controls,
                delay: parts.delay,
                status: parts.status,
                engine: parts.engine,
                profiles: parts.profiles,
                selection: Mutex::new(parts.selection),
                mjpeg_fps: parts.mjpeg_fps,
                shutdown: parts.shutdown,
                tally: Mutex::default(),
                meters: Meters::default(),
                started: Instant::now(),
            }),
        };
        // Subscribed here, not in the task, so no event sent after `new` is missed.
        let events = state.shared.events.subscribe();
        tokio::spawn(tally_events(state.clone(), events));
        Ok(state)
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    pub fn shutdown(&self) -> &CancellationToken {
        &self.shared.shutdown
    }

    /// The profile and instruction last applied.
    pub fn selection(&self) -> Selection {
        self.shared
            .selection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn tally(&self) -> Tally {
        self.shared
            .tally
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The current target delay, in seconds; never negative or NaN.
    pub(crate) fn delay(&self) -> f64 {
        let delay = *self.shared.delay.borrow();
        if delay.is_finite() && delay > 0.0 {
            delay
        } else {
            0.0
        }
    }

    pub(crate) fn connected(&self, kind: Client) -> Connected {
        self.gauge(kind).fetch_add(1, Ordering::Relaxed);
        Connected {
            state: self.clone(),
            kind,
        }
    }

    fn gauge(&self, kind: Client) -> &AtomicU64 {
        let meters = &self.shared.meters;
        match kind {
            Client::Mjpeg => &meters.mjpeg_viewers,
            Client::Sse => &meters.sse_clients,
            Client::Ws => &meters.ws_clients,
        }
    }

    /// Checks a viewer's change and forwards it to the commentary loop, all or nothing.
    pub(crate) fn apply(&self, change: Change) -> Result<Selection, ApiError> {
        let shared = &self.shared;
        let mut controls = Vec::with_capacity(2);
        if let Some(profile) = change.profile {
            if !shared.profiles.contains(&profile) {
                return Err(ApiError::BadRequest(format!(
                    "unknown profile '{profile}'; choose one of: {}",
                    shared.profiles.join(", ")
                )));
            }
            controls.push(Control::SetProfile(profile));
        }
        if let Some(instruction) = change.instruction {
            let instruction = instruction.trim();
            let chars = instruction.chars().count();
            if chars > MAX_INSTRUCTION_CHARS {
                return Err(ApiError::BadRequest(format!(
                    "the instruction is {chars} characters long; the limit is {MAX_INSTRUCTION_CHARS}"
                )));
            }
            controls.push(Control::SetInstruction(instruction.to_string()));
        }
        if controls.is_empty() {
            return Err(ApiError::BadRequest(
                "nothing to change: give \"profile\", \"instruction\" or both".into(),
            ));
        }
        let permits = shared
            .controls
            .try_reserve_many(controls.len())
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(()) => ApiError::Busy(
                    "the commentary loop has not taken the last change yet; try again".into(),
                ),
                mpsc::error::TrySendError::Closed(()) => {
                    ApiError::Unavailable("the commentary loop has stopped".into())
                }
            })?;
        let mut selection = shared
            .selection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (permit, control) in permits.zip(controls) {
            match &control {
                Control::SetProfile(p) => selection.profile = p.clone(),
                Control::SetInstruction(i) => selection.instruction = i.clone(),
            }
            permit.send(control);
        }
        shared.meters.controls.fetch_add(1, Ordering::Relaxed);
        Ok(selection.clone())
    }
}

/// Keeps [`Tally`] up to date until shutdown or until the loop drops its sender.
async fn tally_events(state: AppState, mut events: broadcast::Receiver<Event>) {
    loop {
        let event = tokio::select! {
            _ = state.shared.shutdown.cancelled() => return,
            event = events.recv() => event,
        };
        match event {
            Ok(event) => state
                .shared
                .tally
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .record(&event),
            // Counts miss a few events; nothing to repair.
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
