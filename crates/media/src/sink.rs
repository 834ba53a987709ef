//! The per-frame fan-out every source shares: a [`FrameSink`] takes a decoded frame (planes,
//! or a JPEG as a camera sends it) with its capture time and does everything the rest of
//! kibitz needs of it: the display JPEG for viewers (passed through untouched where browsers
//! can show it, shrunk to `DISPLAY_MAX_WIDTH` otherwise), the capture-rate copy resized for
//! the model in the inference window, the notice to whoever prepares sampled frames (the
//! engine session), and the counters of the source's status.
//!
//! FFmpeg's decode thread is one producer; a [`PushedSource`] hands a sink to any code that
//! has frames of its own (a WebRTC publisher, a test pattern). Time comes in as arguments:
//! [`FrameSink::due`] says when a frame should be shown (the producer waits), the `Stamp`
//! given to [`FrameSink::push`] says when it was captured, and the capture rate decides on
//! that time. Nothing in here sleeps.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ff::format::Pixel;
use ff::util::frame::Video as VideoFrame;
use ffmpeg_next as ff;

use kibitz_frames::{
    model_size, DisplayBuffer, InferenceWindow, Jpeg, Range, Rgb, Stamp, Subsampling, YuvPlanes,
    CAPTURE_FPS, JPEG_QUALITY,
};

use crate::convert::{fit_pixels, jpeg_info, to_rgb, DisplayEncoder, Scaler};
use crate::pacing::{Capture, Pacer};
use crate::status::StatusCell;
use crate::{Error, SourceConfig, SourceContext, SourceState, SourceStatus, StatusReader};

/// `--max-source-pixels` by default: 3840x2160. A bigger source is shown downscaled to fit
/// (keeping aspect): its JPEGs, fifteen seconds of them in the display buffer, would
/// otherwise take most of a gigabyte (8192x8192 took 909 MiB).
pub const MAX_SOURCE_PIXELS: u64 = 3840 * 2160;

/// How a sink turns frames into what the stores hold: the part of a [`SourceConfig`] that
/// is not about opening anything.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// `JPEG_QUALITY` of re-encoded display frames.
    pub jpeg_quality: u8,
    /// `DISPLAY_MAX_WIDTH`: wider frames are shrunk for viewers (passed-through JPEGs aside).
    pub display_max_width: Option<u32>,
    /// `--max-source-pixels`: a bigger picture is shrunk to fit (keeping aspect) before
    /// anything keeps it, passed-through JPEGs included; `None`: no cap.
    pub max_pixels: Option<u64>,
    /// `CAPTURE_FPS`: frames a second resized for the model.
    pub capture_fps: f64,
    /// Model pictures are sized to about this many 448x448 slices.
    pub max_slices: u32,
    /// Pacing of a live source: a schedule that runs behind real time for long is moved up
    /// (see [`FrameSink::due`]). Off for files, which play at their own rate.
    pub live: bool,
}

