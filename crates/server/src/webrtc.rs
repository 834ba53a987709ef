//! WebRTC's routes: WHEP (`/api/streams/{id}/whep`, a viewer; the viewing rule of the
//! token) and WHIP (`/api/streams/{id}/whip`, a publisher; the control rule), and
//! `/api/webrtc`, what a page needs to connect (the ICE servers). The sessions themselves
//! are `kibitz_webrtc`'s; these handlers only check the request, call, and answer.
//!
//! The server is ICE-lite and puts all its candidates in the answer, so trickle ICE
//! (`PATCH` on a session) is answered `405`.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header::{ALLOW, CONTENT_TYPE, LOCATION};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kibitz_stream::StreamSettings;
use kibitz_webrtc::{Answer, WebRtc};
use serde_json::json;

use crate::state::Target;
use crate::{ApiError, AppState};

const SDP: &str = "application/sdp";

/// `GET /api/webrtc`: whether WebRTC is on, the ICE servers for `RTCPeerConnection`, and
/// the endpoints.
pub(crate) async fn info(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(match state.webrtc() {
        Some(webrtc) => json!({
            "enabled": true,
            "ice_servers": webrtc.ice_servers().iter().map(|url| json!({ "urls": url })).collect::<Vec<_>>(),
            "whep": "/api/streams/{id}/whep",
            "whip": "/api/streams/{id}/whip",
            "max_viewers": webrtc.config().max_viewers,
        }),
        None => json!({ "enabled": false }),
    })
}

/// `POST /api/streams/{id}/whep`: an SDP offer in, `201` with the answer and the session's
/// `Location`.
pub(crate) async fn whep(
    State(state): State<AppState>,
    Target(handle): Target,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let webrtc = enabled(&state)?;
    let offer = offer(&headers, &body)?;
    let answer = webrtc.view(&handle, offer).await?;
    Ok(created(
        &webrtc,
        format!("/api/streams/{}/whep/{}", handle.id(), answer.session),
        answer,
    ))
}

/// `POST /api/streams/{id}/whip`: publishes the stream `{id}` (new, or the one whose
/// publisher went away). Query parameters are not read; the stream takes the defaults.
pub(crate) async fn whip(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let webrtc = enabled(&state)?;
    let offer = offer(&headers, &body)?;
    let answer = webrtc
        .publish(&id, offer, StreamSettings::default())
        .await?;
    Ok(created(
        &webrtc,
        format!("/api/streams/{id}/whip/{}", answer.session),
        answer,
    ))
}

/// `DELETE /api/streams/{id}/whep/{session}` (and `…/whip/{session}`, which removes the
/// stream): `200`.
pub(crate) async fn end(
    State(state): State<AppState>,
    Path((id, session)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    enabled(&state)?.end(&id, &session).await?;
    Ok(StatusCode::OK)
}

/// `PATCH` on a session: no trickle ICE on an ICE-lite server.
pub(crate) async fn trickle() -> Response {
    let mut response = ApiError::MethodNotAllowed(
        "the server is ICE-lite and sends all its candidates in the answer; no trickle ICE".into(),
    )
    .into_response();
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static("DELETE"));
    response
}

fn enabled(state: &AppState) -> Result<WebRtc, ApiError> {
    state
        .webrtc()
        .cloned()
        .ok_or_else(|| ApiError::Unavailable("WebRTC is off on this server (--no-webrtc)".into()))
}

/// The offer: the body as text, sent as `application/sdp`.
fn offer<'a>(headers: &HeaderMap, body: &'a Bytes) -> Result<&'a str, ApiError> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.trim().to_ascii_lowercase().starts_with(SDP) {
        return Err(ApiError::BadRequest(format!(
            "send the SDP offer with Content-Type: {SDP} (got '{content_type}')"
        )));
    }
    std::str::from_utf8(body)
        .map_err(|_| ApiError::BadRequest("the offer is not UTF-8 text".into()))
}

/// `201` with the answer, its `Location`, and the ICE servers as `Link` headers (the WHEP
/// and WHIP way to hand them over).
fn created(webrtc: &WebRtc, location: String, answer: Answer) -> Response {
    let mut response = (
        StatusCode::CREATED,
        [(CONTENT_TYPE, SDP.to_string()), (LOCATION, location)],
        answer.sdp,
    )
        .into_response();
    for url in webrtc.ice_servers() {
        if let Ok(link) = HeaderValue::from_str(&format!("<{url}>; rel=\"ice-server\"")) {
            response.headers_mut().append("link", link);
        }
    }
    response
}
