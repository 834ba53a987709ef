//! The `openai` engine against HTTP servers started inside the tests: a well-behaved one
//! built on axum, and raw TCP ones that misbehave on purpose (broken chunks, cut streams,
//! errors, silence). Timeouts here are short where a test waits for one to fire and
//! generous everywhere else, so a loaded 2-core machine passes too.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt as _;
use kibitz_engine::openai::{OpenAiConfig, OpenAiEngine};
use kibitz_engine::{
    Engine, EngineError, Frame, Generation, Image, Output, Priority, Request, Scheduler, Stats,
};
use kibitz_frames::{Jpeg, Rgb};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

const KEY: &str = "sk-test-secret-4f9a";
/// Upper bound for anything that should happen "soon"; only hit when something hangs.
const PATIENCE: Duration = Duration::from_secs(30);

fn chunk(content: &str) -> String {
    let chunk = json!({
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{ "index": 0, "delta": { "content": content }, "finish_reason": null }],
    });
    format!("data: {chunk}\n\n")
}

/// A complete, well-formed answer: role, some reasoning (to be skipped), an empty think
/// block (to be stripped), three words, finish, usage, `[DONE]`.
fn happy_events() -> Vec<String> {
    vec![
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\r\n\r\n".into(),
        ": keep-alive\n\n".into(),
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"hmm\"}}]}\n\n".into(),
        chunk("<think>\n\n</think>\n\n"),
        chunk("A"),
        // One event split over two writes.
        chunk(" dog")[..20].to_string(),
        chunk(" dog")[20..].to_string(),
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" runs.\"},\"finish_reason\":\"stop\"}]}\n\n".into(),
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":321,\"completion_tokens\":3,\"total_tokens\":324}}\n\n"
            .into(),
        "data: [DONE]\n\n".into(),
    ]
}

// ---- a well-behaved server (axum) ----

#[derive(Default)]
struct Seen {
    chats: Mutex<Vec<(HeaderMap, Value)>>,
    model_lists: AtomicUsize,
}

struct Good {
    url: String,
    seen: Arc<Seen>,
}

impl Good {
    fn chats(&self) -> usize {
        self.seen.chats.lock().unwrap().len()
    }
}

async fn good_server(models: Vec<&'static str>) -> Good {
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route(
            "/v1/models",
            get(move |State(seen): State<Arc<Seen>>| async move {
                seen.model_lists.fetch_add(1, Ordering::SeqCst);
                let data: Vec<Value> = models
                    .iter()
                    .map(|id| json!({ "id": id, "object": "model" }))
                    .collect();
                Json(json!({ "object": "list", "data": data }))
            }),
        )
        .with_state(seen.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Good {
        url: format!("http://{addr}/v1"),
        seen,
    }
}

async fn chat(
    State(seen): State<Arc<Seen>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    seen.chats.lock().unwrap().push((headers, body));
    let pieces = futures::stream::iter(happy_events()).then(|piece| async move {
        // Separate writes, so the client sees the answer in many reads.
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok::<_, Infallible>(Bytes::from(piece))
    });
    (
        [("content-type", "text/event-stream")],
        Body::from_stream(pieces),
    )
        .into_response()
}

// ---- raw servers that misbehave ----

/// What a raw server read: the request head (the body is read and dropped).
struct RawRequest {
    head: String,
}

struct Raw {
    url: String,
    connections: Arc<AtomicUsize>,
}

/// A TCP server that hands each connection (numbered from 0) and its request to `behave`.
async fn raw_server<F, Fut>(behave: F) -> Raw
where
    F: Fn(usize, TcpStream, RawRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    let behave = Arc::new(behave);
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let behave = behave.clone();
            tokio::spawn(async move {
                if let Some(request) = read_request(&mut socket).await {
                    behave(n, socket, request).await;
                }
            });
        }
    });
    Raw {
        url: format!("http://{addr}/v1"),
        connections,
    }
}

async fn read_request(socket: &mut TcpStream) -> Option<RawRequest> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(RawRequest { head })
}

async fn start_sse(socket: &mut TcpStream) {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    socket.write_all(head.as_bytes()).await.unwrap();
}

async fn send_chunk(socket: &mut TcpStream, data: &str) {
    let framed = format!("{:x}\r\n{data}\r\n", data.len());
    let _ = socket.write_all(framed.as_bytes()).await;
    let _ = socket.flush().await;
}

async fn end_chunks(socket: &mut TcpStream) {
    let _ = socket.write_all(b"0\r\n\r\n").await;
}

