//! What the handlers share: the registry of streams, who may do what, the engine for
//! health and status, and a few server-wide counters. Everything about one stream (its
//! picture, events, settings and status) is read from its [`StreamHandle`], never kept
//! here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts as RequestParts;
use kibitz_engine::Engine;
use kibitz_stream::{StreamHandle, Streams};
use tokio_util::sync::CancellationToken;

use crate::auth::Access;
use crate::ApiError;

/// Everything [`AppState::new`] needs; the binary builds one from the running registry.
pub struct Parts {
    pub streams: Streams,
    pub access: Access,
    /// Profile names a viewer may choose, in the order the page lists them.
    pub profiles: Vec<String>,
    /// Cancelled to stop the server: long-lived responses end and `serve` returns.
    pub shutdown: CancellationToken,
    /// What was said, searchable; `None` with `--history off`.
    pub history: Option<kibitz_history::History>,
    /// WHEP viewers and WHIP publishers; `None` with `--no-webrtc`.
    pub webrtc: Option<kibitz_webrtc::WebRtc>,
}

/// The one state every handler gets. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub streams: Streams,
    pub access: Access,
    pub profiles: Vec<String>,
    pub shutdown: CancellationToken,
    pub meters: Meters,
    pub started: Instant,
    pub questions: crate::ask::RateLimit,
    pub history: Option<kibitz_history::History>,
    pub webrtc: Option<kibitz_webrtc::WebRtc>,
}

/// Server-wide counts for `/metrics`; per-stream counts live in each stream's status.
#[derive(Debug, Default)]
pub(crate) struct Meters {
    /// Open `/api/events` connections.
    pub bus_clients: AtomicU64,
    /// Times an event client fell behind and skipped events.
    pub lagged: AtomicU64,
    /// Changes applied through the API (profile, instruction, interval).
    pub changes: AtomicU64,
}

impl AppState {
    pub fn new(parts: Parts) -> AppState {
        AppState {
            shared: Arc::new(Shared {
                streams: parts.streams,
                access: parts.access,
                profiles: parts.profiles,
                shutdown: parts.shutdown,
                meters: Meters::default(),
                started: Instant::now(),
                questions: crate::ask::RateLimit::default(),
                history: parts.history,
                webrtc: parts.webrtc,
            }),
        }
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    pub fn streams(&self) -> &Streams {
        &self.shared.streams
    }

    pub fn webrtc(&self) -> Option<&kibitz_webrtc::WebRtc> {
        self.shared.webrtc.as_ref()
    }

    pub fn shutdown(&self) -> &CancellationToken {
        &self.shared.shutdown
    }

    pub(crate) fn engine(&self) -> &Arc<dyn Engine> {
        self.shared.streams.scheduler().engine()
    }

    pub(crate) fn count(&self, meter: impl Fn(&Meters) -> &AtomicU64) {
        meter(&self.shared.meters).fetch_add(1, Ordering::Relaxed);
    }
}

/// The stream a request is about: `{id}` in the path, or, on the single-stream routes
/// that predate streams (`/api/mjpeg`, …), the first stream still running.
pub(crate) struct Target(pub StreamHandle);

impl FromRequestParts<AppState> for Target {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut RequestParts,
        state: &AppState,
    ) -> Result<Target, ApiError> {
        let id =
            Path::<std::collections::HashMap<String, String>>::from_request_parts(parts, state)
                .await
                .ok()
                .and_then(|Path(params)| params.get("id").cloned());
        let streams = state.streams();
        match id {
            Some(id) => streams
                .get(&id)
                .map(Target)
                .ok_or_else(|| ApiError::NotFound(format!("no stream named '{id}'"))),
            None => streams.first().map(Target).ok_or_else(|| {
                ApiError::NotFound("no stream is running; add one with POST /api/streams".into())
            }),
        }
    }
}
