//! Hostile browsers and clients (issue 16, items 3 and 4): what another site can make the
//! user's browser do here, and what a client can make the server hold. Each test is one
//! finding of the 2026-12-02 probe, reproduced and refused.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::http::{header, Request, StatusCode};
use axum::response::Response;
use axum::Router;
use futures::{SinkExt, StreamExt};
use kibitz_server::fake::{Harness, Options};
use kibitz_server::{Limits, Origins, ServeOptions};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tower::ServiceExt;

/// Generous: CI machines are small and busy.
const WAIT: Duration = Duration::from_secs(30);

const TOKEN: &str = "s3cret-token";

/// The Host a browser on this machine sends.
const HOST: &str = "127.0.0.1:8199";
const OWN_ORIGIN: &str = "http://127.0.0.1:8199";
const EVIL: &str = "http://evil.example";

async fn send(
    router: &Router,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Response {
    let mut request = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    router
        .clone()
        .oneshot(request.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap()
}

/// The status and the JSON body; fails when the body is not JSON with an `error`
/// (for errors) — every error is JSON.
async fn answer(response: Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let kind = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    let value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    };
    if status >= 400 {
        assert!(
            kind.starts_with("application/json"),
            "{status} as {kind}: {}",
            String::from_utf8_lossy(&body)
        );
        assert!(
            value["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{status}: {value}"
        );
    }
    (status, value)
}

async fn instruction_of(harness: &Harness, id: &str) -> Option<String> {
    Some(harness.stream(id).spec().instruction.clone())
}

async fn start(harness: &Harness, limits: Limits) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let options = ServeOptions { limits, tls: None };
    tokio::spawn(kibitz_server::serve_with(
        listener,
        harness.state.clone(),
        options,
    ));
    addr
}

/// Before: `POST /api/streams` with `text/plain` from `Origin: http://evil.example` was
/// 201, and a foreign `Host` (DNS rebinding) was served.
#[tokio::test]
async fn another_site_cannot_change_anything_or_read_through_a_rebound_name() {
    let harness = Harness::with(Options {
        origins: Origins::new(
            &["kibitz.home".into()],
            &["https://panel.example".into()],
            &[],
        )
        .unwrap(),
        ..Options::default()
    })
    .await;
    let app = harness.router();
    let body = r#"{"source": "rtsp://127.0.0.1:9/x", "id": "x"}"#;
    let json = ("content-type", "application/json");

    // A form or a no-preflight fetch can only send text/plain: 415, whoever sends it.
    for kind in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let (status, _) = answer(
            send(
                &app,
                "POST",
                "/api/streams",
                &[("content-type", kind), ("host", HOST)],
                body,
            )
            .await,
        )
        .await;
        assert_eq!(status, 415, "{kind}");
    }
    // A body without a type is refused too; no body needs none.
    let (status, _) = answer(
        send(
            &app,
            "POST",
            "/api/streams/s1/instruction",
            &[("content-length", "20")],
            r#"{"profile":"sports"}"#,
        )
        .await,
    )
    .await;
    assert_eq!(status, 415);

    // JSON from another origin: 403, and nothing was added or changed.
    let (status, body_) = answer(
        send(
            &app,
            "POST",
            "/api/streams",
            &[json, ("host", HOST), ("origin", EVIL)],
            body,
        )
        .await,
    )
    .await;
    assert_eq!(status, 403);
    assert!(body_["error"]
        .as_str()
        .unwrap()
        .contains("--allowed-origin"));
    for origin in [
        "null",
        "http://127.0.0.1:8199.evil.example",
        "https://127.0.0.1:8199",
    ] {
        let (status, _) = answer(
            send(
                &app,
                "POST",
                "/api/streams/s1/instruction",
                &[json, ("host", HOST), ("origin", origin)],
                r#"{"instruction":"say pwned"}"#,
            )
            .await,
        )
        .await;
        assert_eq!(status, 403, "{origin}");
    }
    assert!(harness.streams.get("x").is_none());
    assert_ne!(
        instruction_of(&harness, "s1").await.as_deref(),
        Some("say pwned")
    );

    // The server's own origin, an allowed one, and a client that is no browser pass.
    let (status, _) = answer(
        send(
            &app,
            "POST",
            "/api/streams",
            &[json, ("host", HOST), ("origin", OWN_ORIGIN)],
            body,
        )
        .await,
    )
    .await;
    assert_eq!(status, 201);
    let (status, _) = answer(
        send(
            &app,
            "DELETE",
            "/api/streams/x",
            &[("host", HOST), ("origin", "https://panel.example")],
            "",
        )
        .await,
    )
    .await;
    assert_eq!(status, 204);
    let again = r#"{"source": "rtsp://127.0.0.1:9/y", "id": "y"}"#;
    let (status, _) = answer(send(&app, "POST", "/api/streams", &[json], again).await).await;
    assert_eq!(status, 201);

    // DNS rebinding: a name of the attacker's pointing here. Reading is refused too.
    for host in [
        "evil.example:8199",
        "evil.example",
        "localhost.evil.example:8199",
    ] {
        let (status, body_) =
            answer(send(&app, "GET", "/api/streams", &[("host", host)], "").await).await;
        assert_eq!(status, 421, "{host}");
        assert!(body_["error"].as_str().unwrap().contains("--allowed-host"));
    }
    for host in [
        HOST,
        "localhost:8199",
        "[::1]:8199",
        "192.168.1.7:8199",
        "kibitz.home:8199",
        "KIBITZ.HOME",
    ] {
        let (status, _) =
            answer(send(&app, "GET", "/api/streams", &[("host", host)], "").await).await;
        assert_eq!(status, 200, "{host}");
    }
}

