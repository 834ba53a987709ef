//! The HTTP face of kibitz: the page, each stream's delayed MJPEG picture and its
//! commentary as events (SSE and WebSocket), the stream API, status, metrics.
//!
//! The server owns no stage of the pipeline: it holds the registry of streams
//! ([`kibitz_stream::Streams`]) and reads each stream through its handle. Handlers only
//! extract, call and return; every failure goes through [`ApiError`]. When a token is set,
//! [`auth::guard`] runs before any handler.
//!
//! | route | what |
//! |---|---|
//! | `GET /`, `GET /streams/{id}` | the page: all streams, one stream (embedded, no build step) |
//! | `GET /api/streams`, `POST /api/streams` | list, add |
//! | `GET`/`PATCH`/`DELETE /api/streams/{id}` | status, change live settings, remove |
//! | `GET /api/streams/{id}/mjpeg` | the picture, `target_delay` late, at the source's rate |
//! | `GET /api/streams/{id}/frame` | the newest frame as one JPEG |
//! | `GET /api/streams/{id}/stream`, `.../ws` | the stream's events (SSE, WebSocket) |
//! | `GET /api/streams/{id}/status` | the stream's status |
//! | `POST /api/streams/{id}/instruction` | `{profile?, instruction?}` |
//! | `POST /api/streams/{id}/ask` | `{question}`: the answer streams back, and as `answer_*` events |
//! | `GET /api/streams/{id}/speech` | the spoken commentary, one Ogg/Opus stream, delayed like the picture |
//! | `GET /api/streams/{id}/speech/clips/{n}` | one spoken comment (WAV), as `speech` events name it |
//! | `GET`/`POST /api/streams/{id}/alerts`, `DELETE …/alerts/{rule}` | alert rules |
//! | `GET /api/alerts`, `GET /api/alerts/{id}/clip` | fired alerts; the picture around one (Motion JPEG) |
//! | `GET /api/history?q=&stream=&since=&until=&limit=&before=` | search what was said |
//! | `GET /api/streams/{id}/history.vtt?since=&until=` | a time range as WebVTT |
//! | `GET /api/events` | every stream's events, tagged with `stream` (SSE) |
//! | `/api/mjpeg`, `/api/frame`, `/api/stream`, `/api/ws`, `/api/status`, `/api/instruction` | the same for the first stream still running |
//! | `GET /api/profiles` | profile names, voices offered |
//! | `GET /api/clock` | the server's time (unix ms), for scheduling speech clips |
//! | `GET`/`POST`/`DELETE /api/session` | token → cookie for the page |
//! | `GET /metrics`, `GET /healthz` | Prometheus text (label `stream`), health |

use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

mod alerts;
mod api;
mod ask;
pub mod auth;
mod error;
mod events;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
mod history;
mod metrics;
mod mjpeg;
mod page;
mod speech;
mod state;

pub use alerts::{hmac_sha256, sink as alert_sink, Webhook};
#[doc(hidden)]
pub use api::fuzzing;
pub use error::{ApiError, ServerError};
pub use state::{AppState, Parts};

/// Short requests that take longer than this get 503; streams are exempt.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request body: a stream spec or an instruction is well under this.
pub(crate) const MAX_BODY: usize = 64 * 1024;

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
        .route("/streams/{id}", get(page::index))
        .route("/app.js", get(page::script))
        .route("/app.css", get(page::style))
        .route("/api/streams", get(api::list).post(api::add))
        .route(
            "/api/streams/{id}",
            get(api::status).patch(api::change).delete(api::remove),
        )
        .route("/api/streams/{id}/status", get(api::status))
        .route("/api/streams/{id}/frame", get(mjpeg::frame))
        .route("/api/streams/{id}/instruction", post(api::instruction))
        .route("/api/streams/{id}/ask", post(ask::ask))
        .route(
            "/api/streams/{id}/alerts",
            get(alerts::list).post(alerts::add),
        )
        .route(
            "/api/streams/{id}/alerts/{rule}",
            axum::routing::delete(alerts::remove),
        )
        .route("/api/alerts", get(alerts::recent))
        .route("/api/history", get(history::search))
        .route("/api/streams/{id}/history.vtt", get(history::vtt))
        .route("/api/alerts/{id}/clip", get(alerts::clip))
        .route("/api/streams/{id}/speech/clips/{n}", get(speech::clip))
        .route("/api/frame", get(mjpeg::frame))
        .route("/api/status", get(api::status))
        .route("/api/instruction", post(api::instruction))
        .route("/api/profiles", get(api::profiles))
        .route("/api/clock", get(api::clock))
        .route("/metrics", get(metrics::metrics))
        .route("/healthz", get(api::healthz))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ));
    let long = Router::new()
        .route("/api/streams/{id}/mjpeg", get(mjpeg::mjpeg))
        .route("/api/streams/{id}/stream", get(events::stream))
        .route("/api/streams/{id}/ws", get(events::ws))
        .route("/api/streams/{id}/speech", get(speech::stream))
        .route("/api/mjpeg", get(mjpeg::mjpeg))
        .route("/api/stream", get(events::stream))
        .route("/api/ws", get(events::ws))
        .route("/api/events", get(events::bus));
    let access = state.shared().access.clone();
    short
        .merge(long)
        .with_state(state)
        .merge(auth::routes(access.clone()))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(access, auth::guard))
        .layer(TraceLayer::new_for_http())
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
    // The peer's address reaches handlers (rate limits are per client).
    let app = router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let server = axum::serve(listener, app).with_graceful_shutdown(token.clone().cancelled_owned());
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
