//! `/metrics` in the OpenMetrics text format (which Prometheus reads), written by
//! `prometheus-client`: one registry per scrape holds the server's families and the
//! engine's ([`kibitz_engine::Engine::register_metrics`]), and its encoder writes them all.
//! Per-stream samples carry a `stream` label and come from each stream's one status.
//! Counter families are named without `_total`; their samples end in it
//! (`kibitz_source_frames_total{stream="cam"}`).

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use kibitz_engine::metrics::{self, Labels, MetricFamilies, Registry};
use kibitz_stream::StreamStatus;

use crate::AppState;

type Read = fn(&StreamStatus) -> Option<f64>;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Counter,
    Gauge,
}
use Kind::{Counter, Gauge};

/// Per-stream families: name, type, help, how to read it from the status.
const PER_STREAM: &[(&str, Kind, &str, Read)] = &[
    (
        "kibitz_source_frames",
        Counter,
        "Frames decoded from the source.",
        |s| Some(s.source.frames as f64),
    ),
    (
        "kibitz_source_reconnects",
        Counter,
        "Times the source was reconnected.",
        |s| Some(s.source.reconnects as f64),
    ),
    (
        "kibitz_source_live",
        Gauge,
        "1 while the source delivers frames.",
        |s| Some(f64::from(u8::from(s.source.state == "live"))),
    ),
    (
        "kibitz_source_fps",
        Gauge,
        "The source's frame rate (0 while unknown).",
        |s| Some(s.source.fps.unwrap_or(0.0)),
    ),
    (
        "kibitz_display_buffer_frames",
        Gauge,
        "Frames in the display buffer.",
        |s| Some(s.buffers.display_frames as f64),
    ),
    (
        "kibitz_display_buffer_bytes",
        Gauge,
        "JPEG bytes in the display buffer.",
        |s| Some(s.buffers.display_bytes as f64),
    ),
    (
        "kibitz_window_frames",
        Gauge,
        "Frames in the inference window.",
        |s| Some(s.buffers.window_frames as f64),
    ),
    ("kibitz_mjpeg_viewers", Gauge, "Open MJPEG streams.", |s| {
        Some(s.running("mjpeg") as f64)
    }),
    (
        "kibitz_mjpeg_frames_sent",
        Counter,
        "Frames written to MJPEG viewers, all together.",
        |s| Some(s.frames_sent("mjpeg") as f64),
    ),
    (
        "kibitz_event_clients",
        Gauge,
        "Open per-stream event streams (SSE and WebSocket).",
        |s| Some((s.running("sse") + s.running("ws")) as f64),
    ),
    (
        "kibitz_cycles",
        Counter,
        "Commentary cycles finished, skipped ones included.",
        |s| Some(s.commentary.cycles_done as f64),
    ),
    (
        "kibitz_cycles_skipped",
        Counter,
        "Cycles where the model had nothing new to say.",
        |s| Some(s.commentary.cycles_skipped as f64),
    ),
    ("kibitz_cycle_errors", Counter, "Cycles that failed.", |s| {
        Some(s.commentary.cycles_failed as f64)
    }),
    (
        "kibitz_last_cycle_latency_seconds",
        Gauge,
        "From the newest frame's capture to the end of the answer, last cycle.",
        |s| s.commentary.last_latency,
    ),
    (
        "kibitz_target_delay_seconds",
        Gauge,
        "How far behind real time the picture is shown.",
        |s| Some(s.target_delay),
    ),
];

pub(crate) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let statuses: Vec<StreamStatus> = state.streams().list().iter().map(|s| s.status()).collect();
    let mut registry = Registry::default();
    stream_families(&statuses).register(&mut registry);
    server_families(&state, statuses.len()).register(&mut registry);
    state.engine().register_metrics(&mut registry);
    (
        [(CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::encode(&registry),
    )
}

fn stream_label(status: &StreamStatus) -> Labels {
    vec![("stream", status.id.to_string())]
}

/// [`PER_STREAM`] and the per-stream summaries, one sample per stream.
fn stream_families(statuses: &[StreamStatus]) -> MetricFamilies {
    let mut families = MetricFamilies::new();
    for &(name, kind, help, read) in PER_STREAM {
        let samples = statuses
            .iter()
            .filter_map(|s| read(s).map(|value| (stream_label(s), value)));
        match kind {
            Counter => families.counter(name, help, samples),
            Gauge => families.gauge(name, help, samples),
        }
    }
    // Every output by the name it gives, so a new kind needs no line here.
    families.gauge(
        "kibitz_outputs",
        "Outputs running, by name (label `output`).",
        statuses.iter().flat_map(|status| {
            status.outputs.iter().map(move |(output, count)| {
                let labels: Labels = vec![
                    ("stream", status.id.to_string()),
                    ("output", output.to_string()),
                ];
                (labels, count.running)
            })
        }),
    );
    // A sum and a count per stream.
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
        let samples = statuses
            .iter()
            .map(|s| (stream_label(s), sum(s), s.commentary.cycles_done));
        families.sum_count(name, help, samples);
    }
    families
}

/// The server's own numbers, one sample each.
fn server_families(state: &AppState, streams: usize) -> MetricFamilies {
    let meters = &state.shared().meters;
    let load = |gauge: &std::sync::atomic::AtomicU64| gauge.load(Ordering::Relaxed);
    let one = |value: u64| [(Labels::new(), value)];
    let mut families = MetricFamilies::new();
    families.gauge("kibitz_streams", "Streams running.", one(streams as u64));
    families.gauge(
        "kibitz_bus_clients",
        "Open /api/events connections.",
        one(load(&meters.bus_clients)),
    );
    families.counter(
        "kibitz_event_clients_lagged",
        "Times an event client fell behind and skipped events.",
        one(load(&meters.lagged)),
    );
    families.counter(
        "kibitz_changes",
        "Streams added, changed or removed through the API.",
        one(load(&meters.changes)),
    );
    families.gauge(
        "kibitz_engine_in_flight",
        "Engine requests queued or running.",
        one(state.engine().in_flight() as u64),
    );
    families
}