impl SinkConfig {
    /// The documented defaults, live.
    pub fn new() -> Self {
        Self {
            jpeg_quality: JPEG_QUALITY,
            display_max_width: None,
            max_pixels: Some(MAX_SOURCE_PIXELS),
            capture_fps: CAPTURE_FPS,
            max_slices: 1,
            live: true,
        }
    }
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl From<&SourceConfig> for SinkConfig {
    fn from(c: &SourceConfig) -> Self {
        Self {
            jpeg_quality: c.jpeg_quality,
            display_max_width: c.display_max_width,
            max_pixels: c.max_pixels,
            capture_fps: c.capture_fps,
            max_slices: c.max_slices,
            live: c.spec.is_live(),
        }
    }
}

/// A decoded picture as a producer hands it to [`FrameSink::push`]. The sink copies what it
/// keeps; the borrowed planes may be reused as soon as `push` returns.
#[derive(Debug, Clone)]
pub enum Picture<'a> {
    /// Planar 8-bit YUV, as decoders hand it out (rows may be padded).
    Yuv(YuvPlanes<'a>),
    /// Packed 8-bit RGB rows, `pitch` bytes from one row to the next.
    Rgb {
        width: u32,
        height: u32,
        pitch: usize,
        data: &'a [u8],
    },
    /// A complete JPEG (an MJPEG camera's frame). Shown to viewers as it is when browsers can
    /// show it; decoded only when the model takes it.
    Jpeg(Bytes),
}

/// Called with every frame of the sampled set: each `stride`-th capture of the window (by
/// its `seq`), the phase the commentary samples on.
pub(crate) type OnSampled = Arc<dyn Fn(u64, Stamp, &Rgb) + Send + Sync>;

/// Where the frames of one source go, and what is done to them on the way. One producer
/// owns it (`&mut self`); it may move between threads. See the module docs.
pub struct FrameSink {
    config: SinkConfig,
    /// The source as status shows it, for the logs.
    name: String,
    display: Arc<DisplayBuffer>,
    window: Arc<InferenceWindow>,
    status: StatusCell,
    sampled: Option<(u64, OnSampled)>,
    encoder: DisplayEncoder,
    model: Scaler,
    pacer: Pacer,
    capture: Capture,
    /// Made on the first JPEG that must be decoded.
    jpeg_decoder: Option<ff::decoder::Video>,
    /// A frame was shown since the last [`FrameSink::restart`].
    delivered: bool,
    /// What the status says of the pixel cap (kept here so frames need not read it).
    fitted: Option<(u32, u32)>,
    /// Set for a sink handed out by a [`PushedSource`].
    lease: Option<Arc<Slot>>,
}

impl FrameSink {
    pub(crate) fn new(
        config: SinkConfig,
        cx: &SourceContext,
        status: StatusCell,
    ) -> Result<Self, Error> {
        let encoder = DisplayEncoder::new(
            config.jpeg_quality,
            config.display_max_width,
            config.max_pixels,
        )?;
        let name = status.get().source;
        Ok(Self {
            pacer: Pacer::new(config.live),
            capture: Capture::new(config.capture_fps),
            config,
            name,
            display: cx.display.clone(),
            window: cx.window.clone(),
            status,
            sampled: cx.on_sampled.clone(),
            encoder,
            model: Scaler::new(ff::software::scaling::Flags::BILINEAR),
            jpeg_decoder: None,
            delivered: false,
            fitted: None,
            lease: None,
        })
    }

    /// When to show the frame at media time `pts` (the source's own clock, growing) that is
    /// ready at `now`: never before `now`. A producer whose frames come in bursts (a file, an
    /// HLS segment) waits until then and pushes with the time it woke as the capture time; a
    /// producer of real-time frames may push at once.
    pub fn due(&mut self, pts: Duration, now: Instant) -> Instant {
        self.pacer.due(pts, now)
    }

    /// A new connection or session: the pacing schedule starts over and the next frame
    /// announces the source live again.
    pub fn restart(&mut self) {
        self.pacer.reset();
        self.delivered = false;
    }

    /// One frame: the display JPEG into the display buffer, and, when the capture rate takes
    /// it (by `stamp.captured`), its model-sized copy into the inference window. A frame that
    /// cannot be used is counted as dropped and is this call's error; the source goes on.
    /// [`Error::Closed`] once the stream it fed was removed: stop producing.
    pub fn push(&mut self, picture: Picture<'_>, stamp: Stamp) -> Result<(), Error> {
        self.check_open()?;
        let result = match picture {
            Picture::Jpeg(bytes) => self.push_jpeg(bytes, stamp),
            Picture::Yuv(planes) => yuv_frame(&planes).and_then(|f| self.push_video(&f, stamp)),
            Picture::Rgb {
                width,
                height,
                pitch,
                data,
            } => rgb_frame(width, height, pitch, data).and_then(|f| self.push_video(&f, stamp)),
        };
        result.map_err(|reason| {
            self.dropped(reason.clone());
            Error::Picture(reason)
        })
    }

