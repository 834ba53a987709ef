//! The picture: `/api/mjpeg`, the delayed stream the page shows, and `/api/frame`, the
//! newest frame.
//!
//! Every MJPEG viewer is its own paced loop reading the shared display buffer: when the
//! next frame is due it asks for the frame shown `target_delay` ago and writes it if it is
//! new. Nothing is queued per viewer, so a viewer whose socket is full simply is not
//! polled; when it drains, the loop wakes late and sends the current frame, skipping the
//! ones it missed. A slow viewer skips frames and never holds anyone else up.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{stream, Stream, StreamExt};

use crate::state::{Client, Connected, DisplayFrame};
use crate::{ApiError, AppState, DisplayFeed};

macro_rules! boundary {
    () => {
        "kibitzframe"
    };
}
pub(crate) const BOUNDARY: &str = boundary!();
/// Ends every part; see [`part`].
const CLOSING: &str = concat!("\r\n--", boundary!(), "\r\n");

/// Rates outside this range are a broken source report, not a wish.
const MIN_FPS: f64 = 0.2;
const MAX_FPS: f64 = 120.0;

/// How long after a frame is due a viewer wakes to send it, at most.
const MAX_MARGIN: Duration = Duration::from_millis(5);

pub(crate) async fn mjpeg(State(state): State<AppState>) -> Response {
    let viewer = Viewer::new(state);
    (
        [
            (
                CONTENT_TYPE,
                format!("multipart/x-mixed-replace; boundary={BOUNDARY}"),
            ),
            (CACHE_CONTROL, "no-cache, no-store".to_string()),
            // Reverse proxies (nginx) must pass parts through as they come.
            ("x-accel-buffering".parse().unwrap(), "no".to_string()),
        ],
        Body::from_stream(viewer.into_stream()),
    )
        .into_response()
}

pub(crate) async fn frame(State(state): State<AppState>) -> Result<Response, ApiError> {
    let frame = state.shared().display.latest().ok_or_else(|| {
        ApiError::Unavailable("no frame yet: the source has not delivered a picture".into())
    })?;
    Ok((
        [
            (CONTENT_TYPE, "image/jpeg".to_string()),
            (CACHE_CONTROL, "no-store".to_string()),
            ("x-frame-seq".parse().unwrap(), frame.seq.to_string()),
            (
                "x-frame-pts".parse().unwrap(),
                format!("{:.3}", frame.stamp.pts.as_secs_f64()),
            ),
        ],
        frame.jpeg.bytes,
    )
        .into_response())
}

/// One viewer's loop state.
struct Viewer {
    state: AppState,
    next: Instant,
    last_seq: Option<u64>,
    /// Wake-ups in a row that found no new frame.
    misses: u32,
    first: bool,
    _connected: Connected,
}

impl Viewer {
    fn new(state: AppState) -> Viewer {
        Viewer {
            _connected: state.connected(Client::Mjpeg),
            state,
            next: now(),
            last_seq: None,
            misses: 0,
            first: true,
        }
    }

    /// Each frame goes out as three chunks (part header, the JPEG itself, the closing
    /// boundary) so the JPEG bytes are shared with the buffer, never copied per viewer.
    fn into_stream(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
        stream::unfold(self, |mut viewer| async move {
            let part = viewer.next_part().await?;
            Some((part, viewer))
        })
        .flat_map(|part| stream::iter(part.map(Ok)))
    }

