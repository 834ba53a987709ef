//! The small JSON endpoints: status, profiles, the one control endpoint, health.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::state::{Change, Selection};
use crate::{ApiError, AppState};

/// A health check that takes longer than this counts as down.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

/// Everything a person or a monitor wants to know at a glance.
pub(crate) async fn status(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let shared = state.shared();
    let pipeline = shared.status.pipeline();
    let mut source =
        serde_json::to_value(&pipeline.source).map_err(|e| ApiError::Internal(e.to_string()))?;
    source["fps"] = json!(shared.display.fps());
    let engine = &shared.engine;
    let info = engine.info();
    let healthy = tokio::time::timeout(HEALTH_TIMEOUT, engine.health())
        .await
        .unwrap_or(false);
    let tally = state.tally();
    let meters = &shared.meters;
    let load =
        |gauge: &std::sync::atomic::AtomicU64| gauge.load(std::sync::atomic::Ordering::Relaxed);
    Ok(Json(json!({
        "source": source,
        "buffers": pipeline.buffers,
        "extra": pipeline.extra,
        "commentary": tally,
        "selection": state.selection(),
        "target_delay": state.delay(),
        "viewers": {
            "mjpeg": load(&meters.mjpeg_viewers),
            "sse": load(&meters.sse_clients),
            "ws": load(&meters.ws_clients),
        },
        "engine": {
            "kind": info.kind,
            "model": info.model,
            "backend": info.backend,
            "healthy": healthy,
            "in_flight": engine.in_flight(),
            "status": engine.status(),
        },
        "model": info.model,
        "uptime_s": shared.started.elapsed().as_secs_f64(),
    })))
}

pub(crate) async fn profiles(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "profiles": state.shared().profiles,
        "current": state.selection(),
        "max_instruction_chars": crate::state::MAX_INSTRUCTION_CHARS,
    }))
}

/// `{profile?, instruction?}`. The body is parsed here rather than by axum's `Json` so
/// every malformed body (no content type from `curl -d`, bad syntax, wrong field) gets
/// the same 400 with a reason.
pub(crate) async fn instruction(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Json<Selection>, ApiError> {
    let change: Change = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "the body must be JSON like {{\"profile\": \"sports\", \"instruction\": \"...\"}}: {e}"
        ))
    })?;
    Ok(Json(state.apply(change)?))
}