    /// A frame the producer has prepared itself: `jpeg` for viewers, and `model` called (only)
    /// when the capture rate takes the frame, for a picture already sized for the model (see
    /// [`kibitz_frames::model_size`]). For producers that hold both anyway (tests, an encoder
    /// of their own).
    pub fn push_prepared(
        &mut self,
        stamp: Stamp,
        jpeg: Jpeg,
        model: impl FnOnce() -> Rgb,
    ) -> Result<(), Error> {
        self.check_open()?;
        let size = (jpeg.width, jpeg.height);
        if self.show(stamp, jpeg, size) {
            self.store_capture(stamp, model());
        }
        Ok(())
    }

    /// Sets the source's state (announced to the stream when it changes). A frame after a
    /// state other than live sets it live again only after [`FrameSink::restart`].
    pub fn set_state(&self, state: SourceState) {
        self.status.set_state(state);
    }

    /// Counts a frame lost on the producer's side (damage, a decode error) with its reason.
    pub fn dropped(&self, reason: String) {
        tracing::debug!(source = %self.name, %reason);
        self.status.update(|s| {
            s.frames_dropped += 1;
            s.last_error = Some(reason);
        });
    }

    /// The source's status as it stands.
    pub fn status(&self) -> SourceStatus {
        StatusReader {
            cell: self.status.clone(),
            display: Arc::clone(&self.display),
        }
        .get()
    }

    /// Whether a frame was shown since the last [`FrameSink::restart`].
    pub fn delivered(&self) -> bool {
        self.delivered
    }

    /// The display JPEG of a decoded frame (shrunk when it is wider than allowed or over
    /// the pixel cap, which the status then says).
    pub(crate) fn encode(&mut self, frame: &VideoFrame) -> Result<Jpeg, String> {
        self.note_fit(frame.width(), frame.height());
        self.encoder.encode(frame)
    }

    /// Whether a `width` x `height` picture is within the pixel cap (may pass through).
    pub(crate) fn fits(&self, width: u32, height: u32) -> bool {
        fit_pixels(width, height, self.config.max_pixels) == (width, height)
    }

    /// Stores the display JPEG, counts it, and says whether the model takes this frame.
    pub(crate) fn show(&mut self, stamp: Stamp, jpeg: Jpeg, size: (u32, u32)) -> bool {
        self.display.push(stamp, jpeg);
        self.status.update(|s| {
            s.frames_decoded += 1;
            (s.width, s.height) = size;
        });
        if !self.delivered {
            self.delivered = true;
            self.status.set_state(SourceState::Live);
        }
        self.capture.take(stamp.captured)
    }

    /// The model's copy of a frame the capture rate took.
    pub(crate) fn capture(&mut self, frame: &VideoFrame, stamp: Stamp) {
        let (w, h) = model_size(frame.width(), frame.height(), self.config.max_slices);
        match to_rgb(&mut self.model, frame, w, h) {
            Ok(rgb) => self.store_capture(stamp, rgb),
            Err(e) => self.dropped(format!("frame for the model not converted: {e}")),
        }
    }

    fn store_capture(&mut self, stamp: Stamp, rgb: Rgb) {
        let seq = self.window.push(stamp, rgb.clone());
        self.status.update(|s| s.frames_captured += 1);
        if let Some((stride, on_sampled)) = &self.sampled {
            if seq.is_multiple_of(*stride) {
                on_sampled(seq, stamp, &rgb);
            }
        }
    }

    fn push_video(&mut self, frame: &VideoFrame, stamp: Stamp) -> Result<(), String> {
        let jpeg = self.encode(frame)?;
        if self.show(stamp, jpeg, (frame.width(), frame.height())) {
            self.capture(frame, stamp);
        }
        Ok(())
    }

    /// Records in the status (and logs once per size) that frames of `width` x `height`
    /// are over the pixel cap and shown smaller, or that they no longer are.
    fn note_fit(&mut self, width: u32, height: u32) {
        let fitted = fit_pixels(width, height, self.config.max_pixels);
        let fitted = (fitted != (width, height)).then_some(fitted);
        if self.fitted == fitted {
            return;
        }
        self.fitted = fitted;
        if let Some((w, h)) = fitted {
            tracing::warn!(
                source = %self.name,
                "{width}x{height} is over --max-source-pixels ({}); shown downscaled to {w}x{h}",
                self.config.max_pixels.unwrap_or_default()
            );
        }
        self.status.update(|s| s.fitted = fitted);
    }

