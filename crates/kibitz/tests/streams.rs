//! Several streams in one `kibitz serve`: real FFmpeg sources, the real llama.cpp engine on
//! the tiny model, real HTTP. Each stream gets its own pictures and its own commentary, a
//! dead camera beside them reconnects without disturbing them, and streams come and go
//! through the API without a restart.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use serde_json::Value;

mod fixture;
mod served;
use fixture::fixture;
use served::{read_for, request};

fn json(addr: SocketAddr, path: &str) -> Value {
    let (status, data) = request(addr, "GET", path, "", Duration::from_secs(5));
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&data));
    let text = String::from_utf8_lossy(&data).into_owned();
    serde_json::from_str(&text[text.find("\r\n\r\n").unwrap() + 4..]).unwrap()
}

/// The size in a JPEG's start-of-frame segment.
fn jpeg_size(jpeg: &[u8]) -> Option<(u16, u16)> {
    let mut i = 2;
    while i + 9 < jpeg.len() {
        if jpeg[i] != 0xFF {
            i += 1;
            continue;
        }
        let marker = jpeg[i + 1];
        let len = u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
        if matches!(marker, 0xC0..=0xC3) {
            let h = u16::from_be_bytes([jpeg[i + 5], jpeg[i + 6]]);
            let w = u16::from_be_bytes([jpeg[i + 7], jpeg[i + 8]]);
            return Some((w, h));
        }
        i += 2 + len;
    }
    None
}

/// The sizes of the JPEGs in an MJPEG body.
fn mjpeg_sizes(body: &[u8]) -> Vec<(u16, u16)> {
    let mut sizes = Vec::new();
    let mut at = 0;
    while let Some(start) = body[at..].windows(2).position(|w| w == [0xFF, 0xD8]) {
        let start = at + start;
        if let Some(size) = jpeg_size(&body[start..]) {
            sizes.push(size);
        }
        at = start + 2;
        // Skip to the next part.
        match body[at..].windows(14).position(|w| w == b"--kibitzframe\r") {
            Some(next) => at += next,
            None => break,
        }
    }
    sizes
}

#[test]
fn three_streams_and_a_dead_camera_each_get_their_own_pictures_and_words() {
    // A port nothing listens on: the camera is dead from the start.
    let dead_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let streams_file = dir.path().join("streams.toml");
    std::fs::write(
        &streams_file,
        format!(
            "[clip]\nsource = \"{}\"\nprofile = \"nature\"\n\n[dead]\nsource = \"rtsp://127.0.0.1:{dead_port}/cam\"\n",
            fixture("clip.mjpeg").display()
        ),
    )
    .unwrap();
    let server = served::start(
        &[
            format!(
                "--source=small={}",
                fixture("testsrc2-360p25.mp4").display()
            ),
            format!("--source=bunny={}", fixture("bigbuckbunny.mp4").display()),
            format!("--streams={}", streams_file.display()),
        ],
        "0.3",
    );

    // Every live stream's cycles end, each event tagged with its stream, on one connection.
    let events = read_for(server.addr, "/api/events", Duration::from_secs(15));
    let text = String::from_utf8_lossy(&events);
    let mut ends = std::collections::BTreeMap::<String, usize>::new();
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let Ok(event) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        if event["type"] == "cycle_end" {
            assert_eq!(event["frames"].as_array().unwrap().len(), 4, "{event}");
            *ends
                .entry(event["stream"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    for id in ["small", "bunny", "clip"] {
        assert!(
            ends.get(id).copied().unwrap_or(0) >= 1,
            "no cycle for {id} in 15 s: {ends:?}"
        );
    }
    assert!(!ends.contains_key("dead"), "{ends:?}");

    // Each stream's picture is its own source's (the sizes tell them apart).
    for (id, size) in [
        ("small", (640, 360)),
        ("bunny", (1280, 720)),
        ("clip", (320, 240)),
    ] {
        let (status, body) = request(
            server.addr,
            "GET",
            &format!("/api/streams/{id}/mjpeg"),
            "",
            Duration::from_secs(2),
        );
        assert_eq!(status, 200, "{id}");
        let sizes = mjpeg_sizes(&body);
        assert!(sizes.len() >= 5, "{id}: {} frames", sizes.len());
        assert!(sizes.iter().all(|s| *s == size), "{id}: {sizes:?}");
    }

    // The dead camera retries on its own while the others play.
    let dead = json(server.addr, "/api/streams/dead/status");
    assert!(
        ["connecting", "reconnecting"].contains(&dead["source"]["state"].as_str().unwrap()),
        "{dead}"
    );
    let list = json(server.addr, "/api/streams");
    let states: Vec<(String, String)> = list["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().into(),
                s["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    for id in ["small", "bunny", "clip"] {
        assert!(
            states.contains(&(id.to_string(), "live".to_string())),
            "{states:?}"
        );
    }
    assert_eq!(
        json(server.addr, "/api/streams/clip/status")["commentary"]["profile"],
        "nature"
    );

    // Delete one: its buffers are gone from the server's memory count.
    let streams = |addr| {
        json(addr, "/api/streams")["streams"]
            .as_array()
            .unwrap()
            .len()
    };
    let before = json(server.addr, "/api/streams/bunny/status")["buffers"]["display_bytes"]
        .as_u64()
        .unwrap();
    assert!(before > 100_000, "{before}");
    let (status, _) = request(
        server.addr,
        "DELETE",
        "/api/streams/bunny",
        "",
        Duration::from_secs(10),
    );
    assert_eq!(status, 204);
    assert_eq!(streams(server.addr), 3);
    let (status, _) = request(
        server.addr,
        "GET",
        "/api/streams/bunny/status",
        "",
        Duration::from_secs(2),
    );
    assert_eq!(status, 404);
    // The others play on.
    let body = read_for(
        server.addr,
        "/api/streams/small/mjpeg",
        Duration::from_secs(1),
    );
    assert!(!mjpeg_sizes(&body).is_empty());
}
