//! Graceful stop and restart: SIGTERM ends viewers cleanly, flushes the history and exits
//! 0; `serve` started again on the same state folder and history has the same streams
//! (command line and API) and every comment said before the stop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod fixture;
// The served process's helpers; this test keeps its own folder across two runs, so it
// starts `serve` itself and takes only the address and the request.
#[allow(dead_code)]
mod served;
use fixture::fixture;

const WAIT: Duration = Duration::from_secs(60);

struct Serve {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path) -> Serve {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kibitz"))
        .args(["serve", "--bind", "127.0.0.1:0", "--max-tokens", "8"])
        // WebRTC on a free UDP port: servers of tests side by side would share 8199.
        .args(["--webrtc-port", "0"])
        .args(["--inference-interval", "0.5"])
        .arg(format!(
            "--source=cam={}",
            fixture("testsrc2-360p25.mp4").display()
        ))
        .arg("--media-dir")
        .arg(fixture("."))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--history")
        .arg(dir.join("history.sqlite"))
        .arg("--model")
        .arg(dir.join("model"))
        .env("THREADS", "1")
        .env("LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = served::address(&mut child);
    Serve { child, addr }
}

/// One request with `Connection: close`; the status and the body as JSON.
fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, data) = served::request(addr, method, path, body, WAIT);
    let json = String::from_utf8_lossy(&data)
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str(body).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

fn comments(addr: SocketAddr) -> Vec<String> {
    let (_, page) = call(addr, "GET", "/api/history?stream=cam&limit=500", "");
    page["entries"]
        .as_array()
        .map(|e| {
            e.iter()
                .map(|e| e["text"].to_string() + &e["id"].to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn stream_ids(addr: SocketAddr) -> Vec<String> {
    let (_, list) = call(addr, "GET", "/api/streams", "");
    let mut ids: Vec<String> = list
        .as_array()
        .or_else(|| list["streams"].as_array())
        .expect("a list of streams")
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

#[test]
fn sigterm_drains_and_a_restart_has_the_same_streams_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let made = Command::new(env!("CARGO_BIN_EXE_kibitz"))
        .args(["make-test-model", "--size", "tiny"])
        .arg(dir.path().join("model"))
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );

    let mut first = serve(dir.path());
    let clip = fixture("short-1s.mp4");
    let body = format!(r#"{{"source": "{}", "id": "door"}}"#, clip.display());
    let (status, added) = call(first.addr, "POST", "/api/streams", &body);
    assert_eq!(status, 201, "{added}");
    let before = stream_ids(first.addr);
    assert_eq!(before, ["cam", "door"]);

    // A viewer on the events, read on a thread until the server ends it.
    let addr = first.addr;
    let viewer = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        write!(
            stream,
            "GET /api/streams/cam/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        .unwrap();
        let mut all = Vec::new();
        let ended = stream.read_to_end(&mut all);
        (ended.is_ok(), String::from_utf8_lossy(&all).into_owned())
    });

    let deadline = Instant::now() + WAIT;
    while comments(first.addr).len() < 2 {
        assert!(Instant::now() < deadline, "no comments in the history");
        std::thread::sleep(Duration::from_millis(200));
    }
    let said = comments(first.addr);

    let term = Command::new("kill")
        .args(["-TERM", &first.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let deadline = Instant::now() + WAIT;
    let exit = loop {
        if let Some(status) = first.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
    let (clean, events) = viewer.join().unwrap();
    assert!(clean, "the viewer's connection ended with an error");
    // A chunked response ends with its last, empty chunk: a clean end, not a cut.
    assert!(
        events.ends_with("0\r\n\r\n"),
        "{:?}",
        &events[events.len().saturating_sub(200)..]
    );

    let second = serve(dir.path());
    assert_eq!(stream_ids(second.addr), before);
    let kept = comments(second.addr);
    for comment in &said {
        assert!(kept.contains(comment), "{comment} was lost: {kept:?}");
    }
}
