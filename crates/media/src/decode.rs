//! The decode thread: open, read, decode and wait for each frame's time; reopen when a live
//! source drops, loop when a file ends. Every frame goes to the source's [`FrameSink`],
//! which makes the display JPEG and the model's copy and counts them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ff::codec::{self, threading};
use ff::format::context::Input;
use ff::media::Type;
use ff::util::error::{EAGAIN, EINVAL};
use ff::util::frame::Video as VideoFrame;
use ff::{Dictionary, Packet};
use ffmpeg_next as ff;

use kibitz_frames::{Jpeg, Stamp};

use crate::convert::jpeg_info;
use crate::pacing::{Backoff, MediaClock};
use crate::sink::FrameSink;
use crate::status::StatusCell;
use crate::{Error, SourceConfig, SourceSpec, SourceState};

/// An opened input and its video decoder.
pub(crate) struct Opened {
    input: Input,
    index: usize,
    decoder: ff::decoder::Video,
    /// Seconds per timestamp tick of the video stream.
    time_base: f64,
    fps: Option<f64>,
    codec: String,
    /// MJPEG: packets are complete JPEGs, shown without decoding.
    passthrough: bool,
}

/// Opens and probes the source and sets up its video decoder. Blocking reads in here and
/// later are cut short when `stop` is set.
pub(crate) fn open(config: &SourceConfig, stop: &Arc<AtomicBool>) -> Result<Opened, Error> {
    let what = config.spec.to_string();
    let target = config.spec.target();
    let open_error = |reason: String| Error::Open {
        what: what.clone(),
        reason,
    };
    if target.contains('\0') {
        return Err(open_error("the name contains a NUL byte".into()));
    }
    let mut options = Dictionary::new();
    let timeout = config.io_timeout.as_micros().max(1).to_string();
    match &config.spec {
        SourceSpec::Rtsp(_) => {
            // TCP: no lost UDP packets smearing the picture, and it passes firewalls.
            options.set("rtsp_transport", "tcp");
            options.set("timeout", &timeout);
        }
        SourceSpec::Http(_) | SourceSpec::Url(_) => options.set("rw_timeout", &timeout),
        SourceSpec::File(_) | SourceSpec::Webcam(_) => {}
    }
    // FFmpeg applies both to everything the input opens in turn (playlist entries, segments,
    // nested demuxers), which is what keeps an allowed source from reaching further.
    let restrictions = &config.restrictions;
    if let Some(list) = &restrictions.protocol_whitelist {
        options.set("protocol_whitelist", list);
    }
    if let Some(list) = &restrictions.format_whitelist {
        options.set("format_whitelist", list);
    }
    let restricted =
        restrictions.protocol_whitelist.is_some() || restrictions.format_whitelist.is_some();
    let flag = Arc::clone(stop);
    let input = ff::format::input_with_interrupt_and_dictionary(
        &target,
        move || flag.load(Ordering::Relaxed),
        options,
    )
    .map_err(|e| {
        // A refused protocol or format is only "Invalid argument" in FFmpeg's words.
        let refused = restricted && e == (ff::Error::Other { errno: EINVAL });
        let hint = if refused {
            " (the source policy may have refused a protocol or format it needs)"
        } else {
            ""
        };
        open_error(format!("{}{hint}", describe(e)))
    })?;

    let stream = input
        .streams()
        .best(Type::Video)
        .ok_or_else(|| Error::NoVideo { what: what.clone() })?;
    let index = stream.index();
    let time_base = f64::from(stream.time_base());
    let fps = [stream.avg_frame_rate(), stream.rate()]
        .into_iter()
        .map(f64::from)
        .find(|f| f.is_finite() && *f > 0.0 && *f <= 1000.0);
    let mut context =
        codec::context::Context::from_parameters(stream.parameters()).map_err(|e| {
            Error::Decode {
                what: what.clone(),
                reason: e.to_string(),
            }
        })?;
    let id = context.id();
    let passthrough = id == codec::Id::MJPEG;
    if !passthrough {
        // Two frame threads: decoding keeps up on a busy box at the cost of one frame of delay.
        context.set_threading(threading::Config {
            kind: threading::Type::Frame,
            count: 2,
            ..Default::default()
        });
    }
    let decoder = context.decoder().video().map_err(|e| Error::Decode {
        what: what.clone(),
        reason: format!("no decoder for {} ({e})", id.name()),
    })?;
    Ok(Opened {
        input,
        index,
        decoder,
        time_base,
        fps,
        codec: id.name().to_owned(),
        passthrough,
    })
}

/// FFmpeg's message, with a hint where its own wording leaves the user guessing.
pub(crate) fn describe(e: ff::Error) -> String {
    match e {
        ff::Error::InvalidData => format!("{e} (the file is damaged, incomplete or not a video)"),
        ff::Error::Other { errno } if errno == ff::util::error::ECONNREFUSED => {
            format!("{e} (nothing is listening there)")
        }
        _ => e.to_string(),
    }
}

/// Everything the decode thread needs that can cross into it.
pub(crate) struct Worker {
    config: SourceConfig,
    sink: FrameSink,
    status: StatusCell,
    stop: Arc<AtomicBool>,
}

