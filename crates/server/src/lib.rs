//! The HTTP face of kibitz: the page, the delayed MJPEG picture, the commentary as events
//! (SSE and WebSocket), status, metrics and the one control endpoint.
//!
//! The server owns no stage of the pipeline. It reads them through small traits
//! ([`DisplayFeed`], [`StatusReport`], [`kibitz_engine::Engine`]) and channels (the
//! events broadcast, the controls queue, the delay watch) gathered in one cloneable
//! [`AppState`]; the binary wires the real stages in, tests wire [`fake`]s. Handlers only
//! extract, call and return; every failure goes through [`ApiError`].
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the page (embedded, no build step) |
//! | `GET /api/mjpeg` | the picture, `target_delay` late, at the source's rate |
//! | `GET /api/frame` | the newest frame as one JPEG |
//! | `GET /api/stream`, `GET /api/ws` | commentary events (SSE, WebSocket) |
//! | `GET /api/status`, `GET /api/profiles` | JSON state |
//! | `POST /api/instruction` | `{profile?, instruction?}` to the commentary loop |
//! | `GET /metrics`, `GET /healthz` | Prometheus text, health |

use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

mod api;
mod error;
mod events;
pub mod fake;
mod metrics;
mod mjpeg;
mod page;
mod state;

pub use error::{ApiError, ServerError};
pub use state::{
    AppState, BufferStatus, Change, DisplayFeed, DisplayFrame, Parts, PipelineStatus, Selection,
    SourceStatus, StatusReport, MAX_INSTRUCTION_CHARS,
};

/// Short requests that take longer than this get 503; streams are exempt.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// After shutdown, how long connections get to finish before `serve` returns anyway (a
/// stalled MJPEG viewer would otherwise hold it forever).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Kernel send buffer per connection. Linux grows it up to 4 MB for a client that reads
/// slowly, which is seconds of stale MJPEG queued in front of it, out of sync with the
/// words. Capped, a slow viewer skips frames instead; 512 KiB (the kernel doubles it)
/// still carries 720p25 over a 200 ms round trip.
const SEND_BUFFER: usize = 512 * 1024;

/// Every route, with `state`.
pub fn router(state: AppState) -> Router {
    let short = Router::new()
        .route("/", get(page::index))
        .route("/app.js", get(page::script))
        .route("/app.css", get(page::style))
        .route("/api/frame", get(mjpeg::frame))
        .route("/api/status", get(api::status))
        .route("/api/profiles", get(api::profiles))
        .route("/api/instruction", post(api::instruction))
        .route("/metrics", get(metrics::metrics))
        .route("/healthz", get(api::healthz))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ));
    let streams = Router::new()
        .route("/api/mjpeg", get(mjpeg::mjpeg))
        .route("/api/stream", get(events::stream))
        .route("/api/ws", get(events::ws));
    short
        .merge(streams)
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Serves until the state's shutdown token is cancelled. Then streams end, new
/// connections are refused, and open ones get [`SHUTDOWN_GRACE`] to finish.
pub async fn serve(listener: TcpListener, state: AppState) -> Result<(), ServerError> {
    let token = state.shutdown().clone();
    let listener = listener.tap_io(|tcp| {
        // Tokens and frame ends are small writes that should leave at once.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
        if let Err(e) = socket2::SockRef::from(&*tcp).set_send_buffer_size(SEND_BUFFER) {
            tracing::debug!("cannot set SO_SNDBUF: {e}");
        }
    });
    let server = axum::serve(listener, router(state))
        .with_graceful_shutdown(token.clone().cancelled_owned());
    let deadline = async {
        token.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = server => result.map_err(ServerError::Serve),
        () = deadline => {
            tracing::warn!("connections still open {SHUTDOWN_GRACE:?} after shutdown; leaving them");
            Ok(())
        }
    }
}