async fn answer_status(socket: &mut TcpStream, status: u16, body: &str) {
    let reply = format!(
        "HTTP/1.1 {status} Whatever\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = socket.write_all(reply.as_bytes()).await;
}

async fn answer_happily(mut socket: TcpStream) {
    start_sse(&mut socket).await;
    for event in happy_events() {
        send_chunk(&mut socket, &event).await;
    }
    end_chunks(&mut socket).await;
}

/// A server that holds every request until [`Gated::release`], counting the requests it
/// holds: `open` now and `most` at once. A request leaves the count before the first byte
/// of its answer, so the count never runs behind the engine's own.
struct Gated {
    raw: Raw,
    open: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    gate: watch::Sender<bool>,
}

impl Gated {
    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    fn most(&self) -> usize {
        self.most.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.raw.connections.load(Ordering::SeqCst)
    }

    fn release(&self) {
        self.gate.send_replace(true);
    }
}

/// `first` is sent before the hold (`None`: nothing, not even the headers).
async fn gated_server(first: Option<&'static str>) -> Gated {
    let open = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (gate, held) = watch::channel(false);
    let (open2, most2) = (open.clone(), most.clone());
    let raw = raw_server(move |_, mut socket, _| {
        let (open, most, mut held) = (open2.clone(), most2.clone(), held.clone());
        async move {
            let now_open = open.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now_open, Ordering::SeqCst);
            if let Some(text) = first {
                start_sse(&mut socket).await;
                send_chunk(&mut socket, &chunk(text)).await;
            }
            let _ = tokio::time::timeout(PATIENCE, held.wait_for(|go| *go)).await;
            if first.is_none() {
                open.fetch_sub(1, Ordering::SeqCst);
                answer_happily(socket).await;
            } else {
                for event in happy_events() {
                    send_chunk(&mut socket, &event).await;
                }
                open.fetch_sub(1, Ordering::SeqCst);
                end_chunks(&mut socket).await;
            }
        }
    })
    .await;
    Gated {
        raw,
        open,
        most,
        gate,
    }
}

/// A port with nothing listening: connections are refused.
async fn dead_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/v1")
}

// ---- the engine side ----

fn config(urls: &[&str]) -> OpenAiConfig {
    let mut config = OpenAiConfig::new(urls.iter().copied());
    config.model = Some("test-model".into());
    config.api_key = Some(KEY.into());
    config.first_token_timeout = Duration::from_secs(10);
    config.total_timeout = Duration::from_secs(25);
    config.cooldown = Duration::from_secs(2);
    config.max_cooldown = Duration::from_secs(2);
    config
}

fn rgb(width: u32, height: u32, shade: u8) -> Rgb {
    let data: Vec<u8> = (0..width * height)
        .flat_map(|i| [shade, (i % 251) as u8, 255 - shade])
        .collect();
    Rgb {
        width,
        height,
        data: data.into(),
    }
}

fn jpeg_of(picture: &Rgb) -> Jpeg {
    let image = turbojpeg::Image {
        pixels: &picture.data[..],
        width: picture.width as usize,
        pitch: picture.width as usize * 3,
        height: picture.height as usize,
        format: turbojpeg::PixelFormat::RGB,
    };
    let bytes = turbojpeg::compress(image, 90, turbojpeg::Subsamp::Sub2x2).unwrap();
    Jpeg {
        width: picture.width,
        height: picture.height,
        bytes: Bytes::copy_from_slice(&bytes),
    }
}

/// Two frames given out of order: an RGB one at 2 s and a JPEG one at 1 s.
fn request() -> (Request, Jpeg) {
    let jpeg = jpeg_of(&rgb(32, 24, 10));
    let frames = vec![
        Frame {
            image: Image::Rgb(rgb(64, 48, 200)),
            pts: Duration::from_secs(2),
        },
        Frame {
            image: Image::Jpeg(jpeg.clone()),
            pts: Duration::from_secs(1),
        },
    ];
    let mut request = Request::new(frames, "You are a commentator.", "What happens?");
    request.max_tokens = 24;
    (request, jpeg)
}

/// Collects pieces until the end; errors come back with the pieces before them.
async fn run(generation: Generation) -> (Vec<String>, Result<Stats, EngineError>) {
    let mut generation = generation;
    let mut pieces = Vec::new();
    let result = tokio::time::timeout(PATIENCE, async {
        loop {
            match generation.next().await {
                Some(Ok(Output::Text(t))) => pieces.push(t),
                Some(Ok(Output::Done(stats))) => return Ok(stats),
                Some(Err(e)) => return Err(e),
                None => panic!("the generation ended without Done or an error"),
            }
        }
    })
    .await
    .expect("the engine hung");
    (pieces, result)
}

async fn ask(engine: &OpenAiEngine) -> (Vec<String>, Result<Stats, EngineError>) {
    run(engine.submit(request().0).unwrap()).await
}

fn upstream<'a>(status: &'a Value, url: &str) -> &'a Value {
    status["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["url"] == url)
        .unwrap()
}