/// 200 while the engine can serve, 503 when it cannot.
pub(crate) async fn healthz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    let engine = &state.shared().engine;
    match tokio::time::timeout(HEALTH_TIMEOUT, engine.health()).await {
        Ok(true) => Ok("ok\n"),
        Ok(false) => Err(ApiError::Unavailable(format!(
            "the {} engine is down",
            engine.info().kind
        ))),
        Err(_) => Err(ApiError::Unavailable(format!(
            "the {} engine did not answer its health check within {HEALTH_TIMEOUT:?}",
            engine.info().kind
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::{to_bytes, Body};
    use axum::http::{header, Request, StatusCode};
    use axum::response::Response;
    use kibitz_commentator::{Control, CycleEnd, Event};
    use tower::ServiceExt;

    use super::*;
    use crate::fake::Harness;
    use crate::{PipelineStatus, SourceStatus};

    async fn json_body(response: Response) -> Value {
        let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)))
    }

    fn post(body: impl Into<Body>) -> Request<Body> {
        Request::post("/api/instruction")
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.into())
            .unwrap()
    }

    #[tokio::test]
    async fn profiles_lists_names_and_current() {
        let harness = Harness::new();
        let response = harness
            .router()
            .oneshot(Request::get("/api/profiles").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = json_body(response).await;
        assert_eq!(
            body["profiles"],
            json!(["default", "sports", "security", "nature", "descriptive"])
        );
        assert_eq!(body["current"]["profile"], "default");
        assert_eq!(body["current"]["instruction"], "");
    }

    #[tokio::test]
    async fn instruction_forwards_controls_and_updates_the_selection() {
        let mut harness = Harness::new();
        let response = harness
            .router()
            .oneshot(post(
                r#"{"profile":"nature","instruction":"  name the birds "}"#,
            ))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            json_body(response).await,
            json!({"profile": "nature", "instruction": "name the birds"})
        );
        assert_eq!(
            harness.controls.try_recv().unwrap(),
            Control::SetProfile("nature".into())
        );
        assert_eq!(
            harness.controls.try_recv().unwrap(),
            Control::SetInstruction("name the birds".into())
        );
        assert_eq!(harness.state.selection().profile, "nature");

        // Without a content type (curl -d) and with only an instruction.
        let request = Request::post("/api/instruction")
            .body(Body::from(r#"{"instruction":""}"#))
            .unwrap();
        let response = harness.router().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            harness.controls.try_recv().unwrap(),
            Control::SetInstruction(String::new())
        );
        assert_eq!(
            harness.state.selection(),
            Selection {
                profile: "nature".into(),
                instruction: String::new()
            }
        );
    }

    #[tokio::test]
    async fn bad_instructions_get_400_with_a_reason() {
        let long = "x".repeat(2001);
        let cases = [
            ("{not json".to_string(), "must be JSON"),
            ("".to_string(), "must be JSON"),
            (r#"["sports"]"#.to_string(), "must be JSON"),
            (r#"{"profile": 3}"#.to_string(), "must be JSON"),
            (
                r#"{"profil": "sports"}"#.to_string(),
                "unknown field `profil`",
            ),
            (r#"{}"#.to_string(), "nothing to change"),
            (
                r#"{"profile": "opera"}"#.to_string(),
                "unknown profile 'opera'; choose one of: default, sports",
            ),
            (
                format!(r#"{{"instruction": "{long}"}}"#),
                "2001 characters long; the limit is 2000",
            ),
            // Valid profile, bad instruction: nothing at all is applied.
            (
                format!(r#"{{"profile": "sports", "instruction": "{long}"}}"#),
                "the limit is 2000",
            ),
        ];
        let mut harness = Harness::new();
        for (body, reason) in cases {
            let response = harness.router().oneshot(post(body.clone())).await.unwrap();
            assert_eq!(
                response.status(),
                StatusCode::BAD_REQUEST,
                "body {body:.60}"
            );
            let error = json_body(response).await["error"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(
                error.contains(reason),
                "body {body:.60}: reason {error:?} lacks {reason:?}"
            );
        }
        assert!(
            harness.controls.try_recv().is_err(),
            "a rejected change reached the loop"
        );
        assert_eq!(harness.state.selection().profile, "default");
    }

    #[tokio::test]
    async fn the_limit_counts_characters_not_bytes() {
        let harness = Harness::new();
        let text = "é".repeat(2000);
        let response = harness
            .router()
            .oneshot(post(json!({ "instruction": text }).to_string()))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_full_control_queue_is_429_and_a_stopped_loop_503() {
        let mut harness = Harness::with_control_capacity(1);
        let ok = harness
            .router()
            .oneshot(post(r#"{"profile":"sports"}"#))
            .await
            .unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        let busy = harness
            .router()
            .oneshot(post(r#"{"profile":"nature"}"#))
            .await
            .unwrap();
        assert_eq!(busy.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(json_body(busy).await["error"]
            .as_str()
            .unwrap()
            .contains("try again"));
        assert_eq!(
            harness.state.selection().profile,
            "sports",
            "a refused change must not apply"
        );

        harness.controls.close();
        while harness.controls.try_recv().is_ok() {}
        let stopped = harness
            .router()
            .oneshot(post(r#"{"profile":"nature"}"#))
            .await
            .unwrap();
        assert_eq!(stopped.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn status_reports_source_commentary_delay_and_engine() {
        let harness = Harness::new();
        harness.status.set(PipelineStatus {
            source: SourceStatus {
                name: "match.mp4".into(),
                state: "reconnecting".into(),
                retry_in: Some(4.0),
                ..SourceStatus::default()
            },
            ..PipelineStatus::default()
        });
        harness.set_delay(3.25);
        harness
            .events
            .send(Event::CycleEnd(CycleEnd {
                cycle: 1,
                text: "a goal".into(),
                skipped: false,
                frames: vec![0.5],
                latency: 2.0,
                inference_ms: 1500.0,
                target_delay: 3.25,
                first_token_latency: None,
            }))
            .unwrap();
        harness
            .events
            .send(Event::CycleEnd(CycleEnd {
                cycle: 2,
                text: String::new(),
                skipped: true,
                frames: vec![1.5],
                latency: 1.0,
                inference_ms: 700.0,
                target_delay: 3.25,
                first_token_latency: None,
            }))
            .unwrap();
        harness
            .events
            .send(Event::Error {
                cycle: Some(3),
                message: "engine failed".into(),
            })
            .unwrap();
        // The tally task runs beside the request; wait until it has seen all three.
        let body = loop {
            let response = harness
                .router()
                .oneshot(Request::get("/api/status").body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let body = json_body(response).await;
            if body["commentary"]["errors"] == 1 {
                break body;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(body["source"]["name"], "match.mp4");
        assert_eq!(body["source"]["state"], "reconnecting");
        assert_eq!(body["source"]["retry_in"], 4.0);
        assert_eq!(body["source"]["fps"], 10.0);
        assert_eq!(body["commentary"]["cycles"], 2);
        assert_eq!(body["commentary"]["skipped"], 1);
        assert_eq!(body["commentary"]["latencies"], json!([2.0, 1.0]));
        assert_eq!(body["commentary"]["last_comment"], "a goal");
        assert_eq!(body["target_delay"], 3.25);
        assert_eq!(body["engine"]["kind"], "fake");
        assert_eq!(body["engine"]["healthy"], true);
        assert_eq!(body["model"], "scripted");
        assert_eq!(body["selection"]["profile"], "default");
    }

    #[tokio::test]
    async fn healthz_follows_the_engine() {
        let harness = Harness::new();
        let response = harness
            .router()
            .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);

        let down = Harness::with_engine(Arc::new(DownEngine));
        let response = down
            .router()
            .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(json_body(response).await["error"]
            .as_str()
            .unwrap()
            .contains("engine is down"));
    }

    /// An engine whose upstream is gone.
    struct DownEngine;

    impl kibitz_engine::Engine for DownEngine {
        fn submit(
            &self,
            _: kibitz_engine::Request,
        ) -> Result<kibitz_engine::Generation, kibitz_engine::EngineError> {
            Err(kibitz_engine::EngineError::Unavailable("down".into()))
        }
        fn info(&self) -> kibitz_engine::EngineInfo {
            kibitz_engine::EngineInfo {
                kind: "openai".into(),
                model: "m".into(),
                backend: "http://nowhere".into(),
            }
        }
        fn in_flight(&self) -> usize {
            0
        }
        fn health(&self) -> futures::future::BoxFuture<'_, bool> {
            Box::pin(async { false })
        }
    }
}
