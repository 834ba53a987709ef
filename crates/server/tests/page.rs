//! The page in a real browser: headless Chromium driven through chromedriver's W3C
//! WebDriver API, against the server running in this process on fake pictures and
//! events. It checks what a person would: the picture moves, commentary appears, and the
//! profile picker and instruction box reach the commentary loop (or show why not).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use kibitz_commentator::{Control, CycleEnd, Event};
use kibitz_server::fake::{pattern_jpeg, FakeDisplay, Harness};
use kibitz_server::{PipelineStatus, SourceStatus};
use serde_json::{json, Value};

/// Generous: CI machines are small and busy.
const WAIT: Duration = Duration::from_secs(60);
/// The W3C WebDriver web element identifier key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn tool(env: &str, default: &str) -> PathBuf {
    let path = PathBuf::from(std::env::var(env).unwrap_or_else(|_| default.to_string()));
    assert!(
        path.exists(),
        "{} not found: this test needs Chromium and chromedriver. Run the setup: \
         `apt-get install chromium chromium-driver` (Debian), or set {env} to its path.",
        path.display()
    );
    path
}

/// A WebDriver session on a chromedriver this test started.
struct Browser {
    http: reqwest::Client,
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let chromium = tool("CHROMIUM", "/usr/bin/chromium");
        let chromedriver = tool("CHROMEDRIVER", "/usr/bin/chromedriver");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let profile = tempfile::tempdir().unwrap();
        let mut browser = Browser {
            http: reqwest::Client::new(),
            driver,
            port,
            session: String::new(),
            _profile: profile,
        };

        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let status = browser.http.get(browser.url("/status")).send().await;
            if let Ok(response) = status {
                let body: Value = response.json().await.unwrap_or_default();
                if body["value"]["ready"] == true {
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,900",
            &format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": args },
        }}});
        let session = browser.raw("POST", "/session", Some(capabilities)).await;
        browser.session = session["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        browser
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn raw(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let request = match method {
            "GET" => self.http.get(self.url(path)),
            "POST" => self
                .http
                .post(self.url(path))
                .json(&body.unwrap_or(json!({}))),
            _ => unreachable!(),
        };
        let response: Value = request
            .timeout(WAIT)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let value = response["value"].clone();
        if value.get("error").is_some() {
            panic!("WebDriver {method} {path}: {value}");
        }
        value
    }

    async fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.raw(method, &format!("/session/{}{path}", self.session), body)
            .await
    }

    async fn goto(&self, url: &str) {
        self.command("POST", "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn run(&self, script: &str) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
        .await
    }

    /// Polls `script` until it returns true.
    async fn wait_for(&self, what: &str, script: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if self.run(script).await == true {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let state = self
                    .run("return JSON.stringify(window.kibitz) + ' | ' + document.body.innerText")
                    .await;
                panic!("timed out waiting until {what}; page state: {state}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn find(&self, css: &str) -> String {
        let element = self
            .command(
                "POST",
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await;
        element[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element id in {element}"))
            .to_string()
    }

    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.command("POST", &format!("/element/{id}/click"), None)
            .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.command("POST", &format!("/element/{id}/clear"), None)
            .await;
        self.command(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }
}

impl Browser {
    async fn screenshot(&self, path: &str) {
        use base64::Engine as _;
        let png = self.command("GET", "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    /// Ends the session (which closes Chromium) even when the test panicked, then stops
    /// chromedriver. Blocking on purpose: `Drop` cannot await.
    fn drop(&mut self) {
        if !self.session.is_empty() {
            if let Ok(mut socket) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = socket.set_read_timeout(Some(Duration::from_secs(10)));
                let request = format!(
                    "DELETE /session/{} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    self.session
                );
                if socket.write_all(request.as_bytes()).is_ok() {
                    read_response(&mut socket);
                }
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Reads one HTTP response to its end (chromedriver keeps the connection open, so
/// reading to EOF would wait for the timeout).
fn read_response(socket: &mut std::net::TcpStream) {
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(read @ 1..) = socket.read(&mut chunk) {
        response.extend_from_slice(&chunk[..read]);
        let text = String::from_utf8_lossy(&response);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if response.len() >= end + 4 + length {
                return;
            }
        }
    }
}

/// What the commentary loop would say, over and over: a cycle streamed as tokens.
async fn commentate(events: tokio::sync::broadcast::Sender<Event>) {
    let _ = events.send(Event::Source {
        state: "live".into(),
        detail: None,
    });
    for cycle in 0.. {
        let _ = events.send(Event::CycleStart {
            cycle,
            frames: vec![cycle as f64, cycle as f64 + 1.0],
        });
        for piece in ["a", " ball", " rolls"] {
            tokio::time::sleep(Duration::from_millis(60)).await;
            let _ = events.send(Event::Token {
                cycle,
                text: piece.into(),
            });
        }
        let _ = events.send(Event::CycleEnd(CycleEnd {
            cycle,
            text: format!("a ball rolls, comment {cycle}"),
            skipped: false,
            frames: vec![cycle as f64, cycle as f64 + 1.0],
            latency: 1.2,
            inference_ms: 800.0,
            target_delay: 0.0,
            first_token_latency: None,
        }));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_moving_picture_and_commentary_and_sends_changes() {
    let jpegs = (0..4).map(|i| pattern_jpeg(320, 180, i, 0)).collect();
    let mut harness = Harness::with_display(Arc::new(FakeDisplay::new(jpegs, 10.0)));
    harness.status.set(PipelineStatus {
        source: SourceStatus {
            name: "test pattern".into(),
            state: "live".into(),
            ..SourceStatus::default()
        },
        ..PipelineStatus::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let server = tokio::spawn(kibitz_server::serve(listener, harness.state.clone()));
    let talker = tokio::spawn(commentate(harness.events.clone()));

    let browser = Browser::start().await;
    browser.goto(&format!("http://{addr}/")).await;

    browser
        .wait_for(
            "the picture shows and changes",
            "const img = document.getElementById('picture');
             return img.naturalWidth === 320 && window.kibitz.pictureChanges >= 3;",
        )
        .await;
    browser
        .wait_for(
            "a finished comment is in the history",
            "return document.getElementById('history').innerText.includes('a ball rolls, comment');",
        )
        .await;
    browser
        .wait_for("the engine and source state show", "return document.getElementById('engine').innerText.includes('fake') && document.getElementById('source').innerText.startsWith('live');")
        .await;
    browser
        .wait_for(
            "the profiles are listed",
            "return document.querySelectorAll('#profile option').length === 5;",
        )
        .await;

    // Choosing a profile in the picker reaches the loop.
    browser.click("#profile").await;
    browser.click("#profile option[value='sports']").await;
    let control = tokio::time::timeout(WAIT, harness.controls.recv())
        .await
        .expect("a control in time");
    assert_eq!(control, Some(Control::SetProfile("sports".into())));
    browser
        .wait_for(
            "the choice is confirmed",
            "return document.getElementById('message').innerText.includes('sports');",
        )
        .await;

    // An instruction over the limit is refused, and the page says why.
    browser
        .run("document.getElementById('instruction').value = 'x'.repeat(2001); return true;")
        .await;
    browser.click("#apply").await;
    browser
        .wait_for(
            "the refusal's reason shows",
            "const m = document.getElementById('message');
             return m.className === 'error' && m.innerText.includes('the limit is 2000');",
        )
        .await;
    assert!(
        harness.controls.try_recv().is_err(),
        "a refused instruction reached the loop"
    );

    // A good one goes through.
    browser.type_into("#instruction", "follow the ball").await;
    browser.click("#apply").await;
    let control = tokio::time::timeout(WAIT, harness.controls.recv())
        .await
        .expect("a control in time");
    assert_eq!(
        control,
        Some(Control::SetInstruction("follow the ball".into()))
    );

    // For a person to look at: KIBITZ_PAGE_SCREENSHOT=/tmp/page saves desktop and phone views.
    if let Ok(prefix) = std::env::var("KIBITZ_PAGE_SCREENSHOT") {
        browser.screenshot(&format!("{prefix}-desktop.png")).await;
        browser
            .command(
                "POST",
                "/window/rect",
                Some(json!({ "width": 390, "height": 844 })),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        browser.screenshot(&format!("{prefix}-phone.png")).await;
    }

    drop(browser);
    talker.abort();
    harness.state.shutdown().cancel();
    tokio::time::timeout(WAIT, server)
        .await
        .expect("the server stops")
        .unwrap()
        .unwrap();
}