    /// A JPEG straight to viewers when they can show it and it is within the pixel cap
    /// (decoded only for the model); otherwise decoded and encoded again.
    fn push_jpeg(&mut self, bytes: Bytes, stamp: Stamp) -> Result<(), String> {
        match jpeg_info(&bytes).filter(|i| i.has_tables && self.fits(i.width, i.height)) {
            Some(info) => {
                self.status.update(|s| s.passthrough = true);
                let jpeg = Jpeg {
                    width: info.width,
                    height: info.height,
                    bytes: bytes.clone(),
                };
                if self.show(stamp, jpeg, (info.width, info.height)) {
                    match self.decode_jpeg(&bytes) {
                        Ok(frame) => self.capture(&frame, stamp),
                        Err(e) => self.dropped(format!("frame for the model not decoded: {e}")),
                    }
                }
                Ok(())
            }
            None => {
                let frame = self.decode_jpeg(&bytes)?;
                self.push_video(&frame, stamp)
            }
        }
    }

    fn decode_jpeg(&mut self, bytes: &[u8]) -> Result<VideoFrame, String> {
        if self.jpeg_decoder.is_none() {
            let codec =
                ff::decoder::find(ff::codec::Id::MJPEG).ok_or("this FFmpeg has no JPEG decoder")?;
            let decoder = ff::codec::context::Context::new_with_codec(codec)
                .decoder()
                .video()
                .map_err(|e| format!("no JPEG decoder ({e})"))?;
            self.jpeg_decoder = Some(decoder);
        }
        let decoder = self.jpeg_decoder.as_mut().expect("made above");
        let mut frame = VideoFrame::empty();
        decoder
            .send_packet(&ff::Packet::copy(bytes))
            .and_then(|()| decoder.receive_frame(&mut frame))
            .map_err(|e| format!("not a JPEG that decodes: {e}"))?;
        Ok(frame)
    }

    fn check_open(&self) -> Result<(), Error> {
        match &self.lease {
            Some(slot) if slot.closed.load(Ordering::SeqCst) => Err(Error::Closed),
            _ => Ok(()),
        }
    }
}

impl Drop for FrameSink {
    /// A pushed source's producer going away ends the source (until another publishes).
    fn drop(&mut self) {
        if let Some(slot) = self.lease.take() {
            if !slot.closed.load(Ordering::SeqCst) {
                self.status.set_state(SourceState::Ended);
            }
            slot.taken.store(false, Ordering::SeqCst);
        }
    }
}

impl std::fmt::Debug for FrameSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSink")
            .field("source", &self.name)
            .field("config", &self.config)
            .finish()
    }
}

/// The copy of planes the scaler and encoder read; checked against the size first.
fn yuv_frame(p: &YuvPlanes<'_>) -> Result<VideoFrame, String> {
    let format = match (p.subsampling, p.range) {
        (Subsampling::S420, Range::Limited) => Pixel::YUV420P,
        (Subsampling::S420, Range::Full) => Pixel::YUVJ420P,
        (Subsampling::S422, Range::Limited) => Pixel::YUV422P,
        (Subsampling::S422, Range::Full) => Pixel::YUVJ422P,
        (Subsampling::S444, Range::Limited) => Pixel::YUV444P,
        (Subsampling::S444, Range::Full) => Pixel::YUVJ444P,
    };
    check_size(p.width, p.height)?;
    let (cw, ch) = p.subsampling.chroma_size(p.width, p.height);
    let mut frame = VideoFrame::new(format, p.width, p.height);
    copy_plane(
        &mut frame,
        0,
        "Y",
        p.y,
        p.y_stride,
        p.width as usize,
        p.height,
    )?;
    copy_plane(&mut frame, 1, "U", p.u, p.u_stride, cw as usize, ch)?;
    copy_plane(&mut frame, 2, "V", p.v, p.v_stride, cw as usize, ch)?;
    Ok(frame)
}