    /// Waits until the next frame is due on this viewer's (delayed) clock and returns it.
    ///
    /// The wake-up follows the source's own rhythm: right after a frame is sent, the loop
    /// sleeps until the following one should be due (its capture time plus the delay plus
    /// a sliver of margin for capture jitter). A fixed ticker at the same rate would beat
    /// against the source and show some frames twice and skip others. A frame that is
    /// late is looked for again soon, less often the longer it stays away.
    async fn next_part(&mut self) -> Option<[Bytes; 3]> {
        loop {
            tokio::select! {
                biased;
                _ = self.state.shutdown().cancelled() => return None,
                _ = tokio::time::sleep_until(self.next.into()) => {}
            }
            let now = now();
            let shared = self.state.shared();
            let period = period(shared.display.as_ref(), shared.mjpeg_fps);
            let delay = self.state.delay();
            let frame = shown_at(now, delay).and_then(|t| shared.display.at(t));
            // Only forward: a frame already sent (or an older one, when the delay just
            // grew) is not sent again; the picture holds until time catches up.
            let Some(frame) = frame.filter(|f| self.last_seq.is_none_or(|last| f.seq > last))
            else {
                self.misses = (self.misses + 1).min(3);
                self.next = now + (period / 8 * (1 << self.misses)).min(period);
                continue;
            };
            self.misses = 0;
            let margin = (period / 10).min(MAX_MARGIN);
            let due = frame.stamp.captured + Duration::from_secs_f64(delay) + period + margin;
            // Never sooner than half a period (a burst of old frames is not worth sending)
            // nor later than one (a feed that answers with its oldest frame when the delay
            // is longer than it keeps must still play on).
            self.next = due.clamp(now + period / 2, now + period + margin);
            self.last_seq = Some(frame.seq);
            shared
                .meters
                .mjpeg_frames
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let part = part(&frame, self.first);
            self.first = false;
            return Some(part);
        }
    }
}

/// The frame period: the source's rate when known, else `MJPEG_FPS`.
fn period(display: &dyn DisplayFeed, fallback_fps: f64) -> Duration {
    let fps = display
        .fps()
        .filter(|f| f.is_finite() && *f > 0.0)
        .unwrap_or(fallback_fps);
    Duration::from_secs_f64(1.0 / fps.clamp(MIN_FPS, MAX_FPS))
}

/// The moment whose picture is on screen now: `target_delay` ago.
fn shown_at(now: Instant, delay: f64) -> Option<Instant> {
    now.checked_sub(Duration::from_secs_f64(delay))
}

/// Tokio's clock, so tests with paused time drive the pacing.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