impl Worker {
    pub(crate) fn new(
        config: SourceConfig,
        sink: FrameSink,
        status: StatusCell,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Self {
            config,
            sink,
            status,
            stop,
        }
    }

    pub(crate) fn run(self, first: Option<Opened>) {
        let Worker {
            config,
            sink,
            status,
            stop,
        } = self;
        let mut player = Player {
            config,
            status,
            stop,
            clock: MediaClock::new(Duration::from_millis(40)),
            backoff: Backoff::new(),
            sink,
        };
        player.run(first);
    }
}

/// How a session (one opened input) ended.
enum Outcome {
    Stopped,
    /// A file reached its end with looping off.
    Ended,
    /// Give up for good.
    Failed(String),
    /// The input dropped or could not be opened: reconnect (live) or give up (file).
    Lost(String),
}

/// How one pass over an input ended.
enum Pass {
    Stopped,
    Eof,
    Error(String),
}

#[derive(PartialEq)]
enum Flow {
    Go,
    Stop,
}

/// The decode thread's state: reading, decoding and timestamps here; what becomes of each
/// frame is the sink's.
struct Player {
    config: SourceConfig,
    status: StatusCell,
    stop: Arc<AtomicBool>,
    clock: MediaClock,
    backoff: Backoff,
    sink: FrameSink,
}

impl Player {
    fn run(&mut self, mut first: Option<Opened>) {
        let live = self.config.spec.is_live();
        while !self.stopped() {
            let outcome = match first
                .take()
                .map_or_else(|| open(&self.config, &self.stop), Ok)
            {
                Ok(opened) => self.session(opened),
                Err(_) if self.stopped() => Outcome::Stopped,
                Err(e) => Outcome::Lost(e.to_string()),
            };
            match outcome {
                Outcome::Stopped => break,
                Outcome::Ended => {
                    self.status.set_state(SourceState::Ended);
                    break;
                }
                Outcome::Failed(reason) => return self.fail(reason),
                Outcome::Lost(reason) if !live => return self.fail(reason),
                Outcome::Lost(reason) => {
                    tracing::warn!(source = %self.config.spec, %reason, "source lost");
                    let (attempt, retry_in) = self.backoff.next();
                    self.status.update(|s| {
                        s.last_error = Some(reason);
                        s.reconnects += 1;
                    });
                    self.status
                        .set_state(SourceState::Reconnecting { attempt, retry_in });
                    if !self.sleep_until(Instant::now() + retry_in) {
                        break;
                    }
                }
            }
        }
    }

    fn fail(&self, reason: String) {
        tracing::error!(source = %self.config.spec, %reason, "source failed");
        self.status.update(|s| s.last_error = Some(reason.clone()));
        self.status.set_state(SourceState::Failed(reason));
    }

    fn session(&mut self, mut o: Opened) -> Outcome {
        let (w, h) = (o.decoder.width(), o.decoder.height());
        self.status.update(|s| {
            s.codec = Some(o.codec.clone());
            (s.width, s.height) = (w, h);
            s.source_fps = o.fps;
            s.passthrough = o.passthrough && self.sink.fits(w, h);
        });
        if let Some(fps) = o.fps {
            self.clock
                .set_frame_duration(Duration::from_secs_f64(1.0 / fps));
        }
        self.clock.new_segment();
        self.sink.restart();
        let live = self.config.spec.is_live();
        loop {
            let mut shown = 0u64;
            let pass = self.pass(&mut o, &mut shown);
            let reason = match pass {
                Pass::Stopped => return Outcome::Stopped,
                Pass::Eof => "the stream ended".to_owned(),
                Pass::Error(e) => e,
            };
            if live {
                return Outcome::Lost(reason);
            }
            if shown == 0 {
                return Outcome::Failed(format!(
                    "no picture could be decoded from '{}' ({reason})",
                    self.config.spec
                ));
            }
            if !self.config.looping {
                return Outcome::Ended;
            }
            // Start over; the media clock carries on from the last frame, so to viewers and
            // the model the file is one endless stream.
            self.status.update(|s| s.loops += 1);
            if o.input.seek(0, ..).is_ok() {
                o.decoder.flush();
            } else {
                o = match open(&self.config, &self.stop) {
                    Ok(o) => o,
                    Err(e) => return Outcome::Lost(e.to_string()),
                };
            }
            self.clock.new_segment();
        }
    }

