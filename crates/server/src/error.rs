//! Errors: [`ApiError`] is what a request can fail with and maps to one HTTP status;
//! [`ServerError`] is what running the server can fail with.

use axum::http::StatusCode;
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
    /// The route does not take this method (`PATCH` on a WebRTC session).
    #[error("{0}")]
    MethodNotAllowed(String),
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
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
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

impl From<kibitz_webrtc::WebRtcError> for ApiError {
    fn from(e: kibitz_webrtc::WebRtcError) -> ApiError {
        use kibitz_webrtc::WebRtcError as E;
        match e {
            E::BadOffer(_) => ApiError::BadRequest(e.to_string()),
            E::NotFound(_) => ApiError::NotFound(e.to_string()),
            E::TooManyViewers(_) => ApiError::Busy(e.to_string()),
            E::Conflict(_) => ApiError::Conflict(e.to_string()),
            E::Stream(e) => e.into(),
            E::Stopped => ApiError::Unavailable(e.to_string()),
            E::Internal(detail) => ApiError::Internal(detail),
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
}
