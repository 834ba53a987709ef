//! Errors: [`ApiError`] is what a request can fail with and maps to one HTTP status;
//! [`ServerError`] is what running the server can fail with.
//!
//! Every error a client gets is `{"error": "..."}`. Handlers return [`ApiError`]; what axum
//! and tower answer by themselves (no route, wrong method, a body over the limit, an
//! extractor's rejection, a timeout) is plain text or empty, so [`json_errors`] rewrites
//! those on the way out.

use axum::body::Body;
use axum::extract::Request;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kibitz_stream::StreamError;

/// A request that could not be served. The one `IntoResponse` below decides the status
/// and body: `{"error": "..."}` (plus `"field"` for a 422 about one field), with the
/// reason for everything but 500.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not what the route takes (not JSON, wrong shape).
    #[error("{0}")]
    BadRequest(String),
    /// Well-formed, but a value is unusable.
    #[error("{message}")]
    Invalid {
        field: Option<&'static str>,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    /// The id is taken.
    #[error("{0}")]
    Conflict(String),
    /// Too much at once, or too many streams; the client may retry later.
    #[error("{0}")]
    Busy(String),
    /// Something the request needs is not there now (no frame yet, engine down).
    #[error("{0}")]
    Unavailable(String),
    /// A fault of ours. The detail is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<StreamError> for ApiError {
    fn from(e: StreamError) -> ApiError {
        let field = e.field();
        match e {
            StreamError::Invalid(_) | StreamError::Refused(_) | StreamError::Open(_) => {
                ApiError::Invalid {
                    field,
                    message: e.to_string(),
                }
            }
            StreamError::Taken(_) => ApiError::Conflict(e.to_string()),
            StreamError::Full(_) | StreamError::Busy(_) => ApiError::Busy(e.to_string()),
            StreamError::NotFound(_) => ApiError::NotFound(e.to_string()),
            StreamError::Stopped => ApiError::Unavailable(e.to_string()),
            StreamError::Internal(detail) => ApiError::Internal(detail),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = match &self {
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "request failed");
                serde_json::json!({ "error": "internal error; the server log has the details" })
            }
            other => serde_json::json!({ "error": other.to_string() }),
        };
        if let ApiError::Invalid {
            field: Some(field), ..
        } = &self
        {
            body["field"] = serde_json::json!(field);
        }
        (self.status(), Json(body)).into_response()
    }
}

/// Running the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("the HTTP server stopped: {0}")]
    Serve(#[source] std::io::Error),
    /// `--tls-cert`/`--tls-key` could not be used.
    #[error("TLS: {0}")]
    Tls(String),
}

/// The answer for a path no route has.
pub(crate) async fn no_route(request: Request) -> ApiError {
    ApiError::NotFound(format!("no such route: {}", request.uri().path()))
}

/// The answer for a route asked with a method it does not take (axum adds `Allow`).
pub(crate) async fn wrong_method(request: Request) -> Response {
    let message = format!(
        "{} is not allowed on {}",
        request.method(),
        request.uri().path()
    );
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

/// Longest plain-text error kept as the reason; axum's rejections are one line.
const MAX_REASON: usize = 4096;

/// axum middleware: an error response (4xx, 5xx) that is not JSON becomes
/// `{"error": <its text, or the status's name>}`, keeping its status and other headers
/// (`Allow`, `WWW-Authenticate`, `Retry-After`).
pub(crate) async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_REASON)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let reason = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
    } else {
        text
    };
    let body = serde_json::json!({ "error": reason }).to_string();
    parts.headers.remove(CONTENT_LENGTH);
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(parts, Body::from(body))
}
