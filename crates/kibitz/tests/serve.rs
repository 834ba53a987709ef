//! `kibitz serve` end to end: real video through FFmpeg, the real llama.cpp engine on the
//! tiny model, real HTTP. Checks structure and rates with generous bounds, never wording.

use std::time::Duration;

mod fixture;
mod served;
use fixture::fixture;
use served::read_for;

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

fn cycle_ends(sse: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(sse)
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d.trim()).ok())
        .filter(|v| v["type"] == "cycle_end")
        .collect()
}

fn live_commentary(source: &str, fps: f64) {
    let server = served::start(&[format!("--source={}", fixture(source).display())], "0.5");
    // Events first: every cycle streams tokens and ends with its latency and the new delay.
    let sse = read_for(server.addr, "/api/stream", Duration::from_secs(12));
    let ends = cycle_ends(&sse);
    assert!(
        ends.len() >= 2,
        "at least two cycles in 12 s, got {}: {}",
        ends.len(),
        String::from_utf8_lossy(&sse)
    );
    assert!(count(&sse, b"\"type\":\"cycle_start\"") >= ends.len());
    // The delay is an EMA (alpha 0.2) of the latency of non-skipped cycles.
    let mut delay = None::<f64>;
    for end in &ends {
        let latency = end["latency"].as_f64().unwrap();
        let target = end["target_delay"].as_f64().unwrap();
        assert!(latency > 0.0 && latency < 30.0, "{end}");
        assert_eq!(end["frames"].as_array().unwrap().len(), 4, "{end}");
        if let (Some(before), false) = (delay, end["skipped"].as_bool().unwrap()) {
            let expected = 0.8 * before + 0.2 * latency;
            assert!(
                (target - expected).abs() < 1e-6,
                "delay {target} after {before} and latency {latency}"
            );
        }
        delay = Some(target);
    }
    // It moved from its start (5 s) toward the measured latency (under a few seconds here).
    assert!(delay.unwrap() < 5.0, "{ends:?}");

    // The picture, delayed by target_delay, comes at about the source's rate.
    let mjpeg = read_for(server.addr, "/api/mjpeg", Duration::from_secs(4));
    let frames = count(&mjpeg, b"Content-Type: image/jpeg");
    let rate = frames as f64 / 4.0;
    assert!(
        rate > fps * 0.5,
        "{rate:.1} fps of {fps} (a loaded 2-core CI box may drop some, not most)"
    );
    assert!(rate < fps * 1.5, "{rate:.1} fps of {fps}");

    let status = String::from_utf8_lossy(&read_for(
        server.addr,
        "/api/status",
        Duration::from_secs(1),
    ))
    .into_owned();
    let json = &status[status.find('{').unwrap()..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["source"]["state"], "live");
    assert_eq!(v["engine"]["kind"], "llama");
    assert!(v["buffers"]["display_frames"].as_u64().unwrap() > 0);
}

#[test]
fn testsrc2_gets_commentary_in_sync() {
    live_commentary("testsrc2-720p25.mp4", 25.0);
}

#[test]
fn big_buck_bunny_gets_commentary_in_sync() {
    live_commentary("bigbuckbunny.mp4", 25.0);
}