/// Before: with the cookie, nothing but `SameSite=Strict` stood between another site and
/// a change.
#[tokio::test]
async fn the_cookie_does_not_carry_a_foreign_origin() {
    let harness = Harness::with(Options {
        token: Some(TOKEN.into()),
        ..Options::default()
    })
    .await;
    let app = harness.router();
    let bearer = format!("Bearer {TOKEN}");
    let response = send(
        &app,
        "POST",
        "/api/session",
        &[
            ("authorization", &bearer),
            ("host", HOST),
            ("origin", OWN_ORIGIN),
        ],
        "",
    )
    .await;
    assert_eq!(response.status(), 200);
    let cookie = response.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let json = ("content-type", "application/json");
    let change = r#"{"instruction":"say pwned"}"#;
    let (status, _) = answer(
        send(
            &app,
            "POST",
            "/api/streams/s1/instruction",
            &[json, ("host", HOST), ("cookie", &cookie), ("origin", EVIL)],
            change,
        )
        .await,
    )
    .await;
    assert_eq!(status, 403);
    assert_ne!(
        instruction_of(&harness, "s1").await.as_deref(),
        Some("say pwned")
    );
    let (status, _) = answer(
        send(
            &app,
            "POST",
            "/api/streams/s1/instruction",
            &[
                json,
                ("host", HOST),
                ("cookie", &cookie),
                ("origin", OWN_ORIGIN),
            ],
            change,
        )
        .await,
    )
    .await;
    assert_eq!(status, 200);
}

/// Before: `/api/streams/%ff/instruction` changed the first stream (the path's rejection
/// read as "no id", which means the first stream on the old single-stream routes).
#[tokio::test]
async fn an_id_that_is_not_utf8_or_not_a_stream_is_404() {
    let harness = Harness::new().await;
    let app = harness.router();
    let json = ("content-type", "application/json");
    let change = r#"{"instruction":"not for s1"}"#;
    for path in [
        "/api/streams/%ff/instruction",
        "/api/streams/nope/instruction",
        "/api/streams/%C3%28/instruction",
    ] {
        let (status, _) = answer(send(&app, "POST", path, &[json], change).await).await;
        assert_eq!(status, 404, "{path}");
    }
    for (method, path) in [
        ("PATCH", "/api/streams/%ff"),
        ("DELETE", "/api/streams/%ff"),
        ("GET", "/api/streams/%ff/status"),
        ("GET", "/api/streams/%ff/frame"),
    ] {
        let (status, _) = answer(
            send(
                &app,
                method,
                path,
                &[json],
                if method == "PATCH" { change } else { "" },
            )
            .await,
        )
        .await;
        assert_eq!(status, 404, "{method} {path}");
    }
    assert_ne!(
        instruction_of(&harness, "s1").await.as_deref(),
        Some("not for s1")
    );
    assert!(harness.streams.get("s1").is_some());
    // The single-stream route still means the first stream.
    let (status, _) = answer(send(&app, "POST", "/api/instruction", &[json], change).await).await;
    assert_eq!(status, 200);
}

