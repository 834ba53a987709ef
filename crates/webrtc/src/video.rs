//! The picture over WebRTC: one H.264 encoder per stream, running only while the stream
//! has WebRTC viewers (a [`StreamOutput`] on demand of [`VIEWER`]), fed the delayed
//! picture through its own playout cursor exactly as an MJPEG viewer is. Each access unit
//! is encoded once and broadcast to the stream's viewers ([`VideoFeed`]); a viewer that
//! falls behind loses units (and waits for the next keyframe), it never holds up the
//! encoder or other viewers.
//!
//! Keyframes: the encoder's first picture is one; after that a keyframe is made when a
//! viewer wishes one (a new viewer, a PLI/FIR, a viewer that fell behind), at most one per
//! [`KEYFRAME_GAP`] however many ask ([`KeyframePacer`], plain time arithmetic).
//!
//! RTP timestamps are a fixed function of each frame's media time (`pts`, rounded to the
//! microsecond, through [`crate::codec::rtp_timestamp_90k`]), so the commentary's frame
//! times (`frames` of `cycle_start`/`cycle_end`, media seconds) name the same timestamps
//! on the data channel ([`rtp_of_seconds`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kibitz_stream::{Output, OutputContext, StreamOutput, Task};
use tokio::sync::broadcast;

use crate::codec::{rtp_timestamp_90k, EncoderConfig, H264Encoder};
use crate::picture::JpegPictures;

/// The output name of a WebRTC viewer; the encoder runs while one is attached.
pub const VIEWER: &str = kibitz_stream::speech::WEBRTC;

/// At most one forced keyframe per this long.
pub const KEYFRAME_GAP: Duration = Duration::from_millis(500);

/// Access units a viewer may fall behind by before it loses some: about a second at 25 fps.
const UNITS_KEPT: usize = 32;

/// One encoded picture (Annex-B, SPS/PPS before every IDR), shared by every viewer.
#[derive(Debug)]
pub struct AccessUnit {
    pub data: Arc<[u8]>,
    pub keyframe: bool,
    /// 90 kHz, from the frame's media time.
    pub rtp: u32,
}

/// Viewers' wish for a keyframe, kept until the encoder grants it.
#[derive(Debug, Default)]
pub struct KeyframeWish(AtomicBool);

