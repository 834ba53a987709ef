//! The page in a real browser: headless Chromium driven through chromedriver's W3C
//! WebDriver API, against a kibitz server in this process made of the fake harness
//! (pattern-picture sources, a scripted engine, the real registry and routes). It checks
//! what a person would: the overview shows every stream with a changing thumbnail, its
//! state and latest comment; a tile opens the stream's own view with the moving picture
//! and the commentary; profile, instruction, adding and removing reach the server; and
//! with a token the page asks for it once and keeps it out of every URL; and with sound on
//! the spoken comments are scheduled at the moment their picture shows.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kibitz_server::fake::{pattern_jpeg, Harness, Options};
use kibitz_server::ServerError;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

/// Generous: CI machines are small and busy.
const WAIT: Duration = Duration::from_secs(60);
/// The W3C WebDriver web element identifier key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One browser at a time: on a small machine, several Chromiums and servers at once starve
/// each other into timeouts.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
        Browser::start_with(&[]).await
    }

    /// A browser with `extra` Chromium flags.
    async fn start_with(extra: &[&str]) -> Browser {
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
        let mut args = vec![
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
        ];
        let profile_dir = format!("--user-data-dir={}", browser._profile.path().display());
        args.push(&profile_dir);
        args.extend_from_slice(extra);
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

    async fn resize(&self, width: u32, height: u32) {
        self.command(
            "POST",
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        )
        .await;
    }

    /// Saves what the window shows as a PNG, for a person to look at.
    async fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine as _;
        let png = self.command("GET", "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::write(path, png)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
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

/// A kibitz server on a real socket, made of the fake harness.
struct Site {
    harness: Harness,
    addr: SocketAddr,
    server: JoinHandle<Result<(), ServerError>>,
    http: reqwest::Client,
}

impl Site {
    async fn start(options: Options) -> Site {
        let harness = Harness::with(options).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(kibitz_server::serve(listener, harness.state.clone()));
        Site {
            harness,
            addr,
            server,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `GET path` as JSON, from outside the browser.
    async fn json(&self, path: &str) -> Value {
        let response = self
            .http
            .get(self.url(path))
            .timeout(WAIT)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        response.json().await.unwrap()
    }

    async fn patch(&self, path: &str, body: Value) {
        let response = self
            .http
            .patch(self.url(path))
            .json(&body)
            .timeout(WAIT)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "PATCH {path}: {}",
            response.status()
        );
    }

    /// Polls the server's own state until `check` holds.
    async fn wait_until(&self, what: &str, check: impl Fn(&Harness) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !check(&self.harness) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting until {what}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until stream `id` has finished a comment and then gone quiet: no cycle done
    /// for a second.
    async fn wait_quiet(&self, id: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut last = Value::Null;
        loop {
            let status = self.json(&format!("/api/streams/{id}/status")).await;
            let commentary = &status["commentary"];
            if commentary["last_comment"].is_string()
                && commentary["cycle"].is_null()
                && commentary["cycles_done"] == last
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "stream {id} did not go quiet: {commentary}"
            );
            last = commentary["cycles_done"].clone();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn stop(self) {
        self.harness.state.shutdown().cancel();
        tokio::time::timeout(WAIT, self.server)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
        self.harness.streams.stop_all().await;
    }
}

/// Streams `ids`, each showing real pictures (a colour and a bar that move each frame), so
/// the browser has something to decode and to see change.
fn streams(ids: &[&str], token: Option<&str>) -> Options {
    Options {
        streams: ids.iter().map(|id| format!("{id}={id}.mp4")).collect(),
        pictures: Some((0..4).map(|i| pattern_jpeg(320, 180, i, 0)).collect()),
        token: token.map(String::from),
        ..Options::default()
    }
}

/// Where the screenshots go for a person to look at: the workspace's `target/`.
fn screenshot_path(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    std::fs::create_dir_all(&target).unwrap();
    target.join(name)
}

fn tile(id: &str) -> String {
    format!("#tiles .tile[data-id='{id}']")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_shows_every_stream_and_a_tile_opens_its_view() {
    let _one = ONE_AT_A_TIME.lock().await;
    let site = Site::start(streams(&["a", "b", "c"], None)).await;
    let browser = Browser::start().await;
    browser.goto(&site.url("/")).await;

    browser
        .wait_for(
            "three tiles show",
            "return document.querySelectorAll('#tiles .tile').length === 3;",
        )
        .await;
    for id in ["a", "b", "c"] {
        let tile = tile(id);
        browser
            .wait_for(
                &format!("{id}'s thumbnail shows and changes"),
                &format!(
                    "const t = window.kibitz.tiles['{id}'];
                     return document.querySelector(\"{tile} img\").naturalWidth > 0
                       && t.fresh >= 3 && t.changes >= 2;"
                ),
            )
            .await;
        browser
            .wait_for(
                &format!("{id}'s state and latest comment show"),
                &format!(
                    "return document.querySelector(\"{tile} .pill\").innerText === 'live'
                       && document.querySelector(\"{tile} .comment\").innerText.includes('a ball rolls');"
                ),
            )
            .await;
    }

    // One event connection for the whole page, and no stream held open per tile.
    for id in ["a", "b", "c"] {
        let outputs = &site.json(&format!("/api/streams/{id}/status")).await["outputs"];
        for name in ["mjpeg", "sse", "ws"] {
            // A name shows once an output of it has run; none may run now.
            let running = outputs[name]["running"].as_u64().unwrap_or(0);
            assert_eq!(running, 0, "the overview holds a {name} connection to {id}");
        }
    }
    let metrics = site.http.get(site.url("/metrics")).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    let bus_clients = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kibitz_bus_clients "))
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(bus_clients, Some(1.0), "not one /api/events client");
    browser
        .screenshot(&screenshot_path("page-overview.png"))
        .await;
    browser.resize(390, 844).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    browser
        .screenshot(&screenshot_path("page-overview-phone.png"))
        .await;
    browser.resize(1280, 900).await;

    // A tile opens the stream's own view: the delayed picture and the words as they come.
    browser.click(&format!("{} .open", tile("a"))).await;
    browser
        .wait_for(
            "the stream's view opens",
            "return location.pathname === '/streams/a' && window.kibitz.view === 'stream';",
        )
        .await;
    browser
        .wait_for(
            "the picture shows and changes",
            "return document.getElementById('picture').naturalWidth > 0
               && window.kibitz.pictureChanges >= 3;",
        )
        .await;
    browser
        .wait_for(
            "the commentary streams in and lands in the history",
            "return window.kibitz.tokens >= 3 && window.kibitz.comments >= 1
               && document.getElementById('history').innerText.includes('a ball rolls');",
        )
        .await;
    browser
        .wait_for(
            "the source state and the engine show",
            "return document.getElementById('source').innerText.startsWith('live')
               && document.getElementById('engine').innerText.includes('fake');",
        )
        .await;
    browser
        .screenshot(&screenshot_path("page-stream.png"))
        .await;

    // The profile picker reaches the stream.
    browser
        .wait_for(
            "the profiles are listed",
            "return document.querySelectorAll('#profile option').length === 5;",
        )
        .await;
    browser.click("#profile").await;
    browser.click("#profile option[value='sports']").await;
    site.wait_until("stream a's profile is sports", |h| {
        h.stream("a").spec().profile == "sports"
    })
    .await;
    browser
        .wait_for(
            "the choice is confirmed",
            "return document.getElementById('message').innerText.includes('sports');",
        )
        .await;

    // An instruction over the limit is refused, and the page says why; a good one goes in.
    browser
        // As typing would: the input event tells the page the box holds an edit, so the
        // status refresh leaves it alone.
        .run(
            "const box = document.getElementById('instruction'); box.value = 'x'.repeat(2001); \
             box.dispatchEvent(new Event('input')); return true;",
        )
        .await;
    browser.click("#apply").await;
    browser
        .wait_for(
            "the refusal's reason shows",
            "const m = document.getElementById('message');
             return m.classList.contains('error') && m.innerText.includes('2000');",
        )
        .await;
    assert_eq!(site.harness.stream("a").spec().instruction, "");
    browser.type_into("#instruction", "follow the ball").await;
    browser.click("#apply").await;
    site.wait_until("stream a's instruction is set", |h| {
        h.stream("a").spec().instruction == "follow the ball"
    })
    .await;

    // A stream that has gone quiet: its view shows what it last said at once, from the
    // status, with no new comment to wait for.
    site.patch("/api/streams/c", json!({ "inference_interval": 3600 }))
        .await;
    site.wait_quiet("c").await;
    browser.goto(&site.url("/streams/c")).await;
    browser
        .wait_for(
            "c's last comment shows",
            "const earlier = document.querySelector('#history li.earlier');
             return window.kibitz.view === 'stream' && window.kibitz.comments === 0
               && earlier !== null && earlier.innerText.includes('a ball rolls');",
        )
        .await;

    drop(browser);
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_added_and_removed_from_the_overview() {
    let _one = ONE_AT_A_TIME.lock().await;
    let site = Site::start(streams(&["a", "b", "c"], None)).await;
    let browser = Browser::start().await;
    browser.goto(&site.url("/")).await;
    browser
        .wait_for(
            "three tiles show",
            "return document.querySelectorAll('#tiles .tile').length === 3;",
        )
        .await;

    // A source the API may not open: the reason shows beside the form, at the field.
    browser.type_into("#add-source", "/etc/passwd").await;
    browser.click("#add-submit").await;
    browser
        .wait_for(
            "the refusal shows at the source field",
            "return document.getElementById('add-message').classList.contains('error')
               && document.getElementById('add-source').getAttribute('aria-invalid') === 'true';",
        )
        .await;

    // An id already taken.
    browser
        .type_into("#add-source", "rtsp://127.0.0.1:9/cam")
        .await;
    browser.type_into("#add-id", "a").await;
    browser.click("#add-submit").await;
    browser
        .wait_for(
            "the conflict shows",
            "const m = document.getElementById('add-message');
             return m.classList.contains('error') && m.innerText.includes(\"'a'\");",
        )
        .await;
    assert_eq!(site.harness.streams.list().len(), 3);

    browser.type_into("#add-id", "d").await;
    browser.click("#add-submit").await;
    browser
        .wait_for(
            "a fourth tile shows, with a picture",
            &format!(
                "return document.querySelectorAll('#tiles .tile').length === 4
                   && window.kibitz.tiles.d && window.kibitz.tiles.d.loads >= 1
                   && document.querySelector(\"{} .pill\").innerText !== '';",
                tile("d")
            ),
        )
        .await;
    assert!(site.harness.streams.get("d").is_some(), "d does not run");

    // Remove asks once more, then the stream stops and its tile goes.
    let remove = format!("{} .remove", tile("d"));
    browser.click(&remove).await;
    browser.click(&remove).await;
    browser
        .wait_for(
            "the fourth tile is gone",
            "return document.querySelectorAll('#tiles .tile').length === 3 && !window.kibitz.tiles.d;",
        )
        .await;
    site.wait_until("d is stopped", |h| h.streams.get("d").is_none())
        .await;

    drop(browser);
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_page_asks_once_and_keeps_it_out_of_urls() {
    const TOKEN: &str = "s3cret";
    let _one = ONE_AT_A_TIME.lock().await;
    let site = Site::start(streams(&["a"], Some(TOKEN))).await;
    let browser = Browser::start().await;
    browser.goto(&site.url("/")).await;
    browser
        .wait_for(
            "the tile shows (watching needs no token)",
            "return document.querySelectorAll('#tiles .tile').length === 1;",
        )
        .await;

    // Adding needs the token: the page asks for it.
    browser
        .type_into("#add-source", "rtsp://127.0.0.1:9/cam")
        .await;
    browser.type_into("#add-id", "d").await;
    browser.click("#add-submit").await;
    browser
        .wait_for(
            "the page asks for the token",
            "return document.getElementById('signin').open;",
        )
        .await;
    browser
        .screenshot(&screenshot_path("page-signin.png"))
        .await;
    browser.type_into("#signin-token", "wrong").await;
    browser.click("#signin-submit").await;
    browser
        .wait_for(
            "a wrong token is refused",
            "return document.getElementById('signin').open
               && document.getElementById('signin-message').innerText.includes('not the');",
        )
        .await;
    browser.type_into("#signin-token", TOKEN).await;
    browser.click("#signin-submit").await;
    browser
        .wait_for(
            "the add goes through once signed in",
            "return !document.getElementById('signin').open
               && document.querySelectorAll('#tiles .tile').length === 2;",
        )
        .await;
    assert!(site.harness.streams.get("d").is_some(), "d does not run");

    // The session cookie carries later changes: no second question.
    let select = format!("{} .profile", tile("a"));
    browser.click(&select).await;
    browser
        .click(&format!("{select} option[value='nature']"))
        .await;
    site.wait_until("stream a's profile is nature", |h| {
        h.stream("a").spec().profile == "nature"
    })
    .await;
    let remove = format!("{} .remove", tile("d"));
    browser.click(&remove).await;
    browser.click(&remove).await;
    site.wait_until("d is stopped", |h| h.streams.get("d").is_none())
        .await;
    assert_eq!(
        browser
            .run("return document.getElementById('signin').open;")
            .await,
        false,
        "the page asked for the token again"
    );

    // The token went into no URL the browser asked for, is not in the page, and the
    // page cannot read the session cookie.
    let urls = browser
        .run("return performance.getEntries().map((e) => e.name);")
        .await;
    let urls: Vec<&str> = urls
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(urls.iter().any(|u| u.contains("/api/session")), "{urls:?}");
    assert!(!urls.iter().any(|u| u.contains(TOKEN)), "{urls:?}");
    let page = browser
        .run(
            "return document.documentElement.outerHTML + location.href + document.cookie
               + JSON.stringify(localStorage) + JSON.stringify(sessionStorage);",
        )
        .await;
    let page = page.as_str().unwrap();
    assert!(!page.contains(TOKEN), "the token is in the page");
    assert!(
        !page.contains("kibitz_session"),
        "the page can read the session cookie"
    );

    drop(browser);
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_watching_needs_the_token_the_page_asks_first() {
    let _one = ONE_AT_A_TIME.lock().await;
    let site = Site::start(Options {
        token_for_viewing: true,
        ..streams(&["a", "b"], Some("s3cret"))
    })
    .await;
    let browser = Browser::start().await;
    browser.goto(&site.url("/")).await;
    browser
        .wait_for(
            "the page asks for the token before showing anything",
            "return document.getElementById('signin').open
               && document.querySelectorAll('#tiles .tile').length === 0;",
        )
        .await;
    browser.type_into("#signin-token", "s3cret").await;
    browser.click("#signin-submit").await;
    // The cookie alone now carries the picture fetches and the one event stream.
    browser
        .wait_for(
            "both tiles show pictures and comments",
            "const t = window.kibitz.tiles;
             return !document.getElementById('signin').open && t.a && t.b
               && t.a.fresh >= 2 && t.b.fresh >= 2
               && document.querySelector(\"#tiles .tile[data-id='b'] .comment\").innerText.includes('a ball rolls');",
        )
        .await;
    browser.goto(&site.url("/streams/b")).await;
    browser
        .wait_for(
            "the stream's view plays without asking again",
            "return !document.getElementById('signin').open
               && window.kibitz.pictureChanges >= 2 && window.kibitz.tokens >= 1;",
        )
        .await;

    drop(browser);
    site.stop().await;
}

/// How far (ms) a clip may start from the moment its picture shows.
const IN_STEP_MS: f64 = 150.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sound_on_the_stream_view_schedules_each_clip_at_its_picture() {
    let _one = ONE_AT_A_TIME.lock().await;
    let defaults = Options::default().defaults;
    let site = Site::start(Options {
        voices: kibitz_stream::Voices::preset(
            "espeak",
            std::sync::Arc::new(kibitz_server::fake::Tone),
        ),
        defaults: kibitz_stream::StreamDefaults {
            voice: "espeak".into(),
            inference_interval: 1.0,
            // A sync delay, so clips are due a while after they are announced and the page
            // has to schedule them ahead, not just play them on arrival.
            stream_delay_init: 2.0,
            ..defaults
        },
        ..streams(&["s1"], None)
    })
    .await;
    let browser = Browser::start_with(&["--autoplay-policy=no-user-gesture-required"]).await;
    browser.goto(&site.url("/streams/s1")).await;
    browser
        .wait_for(
            "the view runs, knows the server's clock and shows the stream's voice",
            "const k = window.kibitz;
             return k.view === 'stream' && k.clockOffset !== null && k.comments >= 2
               && document.getElementById('voice').value === 'espeak'
               && document.querySelectorAll('#voice option').length >= 2
               && !document.getElementById('speech-link').hidden;",
        )
        .await;

    // Both ends read the same system clock here, so the measured offset is about zero.
    let offset = browser.run("return window.kibitz.clockOffset;").await;
    let offset = offset.as_f64().expect("a clock offset");
    assert!(
        offset.abs() < 50.0,
        "clock offset {offset} ms on one machine"
    );

    // Sound off: the page is no listener, so nothing is spoken, and nothing is scheduled.
    assert_eq!(site.harness.stream("s1").status().speech.listeners, 0);
    assert_eq!(site.harness.stream("s1").status().speech.spoken, 0);
    assert_eq!(
        browser
            .run("return window.kibitz.speech.length + window.kibitz.speechIgnored;")
            .await,
        0
    );

    // One click: the page becomes a listener and the comments are spoken.
    browser.click("#sound").await;
    site.wait_until("the page listens", |h| {
        h.stream("s1").status().speech.listeners >= 1
    })
    .await;
    browser
        .wait_for(
            "the speaking indicator shows",
            "return document.getElementById('speaking').dataset.on === 'true';",
        )
        .await;
    browser
        .screenshot(&screenshot_path("page-stream-sound.png"))
        .await;
    browser.resize(390, 844).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    browser
        .screenshot(&screenshot_path("page-stream-sound-phone.png"))
        .await;
    browser.resize(1280, 900).await;
    browser
        .wait_for(
            "four clips have started",
            "return window.kibitz.speech.filter((c) => c.started).length >= 4;",
        )
        .await;
    let state = browser
        .run(
            "return { offset: window.kibitz.clockOffset, now: performance.timeOrigin + performance.now(),
                      speech: window.kibitz.speech,
                      audio: document.getElementById('sound').getAttribute('aria-pressed') };",
        )
        .await;
    assert_eq!(state["audio"], "true");
    let offset = state["offset"].as_f64().unwrap();
    let now = state["now"].as_f64().unwrap();
    let clips = state["speech"].as_array().unwrap();
    let mut ahead = 0;
    for clip in clips {
        assert!(clip["skipped"].is_null(), "a clip was skipped: {clip}");
        let play_at = clip["playAt"].as_f64().unwrap() - offset;
        let Some(scheduled) = clip["scheduledAt"].as_f64() else {
            // Still loading: only the newest may be.
            assert!(
                now - clip["receivedAt"].as_f64().unwrap() < 1000.0,
                "{clip}"
            );
            continue;
        };
        assert!(
            (scheduled - play_at).abs() <= IN_STEP_MS,
            "clip {} starts {:.0} ms from its picture: {clip}",
            clip["cycle"],
            scheduled - play_at
        );
        if scheduled < now - 200.0 {
            assert_eq!(
                clip["started"], true,
                "clip {} never started",
                clip["cycle"]
            );
        }
        if clip["late"].as_f64().unwrap() < 0.0 {
            ahead += 1;
        }
    }
    assert!(ahead >= 1, "no clip was scheduled ahead of time: {clips:?}");
    println!("clips: {}", serde_json::to_string_pretty(clips).unwrap());
    let spoken = site.harness.stream("s1").status().speech;
    assert!(spoken.spoken >= 4, "{spoken:?}");

    // A clip that comes late starts at once, part way in, so its words still meet their
    // picture; one with more than half of it gone is not played.
    browser
        .run(
            "const k = window.kibitz;
             const last = k.speech[k.speech.length - 1];
             const clip = `/api/streams/s1/speech/clips/${last.cycle}`;
             const serverNow = performance.timeOrigin + performance.now() + k.clockOffset;
             playSpeech({ type: 'speech', cycle: 1001, clip, play_at: serverNow - 200, duration: 0.5 });
             playSpeech({ type: 'speech', cycle: 1002, clip, play_at: serverNow - 400, duration: 0.5 });
             return true;",
        )
        .await;
    browser
        .wait_for(
            "the late clip starts part way in and the later one is skipped",
            "const k = window.kibitz;
             const a = k.speech.find((c) => c.cycle === 1001);
             const b = k.speech.find((c) => c.cycle === 1002);
             return a && a.started && a.offset >= 0.2 && b && b.skipped !== null;",
        )
        .await;
    let late = browser
        .run("return window.kibitz.speech.find((c) => c.cycle === 1001);")
        .await;
    let play_at = late["playAt"].as_f64().unwrap() - offset;
    let heard = late["scheduledAt"].as_f64().unwrap();
    assert!(
        (heard - play_at).abs() <= IN_STEP_MS,
        "the late clip is {:.0} ms off its picture: {late}",
        heard - play_at
    );

    // The voice picker reaches the stream.
    browser.click("#voice").await;
    browser.click("#voice option[value='off']").await;
    site.wait_until("s1's voice is off", |h| {
        h.stream("s1").status().settings.voice.as_deref() == Some("off")
    })
    .await;
    browser
        .wait_for(
            "the page says the stream has no voice",
            "return document.getElementById('sound-note').innerText.includes('no voice')
               && document.getElementById('speech-link').hidden;",
        )
        .await;

    // Sound off: the page stops listening.
    browser.click("#sound").await;
    site.wait_until("the page no longer listens", |h| {
        h.stream("s1").status().speech.listeners == 0
    })
    .await;
    assert_eq!(
        browser
            .run("return document.getElementById('sound').getAttribute('aria-pressed');")
            .await,
        "false"
    );

    drop(browser);
    site.stop().await;
}

/// The engine for the alert tests: commentary and answers say "a ball rolls" word by word;
/// each alert rule's yes/no check answers "no", then "yes" once (the edge that fires it),
/// then "no" for good.
#[derive(Default)]
struct Judge {
    checks: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl kibitz_engine::Engine for Judge {
    fn submit(
        &self,
        request: kibitz_engine::Request,
    ) -> Result<kibitz_engine::Generation, kibitz_engine::EngineError> {
        let pieces: Vec<&'static str> = if request.user.contains("Answer yes or no") {
            let rule = request
                .user
                .split("Condition: ")
                .nth(1)
                .and_then(|rest| rest.lines().next())
                .unwrap_or_default()
                .to_string();
            let mut checks = self.checks.lock().unwrap();
            let seen = checks.entry(rule).or_default();
            *seen += 1;
            vec![if *seen == 2 { "yes" } else { "no" }]
        } else {
            vec!["a ", "ball ", "rolls"]
        };
        let (tx, generation) = kibitz_engine::Generation::channel();
        tokio::spawn(async move {
            for piece in pieces {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = tx.send(Ok(kibitz_engine::Output::Text(piece.into()))).await;
            }
            let _ = tx
                .send(Ok(kibitz_engine::Output::Done(Default::default())))
                .await;
        });
        Ok(generation)
    }

    fn info(&self) -> kibitz_engine::EngineInfo {
        kibitz_engine::EngineInfo {
            kind: "judge".into(),
            model: "script".into(),
            backend: "none".into(),
        }
    }

    fn in_flight(&self) -> usize {
        0
    }

    fn health(&self) -> futures::future::BoxFuture<'_, bool> {
        Box::pin(async { true })
    }
}

/// WebDriver's Enter key.
const ENTER: &str = "\u{E007}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_is_answered_and_an_alert_shows_in_the_view_and_on_its_tile() {
    let _one = ONE_AT_A_TIME.lock().await;
    let site = Site::start(Options {
        engine_override: Some(std::sync::Arc::new(Judge::default())),
        ..streams(&["s1", "s2"], None)
    })
    .await;
    let browser = Browser::start().await;
    browser.goto(&site.url("/streams/s1")).await;
    browser
        .wait_for(
            "the view runs",
            "return window.kibitz.view === 'stream' && window.kibitz.comments >= 1
               && window.kibitz.pictureChanges >= 2;",
        )
        .await;

    // A question typed in the box (Enter sends it) is answered in the list of comments.
    browser
        .type_into("#question", &format!("What colour is the bar?{ENTER}"))
        .await;
    browser
        .wait_for(
            "the answer shows with its question",
            "const a = Object.values(window.kibitz.answers).find((a) => a.mine);
             const li = document.querySelector('#history li.answer');
             return a !== undefined && a.done && a.text === 'a ball rolls' && a.error === null
               && li !== null && li.innerText.includes('What colour is the bar?')
               && li.innerText.includes('a ball rolls')
               && document.getElementById('question').value === '';",
        )
        .await;

    // A rule added in the view is listed; its check turns from no to yes, which fires an
    // alert: highlighted in the list, the picture's border flashing.
    browser.type_into("#alert-rule", "the bar is white").await;
    browser.type_into("#alert-cooldown", "600").await;
    browser.click("#alert-add").await;
    browser
        .wait_for(
            "the rule is listed",
            "const r = window.kibitz.rules;
             return r.length === 1 && r[0].rule === 'the bar is white' && r[0].cooldown === 600
               && document.getElementById('rules').innerText.includes('the bar is white');",
        )
        .await;
    browser
        .wait_for(
            "the alert shows highlighted",
            "const li = document.querySelector('#history li.alert');
             return window.kibitz.alerts.length === 1
               && window.kibitz.alerts[0].rule === 'the bar is white'
               && li !== null && li.innerText.includes('the bar is white')
               && li.querySelector('a.clip').getAttribute('href') === window.kibitz.alerts[0].clip
               && getComputedStyle(li).borderLeftColor !== getComputedStyle(document.querySelector('#history li:not(.alert):not(.answer)')).borderLeftColor
               && document.getElementById('frame').dataset.alert === 'true';",
        )
        .await;
    browser
        .wait_for(
            "the rule counts its firing",
            "return window.kibitz.rules[0].fired === 1;",
        )
        .await;
    // Let the entry's arrival settle, with the whole view in sight.
    browser.run("window.scrollTo(0, 0); return true;").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    browser
        .screenshot(&screenshot_path("page-ask-alert.png"))
        .await;

    // An answer to someone else's question comes through the events.
    let response = site
        .http
        .post(site.url("/api/streams/s1/ask"))
        .timeout(WAIT)
        .header("content-type", "application/json")
        .body(r#"{"question": "Who asked this?"}"#)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    browser
        .wait_for(
            "another viewer's answer shows",
            "return Object.values(window.kibitz.answers).some((a) => !a.mine && a.done
               && a.question === 'Who asked this?' && a.text === 'a ball rolls');",
        )
        .await;

    // Too many questions: the server's reason shows.
    let mut refused = false;
    for n in 0..8 {
        browser
            .type_into("#question", &format!("And now {n}?{ENTER}"))
            .await;
        browser
            .wait_for(
                "the question is sent or refused",
                "const m = document.getElementById('ask-message');
                 return !document.getElementById('ask-submit').disabled
                   && !m.innerText.includes('asking');",
            )
            .await;
        let message = browser
            .run("return document.getElementById('ask-message').innerText;")
            .await;
        if message
            .as_str()
            .unwrap_or_default()
            .contains("too many questions")
        {
            refused = true;
            break;
        }
    }
    assert!(refused, "never refused");
    assert_eq!(
        browser
            .run("return document.getElementById('ask-message').classList.contains('error');")
            .await,
        true
    );

    // The rule goes.
    browser.click("#rules .delete").await;
    browser
        .wait_for(
            "the rule is gone",
            "return window.kibitz.rules.length === 0
               && document.querySelectorAll('#rules li').length === 0;",
        )
        .await;
    let rules = site.json("/api/streams/s1/alerts").await;
    assert_eq!(rules["rules"], json!([]));

    // The overview: s1's alert (fired before it opened) and s2's, live.
    browser.goto(&site.url("/")).await;
    browser
        .wait_for(
            "s1's tile shows its alert",
            &format!(
                "const t = document.querySelector(\"{}\");
                 return t !== null && t.dataset.alert === 'true'
                   && t.querySelector('.alert-note').innerText.includes('the bar is white')
                   && t.querySelector('.alert-note .clip').getAttribute('href').endsWith('/clip');",
                tile("s1")
            ),
        )
        .await;
    let response = site
        .http
        .post(site.url("/api/streams/s2/alerts"))
        .timeout(WAIT)
        .header("content-type", "application/json")
        .body(r#"{"rule": "the ball is red"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    browser
        .wait_for(
            "s2's tile lights up",
            &format!(
                "const t = document.querySelector(\"{}\");
                 return t.dataset.alert === 'true' && t.classList.contains('flash')
                   && t.querySelector('.alert-note').innerText.includes('the ball is red')
                   && window.kibitz.tiles.s2.alert.rule === 'the ball is red';",
                tile("s2")
            ),
        )
        .await;
    browser
        .screenshot(&screenshot_path("page-overview-alert.png"))
        .await;

    // The clip plays in the page: its JPEGs, one after another.
    browser
        .click(&format!("{} .alert-note .clip", tile("s2")))
        .await;
    browser
        .wait_for(
            "the clip plays",
            "return document.getElementById('clip').open
               && /\\d+ pictures/.test(document.getElementById('clip-title').innerText)
               && !document.getElementById('clip-title').innerText.startsWith('clip: 0 ');",
        )
        .await;
    browser.click("#clip-close").await;

    drop(browser);
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_is_searched_and_a_view_opens_with_what_was_said() {
    let _one = ONE_AT_A_TIME.lock().await;
    let site = Site::start(Options {
        history: true,
        ..streams(&["a", "b"], None)
    })
    .await;
    // Enough said to fill more than one page of results, then `a` goes quiet.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let page = site.json("/api/history?stream=a&limit=100").await;
        if page["entries"].as_array().unwrap().len() >= 25 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the history does not fill"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    site.patch("/api/streams/a", json!({ "inference_interval": 3600 }))
        .await;
    site.wait_quiet("a").await;

    // The view shows what was said before it opened, at once.
    let browser = Browser::start().await;
    browser.goto(&site.url("/streams/a")).await;
    browser
        .wait_for(
            "earlier comments show from the history",
            "const earlier = document.querySelectorAll('#history li.earlier');
             return window.kibitz.view === 'stream' && window.kibitz.historyOn === true
               && window.kibitz.comments === 0 && window.kibitz.earlier >= 3
               && earlier.length === window.kibitz.earlier
               && [...earlier].every((li) => li.innerText.includes('a ball rolls'))
               && !document.getElementById('vtt-link').hidden;",
        )
        .await;
    assert_eq!(
        browser
            .run("return window.kibitz.earlier;")
            .await
            .as_u64()
            .unwrap(),
        20,
        "the last 20 entries"
    );
    let href = browser
        .run("return document.getElementById('vtt-link').getAttribute('href');")
        .await;
    assert_eq!(href, "/api/streams/a/history.vtt");
    let vtt = site
        .http
        .get(site.url("/api/streams/a/history.vtt"))
        .timeout(WAIT)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(vtt.starts_with("WEBVTT") && vtt.contains("a ball rolls"));

    // The search box finds "ball", a page at a time.
    browser.type_into("#search", "ball").await;
    browser
        .wait_for(
            "results show",
            "const items = document.querySelectorAll('#results-list li');
             return !document.getElementById('results').hidden && items.length === 20
               && window.kibitz.search.shown === 20 && window.kibitz.search.next !== null
               && items[0].innerText.includes('a ball rolls')
               && items[0].querySelector('.kind').innerText.toLowerCase() === 'comment'
               && /^(a|b)$/.test(items[0].querySelector('.stream').innerText)
               && items[0].querySelector('.time').innerText !== ''
               && !document.getElementById('results-more').hidden;",
        )
        .await;
    browser
        .screenshot(&screenshot_path("page-history-search.png"))
        .await;
    browser.click("#results-more").await;
    browser
        .wait_for(
            "more results show",
            "return document.querySelectorAll('#results-list li').length > 20
               && window.kibitz.search.shown > 20 && !window.kibitz.search.busy;",
        )
        .await;
    // A result opens its stream.
    let first = browser
        .run("return document.querySelector('#results-list li .stream').getAttribute('href');")
        .await;
    assert!(first.as_str().unwrap().starts_with("/streams/"), "{first}");

    // Nothing found, and hostile text, are just said.
    browser.type_into("#search", "zebra \"NEAR(").await;
    browser
        .wait_for(
            "nothing found",
            "return window.kibitz.search.query === 'zebra \"NEAR(' && !window.kibitz.search.busy
               && window.kibitz.search.shown === 0
               && document.getElementById('results-message').innerText.includes('Nothing');",
        )
        .await;

    drop(browser);
    site.stop().await;
}

/// A first run: the model is still downloading. The stream's view shows the picture at once
/// and a banner with the download (its line and bar), then the one line saying what is
/// missing, and once the engine is there the banner goes and the commentary comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_run_shows_the_picture_and_the_download_then_the_commentary() {
    use kibitz_engine::models::Transfer;
    use kibitz_engine::{EngineInfo, EngineSlot, Readiness, ReadyState};

    let _one = ONE_AT_A_TIME.lock().await;
    let slot = std::sync::Arc::new(EngineSlot::new(EngineInfo {
        kind: "llama".into(),
        model: "openbmb/MiniCPM-o-4_5-gguf".into(),
        backend: "not loaded".into(),
    }));
    slot.set(Readiness::downloading(Transfer {
        file: "MiniCPM-o-4_5-Q4_K_M.gguf".into(),
        index: 1,
        files: 2,
        bytes: 1 << 30,
        total: 4 << 30,
        bytes_per_s: (40 << 20) as f64,
        eta_s: Some(77.0),
    }));
    let site = Site::start(Options {
        engine_override: Some(slot.clone()),
        ..streams(&["s1"], None)
    })
    .await;
    let browser = Browser::start().await;
    browser.goto(&site.url("/streams/s1")).await;
    browser
        .wait_for(
            "the picture and the download show",
            "const banner = document.getElementById('readiness');
             return document.getElementById('picture').naturalWidth > 0
               && !banner.hidden
               && banner.innerText.startsWith('downloading MiniCPM-o-4_5-Q4_K_M.gguf (file 1 of 2): 1.00 GiB of 4.00 GiB at 40.00 MiB/s')
               && document.getElementById('readiness-bar').value === 0.25
               && document.getElementById('engine').innerText.endsWith('not loaded · downloading');",
        )
        .await;
    browser
        .screenshot(&screenshot_path("page-first-run.png"))
        .await;

    slot.set(Readiness::new(
        ReadyState::Missing,
        "model openbmb/MiniCPM-o-4_5-gguf (Q4_K_M) is not in /cache; run `kibitz models pull …`",
    ));
    browser
        .wait_for(
            "the missing model's line shows, without a bar",
            "const banner = document.getElementById('readiness');
             return banner.dataset.state === 'missing'
               && banner.innerText.includes('kibitz models pull')
               && document.getElementById('readiness-bar').hidden;",
        )
        .await;

    slot.fill(std::sync::Arc::new(site.harness.engine.clone()));
    site.harness.streams.scheduler().wake();
    browser
        .wait_for(
            "the banner goes and the commentary comes",
            "return document.getElementById('readiness').hidden && window.kibitz.comments > 0;",
        )
        .await;
}