/// Waits (a bounded number of short sleeps) until `check` holds.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn streams_text_and_keeps_the_servers_stats() {
    let server = good_server(vec![]).await;
    let engine = OpenAiEngine::new(config(&[&server.url])).unwrap();
    let (pieces, result) = ask(&engine).await;
    let stats = result.unwrap();
    assert_eq!(pieces.concat(), "A dog runs.");
    assert_eq!(pieces, ["A", " dog", " runs."]);
    assert_eq!(stats.prompt_tokens, 321);
    assert_eq!(stats.generated_tokens, 3);
    assert_eq!(stats.images, 2);
    assert!(
        stats.first_token_ms > 0.0 && stats.total_ms >= stats.first_token_ms,
        "{stats:?}"
    );
    assert!(stats.decode_tokens_per_s > 0.0, "{stats:?}");
    assert_eq!(engine.in_flight(), 0);
    let status = engine.status();
    assert_eq!(upstream(&status, &server.url)["ok"], 1);
    assert!(engine.metrics().contains("result=\"ok\"} 1"));
    assert!(engine.health().await);
    let info = engine.info();
    assert_eq!(
        (
            info.kind.as_str(),
            info.model.as_str(),
            info.backend.as_str()
        ),
        ("openai", "test-model", server.url.as_str())
    );
}

#[tokio::test]
async fn the_request_carries_frames_in_time_order_then_the_text() {
    let server = good_server(vec![]).await;
    let engine = OpenAiEngine::new(config(&[&server.url])).unwrap();
    let (mut request, jpeg) = request();
    request.ignore_eos = true;
    request.sampling.seed = 7;
    run(engine.submit(request).unwrap()).await.1.unwrap();
    let (plain, _) = ask(&engine).await;
    assert_eq!(plain.concat(), "A dog runs.");

    let chats = server.seen.chats.lock().unwrap();
    let (headers, body) = &chats[0];
    assert_eq!(headers["authorization"], format!("Bearer {KEY}").as_str());
    assert_eq!(body["model"], "test-model");
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(body["chat_template_kwargs"]["enable_thinking"], false);
    assert_eq!(body["max_tokens"], 24);
    assert_eq!(body["seed"], 7);
    assert_eq!(body["top_k"], 100);
    assert!(body["temperature"].is_number() && body["top_p"].is_number());
    assert_eq!(body["ignore_eos"], true);
    assert!(
        chats[1].1.get("ignore_eos").is_none(),
        "ignore_eos is sent only when asked for"
    );

    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages[0]["role"], "system");
    assert_eq!(messages[0]["content"], "You are a commentator.");
    assert_eq!(messages[1]["role"], "user");
    let parts = messages[1]["content"].as_array().unwrap();
    assert_eq!(parts.len(), 3);
    let images: Vec<Vec<u8>> = parts[..2]
        .iter()
        .map(|part| {
            assert_eq!(part["type"], "image_url");
            let url = part["image_url"]["url"].as_str().unwrap();
            let data = url
                .strip_prefix("data:image/jpeg;base64,")
                .expect("a base64 JPEG data URL");
            base64::engine::general_purpose::STANDARD
                .decode(data)
                .unwrap()
        })
        .collect();
    // The JPEG frame (1 s) comes first, as it was given; the RGB one (2 s) was encoded.
    assert_eq!(images[0], jpeg.bytes.as_ref());
    let header = turbojpeg::read_header(&images[1]).unwrap();
    assert_eq!((header.width, header.height), (64, 48));
    assert_eq!(parts[2], json!({ "type": "text", "text": "What happens?" }));
}

#[tokio::test]
async fn the_model_is_asked_for_once_when_not_given() {
    let server = good_server(vec!["minicpm-o-4.5", "other"]).await;
    let mut settings = config(&[&server.url]);
    settings.model = None;
    let engine = OpenAiEngine::connect(settings).await.unwrap();
    assert_eq!(engine.info().model, "minicpm-o-4.5");
    for _ in 0..2 {
        ask(&engine).await.1.unwrap();
    }
    assert_eq!(server.seen.model_lists.load(Ordering::SeqCst), 1);
    assert_eq!(
        server.seen.chats.lock().unwrap()[1].1["model"],
        "minicpm-o-4.5"
    );

    let empty = good_server(vec![]).await;
    let mut settings = config(&[&empty.url]);
    settings.model = None;
    let error = OpenAiEngine::connect(settings).await.unwrap_err();
    assert!(
        matches!(&error, EngineError::Unavailable(m) if m.contains("--engine-model") && m.contains("lists no model")),
        "{error}"
    );
}

