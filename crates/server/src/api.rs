//! The JSON endpoints: the stream list and its changes, one stream's status, profiles,
//! the instruction shortcut, liveness (`/healthz`) and readiness (`/readyz`).
//!
//! Bodies are parsed here rather than by axum's `Json`, so every body gets the same
//! answers: not JSON (or no body) → `400`; JSON of the wrong shape or with a bad value →
//! `422` naming the field.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::LOCATION;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kibitz_stream::{StreamSettings, StreamSummary};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::state::{Meters, StreamId, Target};
use crate::{ApiError, AppState};

/// A health check that takes longer than this counts as down.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

/// `GET /api/streams`.
pub(crate) async fn list(State(state): State<AppState>) -> Json<Value> {
    let streams: Vec<StreamSummary> = state.streams().list().iter().map(|s| s.summary()).collect();
    let info = state.engine().info();
    Json(json!({
        "streams": streams,
        "max_streams": state.streams().max_streams(),
        "engine": {
            "kind": info.kind,
            "model": info.model,
            "backend": info.backend,
            "readiness": state.engine().readiness(),
        },
    }))
}

/// `POST /api/streams`: `201` with `Location` and the new stream's summary. With
/// `"source": "push"` the stream opens nothing and waits for a publisher in this process
/// (`StreamHandle::publish`, the WebRTC ingest); it is not kept in the state file.
pub(crate) async fn add(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let settings: StreamSettings =
        parse(&body, r#"{"source": "rtsp://camera/stream", "id": "door"}"#)?;
    let handle = state.streams().add(settings).await?;
    state.count(|m: &Meters| &m.changes);
    let location = format!("/api/streams/{}", handle.id());
    Ok((
        StatusCode::CREATED,
        [(LOCATION, location)],
        Json(handle.summary()),
    )
        .into_response())
}

/// `PATCH /api/streams/{id}`: live settings (profile, instruction, inference_interval).
pub(crate) async fn change(
    State(state): State<AppState>,
    StreamId(id): StreamId,
    body: Bytes,
) -> Result<Json<StreamSummary>, ApiError> {
    let change: StreamSettings = parse(&body, r#"{"profile": "sports", "instruction": "..."}"#)?;
    let handle = state.streams().update(&id, change).await?;
    state.count(|m: &Meters| &m.changes);
    Ok(Json(handle.summary()))
}

/// `DELETE /api/streams/{id}`: `204`.
pub(crate) async fn remove(
    State(state): State<AppState>,
    StreamId(id): StreamId,
) -> Result<StatusCode, ApiError> {
    state.streams().remove(&id).await?;
    state.count(|m: &Meters| &m.changes);
    Ok(StatusCode::NO_CONTENT)
}

/// The profile and instruction, as the page's controls send them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Selection {
    profile: Option<String>,
    instruction: Option<String>,
}

/// `POST /api/streams/{id}/instruction` (and `/api/instruction` for the first stream):
/// `{profile?, instruction?}`; answers the selection now in force.
pub(crate) async fn instruction(
    State(state): State<AppState>,
    Target(stream): Target,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let selection: Selection = parse(&body, r#"{"profile": "sports", "instruction": "..."}"#)?;
    let summary = apply_selection(
        &state,
        stream.id().as_str(),
        selection.profile,
        selection.instruction,
    )
    .await?;
    Ok(Json(json!({
        "profile": summary.profile,
        "instruction": summary.instruction,
    })))
}

/// The one path a profile or instruction change takes, from HTTP and WebSocket alike.
pub(crate) async fn apply_selection(
    state: &AppState,
    id: &str,
    profile: Option<String>,
    instruction: Option<String>,
) -> Result<StreamSummary, ApiError> {
    let change = selection_change(profile, instruction)?;
    let handle = state.streams().update(id, change).await?;
    state.count(|m: &Meters| &m.changes);
    Ok(handle.summary())
}

/// The change a selection asks of the stream's settings.
fn selection_change(
    profile: Option<String>,
    instruction: Option<String>,
) -> Result<StreamSettings, ApiError> {
    if profile.is_none() && instruction.is_none() {
        return Err(ApiError::Invalid {
            field: None,
            message: "nothing to change: give \"profile\", \"instruction\" or both".into(),
        });
    }
    Ok(StreamSettings {
        profile,
        instruction,
        ..StreamSettings::default()
    })
}

/// A WebSocket text message as a selection change.
pub(crate) async fn apply_selection_message(
    state: &AppState,
    id: &str,
    text: &str,
) -> Result<StreamSummary, ApiError> {
    let selection: Selection = parse(text.as_bytes(), r#"{"profile": "sports"}"#)?;
    apply_selection(state, id, selection.profile, selection.instruction).await
}

/// `GET /api/streams/{id}/status` (and `/api/status`): the stream's one status, plus the
/// engine's.
pub(crate) async fn status(
    State(state): State<AppState>,
    Target(stream): Target,
) -> Result<Json<Value>, ApiError> {
    let mut status =
        serde_json::to_value(stream.status()).map_err(|e| ApiError::Internal(e.to_string()))?;
    status["engine"] = engine_status(&state).await;
    status["streams"] = json!(state.streams().len());
    status["server_uptime_s"] = json!(state.shared().started.elapsed().as_secs_f64());
    Ok(Json(status))
}

async fn engine_status(state: &AppState) -> Value {
    let engine = state.engine();
    let info = engine.info();
    let healthy = tokio::time::timeout(HEALTH_TIMEOUT, engine.health())
        .await
        .unwrap_or(false);
    json!({
        "kind": info.kind,
        "model": info.model,
        "backend": info.backend,
        "healthy": healthy,
        // What it waits for before it can comment: the download, the load, what is missing.
        "readiness": engine.readiness(),
        "in_flight": engine.in_flight(),
        "status": engine.status(),
        "scheduler": state.streams().scheduler().status(),
    })
}

/// `GET /api/profiles`: the names a viewer may choose, and the first stream's choice.
pub(crate) async fn profiles(State(state): State<AppState>) -> Json<Value> {
    let current = state.streams().first().map(|s| {
        let spec = s.spec();
        json!({ "profile": spec.profile, "instruction": spec.instruction })
    });
    Json(json!({
        "profiles": state.shared().profiles,
        "current": current,
        "max_instruction_chars": kibitz_commentator::MAX_INSTRUCTION_CHARS,
        "live_fields": kibitz_stream::LIVE_FIELDS,
        "voices": state.streams().voices_offered(),
        "history": state.shared().history.is_some(),
    }))
}

/// `GET /api/clock`: the server's time, for a page to keep its offset to it (speech
/// `play_at` times are in server time). Unix milliseconds.
pub(crate) async fn clock() -> Json<Value> {
    Json(json!({ "now_ms": kibitz_stream::unix_ms(std::time::Instant::now()) }))
}

/// `GET /healthz`: 200 while the process serves, whatever the engine does (a model still
/// downloading, an upstream resting): the liveness probe. Readiness is `/readyz`.
pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /readyz`: 200 when the engine is there and answers its health check, else 503; the
/// body says which in JSON: `{"ready", "state", "message", "download"?}` (the download's
/// bytes, total, speed and time left while the model is fetched).
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let engine = state.engine();
    let readiness = engine.readiness();
    let mut body = serde_json::to_value(&readiness).unwrap_or_else(|_| json!({}));
    let ready = if readiness.is_ready() {
        match tokio::time::timeout(HEALTH_TIMEOUT, engine.health()).await {
            Ok(true) => true,
            Ok(false) => {
                body["state"] = json!("down");
                body["message"] = json!(format!("the {} engine is down", engine.info().kind));
                false
            }
            Err(_) => {
                body["state"] = json!("down");
                body["message"] = json!(format!(
                    "the {} engine did not answer its health check within {HEALTH_TIMEOUT:?}",
                    engine.info().kind
                ));
                false
            }
        }
    } else {
        false
    };
    body["ready"] = json!(ready);
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// The request bodies and WebSocket messages as the handlers read them, without a server,
/// for the fuzz targets in `fuzz/` (not an API). What they lead to is checked by the owner
/// of each value (`StreamSpec::resolve`/`patch`, `check_rule`), which the targets call.
#[doc(hidden)]
pub mod fuzzing {
    use kibitz_stream::{RuleSettings, StreamSettings};

    use super::{parse, selection_change, Selection};
    use crate::ApiError;

    /// `POST /api/streams` and `PATCH /api/streams/{id}`.
    pub fn stream_settings(body: &[u8]) -> Result<StreamSettings, ApiError> {
        parse(body, "")
    }

    /// `POST /api/streams/{id}/instruction` and a WebSocket text message: the change asked.
    pub fn selection(body: &[u8]) -> Result<StreamSettings, ApiError> {
        let selection: Selection = parse(body, "")?;
        selection_change(selection.profile, selection.instruction)
    }

    /// `POST /api/streams/{id}/alerts`.
    pub fn alert_rule(body: &[u8]) -> Result<RuleSettings, ApiError> {
        parse(body, "")
    }

    /// `POST /api/streams/{id}/ask`.
    pub fn question(body: &[u8]) -> Result<String, ApiError> {
        parse::<crate::ask::Question>(body, "").map(|q| q.question)
    }
}

/// Not JSON → 400; JSON that does not fit `T` → 422 with serde's words (they name the
/// field).
pub(crate) fn parse<T: DeserializeOwned>(body: &[u8], example: &str) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the body must be JSON like {example}: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::BadRequest(format!(
            "the body must be a JSON object like {example}"
        )));
    }
    serde_json::from_value(value).map_err(|e| ApiError::Invalid {
        field: None,
        message: e.to_string(),
    })
}