fn rgb_frame(width: u32, height: u32, pitch: usize, data: &[u8]) -> Result<VideoFrame, String> {
    check_size(width, height)?;
    let mut frame = VideoFrame::new(Pixel::RGB24, width, height);
    copy_plane(
        &mut frame,
        0,
        "RGB",
        data,
        pitch,
        width as usize * 3,
        height,
    )?;
    Ok(frame)
}

/// Pictures past this size are a producer's bug, not a camera.
const MAX_SIDE: u32 = 16_384;

fn check_size(width: u32, height: u32) -> Result<(), String> {
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(format!("a {width}x{height} picture cannot be shown"));
    }
    Ok(())
}

/// Copies `rows` rows of `row` bytes, `stride` apart in `src`, into plane `index`.
fn copy_plane(
    frame: &mut VideoFrame,
    index: usize,
    name: &str,
    src: &[u8],
    stride: usize,
    row: usize,
    rows: u32,
) -> Result<(), String> {
    let rows = rows as usize;
    let needed = stride
        .checked_mul(rows - 1)
        .and_then(|n| n.checked_add(row));
    if stride < row || needed.is_none_or(|n| src.len() < n) {
        return Err(format!(
            "the {name} plane is too small: {} bytes for {rows} rows of {row} bytes, {stride} apart",
            src.len()
        ));
    }
    let dst_stride = frame.stride(index);
    let dst = frame.data_mut(index);
    for r in 0..rows {
        dst[r * dst_stride..r * dst_stride + row]
            .copy_from_slice(&src[r * stride..r * stride + row]);
    }
    Ok(())
}

/// Shared by a [`PushedSource`] and the sink it handed out.
#[derive(Debug, Default)]
struct Slot {
    /// A publisher holds the sink.
    taken: AtomicBool,
    /// The source was dropped (its stream removed): pushes are refused.
    closed: AtomicBool,
}

/// A source fed by code in this process rather than opened by FFmpeg: it holds the stores
/// and the status, and hands a [`FrameSink`] to one publisher at a time. Its state is
/// `connecting` until the first frame, `live` while a publisher pushes, `ended` when the
/// publisher drops its sink; a new publisher makes it live again. Dropping the source
/// refuses the sink's further pushes with [`Error::Closed`].
pub struct PushedSource {
    config: SinkConfig,
    cx: SourceContext,
    status: StatusCell,
    slot: Arc<Slot>,
}

/// What a pushed source is called in status (`source` and `kind`).
pub const PUSHED: &str = "push";

impl PushedSource {
    /// A pushed source waiting for its publisher. Fails only on a bad JPEG quality.
    pub fn new(config: SinkConfig, cx: SourceContext) -> Result<Self, Error> {
        crate::init();
        kibitz_frames::JpegEncoder::new(config.jpeg_quality)?;
        let status = StatusCell::new(
            SourceStatus::new(PUSHED.to_owned(), PUSHED),
            cx.on_state.clone(),
        );
        Ok(Self {
            config,
            cx,
            status,
            slot: Arc::default(),
        })
    }

    /// The sink, for the one publisher that feeds this source now; [`Error::Busy`] while
    /// another holds it. Dropping the sink gives it back (and ends the source).
    pub fn publish(&self) -> Result<FrameSink, Error> {
        if self.slot.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        if self.slot.taken.swap(true, Ordering::SeqCst) {
            return Err(Error::Busy);
        }
        let sink = FrameSink::new(self.config.clone(), &self.cx, self.status.clone());
        match sink {
            Ok(mut sink) => {
                sink.lease = Some(Arc::clone(&self.slot));
                self.status.set_state(SourceState::Connecting);
                Ok(sink)
            }
            Err(e) => {
                self.slot.taken.store(false, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// The current status, with the frame rate measured from the display buffer.
    pub fn status(&self) -> SourceStatus {
        self.status_reader().get()
    }

    pub fn status_reader(&self) -> StatusReader {
        StatusReader {
            cell: self.status.clone(),
            display: Arc::clone(&self.cx.display),
        }
    }
}

impl Drop for PushedSource {
    fn drop(&mut self) {
        self.slot.closed.store(true, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for PushedSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushedSource")
            .field("status", &self.status.get())
            .finish()
    }
}
