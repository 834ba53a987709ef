//! What the handlers share: the registry of streams, who may do what, the engine for
//! health and status, and a few server-wide counters. Everything about one stream (its
//! picture, events, settings and status) is read from its [`StreamHandle`], never kept
//! here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::PathRejection;
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
    /// Host names and origins answered besides the server's own; trusted proxies.
    pub origins: crate::Origins,
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
    pub origins: crate::Origins,
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
                origins: parts.origins,
            }),
        }
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    pub fn streams(&self) -> &Streams {
        &self.shared.streams
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
        // Only a route without parameters means "the first stream". A path whose id is
        // not UTF-8 (`%ff`) is a rejection, which must not read as "no id" (it once did,
        // and `/api/streams/%ff/instruction` changed the first stream).
        let id = match Path::<std::collections::HashMap<String, String>>::from_request_parts(
            parts, state,
        )
        .await
        {
            Ok(Path(params)) => params.get("id").cloned(),
            Err(PathRejection::MissingPathParams(_)) => None,
            Err(_) => return Err(not_a_stream()),
        };
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

/// The `{id}` of a stream route as text; an id that is not UTF-8 names no stream (`404`).
pub(crate) struct StreamId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for StreamId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut RequestParts, state: &S) -> Result<StreamId, ApiError> {
        match Path::<std::collections::HashMap<String, String>>::from_request_parts(parts, state)
            .await
        {
            Ok(Path(mut params)) => params.remove("id").map(StreamId).ok_or_else(not_a_stream),
            Err(_) => Err(not_a_stream()),
        }
    }
}

fn not_a_stream() -> ApiError {
    ApiError::NotFound("no such stream: the id in the path is not valid UTF-8".into())
}
