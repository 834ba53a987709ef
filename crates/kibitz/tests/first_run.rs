//! A first run as a new user has it: no model in the cache. Offline, `serve` still plays the
//! video and says in one line what is missing and where it goes; with a hub (a stand-in
//! started here, serving the tiny generated model), it shows the download, then loads the
//! model and comments. `kibitz models` and `kibitz healthcheck` against the same.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod fixture;
// Each test binary uses its own part of the shared helpers.
#[allow(dead_code)]
mod served;
use fixture::fixture;
use served::{read_for, request};

/// Generous: CI machines are small and busy, and the model loads on one thread.
const WAIT: Duration = Duration::from_secs(120);

const REPO: &str = "test/tiny";

fn kibitz() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kibitz"));
    cmd.env("THREADS", "1")
        .env("LOG", "warn")
        .env_remove("MODEL_PATH")
        .env_remove("ENGINE")
        .env_remove("QUANT")
        .env_remove("BIND")
        .env_remove("HEALTHCHECK_URL");
    cmd
}

/// A port nothing listens on: bound, then let go.
fn closed_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// The tiny model's two files, named as a hub repo names them.
fn tiny_files() -> HashMap<String, Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let pair =
        kibitz_synthetic_model::write_pair(dir.path(), &kibitz_synthetic_model::Spec::tiny())
            .unwrap();
    HashMap::from([
        (
            "model-Q4_K_M.gguf".into(),
            std::fs::read(&pair.llm).unwrap(),
        ),
        (
            "mmproj-model-f16.gguf".into(),
            std::fs::read(&pair.mmproj).unwrap(),
        ),
    ])
}

/// A stand-in for the Hugging Face hub serving [`REPO`]: its listing and its files. With a
/// gate, the LLM file stops half way until the gate is opened (so a test sees the download
/// in progress).
struct Hub {
    endpoint: String,
    gate: Option<mpsc::Sender<()>>,
}

impl Hub {
    fn start(files: HashMap<String, Vec<u8>>, gated: bool) -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (gate, opened) = mpsc::channel::<()>();
        let opened = Arc::new(Mutex::new(opened));
        let files = Arc::new(files);
        std::thread::spawn(move || {
            for socket in listener.incoming().flatten() {
                let (files, opened) = (files.clone(), opened.clone());
                std::thread::spawn(move || answer(socket, &files, gated.then_some(&*opened)));
            }
        });
        Hub {
            endpoint,
            gate: gated.then_some(gate),
        }
    }

    fn open(&mut self) {
        if let Some(gate) = self.gate.take() {
            let _ = gate.send(());
        }
    }
}

fn answer(
    mut socket: TcpStream,
    files: &HashMap<String, Vec<u8>>,
    gate: Option<&Mutex<mpsc::Receiver<()>>>,
) {
    let mut reader = BufReader::new(socket.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
            break;
        }
    }
    let head = |status: &str, len: usize, kind: &str| {
        format!(
            "HTTP/1.1 {status}\r\nContent-Length: {len}\r\nContent-Type: {kind}\r\nConnection: close\r\n\r\n"
        )
    };
    if path.starts_with(&format!("/api/models/{REPO}/tree/main")) {
        let listing: Vec<serde_json::Value> = files
            .iter()
            .map(|(name, bytes)| serde_json::json!({"type": "file", "path": name, "size": bytes.len()}))
            .collect();
        let body = serde_json::to_vec(&listing).unwrap();
        let _ = socket.write_all(head("200 OK", body.len(), "application/json").as_bytes());
        let _ = socket.write_all(&body);
        return;
    }
    let Some(bytes) = path
        .strip_prefix(&format!("/{REPO}/resolve/main/"))
        .and_then(|name| files.get(name))
    else {
        let _ = socket.write_all(head("404 Not Found", 0, "text/plain").as_bytes());
        return;
    };
    let _ = socket.write_all(head("200 OK", bytes.len(), "application/octet-stream").as_bytes());
    let half = match gate {
        Some(_) if path.ends_with("Q4_K_M.gguf") => bytes.len() / 2,
        _ => bytes.len(),
    };
    let _ = socket.write_all(&bytes[..half]);
    let _ = socket.flush();
    if half < bytes.len() {
        let _ = gate
            .unwrap()
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(300));
        let _ = socket.write_all(&bytes[half..]);
    }
}

