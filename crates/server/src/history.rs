//! The history: `GET /api/history?q=&stream=&since=&until=&limit=&before=` (full-text
//! search, newest first, `next` is the `before` of the next page; times RFC 3339 or unix
//! seconds) and `GET /api/streams/{id}/history.vtt?since=&until=` (a time range as WebVTT).

use axum::extract::{Query as QueryString, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kibitz_history::{parse_time, History, HistoryError, Page, Query};
use serde::Deserialize;

use crate::state::Target;
use crate::{ApiError, AppState};

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Params {
    q: Option<String>,
    stream: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
    before: Option<String>,
}

/// `GET /api/history`.
pub(crate) async fn search(
    State(state): State<AppState>,
    QueryString(params): QueryString<Params>,
) -> Result<Json<Page>, ApiError> {
    let history = history(&state)?;
    let query = Query {
        q: params.q.filter(|q| !q.trim().is_empty()),
        stream: params.stream.filter(|s| !s.is_empty()),
        since_ms: time(params.since.as_deref())?,
        until_ms: time(params.until.as_deref())?,
        limit: params.limit,
        before: params
            .before
            .filter(|b| !b.is_empty())
            .map(|b| b.parse())
            .transpose()
            .map_err(bad)?,
    };
    Ok(Json(history.search(query).await.map_err(bad)?))
}

/// `GET /api/streams/{id}/history.vtt`.
pub(crate) async fn vtt(
    State(state): State<AppState>,
    Target(handle): Target,
    QueryString(params): QueryString<Params>,
) -> Result<Response, ApiError> {
    let history = history(&state)?;
    let since = time(params.since.as_deref())?;
    let until = time(params.until.as_deref())?;
    let text = history
        .vtt(handle.id().as_str(), since, until)
        .await
        .map_err(bad)?;
    Ok((
        [
            (CONTENT_TYPE, "text/vtt; charset=utf-8"),
            (CACHE_CONTROL, "no-store"),
        ],
        text,
    )
        .into_response())
}

fn history(state: &AppState) -> Result<&History, ApiError> {
    state.shared().history.as_ref().ok_or_else(|| {
        ApiError::NotFound(
            "history is off on this server (--history off, or its file could not be opened)".into(),
        )
    })
}

fn time(text: Option<&str>) -> Result<Option<i64>, ApiError> {
    text.filter(|t| !t.is_empty())
        .map(parse_time)
        .transpose()
        .map_err(bad)
}

/// A bad parameter is the client's (422); anything else is ours.
fn bad(e: HistoryError) -> ApiError {
    if e.is_bad_input() {
        ApiError::Invalid {
            field: None,
            message: e.to_string(),
        }
    } else {
        ApiError::Internal(e.to_string())
    }
}