/// Before: 404, 405, 413 and extractor rejections were plain text or empty.
#[tokio::test]
async fn every_error_is_json() {
    let harness = Harness::with(Options {
        history: true,
        ..Options::default()
    })
    .await;
    let app = harness.router();
    let json = ("content-type", "application/json");
    let big = format!(r#"{{"instruction": "{}"}}"#, "x".repeat(100 * 1024));
    for (method, path, headers, body, want) in [
        ("GET", "/nope", &[][..], "", 404),
        ("GET", "/api/nope", &[][..], "", 404),
        ("PUT", "/api/streams", &[json][..], "{}", 405),
        ("DELETE", "/healthz", &[][..], "", 405),
        (
            "POST",
            "/api/streams/s1/instruction",
            &[json][..],
            big.as_str(),
            413,
        ),
        (
            "POST",
            "/api/streams",
            &[("content-type", "text/plain")][..],
            "{}",
            415,
        ),
        ("GET", "/api/history?limit=many", &[][..], "", 400),
        ("GET", "/api/alerts/%ff/clip", &[][..], "", 400),
        ("GET", "/api/streams/s1/ws", &[][..], "", 400),
    ] {
        let (status, _) = answer(send(&app, method, path, headers, body).await).await;
        assert_eq!(status, want, "{method} {path}");
    }
}

/// Before: messages up to 64 MiB were read whole, from anyone, before the token check.
#[tokio::test]
async fn websocket_messages_are_capped_and_foreign_origins_refused_before_the_upgrade() {
    let harness = Harness::with(Options {
        token: Some(TOKEN.into()),
        ..Options::default()
    })
    .await;
    let addr = start(&harness, Limits::default()).await;
    let url = format!("ws://{addr}/api/streams/s1/ws");

    // Another site's page: refused at the upgrade, with or without the cookie.
    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", EVIL.parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::FORBIDDEN)
        }
        other => panic!("a foreign origin was upgraded: {other:?}"),
    }

    // Without the token: a message over 1 KiB closes the socket (1009), unread.
    let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    socket
        .send(Message::text("x".repeat(1024 * 1024)))
        .await
        .ok();
    assert_closed(&mut socket).await;

    // With the token: a selection works, 64 KiB + 1 closes the socket.
    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request.clone())
        .await
        .unwrap();
    socket
        .send(Message::text(r#"{"profile":"sports"}"#))
        .await
        .unwrap();
    let reply = until_reply(&mut socket).await;
    assert_eq!(reply["type"], "selection", "{reply}");
    socket
        .send(Message::text("y".repeat(64 * 1024 + 1)))
        .await
        .ok();
    assert_closed(&mut socket).await;
}

/// Reads until a `selection`/`rejected` reply (events come between).
async fn until_reply<S>(socket: &mut S) -> Value
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let read = async {
        while let Some(Ok(message)) = socket.next().await {
            if let Message::Text(text) = message {
                let value: Value = serde_json::from_str(&text).unwrap();
                if matches!(value["type"].as_str(), Some("selection" | "rejected")) {
                    return value;
                }
            }
        }
        panic!("the socket closed before a reply");
    };
    tokio::time::timeout(WAIT, read).await.expect("a reply")
}

/// The socket ends (a close frame 1009 or the connection dropped) without a reply.
async fn assert_closed<S>(socket: &mut S)
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let read = async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(Message::Close(frame))) => {
                    if let Some(frame) = frame {
                        assert_eq!(u16::from(frame.code), 1009, "{frame:?}");
                    }
                    return;
                }
                Some(Ok(Message::Text(text))) => {
                    assert!(
                        !text.contains("rejected") && !text.contains("selection"),
                        "the message was read: {text}"
                    );
                }
                Some(Ok(_)) => {}
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("the socket closes");
}

/// Reads until the peer closes; fails after [`WAIT`]. Answers what was read.
async fn read_to_close(tcp: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("the server closes the connection");
    all
}

