//! Errors: [`ApiError`] is what a request can fail with and maps to one HTTP status;
//! [`ServerError`] is what starting or running the server can fail with.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// A request that could not be served. The one `IntoResponse` below decides the status
/// and body: `{"error": "..."}`, with the reason for everything but 500.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is unusable as sent (bad JSON, unknown profile, text too long).
    #[error("{0}")]
    BadRequest(String),
    /// Too much at once; the client should retry shortly.
    #[error("{0}")]
    Busy(String),
    /// Something the request needs is not there now (no frame yet, engine down, loop stopped).
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
            ApiError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = match &self {
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "request failed");
                "internal error; the server log has the details".to_string()
            }
            other => other.to_string(),
        };
        (self.status(), Json(serde_json::json!({ "error": message }))).into_response()
    }
}

/// Starting or running the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A setting handed to [`crate::AppState::new`] is unusable.
    #[error("{0}")]
    Config(String),
    #[error("the HTTP server stopped: {0}")]
    Serve(#[source] std::io::Error),
}
