//! `/metrics` in the Prometheus text format, written by hand: a few dozen lines do not
//! need a metrics library. Per-stream samples carry a `stream` label and come from each
//! stream's one status.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use kibitz_stream::StreamStatus;

use crate::AppState;

type Read = fn(&StreamStatus) -> Option<f64>;

/// Per-stream families: name, type, help, how to read it from the status.
const PER_STREAM: &[(&str, &str, &str, Read)] = &[
    (
        "kibitz_source_frames_total",
        "counter",
        "Frames decoded from the source.",
        |s| Some(s.source.frames as f64),
    ),
    (
        "kibitz_source_reconnects_total",
        "counter",
        "Times the source was reconnected.",
        |s| Some(s.source.reconnects as f64),
    ),
    (
        "kibitz_source_live",
        "gauge",
        "1 while the source delivers frames.",
        |s| Some(f64::from(u8::from(s.source.state == "live"))),
    ),
    (
        "kibitz_source_fps",
        "gauge",
        "The source's frame rate (0 while unknown).",
        |s| Some(s.source.fps.unwrap_or(0.0)),
    ),
    (
        "kibitz_display_buffer_frames",
        "gauge",
        "Frames in the display buffer.",
        |s| Some(s.buffers.display_frames as f64),
    ),
    (
        "kibitz_display_buffer_bytes",
        "gauge",
        "JPEG bytes in the display buffer.",
        |s| Some(s.buffers.display_bytes as f64),
    ),
    (
        "kibitz_window_frames",
        "gauge",
        "Frames in the inference window.",
        |s| Some(s.buffers.window_frames as f64),
    ),
    (
        "kibitz_mjpeg_viewers",
        "gauge",
        "Open MJPEG streams.",
        |s| Some(s.running("mjpeg") as f64),
    ),
    (
        "kibitz_mjpeg_frames_sent_total",
        "counter",
        "Frames written to MJPEG viewers, all together.",
        |s| Some(s.frames_sent("mjpeg") as f64),
    ),
    (
        "kibitz_event_clients",
        "gauge",
        "Open per-stream event streams (SSE and WebSocket).",
        |s| Some((s.running("sse") + s.running("ws")) as f64),
    ),
    (
        "kibitz_cycles_total",
        "counter",
        "Commentary cycles finished, skipped ones included.",
        |s| Some(s.commentary.cycles_done as f64),
    ),
    (
        "kibitz_cycles_skipped_total",
        "counter",
        "Cycles where the model had nothing new to say.",
        |s| Some(s.commentary.cycles_skipped as f64),
    ),
    (
        "kibitz_cycle_errors_total",
        "counter",
        "Cycles that failed.",
        |s| Some(s.commentary.cycles_failed as f64),
    ),
    (
        "kibitz_last_cycle_latency_seconds",
        "gauge",
        "From the newest frame's capture to the end of the answer, last cycle.",
        |s| s.commentary.last_latency,
    ),
    (
        "kibitz_target_delay_seconds",
        "gauge",
        "How far behind real time the picture is shown.",
        |s| Some(s.target_delay),
    ),
];

pub(crate) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let statuses: Vec<StreamStatus> = state.streams().list().iter().map(|s| s.status()).collect();
    let mut out = Metrics(String::with_capacity(4096));
    for (name, kind, help, read) in PER_STREAM {
        out.header(name, kind, help);
        for status in &statuses {
            if let Some(value) = read(status) {
                let _ = writeln!(out.0, "{name}{{stream=\"{}\"}} {value}", status.id);
            }
        }
    }

    // Every output by the name it gives, so a new kind needs no line here.
    out.header(
        "kibitz_outputs",
        "gauge",
        "Outputs running, by name (label `output`).",
    );
    for status in &statuses {
        for (output, count) in &status.outputs {
            let _ = writeln!(
                out.0,
                "kibitz_outputs{{stream=\"{}\",output=\"{output}\"}} {}",
                status.id, count.running
            );
        }
    }

    // Summaries: a sum and a count per stream.
    for (name, help, sum) in [
        (
            "kibitz_cycle_latency_seconds",
            "From the newest frame's capture to the end of the answer.",
            (|s: &StreamStatus| s.commentary.latency_sum_s) as fn(&StreamStatus) -> f64,
        ),
        (
            "kibitz_inference_seconds",
            "Time inside the engine per cycle.",
            |s: &StreamStatus| s.commentary.inference_sum_s,
        ),
    ] {
        out.header(name, "summary", help);
        for status in &statuses {
            let id = &status.id;
            let _ = writeln!(out.0, "{name}_sum{{stream=\"{id}\"}} {}", sum(status));
            let _ = writeln!(
                out.0,
                "{name}_count{{stream=\"{id}\"}} {}",
                status.commentary.cycles_done
            );
        }
    }

    let meters = &state.shared().meters;
    let load = |gauge: &std::sync::atomic::AtomicU64| gauge.load(Ordering::Relaxed) as f64;
    out.one(
        "kibitz_streams",
        "gauge",
        "Streams running.",
        statuses.len() as f64,
    );
    out.one(
        "kibitz_bus_clients",
        "gauge",
        "Open /api/events connections.",
        load(&meters.bus_clients),
    );
    out.one(
        "kibitz_event_clients_lagged_total",
        "counter",
        "Times an event client fell behind and skipped events.",
        load(&meters.lagged),
    );
    out.one(
        "kibitz_changes_total",
        "counter",
        "Streams added, changed or removed through the API.",
        load(&meters.changes),
    );
    let engine = state.engine();
    out.one(
        "kibitz_engine_in_flight",
        "gauge",
        "Engine requests queued or running.",
        engine.in_flight() as f64,
    );

    let mut text = out.0;
    let extra = engine.metrics();
    text.push_str(&extra);
    if !extra.is_empty() && !extra.ends_with('\n') {
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

    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.header(name, kind, help);
        let _ = writeln!(self.0, "{name} {value}");
    }
}