/// Before: idle connections were never closed.
#[tokio::test]
async fn silent_and_stalled_connections_are_closed() {
    let harness = Harness::new().await;
    let addr = start(
        &harness,
        Limits {
            header_read_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(500),
            ..Limits::default()
        },
    )
    .await;
    // Nothing sent: the header timeout.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    assert!(read_to_close(&mut silent).await.is_empty());
    // Half the headers: the header timeout too.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /api/streams HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    assert!(read_to_close(&mut slow).await.is_empty());
    // A body that stops coming: the idle timeout, well before the 10 s request timeout.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(b"POST /api/streams HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"source\":")
        .await
        .unwrap();
    let answered = read_to_close(&mut stalled).await;
    assert!(!String::from_utf8_lossy(&answered).contains(" 201 "));
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
}

/// A picture stream sends all the time, so it is never idle however short the timeout.
#[tokio::test]
async fn a_stream_that_sends_is_not_idle() {
    let harness = Harness::new().await;
    let addr = start(
        &harness,
        Limits {
            idle_timeout: Duration::from_millis(400),
            ..Limits::default()
        },
    )
    .await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /api/streams/s1/mjpeg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut total = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    let mut buf = vec![0u8; 64 * 1024];
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) => panic!("closed after {total} bytes"),
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => panic!("{e} after {total} bytes"),
            Err(_) => break,
        }
    }
    // Still open: another read gets more pictures.
    let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(n > 0 && total > 0);
}

/// Before: 1,100 idle sockets made `/healthz` time out. Past `--max-connections` the
/// reserve still answers `/healthz` (and says 503 to anything else).
#[tokio::test]
async fn past_the_connection_cap_healthz_still_answers() {
    let harness = Harness::new().await;
    let addr = start(
        &harness,
        Limits {
            max_connections: 8,
            ..Limits::default()
        },
    )
    .await;
    // More idle sockets than the cap and the reserve together.
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let health = client
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let other = client
        .get(format!("http://{addr}/api/streams"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 503);
    let body: Value = other.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("--max-connections"),
        "{body}"
    );
    drop(idle);
    // The slots come back.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = client
            .get(format!("http://{addr}/api/streams"))
            .send()
            .await
            .unwrap()
            .status();
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slots never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// HTTPS with a certificate made here; the cookie is `Secure` over it, and behind a
/// trusted proxy that says the client used HTTPS, but not over plain HTTP.
#[tokio::test]
async fn tls_serves_https_and_the_cookie_is_secure_over_it() {
    let dir = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let tls = kibitz_server::listen::tls_from_pem(&cert, &key).unwrap();
    // A key that is no key, a file that is not there: one clear error each.
    assert!(kibitz_server::listen::tls_from_pem(&cert, &cert).is_err());
    let Err(missing) = kibitz_server::listen::tls_from_pem(&dir.path().join("nope.pem"), &key)
    else {
        panic!("a missing certificate was accepted");
    };
    assert!(missing.to_string().contains("nope.pem"), "{missing}");

    let harness = Harness::with(Options {
        token: Some(TOKEN.into()),
        ..Options::default()
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let options = ServeOptions {
        limits: Limits::default(),
        tls: Some(tls),
    };
    tokio::spawn(kibitz_server::serve_with(
        listener,
        harness.state.clone(),
        options,
    ));

    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(made.cert.pem().as_bytes()).unwrap())
        .resolve("localhost", addr)
        .timeout(WAIT)
        .build()
        .unwrap();
    let base = format!("https://localhost:{}", addr.port());
    assert_eq!(
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let signed_in = client
        .post(format!("{base}/api/session"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), 200);
    let set = signed_in.headers()[header::SET_COOKIE].to_str().unwrap();
    assert!(set.split("; ").any(|a| a == "Secure"), "{set}");
    // Plain HTTP on the TLS port gets no answer.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    assert!(plain
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .is_err());

    // Behind a proxy: only a trusted one may say the client used HTTPS.
    for (proxies, secure) in [(vec![], false), (vec!["127.0.0.1".parse().unwrap()], true)] {
        let harness = Harness::with(Options {
            token: Some(TOKEN.into()),
            origins: Origins::new(&[], &[], &proxies).unwrap(),
            ..Options::default()
        })
        .await;
        let addr = start(&harness, Limits::default()).await;
        let response = plain
            .post(format!("http://{addr}/api/session"))
            .bearer_auth(TOKEN)
            .header("x-forwarded-proto", "https")
            .send()
            .await
            .unwrap();
        let set = response.headers()[header::SET_COOKIE].to_str().unwrap();
        assert_eq!(
            set.split("; ").any(|a| a == "Secure"),
            secure,
            "{proxies:?}: {set}"
        );
    }
}
