//! `/metrics` in the Prometheus text format, written by hand: a couple of dozen lines do
//! not need a metrics library.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;

use crate::AppState;

pub(crate) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let shared = state.shared();
    let pipeline = shared.status.pipeline();
    let tally = state.tally();
    let meters = &shared.meters;
    let mut out = Metrics(String::with_capacity(4096));

    out.one(
        "kibitz_source_frames_total",
        "counter",
        "Frames decoded from the source.",
        pipeline.source.frames as f64,
    );
    out.one(
        "kibitz_source_reconnects_total",
        "counter",
        "Times the source was reconnected.",
        pipeline.source.reconnects as f64,
    );
    out.one(
        "kibitz_source_live",
        "gauge",
        "1 while the source delivers frames.",
        f64::from(u8::from(pipeline.source.state == "live")),
    );
    out.one(
        "kibitz_source_fps",
        "gauge",
        "The source's frame rate (0 while unknown).",
        shared.display.fps().unwrap_or(0.0),
    );
    out.one(
        "kibitz_display_buffer_frames",
        "gauge",
        "Frames in the display buffer.",
        pipeline.buffers.display_frames as f64,
    );
    out.one(
        "kibitz_display_buffer_bytes",
        "gauge",
        "JPEG bytes in the display buffer.",
        pipeline.buffers.display_bytes as f64,
    );
    out.one(
        "kibitz_window_frames",
        "gauge",
        "Frames in the inference window.",
        pipeline.buffers.window_frames as f64,
    );

    let load = |gauge: &std::sync::atomic::AtomicU64| gauge.load(Ordering::Relaxed) as f64;
    out.one(
        "kibitz_mjpeg_viewers",
        "gauge",
        "Open MJPEG streams.",
        load(&meters.mjpeg_viewers),
    );
    out.one(
        "kibitz_mjpeg_frames_sent_total",
        "counter",
        "Frames written to MJPEG viewers, all together.",
        load(&meters.mjpeg_frames),
    );
    out.one(
        "kibitz_event_clients",
        "gauge",
        "Open event streams (SSE and WebSocket).",
        load(&meters.sse_clients) + load(&meters.ws_clients),
    );
    out.one(
        "kibitz_event_clients_lagged_total",
        "counter",
        "Times an event client fell behind and skipped events.",
        load(&meters.lagged),
    );
    out.one(
        "kibitz_controls_total",
        "counter",
        "Profile or instruction changes forwarded.",
        load(&meters.controls),
    );

    out.one(
        "kibitz_cycles_total",
        "counter",
        "Commentary cycles finished, skipped ones included.",
        tally.cycles as f64,
    );
    out.one(
        "kibitz_cycles_skipped_total",
        "counter",
        "Cycles where the model had nothing new to say.",
        tally.skipped as f64,
    );
    out.one(
        "kibitz_cycle_errors_total",
        "counter",
        "Cycles that failed.",
        tally.errors as f64,
    );
    out.header(
        "kibitz_cycle_latency_seconds",
        "summary",
        "From the newest frame's capture to the end of the answer.",
    );
    out.line("kibitz_cycle_latency_seconds_sum", tally.latency_sum);
    out.line("kibitz_cycle_latency_seconds_count", tally.cycles as f64);
    out.header(
        "kibitz_inference_seconds",
        "summary",
        "Time inside the engine per cycle.",
    );
    out.line("kibitz_inference_seconds_sum", tally.inference_ms_sum / 1e3);
    out.line("kibitz_inference_seconds_count", tally.cycles as f64);
    if let Some(latency) = tally.last_latency {
        out.one(
            "kibitz_last_cycle_latency_seconds",
            "gauge",
            "Latency of the last cycle.",
            latency,
        );
    }
    out.one(
        "kibitz_target_delay_seconds",
        "gauge",
        "How far behind real time the picture is shown.",
        state.delay(),
    );
    out.one(
        "kibitz_engine_in_flight",
        "gauge",
        "Engine requests queued or running.",
        shared.engine.in_flight() as f64,
    );

    let mut text = out.0;
    let engine = shared.engine.metrics();
    text.push_str(&engine);
    if !engine.is_empty() && !engine.ends_with('\n') {
        text.push('\n');
    }
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
}

struct Metrics(String);

impl Metrics {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn line(&mut self, name: &str, value: f64) {
        let _ = writeln!(self.0, "{name} {value}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.header(name, kind, help);
        self.line(name, value);
    }
}

#[cfg(test)]
mod tests {
    use axum::body::{to_bytes, Body};
    use axum::http::{Request, StatusCode};
    use kibitz_commentator::{CycleEnd, Event};
    use tower::ServiceExt;

    use crate::fake::Harness;

    fn value(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text() {
        let harness = Harness::new();
        harness.set_delay(2.5);
        harness
            .events
            .send(Event::CycleEnd(CycleEnd {
                cycle: 0,
                text: "hi".into(),
                skipped: false,
                frames: vec![],
                latency: 1.25,
                inference_ms: 500.0,
                target_delay: 2.5,
                first_token_latency: None,
            }))
            .unwrap();
        let text = loop {
            let response = harness
                .router()
                .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert!(response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain; version=0.0.4"));
            let text = String::from_utf8(
                to_bytes(response.into_body(), usize::MAX)
                    .await
                    .unwrap()
                    .to_vec(),
            )
            .unwrap();
            if value(&text, "kibitz_cycles_total") == Some(1.0) {
                break text;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        assert_eq!(value(&text, "kibitz_target_delay_seconds"), Some(2.5));
        assert_eq!(value(&text, "kibitz_cycle_latency_seconds_sum"), Some(1.25));
        assert_eq!(value(&text, "kibitz_inference_seconds_sum"), Some(0.5));
        assert_eq!(value(&text, "kibitz_mjpeg_viewers"), Some(0.0));
        assert_eq!(value(&text, "kibitz_source_fps"), Some(10.0));
        // Every sample has its HELP and TYPE, and nothing else is on the page.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split([' ', '{']).next().unwrap();
            let family = name.trim_end_matches("_sum").trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{name} has no TYPE"
            );
        }
    }
}
