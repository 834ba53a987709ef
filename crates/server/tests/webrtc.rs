//! WebRTC end to end on loopback: a Rust WHEP viewer and a Rust WHIP publisher (str0m as
//! the peer, like a browser) against the server's routes, with pattern sources and the
//! scripted engine; and the answers to bad offers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{to_bytes, Body};
use axum::http::{Request, StatusCode};
use axum::response::Response;
use kibitz_server::fake::{Harness, Options};
use kibitz_webrtc::codec::{EncoderConfig, H264Decoder, H264Encoder};
use kibitz_webrtc::WebRtcConfig;
use serde_json::Value;
use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tower::ServiceExt;

fn webrtc(max_viewers: usize) -> Option<WebRtcConfig> {
    Some(WebRtcConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        max_viewers,
        publisher_timeout: Duration::from_secs(2),
        ..WebRtcConfig::default()
    })
}

/// Streams of real pictures (the pattern sources' own JPEGs are tags, not images), 10 fps.
async fn harness(options: Options) -> Harness {
    let pictures = (0..10)
        .map(|i| kibitz_server::fake::pattern_jpeg(320, 240, i, 8))
        .collect();
    Harness::with(Options {
        webrtc: options.webrtc.clone().or_else(|| webrtc(4)),
        pictures: Some(pictures),
        ..options
    })
    .await
}

async fn send(harness: &Harness, method: &str, path: &str, sdp: Option<&str>) -> Response {
    let mut request = Request::builder().method(method).uri(path);
    if sdp.is_some() {
        request = request.header("content-type", "application/sdp");
    }
    let body = sdp.map(|s| Body::from(s.to_string())).unwrap_or_default();
    harness
        .router()
        .oneshot(request.body(body).unwrap())
        .await
        .unwrap()
}

async fn text(response: Response) -> String {
    let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
    String::from_utf8(body.to_vec()).unwrap()
}

/// A str0m peer on its own loopback socket.
struct Peer {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
}

/// What a test does with a peer's events and its clock.
trait Handler {
    /// `true` ends the run.
    fn event(&mut self, rtc: &mut Rtc, event: Event) -> bool;
    /// Called when `wake` passes; returns the next wake.
    fn tick(&mut self, _rtc: &mut Rtc, now: Instant) -> Instant {
        now + Duration::from_secs(3600)
    }
}

impl Peer {
    async fn new() -> Peer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let local = socket.local_addr().unwrap();
        let mut rtc = Rtc::builder()
            .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
            .clear_codecs()
            .enable_h264(true)
            .enable_opus(true, false)
            .build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, "udp").unwrap());
        Peer { rtc, socket, local }
    }

    /// Sends `offer` to `path`, takes the answer; returns the session's location.
    async fn connect(
        &mut self,
        harness: &Harness,
        path: &str,
        offer: String,
        pending: SdpPendingOffer,
    ) -> String {
        let response = send(harness, "POST", path, Some(&offer)).await;
        let status = response.status();
        let location = response
            .headers()
            .get("location")
            .map(|l| l.to_str().unwrap().to_string());
        let body = text(response).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let answer = SdpAnswer::from_sdp_string(&body).unwrap();
        self.rtc.sdp_api().accept_answer(pending, answer).unwrap();
        location.expect("a Location")
    }

    /// Drives the peer until the handler says so or `limit` passes (never longer).
    async fn run(&mut self, limit: Duration, handler: &mut impl Handler) {
        let end = Instant::now() + limit;
        let mut wake = Instant::now();
        let mut buf = vec![0u8; 2048];
        loop {
            let timeout = loop {
                match self.rtc.poll_output().unwrap() {
                    Output::Timeout(t) => break t,
                    Output::Transmit(t) => {
                        let _ = self.socket.send_to(&t.contents, t.destination).await;
                    }
                    Output::Event(e) => {
                        if handler.event(&mut self.rtc, e) {
                            return;
                        }
                    }
                }
            };
            let now = Instant::now();
            if now >= end {
                return;
            }
            if now >= wake {
                wake = handler.tick(&mut self.rtc, now);
                continue;
            }
            let until = timeout.min(wake).min(end).max(now);
            let input = tokio::select! {
                received = self.socket.recv_from(&mut buf) => {
                    let (n, source) = received.unwrap();
                    Some((n, source))
                }
                _ = tokio::time::sleep_until(until.into()) => None,
            };
            let now = Instant::now();
            match input {
                Some((n, source)) => {
                    let receive = Receive {
                        proto: Protocol::Udp,
                        source,
                        destination: self.local,
                        contents: buf[..n].try_into().unwrap(),
                    };
                    self.rtc.handle_input(Input::Receive(now, receive)).unwrap();
                }
                None => self.rtc.handle_input(Input::Timeout(now)).unwrap(),
            }
        }
    }
}

