//! The picture: `/api/streams/{id}/mjpeg`, the delayed stream the page shows, and
//! `/api/streams/{id}/frame`, the newest frame (the overview's thumbnails poll it).
//!
//! Every MJPEG viewer is an output of its stream ([`Mjpeg`], counted as `mjpeg`) and asks
//! its context's [`Playout`] which frame is on screen now; nothing is queued per viewer, so a viewer whose socket is full
//! simply is not polled; when it drains, it wakes late and sends the current frame,
//! skipping the ones it missed. A slow viewer skips frames and never holds anyone else up.
//!
//! [`Playout`]: kibitz_stream::Playout

use std::convert::Infallible;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{stream, Stream, StreamExt};
use kibitz_frames::DisplayFrame;
use kibitz_stream::{Output, OutputContext};

use crate::state::Target;
use crate::{ApiError, AppState};

macro_rules! boundary {
    () => {
        "kibitzframe"
    };
}
pub(crate) const BOUNDARY: &str = boundary!();
/// Ends every part; see [`part`].
const CLOSING: &str = concat!("\r\n--", boundary!(), "\r\n");

pub(crate) async fn mjpeg(State(state): State<AppState>, Target(handle): Target) -> Response {
    let viewer = handle.attach(Mjpeg { state }, now());
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

pub(crate) async fn frame(Target(handle): Target) -> Result<Response, ApiError> {
    let frame = handle.latest_frame().ok_or_else(|| {
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

/// The MJPEG output: one per viewer.
struct Mjpeg {
    state: AppState,
}

impl Output for Mjpeg {
    type Running = Viewer;

    fn name(&self) -> &'static str {
        "mjpeg"
    }

    fn build(self, cx: OutputContext) -> Viewer {
        Viewer {
            cx,
            state: self.state,
            first: true,
        }
    }
}

/// One viewer: its output context and whether the opening boundary went out.
struct Viewer {
    cx: OutputContext,
    state: AppState,
    first: bool,
}

impl Viewer {
    /// Each frame goes out as three chunks (part header, the JPEG itself, the closing
    /// boundary) so the JPEG bytes are shared with the buffer, never copied per viewer.
    fn into_stream(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
        stream::unfold(self, |mut viewer| async move {
            let part = viewer.next_part().await?;
            Some((part, viewer))
        })
        .flat_map(|part| stream::iter(part.map(Ok)))
    }

    /// Sleeps until the playout says a frame may be due, and returns it when it is.
    async fn next_part(&mut self) -> Option<[Bytes; 3]> {
        loop {
            let wake = self.cx.playout.wake_at();
            tokio::select! {
                biased;
                _ = self.state.shutdown().cancelled() => return None,
                _ = self.cx.stopped.cancelled() => return None,
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            if let Some(frame) = self.cx.show(now()) {
                let part = part(&frame, self.first);
                self.first = false;
                return Some(part);
            }
        }
    }
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