    /// Reads the input to its end (or an error), showing every frame on time.
    fn pass(&mut self, o: &mut Opened, shown: &mut u64) -> Pass {
        let mut bad_reads = 0u32;
        loop {
            if self.stopped() {
                return Pass::Stopped;
            }
            // A fresh packet for every read: `av_read_frame` fills the one it is given
            // without releasing what it held, so a reused packet would keep each buffer.
            let mut packet = Packet::empty();
            match packet.read(&mut o.input) {
                Ok(()) => {
                    bad_reads = 0;
                    if packet.stream() != o.index {
                        continue;
                    }
                    if o.passthrough {
                        match self.pass_through(o, &packet) {
                            Some(Flow::Go) => {
                                *shown += 1;
                                continue;
                            }
                            Some(Flow::Stop) => return Pass::Stopped,
                            None => {} // not a JPEG browsers can show: decode it
                        }
                    }
                    if let Err(e) = o.decoder.send_packet(&packet) {
                        self.dropped(format!("damaged packet skipped: {e}"));
                        continue;
                    }
                    if self.drain(o, shown) == Flow::Stop {
                        return Pass::Stopped;
                    }
                }
                Err(ff::Error::Eof) => {
                    // The decoder holds the last few frames until told the input ended.
                    let _ = o.decoder.send_eof();
                    if self.drain(o, shown) == Flow::Stop {
                        return Pass::Stopped;
                    }
                    return Pass::Eof;
                }
                Err(_) if self.stopped() => return Pass::Stopped,
                Err(ff::Error::InvalidData) => {
                    self.dropped("damaged data skipped".to_owned());
                    bad_reads += 1;
                    if bad_reads > 1000 {
                        return Pass::Error("nothing but damaged data".to_owned());
                    }
                }
                Err(ff::Error::Other { errno: EAGAIN }) => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => return Pass::Error(describe(e)),
            }
        }
    }

    /// Shows every frame the decoder has ready.
    fn drain(&mut self, o: &mut Opened, shown: &mut u64) -> Flow {
        let mut frame = VideoFrame::empty();
        loop {
            match o.decoder.receive_frame(&mut frame) {
                Ok(()) => {
                    if self.show(o, &frame) == Flow::Stop {
                        return Flow::Stop;
                    }
                    *shown += 1;
                }
                Err(ff::Error::Other { errno: EAGAIN }) | Err(ff::Error::Eof) => return Flow::Go,
                Err(e) => {
                    self.dropped(format!("frame lost: {e}"));
                    return Flow::Go;
                }
            }
        }
    }

    /// One decoded frame: JPEG for viewers, on time; RGB for the model when due.
    fn show(&mut self, o: &Opened, frame: &VideoFrame) -> Flow {
        let raw = frame.timestamp().map(|t| t as f64 * o.time_base);
        let pts = self.clock.map(raw);
        if frame.is_corrupt() {
            self.dropped("damaged frame (shown concealed)".to_owned());
        }
        // Encode before waiting, so the wait absorbs the encode time.
        let jpeg = match self.sink.encode(frame) {
            Ok(j) => j,
            Err(e) => {
                self.dropped(format!("frame not encoded: {e}"));
                return Flow::Go;
            }
        };
        let Some(captured) = self.wait(pts) else {
            return Flow::Stop;
        };
        let stamp = Stamp { pts, captured };
        if self.show_display(stamp, jpeg, (frame.width(), frame.height())) {
            self.sink.capture(frame, stamp);
        }
        Flow::Go
    }

    /// An MJPEG packet straight to viewers. `None`: the packet is not a JPEG a browser can
    /// show as is, decode it instead.
    fn pass_through(&mut self, o: &mut Opened, packet: &Packet) -> Option<Flow> {
        let data = packet.data()?;
        // Over the pixel cap: decoded and shown downscaled instead.
        let info = jpeg_info(data).filter(|i| i.has_tables && self.sink.fits(i.width, i.height))?;
        let raw = packet
            .pts()
            .or(packet.dts())
            .map(|t| t as f64 * o.time_base);
        let pts = self.clock.map(raw);
        let jpeg = Jpeg {
            width: info.width,
            height: info.height,
            bytes: Bytes::copy_from_slice(data),
        };
        let Some(captured) = self.wait(pts) else {
            return Some(Flow::Stop);
        };
        let stamp = Stamp { pts, captured };
        if self.show_display(stamp, jpeg, (info.width, info.height)) {
            // Only the frames the model gets are decoded at all.
            let mut frame = VideoFrame::empty();
            match o
                .decoder
                .send_packet(packet)
                .and_then(|()| o.decoder.receive_frame(&mut frame))
            {
                Ok(()) => self.sink.capture(&frame, stamp),
                Err(e) => self.dropped(format!("frame for the model not decoded: {e}")),
            }
        }
        Some(Flow::Go)
    }

    /// The frame to viewers; whether the model takes it too. The first frame since the
    /// source (re)opened means it works again: the next drop starts the backoff over.
    fn show_display(&mut self, stamp: Stamp, jpeg: Jpeg, size: (u32, u32)) -> bool {
        if !self.sink.delivered() {
            self.backoff.reset();
        }
        self.sink.show(stamp, jpeg, size)
    }

    fn dropped(&self, reason: String) {
        self.sink.dropped(reason);
    }

    /// Waits until the frame at media time `pts` is due; its capture time, or `None` when
    /// stopped meanwhile.
    fn wait(&mut self, pts: Duration) -> Option<Instant> {
        let due = self.sink.due(pts, Instant::now());
        self.sleep_until(due).then(Instant::now)
    }

    /// Sleeps until `deadline`; `false` if stopped first (`Source::stop` unparks us).
    fn sleep_until(&self, deadline: Instant) -> bool {
        loop {
            if self.stopped() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            std::thread::park_timeout(deadline - now);
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}
