//! The HTTP face of kibitz: the page, each stream's delayed MJPEG picture and its
//! commentary as events (SSE and WebSocket), the stream API, status, metrics.
//!
//! The server owns no stage of the pipeline: it holds the registry of streams
//! ([`kibitz_stream::Streams`]) and reads each stream through its handle. Handlers only
//! extract, call and return; every failure goes through [`ApiError`], and whatever axum
//! answers by itself is made JSON too (`error::json_errors`). Before any handler, in order:
//! [`browsers::guard`] (foreign `Host` → 421, foreign `Origin` → 403, a body not of the
//! route's type → 415), then [`auth::guard`] (the token). Every response carries the
//! page's security headers (`page::security_headers`). Connections are accepted by
//! [`listen`]: header-read and idle timeouts, a connection cap, TLS.
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
//! | `POST /api/streams/{id}/whep` | WHEP: an SDP offer → `201`, the answer, `Location: …/whep/{session}` |
//! | `DELETE /api/streams/{id}/whep/{session}` | ends a viewer (`PATCH`: `405`, no trickle ICE) |
//! | `POST /api/streams/{id}/whip` | WHIP: publishes the stream `{id}` (control rule) |
//! | `DELETE /api/streams/{id}/whip/{session}` | ends the publisher and its stream |
//! | `GET /api/webrtc` | `{enabled, ice_servers, whep, whip, max_viewers}` for pages |
//! | `GET /metrics` | Prometheus text (label `stream`) |
//! | `GET /healthz`, `GET /readyz` | alive (200 while serving); engine ready (200, else 503 with what it waits for: download, load, missing model) |

use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

mod alerts;
mod api;
mod ask;
pub mod auth;
pub mod browsers;
mod error;
mod events;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
mod history;
pub mod listen;
mod metrics;
mod mjpeg;
mod page;
mod speech;
mod state;
mod webrtc;

pub use alerts::{hmac_sha256, sink as alert_sink, Webhook};
#[doc(hidden)]
pub use api::fuzzing;
pub use browsers::Origins;
pub use error::{ApiError, ServerError};
pub use listen::{Limits, ServeOptions};
pub use state::{AppState, Parts};

/// Short requests that take longer than this get 503; streams are exempt.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request body: a stream spec or an instruction is well under this.
pub(crate) const MAX_BODY: usize = 64 * 1024;

/// After shutdown, how long connections get to finish before `serve` returns anyway (a
/// stalled MJPEG viewer would otherwise hold it forever).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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
        .route("/api/webrtc", get(webrtc::info))
        .route("/api/streams/{id}/whep", post(webrtc::whep))
        .route(
            "/api/streams/{id}/whep/{session}",
            axum::routing::delete(webrtc::end).patch(webrtc::trickle),
        )
        .route("/api/streams/{id}/whip", post(webrtc::whip))
        .route(
            "/api/streams/{id}/whip/{session}",
            axum::routing::delete(webrtc::end).patch(webrtc::trickle),
        )
        .route("/metrics", get(metrics::metrics))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
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
    let origins = state.shared().origins.clone();
    short
        .merge(long)
        .with_state(state)
        .merge(auth::routes(access.clone()))
        .fallback(error::no_route)
        .method_not_allowed_fallback(error::wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(access, auth::guard))
        .layer(axum::middleware::from_fn_with_state(
            origins,
            browsers::guard,
        ))
        .layer(axum::middleware::from_fn(page::security_headers))
        .layer(axum::middleware::from_fn(error::json_errors))
        .layer(TraceLayer::new_for_http().on_failure(log_failure))
}

/// A 503 is a state, not a fault (no picture yet, `/readyz` while the model downloads, which
/// the page and probes ask every few seconds): kept out of the error log. Faults are logged
/// at error, as before (a 500's detail also by [`ApiError`]).
fn log_failure(
    class: tower_http::classify::ServerErrorsFailureClass,
    latency: Duration,
    _span: &tracing::Span,
) {
    use tower_http::classify::ServerErrorsFailureClass::StatusCode as Status;
    match class {
        Status(code) if code == StatusCode::SERVICE_UNAVAILABLE => {
            tracing::debug!(?latency, "answered 503")
        }
        class => tracing::error!(%class, ?latency, "response failed"),
    }
}

/// Serves with the default [`ServeOptions`] (plain HTTP, default limits) until the
/// state's shutdown token is cancelled.
pub async fn serve(listener: TcpListener, state: AppState) -> Result<(), ServerError> {
    serve_with(listener, state, ServeOptions::default()).await
}

/// Serves until the state's shutdown token is cancelled. Then streams end, new
/// connections are refused, and open ones get [`SHUTDOWN_GRACE`] to finish.
pub async fn serve_with(
    listener: TcpListener,
    state: AppState,
    options: ServeOptions,
) -> Result<(), ServerError> {
    let token = state.shutdown().clone();
    listen::run(listener, router(state), options, token, SHUTDOWN_GRACE).await
}