fn part(frame: &DisplayFrame, first: bool) -> [Bytes; 3] {
    let opening = if first {
        format!("--{BOUNDARY}\r\n")
    } else {
        String::new()
    };
    let header = format!(
        "{opening}Content-Type: image/jpeg\r\nContent-Length: {}\r\nX-Frame-Seq: {}\r\nX-Frame-Pts: {:.3}\r\n\r\n",
        frame.jpeg.bytes.len(),
        frame.seq,
        frame.stamp.pts.as_secs_f64()
    );
    // The boundary goes right after the JPEG, not before the next one: browsers show a
    // part only once they see the boundary that ends it.
    [
        Bytes::from(header),
        frame.jpeg.bytes.clone(),
        Bytes::from_static(CLOSING.as_bytes()),
    ]
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use axum::body::to_bytes;
    use axum::http::{Request, StatusCode};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::ServiceExt;

    use super::*;
    use crate::fake::{pattern_jpeg, FakeDisplay, Harness};

    #[tokio::test]
    async fn frame_is_the_newest_jpeg() {
        let jpegs = vec![pattern_jpeg(64, 48, 0, 0), pattern_jpeg(64, 48, 1, 0)];
        let display = Arc::new(FakeDisplay::new(jpegs.clone(), 10.0));
        let harness = Harness::with_display(display.clone());
        let response = harness
            .router()
            .oneshot(Request::get("/api/frame").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], "image/jpeg");
        let seq: u64 = response.headers()["x-frame-seq"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        assert_eq!(body, jpegs[(seq % 2) as usize].bytes);
        assert!(
            seq + 1 >= display.latest().unwrap().seq,
            "an old frame was served"
        );
    }

    #[tokio::test]
    async fn frame_before_the_first_picture_is_503() {
        let display = Arc::new(FakeDisplay::empty());
        let harness = Harness::with_display(display);
        let response = harness
            .router()
            .oneshot(Request::get("/api/frame").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        assert!(String::from_utf8_lossy(&body).contains("no frame yet"));
    }

    /// With time paused, a 10 fps source and no delay, every tick gives a new frame, each
    /// sent once, as well-formed parts.
    #[tokio::test(start_paused = true)]
    async fn stream_sends_each_frame_once_as_parts() {
        let jpegs = vec![pattern_jpeg(32, 32, 0, 0), pattern_jpeg(32, 32, 1, 0)];
        let display = Arc::new(FakeDisplay::new(jpegs, 10.0));
        let harness = Harness::with_display(display);
        harness.set_delay(0.0);
        let response = harness
            .router()
            .oneshot(Request::get("/api/mjpeg").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            "multipart/x-mixed-replace; boundary=kibitzframe"
        );
        let mut body = response.into_body().into_data_stream();
        let mut bytes = Vec::new();
        let mut chunks = 0;
        while chunks < 3 * 5 {
            bytes.extend_from_slice(&body.next().await.unwrap().unwrap());
            chunks += 1;
        }
        let seqs = parse_parts(&bytes);
        assert_eq!(seqs.len(), 5);
        assert!(
            seqs.windows(2).all(|w| w[1] > w[0]),
            "frames repeated or out of order: {seqs:?}"
        );
    }

    /// A source that does not report its rate is paced at `MJPEG_FPS` (10 here); when
    /// it is slower (2 fps), the ticks without a new frame send nothing.
    #[tokio::test(start_paused = true)]
    async fn stream_does_not_repeat_a_frame() {
        let display = Arc::new(
            FakeDisplay::new(vec![pattern_jpeg(16, 16, 0, 0)], 2.0).with_reported_fps(None),
        );
        let harness = Harness::with_display(display);
        harness.set_delay(0.0);
        let mut body = mjpeg(&harness).await;
        let bytes = read_frames(&mut body, 4).await;
        let seqs = parse_parts(&bytes);
        assert_eq!(seqs.len(), 4);
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    }

    /// Frames come from `now - target_delay`: with a 2 s delay the first frame sent is
    /// the one captured 2 s ago.
    #[tokio::test(start_paused = true)]
    async fn stream_is_delayed_by_the_target_delay() {
        let display = Arc::new(FakeDisplay::new(vec![pattern_jpeg(16, 16, 0, 0)], 10.0));
        let harness = Harness::with_display(display.clone());
        harness.set_delay(2.0);
        tokio::time::advance(Duration::from_secs(5)).await;
        let mut body = mjpeg(&harness).await;
        let bytes = read_frames(&mut body, 1).await;
        let latest = display.latest().unwrap().seq;
        let sent = parse_parts(&bytes)[0];
        assert_eq!(latest - sent, 20, "2 s at 10 fps behind the newest frame");
    }

    /// A 25 fps source whose frames arrive up to 30 % of a period early or late.
    struct Jittery {
        start: Instant,
        jpeg: kibitz_frames::Jpeg,
    }

    impl Jittery {
        const FPS: f64 = 25.0;

        fn captured(&self, seq: u64) -> Instant {
            let jitter = [0.0, 0.3, -0.3, 0.1, -0.2][(seq % 5) as usize];
            self.start + Duration::from_secs_f64((seq as f64 + 1.0 + jitter) / Self::FPS)
        }
    }

    impl DisplayFeed for Jittery {
        fn latest(&self) -> Option<DisplayFrame> {
            self.at(now())
        }
        fn at(&self, t: Instant) -> Option<DisplayFrame> {
            let guess =
                (t.checked_duration_since(self.start)?.as_secs_f64() * Self::FPS) as u64 + 1;
            let seq = (0..=guess).rev().find(|&n| self.captured(n) <= t)?;
            let captured = self.captured(seq);
            let pts = captured - self.start;
            Some(DisplayFrame {
                seq,
                stamp: kibitz_frames::Stamp { pts, captured },
                jpeg: self.jpeg.clone(),
            })
        }
        fn fps(&self) -> Option<f64> {
            Some(Self::FPS)
        }
    }

    /// Pacing follows the source: with capture jitter at the same rate as the pace, every
    /// frame is still sent exactly once, none doubled, none skipped.
    #[tokio::test(start_paused = true)]
    async fn jittery_frames_are_each_sent_once() {
        let display = Arc::new(Jittery {
            start: now(),
            jpeg: pattern_jpeg(16, 16, 0, 0),
        });
        let harness = Harness::with_display(display);
        // A quarter period off the frames' nominal times, where a fixed ticker would beat.
        harness.set_delay(0.41);
        let mut body = mjpeg(&harness).await;
        let bytes = read_frames(&mut body, 60).await;
        let seqs = parse_parts(&bytes);
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    }

    /// Keeps one second; asked for anything older, answers with its oldest frame, as the
    /// real display buffer does.
    struct Short(FakeDisplay);

    impl DisplayFeed for Short {
        fn latest(&self) -> Option<DisplayFrame> {
            self.0.latest()
        }
        fn at(&self, t: Instant) -> Option<DisplayFrame> {
            self.0.at(t.max(now() - Duration::from_secs(1)))
        }
        fn fps(&self) -> Option<f64> {
            self.0.fps()
        }
    }

    /// A delay longer than the buffer shows the oldest frames, still at the full rate.
    #[tokio::test(start_paused = true)]
    async fn a_delay_longer_than_the_buffer_still_plays() {
        let display = Arc::new(Short(FakeDisplay::new(
            vec![pattern_jpeg(16, 16, 0, 0)],
            10.0,
        )));
        let harness = Harness::with_display(display);
        harness.set_delay(5.0);
        tokio::time::advance(Duration::from_secs(3)).await;
        let start = tokio::time::Instant::now();
        let mut body = mjpeg(&harness).await;
        let bytes = read_frames(&mut body, 20).await;
        let seqs = parse_parts(&bytes);
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "20 frames at 10 fps took {took:?}"
        );
    }

    /// When the delay grows the shown moment steps back; the picture holds rather than
    /// replaying frames, then moves on once time catches up.
    #[tokio::test(start_paused = true)]
    async fn the_picture_never_goes_backwards() {
        let display = Arc::new(FakeDisplay::new(vec![pattern_jpeg(16, 16, 0, 0)], 10.0));
        let harness = Harness::with_display(display);
        harness.set_delay(0.0);
        tokio::time::advance(Duration::from_secs(3)).await;
        let mut body = mjpeg(&harness).await;
        let mut bytes = read_frames(&mut body, 3).await;
        harness.set_delay(1.0);
        bytes.extend(read_frames(&mut body, 3).await);
        let seqs = parse_parts(&bytes);
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn stream_ends_on_shutdown() {
        let display = Arc::new(FakeDisplay::new(vec![pattern_jpeg(16, 16, 0, 0)], 10.0));
        let harness = Harness::with_display(display);
        let mut body = mjpeg(&harness).await;
        harness.state.shutdown().cancel();
        while body.next().await.is_some() {}
    }

    /// The sequence numbers of the parts in an MJPEG body, checking their framing.
    /// Opens `/api/mjpeg` and returns its body as it streams.
    async fn mjpeg(harness: &Harness) -> axum::body::BodyDataStream {
        let request = Request::get("/api/mjpeg").body(Body::empty()).unwrap();
        let response = harness.router().oneshot(request).await.unwrap();
        response.into_body().into_data_stream()
    }

    /// The bytes of the next `frames` parts: each comes as three chunks (part headers, the
    /// JPEG, the line break).
    async fn read_frames(body: &mut axum::body::BodyDataStream, frames: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        for _ in 0..3 * frames {
            bytes.extend_from_slice(&body.next().await.unwrap().unwrap());
        }
        bytes
    }

    fn parse_parts(mut bytes: &[u8]) -> Vec<u64> {
        let opening = format!("--{BOUNDARY}\r\n");
        assert!(
            bytes.starts_with(opening.as_bytes()),
            "the body must open with the boundary"
        );
        bytes = &bytes[opening.len()..];
        let mut seqs = Vec::new();
        while !bytes.is_empty() {
            let end = memchr::memmem::find(bytes, b"\r\n\r\n").expect("part header");
            let header = std::str::from_utf8(&bytes[..end]).unwrap();
            let field = |name: &str| {
                header
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
                    .unwrap()
            };
            let len: usize = field("Content-Length:").parse().unwrap();
            seqs.push(field("X-Frame-Seq:").parse().unwrap());
            let jpeg = &bytes[end + 4..end + 4 + len];
            assert_eq!(&jpeg[..2], b"\xff\xd8", "a JPEG starts with SOI");
            bytes = &bytes[end + 4 + len..];
            assert!(
                bytes.starts_with(CLOSING.as_bytes()),
                "each part ends with the boundary"
            );
            bytes = &bytes[CLOSING.len()..];
        }
        seqs
    }

    /// Parts seen by a raw HTTP client reading as fast as it can for `duration`.
    async fn count_parts(addr: std::net::SocketAddr, duration: Duration) -> usize {
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        socket
            .write_all(b"GET /api/mjpeg HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let finder = memchr::memmem::Finder::new(CLOSING.as_bytes());
        let mut buf = vec![0u8; 256 * 1024];
        let mut carry = 0;
        let mut parts = 0;
        let deadline = tokio::time::Instant::now() + duration;
        loop {
            let read = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return parts,
                read = socket.read(&mut buf[carry..]) => read.unwrap(),
            };
            assert!(read > 0, "the server closed the stream");
            let filled = carry + read;
            parts += finder.find_iter(&buf[..filled]).count();
            // Keep a tail so a boundary split across two reads is still found once.
            let keep = (finder.needle().len() - 1).min(filled);
            buf.copy_within(filled - keep..filled, 0);
            carry = keep;
        }
    }

    /// One viewer reads a little and then stalls with its socket full; another viewer
    /// beside it still gets about the full rate, and the stalled one does not hold up the
    /// server's shutdown for long.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_viewer_does_not_slow_the_others() {
        const FPS: f64 = 20.0;
        // Big pictures fill the stalled socket's buffers quickly.
        let jpegs: Vec<_> = (0..4).map(|i| pattern_jpeg(1280, 720, i, 60)).collect();
        assert!(
            jpegs[0].bytes.len() > 100_000,
            "test pictures too small: {}",
            jpegs[0].bytes.len()
        );
        let display = Arc::new(FakeDisplay::new(jpegs, FPS));
        let harness = Harness::with_display(display);
        harness.set_delay(0.0);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(crate::serve(listener, harness.state.clone()));

        // A small receive buffer, so the stall reaches the server after a frame or two.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(16 * 1024).unwrap();
        let mut stalled = socket.connect(addr).await.unwrap();
        stalled
            .write_all(b"GET /api/mjpeg HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = vec![0u8; 4096];
        stalled.read_exact(&mut first).await.unwrap();
        // From here on the stalled viewer reads nothing.

        let window = Duration::from_secs(2);
        let parts = count_parts(addr, window).await;
        let expected = FPS * window.as_secs_f64();
        assert!(
            parts as f64 >= expected * 0.5,
            "the normal viewer got {parts} frames in {window:?}, expected about {expected}"
        );
        assert!(
            parts as f64 <= expected * 1.5 + 2.0,
            "more frames than the source made: {parts}"
        );
        // The stalled viewer really was stalled: it was given few of the frames.
        let sent = harness
            .state
            .shared()
            .meters
            .mjpeg_frames
            .load(std::sync::atomic::Ordering::Relaxed);
        let to_stalled = sent.saturating_sub(parts as u64);
        assert!(
            (to_stalled as f64) < expected / 2.0,
            "the stalled viewer was sent {to_stalled} frames"
        );

        harness.state.shutdown().cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(30), server).await;
        assert!(
            stopped.is_ok(),
            "serve did not return after shutdown with a stalled viewer"
        );
        drop(stalled);
    }
}
