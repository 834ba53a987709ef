//! `POST /api/streams/{id}/ask`: a viewer's question about what the stream shows now. The
//! answer streams back as the response body (plain text, piece by piece) and to everyone
//! watching as `answer_start` / `answer_token` / `answer_end` events. Questions go before
//! the next commentary cycle; each client may ask [`BURST`] at once and then one every
//! [`REFILL`] (`429` beyond).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderValue, Request};
use axum::response::{IntoResponse, Response};
use futures::stream;
use kibitz_stream::AnswerPiece;
use serde::Deserialize;

use crate::state::Target;
use crate::{ApiError, AppState};

/// Questions a client may ask in a row.
pub(crate) const BURST: f64 = 3.0;
/// Then one more each this long.
pub(crate) const REFILL: Duration = Duration::from_secs(5);
/// Clients remembered at most (the oldest are forgotten first).
const CLIENTS: usize = 10_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Question {
    pub(crate) question: String,
}

pub(crate) async fn ask(
    State(state): State<AppState>,
    Target(handle): Target,
    request: Request<Body>,
) -> Result<Response, ApiError> {
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let body = axum::body::to_bytes(request.into_body(), crate::MAX_BODY)
        .await
        .map_err(|e| ApiError::BadRequest(format!("cannot read the body: {e}")))?;
    let question: Question = crate::api::parse(&body, r#"{"question": "who is winning?"}"#)?;
    if let Err(wait) = state.shared().questions.take(client, Instant::now()) {
        let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
        let mut response =
            ApiError::Busy(format!("too many questions: ask again in {seconds} s")).into_response();
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            HeaderValue::from_str(&seconds.to_string()).expect("digits"),
        );
        return Ok(response);
    }
    let (id, pieces) = handle.ask(&question.question)?;
    let body = stream::unfold(pieces, |mut pieces| async move {
        let piece = match pieces.recv().await? {
            AnswerPiece::Text(text) => text,
            AnswerPiece::Failed(reason) => format!("\n[no answer: {reason}]\n"),
        };
        Some((Ok::<_, Infallible>(Bytes::from(piece)), pieces))
    });
    let mut response = (
        [
            (CONTENT_TYPE, "text/plain; charset=utf-8"),
            (CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(body),
    )
        .into_response();
    response.headers_mut().insert(
        "x-answer-id",
        HeaderValue::from_str(&id.to_string()).expect("digits"),
    );
    // Proxies must pass the pieces through as they come.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// A token bucket per client address.
#[derive(Default)]
pub(crate) struct RateLimit {
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimit {
    /// Takes one question from `client`'s bucket, or says how long until the next.
    fn take(&self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= CLIENTS && !buckets.contains_key(&client) {
            // Forget the client seen longest ago.
            if let Some(oldest) = buckets
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(ip, _)| *ip)
            {
                buckets.remove(&oldest);
            }
        }
        let (tokens, at) = buckets.entry(client).or_insert((BURST, now));
        let refilled = now.saturating_duration_since(*at).as_secs_f64() / REFILL.as_secs_f64();
        *tokens = (*tokens + refilled).min(BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(REFILL.mul_f64(1.0 - *tokens))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_refill() {
        let limit = RateLimit::default();
        let client = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limit.take(client, t0).is_ok());
        }
        let wait = limit.take(client, t0).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= REFILL, "{wait:?}");
        assert!(limit.take(client, t0 + REFILL).is_ok());
        assert!(limit.take(client, t0 + REFILL).is_err());
        // Someone else is not held up.
        assert!(limit
            .take(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)), t0)
            .is_ok());
    }
}