/// A viewer's offer: video and audio to receive, and a data channel.
fn viewer_offer(rtc: &mut Rtc) -> (String, SdpPendingOffer) {
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
    api.add_channel("kibitz".into());
    let (offer, pending) = api.apply().unwrap();
    (offer.to_sdp_string(), pending)
}

/// What a viewer saw.
#[derive(Default)]
struct Seen {
    connected: Option<Instant>,
    decoded: usize,
    undecodable: usize,
    video_rtp: Vec<u32>,
    opus: Vec<usize>,
    messages: Vec<Value>,
    decoder: Option<H264Decoder>,
    stop_after: Option<Duration>,
}

impl Handler for Seen {
    fn event(&mut self, _rtc: &mut Rtc, event: Event) -> bool {
        match event {
            Event::Connected => self.connected = Some(Instant::now()),
            Event::MediaData(data) if data.params.spec().codec == Codec::H264 => {
                let decoder = self
                    .decoder
                    .get_or_insert_with(|| H264Decoder::new().unwrap());
                match decoder.decode(&data.data) {
                    Ok(Some(_)) => self.decoded += 1,
                    Ok(None) => {}
                    Err(_) => self.undecodable += 1,
                }
                self.video_rtp.push(data.time.numer() as u32);
            }
            Event::MediaData(data) if data.params.spec().codec == Codec::Opus => {
                self.opus.push(data.data.len());
            }
            Event::ChannelData(data) => {
                self.messages
                    .push(serde_json::from_slice(&data.data).expect("JSON messages"));
            }
            _ => {}
        }
        self.connected
            .zip(self.stop_after)
            .is_some_and(|(t, after)| t.elapsed() >= after)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whep_viewer_gets_decodable_h264_at_the_source_rate_and_the_commentary() {
    let harness = harness(Options::default()).await;
    let mut events = harness.stream("s1").subscribe();
    let mut peer = Peer::new().await;
    let (offer, pending) = viewer_offer(&mut peer.rtc);
    let location = peer
        .connect(&harness, "/api/streams/s1/whep", offer, pending)
        .await;
    assert!(location.starts_with("/api/streams/s1/whep/"), "{location}");

    let watched = Duration::from_secs(4);
    let mut seen = Seen {
        stop_after: Some(watched),
        ..Seen::default()
    };
    peer.run(Duration::from_secs(20), &mut seen).await;
    assert!(seen.connected.is_some(), "connected over loopback");
    // The pattern source runs at 10 fps: at least 80 % of its frames, decoded.
    let expected = (watched.as_secs_f64() * 10.0 * 0.8) as usize;
    assert!(
        seen.decoded >= expected,
        "{} decoded ({} undecodable) in {watched:?}, expected {expected}",
        seen.decoded,
        seen.undecodable
    );
    assert!(
        seen.video_rtp.windows(2).all(|w| w[1] > w[0]),
        "timestamps grow"
    );
    assert_eq!(harness.stream("s1").running("webrtc"), 1);

    // The data channel carried the events the SSE stream has, each with the RTP time of
    // its cycle's newest frame.
    let mut sse = Vec::new();
    while let Ok(event) = events.try_recv() {
        sse.push(serde_json::to_value(&event).unwrap());
    }
    let ends: Vec<&Value> = seen
        .messages
        .iter()
        .filter(|m| m["type"] == "cycle_end")
        .collect();
    assert!(
        !ends.is_empty(),
        "cycle ends on the data channel: {:?}",
        seen.messages
    );
    for end in ends {
        let mut plain = end.clone();
        let rtp = plain.as_object_mut().unwrap().remove("rtp_timestamp");
        assert!(sse.contains(&plain), "{end} is an SSE event");
        let newest = end["frames"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .as_f64()
            .unwrap();
        assert_eq!(rtp, Some(kibitz_webrtc::rtp_of_seconds(newest).into()));
    }

    // DELETE ends it; the viewer is no longer counted; a second DELETE finds nothing.
    let response = send(&harness, "DELETE", &location, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(5);
    while harness.stream("s1").running("webrtc") > 0 {
        assert!(Instant::now() < deadline, "the viewer is freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let response = send(&harness, "DELETE", &location, None).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whep_viewer_hears_the_spoken_comments_as_opus_with_silence_between() {
    let harness = harness(Options {
        voices: kibitz_stream::Voices::preset("espeak", Arc::new(kibitz_server::fake::Tone)),
        defaults: kibitz_stream::StreamDefaults {
            voice: "espeak".into(),
            inference_interval: 1.0,
            ..Options::default().defaults
        },
        ..Options::default()
    })
    .await;
    let mut peer = Peer::new().await;
    let (offer, pending) = viewer_offer(&mut peer.rtc);
    peer.connect(&harness, "/api/streams/s1/whep", offer, pending)
        .await;
    let mut seen = Seen {
        stop_after: Some(Duration::from_secs(6)),
        ..Seen::default()
    };
    peer.run(Duration::from_secs(20), &mut seen).await;
    // 20 ms frames, continuous: about 50 a second.
    assert!(seen.opus.len() >= 200, "{} Opus packets", seen.opus.len());
    // The tone makes full packets; silence makes packets of a few bytes.
    let loud = seen.opus.iter().filter(|&&n| n > 20).count();
    let quiet = seen.opus.iter().filter(|&&n| n <= 20).count();
    assert!(loud >= 10, "{loud} packets of speech: {:?}", seen.opus);
    assert!(quiet >= 10, "{quiet} packets of silence");
}

/// A publisher sending a moving test pattern at 10 fps.
struct Publishing {
    mid: Option<Mid>,
    encoder: H264Encoder,
    frame: u32,
    connected: bool,
    sent: usize,
}

impl Handler for Publishing {
    fn event(&mut self, _rtc: &mut Rtc, event: Event) -> bool {
        self.connected |= matches!(event, Event::Connected);
        false
    }

    fn tick(&mut self, rtc: &mut Rtc, now: Instant) -> Instant {
        let next = now + Duration::from_millis(100);
        let (Some(mid), true) = (self.mid, self.connected) else {
            return next;
        };
        let (width, height) = (320u32, 240u32);
        let shift = self.frame * 8;
        let rgb: Vec<u8> = (0..width * height)
            .flat_map(|i| {
                let (x, y) = (i % width, i / width);
                [
                    ((x + shift) % 256) as u8,
                    (y % 256) as u8,
                    ((x + y) % 256) as u8,
                ]
            })
            .collect();
        let picture = kibitz_media::Picture::Rgb {
            width,
            height,
            pitch: width as usize * 3,
            data: &rgb,
        };
        let encoded = self.encoder.encode(&picture, self.frame == 0).unwrap();
        let writer = rtc.writer(mid).unwrap();
        let pt = writer
            .payload_params()
            .find(|p| p.spec().codec == Codec::H264)
            .unwrap()
            .pt();
        writer
            .write(
                pt,
                now,
                MediaTime::from_90khz(u64::from(self.frame) * 9_000),
                encoded.data,
            )
            .unwrap();
        self.frame += 1;
        self.sent += 1;
        next
    }
}

/// A WHIP publisher of stream `id` that has connected; `run` publishes.
async fn publisher(harness: &Harness, id: &str) -> (Peer, Publishing, String) {
    let mut peer = Peer::new().await;
    let mut api = peer.rtc.sdp_api();
    let mid = api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
    let (offer, pending) = api.apply().unwrap();
    let path = format!("/api/streams/{id}/whip");
    let location = peer
        .connect(harness, &path, offer.to_sdp_string(), pending)
        .await;
    assert!(location.starts_with(&format!("{path}/")), "{location}");
    let publishing = Publishing {
        mid: Some(mid),
        encoder: H264Encoder::new(EncoderConfig {
            width: 320,
            height: 240,
            fps: 10.0,
            bitrate_bps: 500_000,
        })
        .unwrap(),
        frame: 0,
        connected: false,
        sent: 0,
    };
    (peer, publishing, location)
}

fn source_of(harness: &Harness, id: &str) -> Value {
    let stream = harness.streams.get(id).expect("the stream runs");
    serde_json::to_value(stream.status()).unwrap()["source"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whip_publisher_becomes_a_stream_with_commentary() {
    let harness = harness(Options::default()).await;
    let (mut peer, mut publishing, location) = publisher(&harness, "cam").await;
    let stream = harness
        .streams
        .get("cam")
        .expect("the stream exists at once");
    let mut events = stream.subscribe();
    peer.run(Duration::from_secs(5), &mut publishing).await;
    assert!(publishing.sent >= 20, "{} frames sent", publishing.sent);
    let status = serde_json::to_value(stream.status()).unwrap();
    assert_eq!(status["source"]["state"], "live", "{status}");
    let frames = status["source"]["frames"].as_u64();
    assert!(
        frames.is_some_and(|n| n >= 10),
        "decoded frames reached the stream: {status}"
    );
    let mut commented = false;
    while let Ok(event) = events.try_recv() {
        if let kibitz_commentator::Event::CycleEnd(end) = event {
            commented |= end.text == "a ball rolls";
        }
    }
    assert!(commented, "the stream was commented on");

    // DELETE ends the publisher and its stream.
    let response = send(&harness, "DELETE", &location, None).await;
    let status = response.status();
    assert_eq!(status, StatusCode::OK, "{}", text(response).await);
    assert!(harness.streams.get("cam").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_publisher_leaves_its_stream_reconnecting_until_it_comes_back() {
    let harness = harness(Options {
        webrtc: Some(WebRtcConfig {
            publisher_timeout: Duration::from_secs(60),
            ..webrtc(4).unwrap()
        }),
        ..Options::default()
    })
    .await;
    let (mut peer, mut publishing, _) = publisher(&harness, "cam").await;
    peer.run(Duration::from_secs(2), &mut publishing).await;
    assert_eq!(source_of(&harness, "cam")["state"], "live");
    let before = source_of(&harness, "cam")["frames"].as_u64().unwrap();
    // The peer goes without a word: its session ends when ICE consent lapses.
    drop(peer);
    let deadline = Instant::now() + Duration::from_secs(40);
    while source_of(&harness, "cam")["state"] != "reconnecting" {
        assert!(Instant::now() < deadline, "{}", source_of(&harness, "cam"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A new publisher for the same id feeds the same stream again.
    let (mut peer, mut publishing, _) = publisher(&harness, "cam").await;
    peer.run(Duration::from_secs(2), &mut publishing).await;
    let source = source_of(&harness, "cam");
    assert_eq!(source["state"], "live", "{source}");
    assert!(source["frames"].as_u64().unwrap() > before, "{source}");
}

/// An SDP offer as text, with the given media sections.
fn offer_with(
    media: &[(MediaKind, Direction)],
    data: bool,
    codecs: fn(str0m::RtcConfig) -> str0m::RtcConfig,
) -> String {
    let mut rtc =
        codecs(Rtc::builder().set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags())))
            .build(Instant::now());
    rtc.add_local_candidate(Candidate::host("127.0.0.1:5000".parse().unwrap(), "udp").unwrap());
    let mut api = rtc.sdp_api();
    for (kind, direction) in media {
        api.add_media(*kind, *direction, None, None, None);
    }
    if data {
        api.add_channel("kibitz".into());
    }
    api.apply().unwrap().0.to_sdp_string()
}

#[tokio::test]
async fn bad_offers_get_400_with_the_reason() {
    let harness = harness(Options::default()).await;
    let cases: Vec<(&str, String, &str)> = vec![
        ("not SDP", "hello".into(), "not valid SDP"),
        ("empty", String::new(), "empty"),
        (
            "only a data channel",
            offer_with(&[], true, |c| c),
            "no usable m-line",
        ),
        (
            "VP8 video only",
            offer_with(&[(MediaKind::Video, Direction::RecvOnly)], false, |c| {
                c.clear_codecs().enable_vp8(true)
            }),
            "no H.264",
        ),
    ];
    for (what, sdp, reason) in cases {
        let response = send(&harness, "POST", "/api/streams/s1/whep", Some(&sdp)).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{what}");
        let body: Value = serde_json::from_str(&text(response).await).unwrap();
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(reason), "{what}: {error}");
    }
    // Not sent as SDP: the browsers guard, the one owner of body types, answers 415.
    let response = harness
        .router()
        .oneshot(
            Request::post("/api/streams/s1/whep")
                .header("content-type", "application/json")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // A publisher must send video.
    let audio = offer_with(&[(MediaKind::Audio, Direction::SendOnly)], false, |c| c);
    let response = send(&harness, "POST", "/api/streams/new/whip", Some(&audio)).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(harness.streams.get("new").is_none(), "nothing was made");
}

#[tokio::test]
async fn unknown_streams_full_streams_and_trickle_get_their_statuses() {
    let harness = harness(Options {
        webrtc: webrtc(1),
        ..Options::default()
    })
    .await;
    let offer = || offer_with(&[(MediaKind::Video, Direction::RecvOnly)], false, |c| c);
    let response = send(&harness, "POST", "/api/streams/nope/whep", Some(&offer())).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    let first = send(&harness, "POST", "/api/streams/s1/whep", Some(&offer())).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(first.headers()["content-type"], "application/sdp");
    let location = first.headers()["location"].to_str().unwrap().to_string();
    let second = send(&harness, "POST", "/api/streams/s1/whep", Some(&offer())).await;
    assert_eq!(
        second.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "--max-viewers 1"
    );

    // Trickle ICE as a WHEP client sends it: the server is ICE-lite.
    let response = harness
        .router()
        .oneshot(
            Request::patch(&location)
                .header("content-type", "application/trickle-ice-sdpfrag")
                .body(Body::from("a=candidate:1"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);

    // A stream that reads its own source cannot be published over WHIP.
    let publish = offer_with(&[(MediaKind::Video, Direction::SendOnly)], false, |c| c);
    let response = send(&harness, "POST", "/api/streams/s1/whip", Some(&publish)).await;
    assert_eq!(response.status(), StatusCode::CONFLICT);

    let info: Value =
        serde_json::from_str(&text(send(&harness, "GET", "/api/webrtc", None).await).await)
            .unwrap();
    assert_eq!(info["enabled"], true);
    assert_eq!(info["whep"], "/api/streams/{id}/whep");
    assert_eq!(info["max_viewers"], 1);
}