/// `GET path` as JSON, with its status.
fn get_json(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let (status, data) = request(addr, "GET", path, "", Duration::from_secs(3));
    let text = String::from_utf8_lossy(&data);
    let body = text
        .find("\r\n\r\n")
        .map(|i| &text[i + 4..])
        .unwrap_or_default();
    let json = serde_json::from_str(body.trim())
        .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"));
    (status, json)
}

/// Polls `/readyz` until `check` holds, or fails after [`WAIT`].
fn readyz_until(
    addr: SocketAddr,
    what: &str,
    check: impl Fn(u16, &serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = get_json(addr, "/readyz");
        if check(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "timed out: {what}; last /readyz {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn serve(hub: &str, cache: &std::path::Path) -> served::Server {
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<String> = [
        "--source",
        &fixture("testsrc2-360p25.mp4").display().to_string(),
        "--model",
        REPO,
        "--max-tokens",
        "8",
        "--inference-interval",
        "0.5",
        "--stream-delay-init",
        "1",
    ]
    .map(String::from)
    .to_vec();
    served::spawn(
        dir,
        &args,
        &[
            ("HF_ENDPOINT", hub.to_string()),
            ("KIBITZ_CACHE", cache.display().to_string()),
        ],
    )
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn offline_without_a_model_the_video_plays_and_one_line_says_what_is_missing() {
    let cache = tempfile::tempdir().unwrap();
    let server = serve(&closed_port(), cache.path());

    let (status, body) = request(server.addr, "GET", "/healthz", "", Duration::from_secs(2));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let missing = readyz_until(server.addr, "the model is missing", |status, body| {
        status == 503 && body["state"] == "missing"
    });
    let line = missing["message"].as_str().unwrap();
    let dir = cache.path().join("test--tiny");
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(
        line.contains(&format!(
            "model test/tiny (Q4_K_M) is not in {}",
            dir.display()
        )) && line.contains("`kibitz models pull test/tiny --quant Q4_K_M`"),
        "{line}"
    );

    // The picture plays without the engine.
    let mjpeg = read_for(server.addr, "/api/mjpeg", Duration::from_secs(4));
    let frames = String::from_utf8_lossy(&mjpeg)
        .matches("Content-Type: image/jpeg")
        .count();
    assert!(frames >= 5, "{frames} MJPEG frames in 4 s");
    let (status, v) = get_json(server.addr, "/api/status");
    assert_eq!(status, 200);
    assert_eq!(v["source"]["state"], "live", "{v}");
    assert_eq!(v["engine"]["readiness"]["state"], "missing", "{v}");
    assert_eq!(v["engine"]["readiness"]["message"], line);
    assert_eq!(
        v["commentary"]["cycles_failed"], 0,
        "waits, never fails: {v}"
    );

    // `kibitz healthcheck`: alive by its URL or by BIND; nothing listening is one line and 1.
    let ok = kibitz()
        .args(["healthcheck", "--url", &format!("http://{}", server.addr)])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{:?}", text(&ok));
    let ok = kibitz()
        .arg("healthcheck")
        .env("BIND", server.addr.to_string())
        .output()
        .unwrap();
    assert!(ok.status.success(), "{:?}", text(&ok));
    let down = kibitz()
        .args(["healthcheck", "--timeout", "2", "--url", &closed_port()])
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(1));
    let (_, stderr) = text(&down);
    assert!(
        stderr.starts_with("kibitz: unhealthy: http://127.0.0.1:") && stderr.lines().count() == 1,
        "{stderr}"
    );
}

#[test]
fn a_first_run_shows_the_download_then_comments() {
    let mut hub = Hub::start(tiny_files(), true);
    let cache = tempfile::tempdir().unwrap();
    let server = serve(&hub.endpoint, cache.path());

    let downloading = readyz_until(server.addr, "the download shows", |status, body| {
        status == 503
            && body["state"] == "downloading"
            && body["download"]["bytes"].as_u64() > Some(0)
    });
    let download = &downloading["download"];
    assert_eq!(download["file"], "model-Q4_K_M.gguf", "{downloading}");
    assert_eq!(
        (download["index"].as_u64(), download["files"].as_u64()),
        (Some(1), Some(2))
    );
    assert!(
        download["total"].as_u64() > download["bytes"].as_u64(),
        "{downloading}"
    );
    assert!(
        downloading["message"]
            .as_str()
            .unwrap()
            .starts_with("downloading model-Q4_K_M.gguf (file 1 of 2): "),
        "{downloading}"
    );
    let (_, status) = get_json(server.addr, "/api/status");
    assert_eq!(
        status["engine"]["readiness"]["state"], "downloading",
        "{status}"
    );

    hub.open();
    readyz_until(server.addr, "the engine is ready", |status, body| {
        status == 200 && body["ready"] == true
    });
    let sse = read_for(server.addr, "/api/stream", Duration::from_secs(20));
    let ends = String::from_utf8_lossy(&sse)
        .matches("\"type\":\"cycle_end\"")
        .count();
    assert!(ends >= 1, "{}", String::from_utf8_lossy(&sse));
    let cached = cache.path().join("test--tiny");
    assert!(cached.join("model-Q4_K_M.gguf").is_file());
    assert!(cached.join("mmproj-model-f16.gguf").is_file());
}

#[test]
fn models_pull_list_and_rm_against_a_hub() {
    let hub = Hub::start(tiny_files(), false);
    let cache = tempfile::tempdir().unwrap();
    let models = |args: &[&str]| {
        kibitz()
            .arg("models")
            .args(args)
            .env("HF_ENDPOINT", &hub.endpoint)
            .env("KIBITZ_CACHE", cache.path())
            .output()
            .unwrap()
    };
    let (stdout, _) = text(&models(&["list"]));
    assert_eq!(
        stdout.trim(),
        format!("no models in {}", cache.path().display())
    );

    let out = models(&["pull", REPO, "--quant", "Q4_K_M"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let dir = cache.path().join("test--tiny");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            dir.join("model-Q4_K_M.gguf").display().to_string(),
            dir.join("mmproj-model-f16.gguf").display().to_string()
        ]
    );
    for progress in [
        "kibitz: downloading model-Q4_K_M.gguf (file 1 of 2): 0 B of ",
        "kibitz: downloading mmproj-model-f16.gguf (file 2 of 2): ",
    ] {
        assert!(stderr.contains(progress), "{progress} in {stderr}");
    }

    let out = models(&["list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["models"][0]["repo"], REPO, "{listed}");
    let names: Vec<&str> = listed["models"][0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["mmproj-model-f16.gguf", "model-Q4_K_M.gguf"]);
    let (stdout, _) = text(&models(&["list"]));
    assert!(stdout.starts_with(&format!("{REPO}\t")), "{stdout}");

    let out = models(&["rm", REPO, "--quant", "Q4_K_M"]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(!dir.join("model-Q4_K_M.gguf").exists());
    assert!(dir.join("mmproj-model-f16.gguf").exists());
    let out = models(&["rm", REPO]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(!dir.exists());
    let out = models(&["rm", REPO]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).1.contains("is not in the cache"),
        "{:?}",
        text(&out)
    );

    // Offline: one line with what to do.
    let out = kibitz()
        .args(["models", "pull", REPO])
        .env("HF_ENDPOINT", closed_port())
        .env("KIBITZ_CACHE", cache.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let (_, stderr) = text(&out);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot be reached"), "{stderr}");
}