impl KeyframeWish {
    pub fn want(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub(crate) fn wanted(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn granted(&self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// What a stream's WebRTC viewers share, kept on the stream (`handle.extension`).
pub struct VideoFeed {
    units: broadcast::Sender<Arc<AccessUnit>>,
    pub keyframes: Arc<KeyframeWish>,
}

impl Default for VideoFeed {
    fn default() -> Self {
        VideoFeed {
            units: broadcast::channel(UNITS_KEPT).0,
            keyframes: Arc::default(),
        }
    }
}

impl VideoFeed {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AccessUnit>> {
        self.units.subscribe()
    }
}

/// When a wished keyframe may be made: at most one per [`KEYFRAME_GAP`].
#[derive(Debug, Default)]
pub(crate) struct KeyframePacer {
    last: Option<Instant>,
}

impl KeyframePacer {
    /// Whether the picture encoded at `now` is forced to be a keyframe.
    pub(crate) fn force(&mut self, now: Instant, wished: bool) -> bool {
        let allowed = self.last.is_none_or(|t| now >= t + KEYFRAME_GAP);
        if wished && allowed {
            self.last = Some(now);
        }
        wished && allowed
    }

    /// A keyframe went out at `now` (the encoder's own, or a forced one).
    pub(crate) fn sent(&mut self, now: Instant) {
        self.last = Some(now);
    }
}

/// The RTP timestamp of a frame of media time `pts`.
pub fn rtp_of_pts(pts: Duration) -> u32 {
    let micros = (pts.as_nanos() + 500) / 1_000;
    rtp_timestamp_90k(Duration::from_micros(micros as u64))
}

/// The RTP timestamp of the frame at `secs` media seconds (as events give frame times).
pub fn rtp_of_seconds(secs: f64) -> u32 {
    let micros = (secs.max(0.0) * 1e6).round() as u64;
    rtp_timestamp_90k(Duration::from_micros(micros))
}

/// The stream's encoder, as the registry runs it (`Streams::add_output`).
pub fn output(bitrate_bps: u32) -> StreamOutput {
    StreamOutput::new(Encoder { bitrate_bps }).while_attached(&[VIEWER])
}

#[derive(Clone)]
struct Encoder {
    bitrate_bps: u32,
}

impl Output for Encoder {
    type Running = Task;

    fn name(&self) -> &'static str {
        "webrtc_encoder"
    }

    fn build(self, cx: OutputContext) -> Task {
        Box::pin(encode(cx, self.bitrate_bps))
    }
}

/// The JPEG decoder and H.264 encoder, moved to the blocking pool for each picture.
struct Work {
    pictures: JpegPictures,
    encoder: Option<(H264Encoder, (u32, u32))>,
    bitrate_bps: u32,
}

impl Work {
    /// One picture: decoded, then encoded by an encoder of its size (made anew when the
    /// size changes, which starts with a keyframe).
    fn encode(&mut self, jpeg: &[u8], force: bool, fps: f32) -> Result<(Vec<u8>, bool), String> {
        let picture = self.pictures.decode(jpeg)?;
        let size = match &picture {
            kibitz_media::Picture::Yuv(p) => (p.width, p.height),
            kibitz_media::Picture::Rgb { width, height, .. } => (*width, *height),
            kibitz_media::Picture::Jpeg(_) => return Err("a JPEG after decoding".into()),
        };
        if self.encoder.as_ref().is_none_or(|(_, s)| *s != size) {
            let config = EncoderConfig {
                width: size.0,
                height: size.1,
                fps,
                bitrate_bps: self.bitrate_bps,
            };
            let encoder = H264Encoder::new(config).map_err(|e| e.to_string())?;
            self.encoder = Some((encoder, size));
        }
        let (encoder, _) = self.encoder.as_mut().expect("made above");
        let frame = encoder.encode(&picture, force).map_err(|e| e.to_string())?;
        Ok((frame.data, frame.keyframe))
    }
}

/// Runs until the stream's viewers are gone or the stream stops.
async fn encode(mut cx: OutputContext, bitrate_bps: u32) {
    let feed = cx.handle.extension::<VideoFeed>();
    let mut work = match JpegPictures::new() {
        Ok(pictures) => Some(Work {
            pictures,
            encoder: None,
            bitrate_bps,
        }),
        Err(e) => {
            tracing::error!("cannot start the JPEG decoder for WebRTC: {e}");
            return;
        }
    };
    let mut pacer = KeyframePacer::default();
    let mut failures = 0u64;
    loop {
        let wake = cx.playout.wake_at();
        tokio::select! {
            _ = cx.stopped.cancelled() => return,
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        let now = now();
        let Some(frame) = cx.show(now) else { continue };
        let force = pacer.force(now, feed.keyframes.wanted());
        if force {
            feed.keyframes.granted();
        }
        let fps = (1.0 / cx.handle.frame_period().as_secs_f64()) as f32;
        let mut w = work.take().expect("given back after each picture");
        let jpeg = frame.jpeg.bytes.clone();
        let Ok((w, result)) = tokio::task::spawn_blocking(move || {
            let result = w.encode(&jpeg, force, fps);
            (w, result)
        })
        .await
        else {
            tracing::error!(stream = %cx.handle.id(), "the H.264 encoder panicked");
            return;
        };
        work = Some(w);
        match result {
            Ok((data, keyframe)) => {
                if keyframe {
                    pacer.sent(now);
                }
                let unit = AccessUnit {
                    data: data.into(),
                    keyframe,
                    rtp: rtp_of_pts(frame.stamp.pts),
                };
                // No receiver is fine: a viewer between sessions.
                let _ = feed.units.send(Arc::new(unit));
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(stream = %cx.handle.id(), "cannot encode a picture for WebRTC: {e}");
                } else {
                    tracing::debug!(stream = %cx.handle.id(), failures, "cannot encode a picture for WebRTC: {e}");
                }
            }
        }
    }
}

/// Tokio's clock, so tests with paused time drive the encoder.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wishes_are_granted_at_most_once_per_gap() {
        let start = Instant::now();
        let mut pacer = KeyframePacer::default();
        assert!(pacer.force(start, true), "the first wish at once");
        let mut granted = 1;
        // Everyone wishes on every frame for 10 s at 25 fps.
        for k in 1..250u32 {
            if pacer.force(start + Duration::from_millis(40) * k, true) {
                granted += 1;
            }
        }
        assert_eq!(granted, 20, "one per 500 ms over 10 s");
    }

    #[test]
    fn no_wish_no_keyframe_and_the_encoders_own_keyframes_count() {
        let start = Instant::now();
        let mut pacer = KeyframePacer::default();
        assert!(!pacer.force(start, false));
        pacer.sent(start);
        assert!(!pacer.force(start + Duration::from_millis(100), true));
        assert!(pacer.force(start + KEYFRAME_GAP, true));
    }

    #[test]
    fn frame_times_and_event_seconds_name_the_same_timestamp() {
        for pts in [
            Duration::ZERO,
            Duration::from_nanos(40_000_000),
            Duration::from_nanos(1_234_567_891),
            Duration::from_secs(3600) + Duration::from_nanos(999_999_501),
        ] {
            assert_eq!(
                rtp_of_pts(pts),
                rtp_of_seconds(pts.as_secs_f64()),
                "{pts:?}"
            );
        }
        assert_eq!(
            rtp_of_pts(Duration::from_secs(1)) - rtp_of_pts(Duration::ZERO),
            90_000
        );
    }
}
