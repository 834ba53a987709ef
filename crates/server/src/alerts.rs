//! Alert rules over HTTP (`GET`/`POST /api/streams/{id}/alerts`, `DELETE
//! /api/streams/{id}/alerts/{rule}`), fired alerts (`GET /api/alerts`, `GET
//! /api/alerts/{id}/clip`), and the webhook that tells another system.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use kibitz_stream::{Alert, AlertSink, RuleSettings};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::mpsc;

use crate::state::Target;
use crate::{ApiError, AppState};

/// `GET /api/streams/{id}/alerts`.
pub(crate) async fn list(Target(handle): Target) -> Json<Value> {
    Json(json!({ "rules": handle.alert_rules() }))
}

/// `POST /api/streams/{id}/alerts` `{"rule": "...", "cooldown"?: seconds}` → `201`.
pub(crate) async fn add(Target(handle): Target, body: Bytes) -> Result<Response, ApiError> {
    let settings: RuleSettings = crate::api::parse(
        &body,
        r#"{"rule": "a person climbs the fence", "cooldown": 60}"#,
    )?;
    let rule = handle.add_alert_rule(&settings)?;
    Ok((StatusCode::CREATED, Json(rule)).into_response())
}

/// `DELETE /api/streams/{id}/alerts/{rule}` → `204`.
pub(crate) async fn remove(
    Target(handle): Target,
    Path((_, rule)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let rule: u64 = rule
        .parse()
        .map_err(|_| ApiError::NotFound(format!("no rule '{rule}'")))?;
    handle.remove_alert_rule(rule)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/alerts`: the alerts fired lately, newest last.
pub(crate) async fn recent(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "alerts": state.streams().alerts().recent() }))
}

/// `GET /api/alerts/{id}/clip`: the seconds of picture around it, as Motion JPEG.
pub(crate) async fn clip(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let alert = id
        .parse()
        .ok()
        .and_then(|id| state.streams().alerts().get(id))
        .ok_or_else(|| {
            ApiError::NotFound(format!("no alert '{id}': only the last few are kept"))
        })?;
    Ok((
        [
            (CONTENT_TYPE, "video/x-motion-jpeg".to_string()),
            (CACHE_CONTROL, "max-age=3600".to_string()),
            (
                CONTENT_DISPOSITION,
                format!("inline; filename=\"alert-{id}.mjpeg\""),
            ),
        ],
        alert.clip_bytes(),
    )
        .into_response())
}

/// Tries a delivery this many times, waiting twice as long after each failure.
const ATTEMPTS: u32 = 5;
const FIRST_RETRY: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(5);
/// Alerts waiting for the webhook at most; more are dropped with a warning.
const QUEUE: usize = 64;

/// `--webhook URL [--webhook-secret S]`: each alert is POSTed as JSON (stream, rule,
/// comment, time, the frame as base64 JPEG, the clip's URL), signed with HMAC-SHA256 of the
/// body in `X-Kibitz-Signature: sha256=HEX` when there is a secret, retried with backoff.
/// One task delivers in order; `deliver` only queues, so the loop never waits.
pub struct Webhook {
    queue: mpsc::Sender<Value>,
    /// How the receiver reaches this server (`http://host:port`), for the clip's URL.
    base: String,
}

impl Webhook {
    /// Starts the delivery task; call inside the tokio runtime.
    pub fn start(url: String, secret: Option<String>, base: String) -> Webhook {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(deliver_all(url, secret, rx));
        Webhook {
            queue,
            base: base.trim_end_matches('/').to_string(),
        }
    }
}

impl AlertSink for Webhook {
    fn deliver(&self, alert: &Alert) {
        let frame = alert
            .frame
            .as_ref()
            .map(|jpeg| base64::engine::general_purpose::STANDARD.encode(&jpeg.bytes));
        let body = json!({
            "alert": alert.id,
            "stream": alert.stream,
            "rule": alert.rule,
            "comment": alert.comment,
            "time": alert.time,
            "frame_jpeg": frame,
            "clip": format!("{}{}", self.base, alert.clip),
        });
        if self.queue.try_send(body).is_err() {
            tracing::warn!(
                alert = alert.id,
                "the webhook is behind; this alert is not sent"
            );
        }
    }
}

async fn deliver_all(url: String, secret: Option<String>, mut rx: mpsc::Receiver<Value>) {
    let client = match reqwest::Client::builder().timeout(TIMEOUT).build() {
        Ok(client) => client,
        Err(e) => {
            tracing::error!("cannot start the webhook client: {e}");
            return;
        }
    };
    while let Some(body) = rx.recv().await {
        let body = body.to_string();
        let mut wait = FIRST_RETRY;
        for attempt in 1..=ATTEMPTS {
            let mut request = client
                .post(&url)
                .header(CONTENT_TYPE, "application/json")
                .body(body.clone());
            if let Some(secret) = &secret {
                request = request.header(
                    "X-Kibitz-Signature",
                    format!(
                        "sha256={}",
                        hex::encode(hmac_sha256(secret.as_bytes(), body.as_bytes()))
                    ),
                );
            }
            match request.send().await {
                Ok(response) if response.status().is_success() => break,
                Ok(response) => tracing::warn!(
                    attempt,
                    status = %response.status(),
                    "the webhook refused an alert"
                ),
                Err(e) => tracing::warn!(attempt, "the webhook is unreachable: {e}"),
            }
            if attempt == ATTEMPTS {
                tracing::error!("an alert was dropped after {ATTEMPTS} webhook attempts");
            } else {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    }
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key`, as `X-Kibitz-Signature` carries it.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Shared so the binary can hand it to the registry.
pub fn sink(webhook: Webhook) -> Arc<dyn AlertSink> {
    Arc::new(webhook)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // RFC 4231, test case 2.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than a block.
        let mac = hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            hex::encode(mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }
}