#[tokio::test]
async fn a_malformed_chunk_ends_the_answer_with_a_clear_error() {
    let server = raw_server(|_, mut socket, _| async move {
        start_sse(&mut socket).await;
        send_chunk(&mut socket, &chunk("Hi")).await;
        send_chunk(&mut socket, "data: {\"choices\": [{\"delta\": nonsense\n\n").await;
        end_chunks(&mut socket).await;
    })
    .await;
    let engine = OpenAiEngine::new(config(&[&server.url])).unwrap();
    let (pieces, result) = ask(&engine).await;
    assert_eq!(pieces, ["Hi"]);
    let error = result.unwrap_err();
    assert!(
        matches!(&error, EngineError::Failed(m) if m.contains("malformed") && m.contains("nonsense")),
        "{error}"
    );
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_stream_cut_midway_is_never_sent_again() {
    let cut = || {
        raw_server(|_, mut socket, _| async move {
            start_sse(&mut socket).await;
            send_chunk(&mut socket, &chunk("The")).await;
            send_chunk(&mut socket, &chunk(" ball")).await;
            // Gone without the closing chunk.
        })
    };
    let (a, b) = (cut().await, cut().await);
    let engine = OpenAiEngine::new(config(&[&a.url, &b.url])).unwrap();
    let (pieces, result) = ask(&engine).await;
    assert_eq!(pieces, ["The", " ball"]);
    let error = result.unwrap_err();
    assert!(
        matches!(&error, EngineError::Failed(m) if m.contains("stream cut after 2 tokens")),
        "{error}"
    );
    let requests = a.connections.load(Ordering::SeqCst) + b.connections.load(Ordering::SeqCst);
    assert_eq!(
        requests, 1,
        "a request whose text already streamed must not be sent again"
    );
}

#[tokio::test]
async fn http_500_and_429_before_streaming_go_to_the_other_upstream() {
    for code in [500u16, 429] {
        let failing = raw_server(move |_, mut socket, _| async move {
            answer_status(&mut socket, code, "{\"error\":{\"message\":\"try later\"}}").await;
        })
        .await;
        let good = good_server(vec![]).await;
        let engine = OpenAiEngine::new(config(&[&failing.url, &good.url])).unwrap();
        // Round-robin starts with the first URL, so the failing one is asked first.
        let (pieces, result) = ask(&engine).await;
        result.unwrap_or_else(|e| panic!("HTTP {code}: {e}"));
        assert_eq!(pieces.concat(), "A dog runs.");
        assert_eq!(failing.connections.load(Ordering::SeqCst), 1);
        assert_eq!(good.chats(), 1);
        let status = engine.status();
        let rested = upstream(&status, &failing.url);
        assert_eq!(rested["errors"], 1);
        assert_eq!(rested["up"], false, "{status}");
        assert!(
            rested["last_error"]
                .as_str()
                .unwrap()
                .contains(&code.to_string()),
            "{status}"
        );
    }
}

#[tokio::test]
async fn http_500_and_429_with_one_upstream_are_clear_errors() {
    for code in [500u16, 429] {
        let failing = raw_server(move |_, mut socket, _| async move {
            answer_status(
                &mut socket,
                code,
                "{\"error\":{\"message\":\"overloaded\"}}",
            )
            .await;
        })
        .await;
        let engine = OpenAiEngine::new(config(&[&failing.url])).unwrap();
        let (pieces, result) = ask(&engine).await;
        assert!(pieces.is_empty());
        let error = result.unwrap_err();
        assert!(
            matches!(&error, EngineError::Unavailable(m) if m.contains(&format!("HTTP {code}")) && m.contains("overloaded")),
            "{error}"
        );
        assert_eq!(failing.connections.load(Ordering::SeqCst), 1);
        // Resting now: the next cycle fails at once and says why.
        let (_, again) = ask(&engine).await;
        let error = again.unwrap_err();
        assert!(
            matches!(&error, EngineError::Unavailable(m) if m.contains("resting")),
            "{error}"
        );
        assert_eq!(failing.connections.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test]
async fn a_connection_dropped_before_any_answer_is_tried_again_on_the_only_upstream() {
    let flaky = raw_server(|n, socket, _| async move {
        if n > 0 {
            answer_happily(socket).await;
        } // the first connection is closed without a word
    })
    .await;
    let engine = OpenAiEngine::new(config(&[&flaky.url])).unwrap();
    let (pieces, result) = ask(&engine).await;
    result.unwrap();
    assert_eq!(pieces.concat(), "A dog runs.");
    assert_eq!(flaky.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_server_that_never_answers_hits_the_first_token_timeout() {
    // One says nothing at all; the other sends headers and keep-alives but no text.
    let (release, held) = tokio::sync::watch::channel(());
    let silent = raw_server(move |_, socket, _| {
        let mut held = held.clone();
        async move {
            let _ = held.changed().await;
            drop(socket);
        }
    })
    .await;
    let (release2, held2) = tokio::sync::watch::channel(());
    let chatty = raw_server(move |_, mut socket, _| {
        let mut held = held2.clone();
        async move {
            start_sse(&mut socket).await;
            loop {
                send_chunk(&mut socket, ": keep-alive\n\n").await;
                tokio::select! {
                    _ = held.changed() => return,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    })
    .await;
    for url in [&silent.url, &chatty.url] {
        let mut settings = config(&[url]);
        settings.first_token_timeout = Duration::from_millis(400);
        let engine = OpenAiEngine::new(settings).unwrap();
        let (pieces, result) = ask(&engine).await;
        assert!(pieces.is_empty());
        let error = result.unwrap_err();
        assert!(
            matches!(&error, EngineError::Timeout(m) if m.contains("first-token")),
            "{url}: {error}"
        );
        let status = engine.status();
        assert_eq!(upstream(&status, url)["timeouts"], 1, "{status}");
        assert_eq!(
            upstream(&status, url)["up"],
            false,
            "a slow upstream rests too: {status}"
        );
    }
    drop((release, release2));
}

#[tokio::test]
async fn the_total_timeout_ends_a_slow_stream() {
    let slow = raw_server(|_, mut socket, _| async move {
        start_sse(&mut socket).await;
        for _ in 0..200 {
            send_chunk(&mut socket, &chunk(" la")).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let mut settings = config(&[&slow.url]);
    settings.total_timeout = Duration::from_millis(600);
    let engine = OpenAiEngine::new(settings).unwrap();
    let (pieces, result) = ask(&engine).await;
    assert!(!pieces.is_empty());
    let error = result.unwrap_err();
    assert!(
        matches!(&error, EngineError::Timeout(m) if m.contains("total timeout")),
        "{error}"
    );
}

#[tokio::test]
async fn a_dead_upstream_is_rested_then_tried_again_after_its_cooldown() {
    let dead = dead_url().await;
    let good = good_server(vec![]).await;
    let engine = OpenAiEngine::new(config(&[&dead, &good.url])).unwrap();
    let dead_errors = |engine: &OpenAiEngine| {
        upstream(&engine.status(), &dead)["errors"]
            .as_u64()
            .unwrap()
    };

    // First cycle: the dead one is asked first, fails, the retry goes to the good one.
    let (pieces, result) = ask(&engine).await;
    result.unwrap();
    assert_eq!(pieces.concat(), "A dog runs.");
    assert_eq!(dead_errors(&engine), 1);
    assert_eq!(upstream(&engine.status(), &dead)["up"], false);
    assert!(engine
        .metrics()
        .contains(&format!("kibitz_upstream_up{{url=\"{dead}\"}} 0")));

    // While it rests (2 s), every cycle goes straight to the good one.
    for _ in 0..4 {
        ask(&engine).await.1.unwrap();
    }
    assert_eq!(good.chats(), 5);
    assert!(
        dead_errors(&engine) <= 2,
        "the dead upstream was tried while resting"
    );
    assert!(engine.health().await, "one upstream is fine");

    // After the rest it is tried again (half-open), fails, and cycles still succeed.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let before = dead_errors(&engine);
    for _ in 0..3 {
        ask(&engine).await.1.unwrap();
    }
    assert!(
        dead_errors(&engine) > before,
        "the dead upstream was never tried again: {}",
        engine.status()
    );
    assert_eq!(good.chats(), 8);
}

#[tokio::test]
async fn health_is_false_when_no_upstream_answers() {
    let engine = OpenAiEngine::new(config(&[&dead_url().await])).unwrap();
    assert!(!engine.health().await);
}

#[tokio::test]
async fn dropping_the_generation_closes_the_upstream_connection() {
    let (closed_tx, closed_rx) = oneshot::channel::<usize>();
    let closed_tx = Arc::new(Mutex::new(Some(closed_tx)));
    let server = raw_server(move |_, mut socket, _| {
        let closed_tx = closed_tx.clone();
        async move {
            start_sse(&mut socket).await;
            send_chunk(&mut socket, &chunk("Hi")).await;
            // Keep "generating" until the client goes away, as a real server would.
            let mut sent = 1;
            let mut buf = [0u8; 64];
            loop {
                tokio::select! {
                    read = socket.read(&mut buf) => {
                        if matches!(read, Ok(0) | Err(_)) { break; }
                    }
                    () = tokio::time::sleep(Duration::from_millis(20)) => {
                        send_chunk(&mut socket, &chunk(" more")).await;
                        sent += 1;
                    }
                }
            }
            if let Some(tx) = closed_tx.lock().unwrap().take() {
                let _ = tx.send(sent);
            }
        }
    })
    .await;
    let engine = OpenAiEngine::new(config(&[&server.url])).unwrap();
    let mut generation = engine.submit(request().0).unwrap();
    let first = tokio::time::timeout(PATIENCE, generation.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first, Output::Text("Hi".into()));
    assert_eq!(engine.in_flight(), 1);
    drop(generation);
    let sent = tokio::time::timeout(PATIENCE, closed_rx)
        .await
        .expect("the upstream connection stayed open")
        .unwrap();
    assert!(sent >= 1);
    eventually("in_flight back to 0", || engine.in_flight() == 0).await;
    eventually("the cancellation counted", || {
        upstream(&engine.status(), &server.url)["cancelled"] == 1
    })
    .await;
    let status = engine.status();
    assert_eq!(
        upstream(&status, &server.url)["up"],
        true,
        "a cancellation does not rest the upstream: {status}"
    );
}

#[tokio::test]
async fn the_api_key_never_shows_in_debug_status_metrics_or_errors() {
    // A server that echoes the Authorization header back in its error body.
    let echo = raw_server(|_, mut socket, request| async move {
        let auth = request
            .head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("authorization"))
            .unwrap_or("");
        answer_status(
            &mut socket,
            401,
            &format!("{{\"error\":\"bad key: {auth}\"}}"),
        )
        .await;
    })
    .await;
    let settings = config(&[&echo.url]);
    assert!(!format!("{settings:?}").contains(KEY));
    let engine = OpenAiEngine::new(settings).unwrap();
    let (_, result) = ask(&engine).await;
    let error = result.unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("401") && message.contains("--api-key"),
        "{message}"
    );
    assert!(
        message.contains("Bearer ***"),
        "the echo is there, redacted: {message}"
    );
    let everything = format!(
        "{message} {error:?} {engine:?} {} {} {:?}",
        engine.status(),
        engine.metrics(),
        engine.info()
    );
    assert!(!everything.contains(KEY), "the key leaked: {everything}");
    // A 401 is the request's fault, not the upstream's: it is not rested.
    assert_eq!(upstream(&engine.status(), &echo.url)["up"], true);
}

#[tokio::test]
async fn concurrent_requests_spread_over_upstreams_and_never_mix() {
    let (a, b) = (good_server(vec![]).await, good_server(vec![]).await);
    let engine = OpenAiEngine::new(config(&[&a.url, &b.url])).unwrap();
    let generations: Vec<Generation> = (0..6)
        .map(|_| engine.submit(request().0).unwrap())
        .collect();
    let answers = futures::future::join_all(generations.into_iter().map(run)).await;
    for (pieces, result) in answers {
        result.unwrap();
        assert_eq!(pieces.concat(), "A dog runs.");
    }
    assert_eq!(a.chats() + b.chats(), 6);
    assert!(
        a.chats() >= 1 && b.chats() >= 1,
        "both upstreams get work: {} / {}",
        a.chats(),
        b.chats()
    );
}

#[tokio::test]
async fn an_error_event_inside_the_stream_is_reported() {
    let server = raw_server(|_, mut socket, _| async move {
        start_sse(&mut socket).await;
        send_chunk(
            &mut socket,
            "data: {\"error\":{\"message\":\"context length exceeded\",\"code\":400}}\n\n",
        )
        .await;
        end_chunks(&mut socket).await;
    })
    .await;
    let engine = OpenAiEngine::new(config(&[&server.url])).unwrap();
    let error = ask(&engine).await.1.unwrap_err();
    assert!(
        matches!(&error, EngineError::Failed(m) if m.contains("context length exceeded")),
        "{error}"
    );
    // The server is up and said what was wrong with the request: no rest.
    assert_eq!(upstream(&engine.status(), &server.url)["up"], true);
}

#[tokio::test]
async fn when_both_upstreams_fail_the_error_tells_both_stories() {
    let failing = || {
        raw_server(|_, mut socket, _| async move {
            answer_status(&mut socket, 503, "{\"error\":\"warming up\"}").await;
        })
    };
    let (a, b) = (failing().await, failing().await);
    let engine = OpenAiEngine::new(config(&[&a.url, &b.url])).unwrap();
    let error = ask(&engine).await.1.unwrap_err();
    let EngineError::Unavailable(message) = &error else {
        panic!("{error}")
    };
    assert!(
        message.contains(&a.url) && message.contains(&b.url) && message.contains("; then "),
        "{message}"
    );
    assert!(
        !message.contains("engine unavailable"),
        "no doubled prefixes: {message}"
    );
    // Both rest now; a cycle fails at once without asking either.
    let error = ask(&engine).await.1.unwrap_err();
    assert!(error.to_string().contains("resting"), "{error}");
    let requests = a.connections.load(Ordering::SeqCst) + b.connections.load(Ordering::SeqCst);
    assert_eq!(requests, 2);
}

/// What `run` gathers: the pieces, then how the answer ended.
type Answered = (Vec<String>, Result<Stats, EngineError>);

/// `n` streams, each asking once through `scheduler` at commentary priority, in tasks.
fn ask_through(scheduler: &Scheduler, n: usize) -> Vec<tokio::task::JoinHandle<Answered>> {
    (0..n)
        .map(|i| {
            let session = scheduler.open_session(&format!("s{i}"));
            tokio::spawn(async move {
                let turn = session.turn(Priority::Commentary, None).await.unwrap();
                run(turn.submit(request().0).unwrap()).await
            })
        })
        .collect()
}

#[tokio::test]
async fn five_streams_on_one_upstream_with_cap_two_wait_in_the_scheduler_not_the_engine() {
    let server = gated_server(None).await;
    let mut settings = config(&[&server.raw.url]);
    settings.max_in_flight = 2;
    let engine = Arc::new(OpenAiEngine::new(settings).unwrap());
    assert_eq!((engine.capacity(), engine.parallelism()), (2, 2));
    let scheduler = Scheduler::new(engine.clone());
    let asks = ask_through(&scheduler, 5);
    eventually(
        "two requests open at the upstream, three waiting in the scheduler",
        || server.open() == 2 && scheduler.status().waiting.commentary == 3,
    )
    .await;
    assert_eq!(engine.in_flight(), 2, "the engine holds only what runs");
    let status = engine.status();
    let shown = upstream(&status, &server.raw.url);
    assert_eq!(
        (&shown["in_flight"], &shown["max_in_flight"]),
        (&json!(2), &json!(2)),
        "{status}"
    );
    assert_eq!(
        (&status["capacity"], &status["capacity_now"]),
        (&json!(2), &json!(2))
    );
    let metrics = engine.metrics();
    for line in [
        format!(
            "kibitz_upstream_in_flight{{url=\"{}\"}} 2\n",
            server.raw.url
        ),
        format!(
            "kibitz_upstream_max_in_flight{{url=\"{}\"}} 2\n",
            server.raw.url
        ),
    ] {
        assert!(metrics.contains(&line), "{line} missing in:\n{metrics}");
    }
    // Held a while longer, the upstream still sees only two.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!((server.open(), server.requests()), (2, 2));

    server.release();
    for ask in asks {
        let (pieces, result) = ask.await.unwrap();
        result.unwrap();
        assert_eq!(pieces.concat(), "A dog runs.");
    }
    assert_eq!(server.requests(), 5);
    assert_eq!(
        server.most(),
        2,
        "never more than the cap open at the upstream"
    );
    eventually("nothing in flight or waiting", || {
        let queue = scheduler.status();
        engine.in_flight() == 0 && queue.running == 0 && queue.waiting.commentary == 0
    })
    .await;
    let status = engine.status();
    assert_eq!(upstream(&status, &server.raw.url)["ok"], 5, "{status}");
}

#[tokio::test]
async fn two_upstreams_with_cap_two_take_two_each_and_the_fifth_waits() {
    let (a, b) = (gated_server(None).await, gated_server(None).await);
    let mut settings = config(&[&a.raw.url, &b.raw.url]);
    settings.max_in_flight = 2;
    let engine = Arc::new(OpenAiEngine::new(settings).unwrap());
    assert_eq!(engine.parallelism(), 4);
    let scheduler = Scheduler::new(engine.clone());
    let asks = ask_through(&scheduler, 5);
    eventually("two open on each upstream and one waiting", || {
        a.open() == 2 && b.open() == 2 && scheduler.status().waiting.commentary == 1
    })
    .await;
    a.release();
    b.release();
    for ask in asks {
        let (pieces, result) = ask.await.unwrap();
        result.unwrap();
        assert_eq!(pieces.concat(), "A dog runs.");
    }
    assert_eq!(a.requests() + b.requests(), 5);
    assert!(
        a.most() <= 2 && b.most() <= 2,
        "{} / {}",
        a.most(),
        b.most()
    );
}

#[tokio::test]
async fn a_request_past_the_cap_is_busy_at_once_and_the_upstream_is_not_blamed() {
    let server = gated_server(Some("Hi")).await;
    let mut settings = config(&[&server.raw.url]);
    settings.max_in_flight = 1;
    let engine = OpenAiEngine::new(settings).unwrap();
    // The first request holds the only slot.
    let mut first = engine.submit(request().0).unwrap();
    let hi = tokio::time::timeout(PATIENCE, first.next()).await.unwrap();
    assert_eq!(hi.unwrap().unwrap(), Output::Text("Hi".into()));

    // Past the scheduler (which would have held it): refused, not parked in the engine.
    let (pieces, result) = ask(&engine).await;
    assert!(pieces.is_empty());
    let error = result.unwrap_err();
    assert!(
        matches!(&error, EngineError::Busy(m) if m.contains("--engine-max-inflight")),
        "{error}"
    );
    assert_eq!(
        server.requests(),
        1,
        "the upstream never saw the second request"
    );
    let status = engine.status();
    let shown = upstream(&status, &server.raw.url);
    assert_eq!(
        (&shown["up"], &shown["errors"], &shown["timeouts"]),
        (&json!(true), &json!(0), &json!(0)),
        "a full upstream is not to blame: {status}"
    );

    server.release();
    let (pieces, result) = run(first).await;
    result.unwrap();
    assert_eq!(pieces.concat(), "A dog runs.");
}

#[tokio::test]
async fn the_cooldown_setting_sets_how_long_a_failed_upstream_rests() {
    let dead = dead_url().await;
    let good = good_server(vec![]).await;
    let mut settings = config(&[&dead, &good.url]);
    settings.cooldown = Duration::from_millis(300);
    settings.max_cooldown = Duration::from_millis(300);
    let engine = OpenAiEngine::new(settings).unwrap();
    assert_eq!(
        engine.status()["cooldown_ms"],
        json!({ "first": 300, "max": 300 })
    );
    ask(&engine).await.1.unwrap();
    let status = engine.status();
    let rest = upstream(&status, &dead)["resting_for_ms"].as_u64().unwrap();
    assert!(rest <= 300, "{status}");
    // Back in the running well before the default of 10 s.
    eventually("the dead upstream is up again after its 0.3 s rest", || {
        upstream(&engine.status(), &dead)["up"] == true
    })
    .await;
    // Rested, its share is back in what the scheduler in front is told (the unit tests in
    // `upstream` follow the share while it rests, on fake time).
    assert_eq!(engine.parallelism(), engine.capacity());
}

/// Answers chat requests with 503 and `retry_after` as its `Retry-After` header, and
/// `GET /models` with a model list (the upstream is up, only busy).
async fn busy_server(retry_after: String) -> Raw {
    raw_server(move |_, mut socket, request| {
        let retry_after = retry_after.clone();
        async move {
            if request.head.starts_with("GET") {
                answer_status(&mut socket, 200, "{\"data\":[{\"id\":\"m\"}]}").await;
                return;
            }
            let body = "{\"error\":\"busy\"}";
            let reply = format!(
                "HTTP/1.1 503 Busy\r\nretry-after: {retry_after}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(reply.as_bytes()).await;
        }
    })
    .await
}

#[tokio::test]
async fn retry_after_in_seconds_or_as_a_date_sets_the_rest() {
    let in_40_s = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(40));
    for header in ["30".to_string(), in_40_s] {
        let busy = busy_server(header.clone()).await;
        // The cooldown alone would rest it 2 s.
        let engine = OpenAiEngine::new(config(&[&busy.url])).unwrap();
        let error = ask(&engine).await.1.unwrap_err();
        assert!(error.to_string().contains("HTTP 503"), "{error}");
        let status = engine.status();
        let rest = upstream(&status, &busy.url)["resting_for_ms"]
            .as_u64()
            .unwrap();
        assert!(
            (25_000..=40_000).contains(&rest),
            "Retry-After {header}: {status}"
        );
    }
}

#[tokio::test]
async fn health_holds_while_the_only_upstream_rests() {
    let busy = busy_server("30".into()).await;
    let engine = OpenAiEngine::new(config(&[&busy.url])).unwrap();
    ask(&engine).await.1.unwrap_err();
    assert_eq!(upstream(&engine.status(), &busy.url)["up"], false);
    assert!(
        engine.health().await,
        "resting is not gone: {}",
        engine.status()
    );
}

#[tokio::test]
async fn a_huge_error_body_is_read_only_up_to_its_cap() {
    const BODY: usize = 50 * 1024 * 1024;
    // Bytes written, and whether the writer is done (all sent, or the peer hung up).
    let sent = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let (sent2, done2) = (sent.clone(), done.clone());
    let failing = raw_server(move |_, mut socket, _| {
        let (sent, done) = (sent2.clone(), done2.clone());
        async move {
            let head = format!(
                "HTTP/1.1 500 Broken\r\ncontent-length: {BODY}\r\nconnection: close\r\n\r\n"
            );
            socket.write_all(head.as_bytes()).await.unwrap();
            let block = vec![b'x'; 64 * 1024];
            while sent.load(Ordering::SeqCst) < BODY {
                if socket.write_all(&block).await.is_err() {
                    break;
                }
                sent.fetch_add(block.len(), Ordering::SeqCst);
            }
            done.store(1, Ordering::SeqCst);
        }
    })
    .await;
    let engine = OpenAiEngine::new(config(&[&failing.url])).unwrap();
    let error = ask(&engine).await.1.unwrap_err();
    assert!(error.to_string().contains("HTTP 500"), "{error}");
    eventually("the server to stop writing", || {
        done.load(Ordering::SeqCst) == 1
    })
    .await;
    // The engine hung up after its cap: what the server got out is the cap plus what the
    // two sockets' buffers held, far from the whole body.
    let sent = sent.load(Ordering::SeqCst);
    assert!(
        sent < 20 * 1024 * 1024,
        "{sent} bytes of the error body were taken"
    );
}
