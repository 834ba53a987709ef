//! Reading a video file's frames for the model as fast as FFmpeg decodes them, for
//! `kibitz annotate`: no pacing, no display JPEGs, no looping.
//!
//! A live source is paced and stamped by the wall clock ([`crate::Source`]); a file being
//! annotated runs on its own media time. [`VideoFile::read`] decodes every frame (a
//! decoder cannot skip to the next capture) but converts only those the capture rate takes
//! (the same [`Capture`] rule and the same model-sized RGB as the live path), and hands them
//! over with their media time: seconds from the container's start, as a player counts them
//! and as subtitle cues must.
//!
//! Opening is separate from reading so that a missing file or one without video is an
//! error before any model loads; the opened file is `Send` (reading may go on a thread of
//! its own), the swscale context of the reading is not, so it lives inside [`VideoFile::read`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ff::codec::{self, threading};
use ff::format::context::Input;
use ff::media::Type;
use ff::util::error::EAGAIN;
use ff::util::frame::Video as VideoFrame;
use ff::Packet;
use ffmpeg_next as ff;

use kibitz_frames::{model_size, Rgb};

use crate::convert::{to_rgb, Scaler};
use crate::decode::describe;
use crate::pacing::Capture;
use crate::Error;

/// What a file holds, as far as annotating it is concerned.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoInfo {
    /// The container's start time, seconds (media time 0 is this raw time).
    pub start: f64,
    /// The container's duration, seconds, when it says.
    pub duration: Option<f64>,
    /// Frames a second of the video stream, when it says.
    pub fps: Option<f64>,
    pub width: u32,
    pub height: u32,
    /// The video codec's FFmpeg name (`h264`, `msmpeg4v3`).
    pub codec: String,
}

/// A frame taken for the model.
#[derive(Debug, Clone)]
pub struct Captured {
    /// Media time: seconds from the container's start.
    pub pts: Duration,
    /// The frame scaled to the model's size (see [`kibitz_frames::model_size`]).
    pub rgb: Rgb,
}

/// How a read ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadSummary {
    /// Frames decoded (all of them, not only those captured).
    pub decoded: u64,
    /// Frames handed to the caller.
    pub captured: u64,
    /// Media time at which the video ends: the last frame's time plus one frame.
    pub end: Duration,
    /// The caller asked to stop before the end.
    pub stopped: bool,
}

/// An opened video file and its decoder.
pub struct VideoFile {
    path: PathBuf,
    input: Input,
    index: usize,
    decoder: ff::decoder::Video,
    time_base: f64,
    info: VideoInfo,
}

impl VideoFile {
    /// Opens and probes `path`; fails if it is missing, not a media file, or has no video.
    pub fn open(path: &Path) -> Result<VideoFile, Error> {
        crate::init();
        let what = path.display().to_string();
        if !path.exists() {
            return Err(Error::Open {
                what,
                reason: "no such file".into(),
            });
        }
        let input = ff::format::input(path).map_err(|e| Error::Open {
            what: what.clone(),
            reason: describe(e),
        })?;
        // FFmpeg opens a still image as a one-frame video; commenting needs motion.
        let demuxer = input.format().name().to_owned();
        if demuxer == "image2" || demuxer.ends_with("_pipe") {
            return Err(Error::Open {
                what,
                reason: "a still image, not a video (`kibitz describe` comments on images)".into(),
            });
        }
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
        context.set_threading(threading::Config {
            kind: threading::Type::Frame,
            count: 0, // as many as FFmpeg sees fit: nothing else waits on this thread
            ..Default::default()
        });
        let decoder = context.decoder().video().map_err(|e| Error::Decode {
            what: what.clone(),
            reason: format!("no decoder for {} ({e})", id.name()),
        })?;
        // SAFETY: `input` owns an opened format context for as long as this borrow lasts,
        // and this reads one plain integer field of it.
        let start = match unsafe { (*input.as_ptr()).start_time } {
            t if t == ff::ffi::AV_NOPTS_VALUE => 0.0,
            t => t as f64 / f64::from(ff::ffi::AV_TIME_BASE),
        };
        let duration = match input.duration() {
            d if d <= 0 || d == ff::ffi::AV_NOPTS_VALUE => None,
            d => Some(d as f64 / f64::from(ff::ffi::AV_TIME_BASE)),
        };
        let info = VideoInfo {
            start,
            duration,
            fps,
            width: decoder.width(),
            height: decoder.height(),
            codec: id.name().to_owned(),
        };
        Ok(VideoFile {
            path: path.to_owned(),
            input,
            index,
            decoder,
            time_base,
            info,
        })
    }

    pub fn info(&self) -> &VideoInfo {
        &self.info
    }

    /// Decodes the whole video, handing every frame the capture rate takes (`capture_fps`,
    /// by media time) to `each`, scaled to the model's size for `max_slices`. `each`
    /// returns `false` to stop early. Damaged packets are skipped; a file from which no
    /// frame at all decodes is an error.
    pub fn read(
        mut self,
        capture_fps: f64,
        max_slices: u32,
        mut each: impl FnMut(Captured) -> bool,
    ) -> Result<ReadSummary, Error> {
        let what = self.path.display().to_string();
        // `Capture` picks frames by instant; media time on a made-up base is one.
        let base = Instant::now();
        let mut capture = Capture::new(capture_fps);
        let mut scaler = Scaler::new(ff::software::scaling::Flags::BILINEAR);
        let frame_time = Duration::from_secs_f64(1.0 / self.info.fps.unwrap_or(25.0));
        let mut summary = ReadSummary {
            decoded: 0,
            captured: 0,
            end: Duration::ZERO,
            stopped: false,
        };
        let mut last: Option<Duration> = None;
        let mut frame = VideoFrame::empty();
        let mut bad_reads = 0u32;
        let mut last_error = None;
        let mut eof = false;
        loop {
            if !eof {
                // A fresh packet for every read (see `decode::Player::pass`).
                let mut packet = Packet::empty();
                match packet.read(&mut self.input) {
                    Ok(()) => {
                        bad_reads = 0;
                        if packet.stream() != self.index {
                            continue;
                        }
                        if let Err(e) = self.decoder.send_packet(&packet) {
                            last_error = Some(describe(e));
                            continue;
                        }
                    }
                    Err(ff::Error::Eof) => {
                        eof = true;
                        let _ = self.decoder.send_eof();
                    }
                    Err(ff::Error::InvalidData) => {
                        bad_reads += 1;
                        last_error = Some(describe(ff::Error::InvalidData));
                        if bad_reads > 1000 {
                            break;
                        }
                        continue;
                    }
                    Err(ff::Error::Other { errno: EAGAIN }) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(e) => {
                        last_error = Some(describe(e));
                        break;
                    }
                }
            }
            loop {
                match self.decoder.receive_frame(&mut frame) {
                    Ok(()) => {}
                    Err(ff::Error::Other { errno: EAGAIN }) => break,
                    Err(ff::Error::Eof) => {
                        return self.finish(summary, &what, last_error);
                    }
                    Err(e) => {
                        last_error = Some(describe(e));
                        break;
                    }
                }
                summary.decoded += 1;
                let pts = self.media_time(&frame, last, frame_time);
                last = Some(pts);
                summary.end = summary.end.max(pts + frame_time);
                if !capture.take(base + pts) {
                    continue;
                }
                let (w, h) = model_size(frame.width(), frame.height(), max_slices);
                match to_rgb(&mut scaler, &frame, w, h) {
                    Ok(rgb) => {
                        summary.captured += 1;
                        if !each(Captured { pts, rgb }) {
                            summary.stopped = true;
                            return Ok(summary);
                        }
                    }
                    Err(e) => last_error = Some(e),
                }
            }
            if eof {
                break;
            }
        }
        self.finish(summary, &what, last_error)
    }

    fn finish(
        &self,
        summary: ReadSummary,
        what: &str,
        last_error: Option<String>,
    ) -> Result<ReadSummary, Error> {
        if summary.decoded == 0 {
            return Err(Error::Decode {
                what: what.to_owned(),
                reason: format!(
                    "no picture could be decoded ({})",
                    last_error.as_deref().unwrap_or("the video stream is empty")
                ),
            });
        }
        Ok(summary)
    }

    /// A frame's media time: its timestamp from the container's start, never going back
    /// (a frame without one, or one stepping back, comes one frame after the last).
    fn media_time(
        &self,
        frame: &VideoFrame,
        last: Option<Duration>,
        frame_time: Duration,
    ) -> Duration {
        let raw = frame
            .timestamp()
            .map(|t| t as f64 * self.time_base - self.info.start)
            .filter(|t| t.is_finite());
        let next = last.map_or(Duration::ZERO, |l| l + frame_time);
        match raw {
            Some(t) => {
                let t = Duration::from_secs_f64(t.max(0.0));
                match last {
                    Some(l) if t <= l => next,
                    _ => t,
                }
            }
            None => next,
        }
    }
}

impl std::fmt::Debug for VideoFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoFile")
            .field("path", &self.path)
            .field("info", &self.info)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures")
            .join(name)
    }

    #[test]
    fn a_file_is_read_whole_at_the_capture_rate_on_its_own_time() {
        let file = VideoFile::open(&fixture("testsrc2-360p25.mp4")).unwrap();
        assert_eq!(file.info().codec, "h264");
        assert_eq!(file.info().fps, Some(25.0));
        let mut frames = Vec::new();
        let summary = file
            .read(2.0, 1, |c| {
                frames.push(c);
                true
            })
            .unwrap();
        assert_eq!(summary.decoded, 250);
        assert_eq!(summary.end, Duration::from_secs(10));
        let times: Vec<f64> = frames.iter().map(|c| c.pts.as_secs_f64()).collect();
        let want: Vec<f64> = (0..20).map(|k| k as f64 * 0.5).collect();
        assert_eq!(times.len(), 20, "{times:?}");
        assert!(
            times.iter().zip(&want).all(|(a, b)| (a - b).abs() < 0.021),
            "{times:?}"
        );
        // The model's size, as the live path makes it.
        let (w, h) = model_size(640, 360, 1);
        assert!(frames.iter().all(|c| (c.rgb.width, c.rgb.height) == (w, h)));
    }

    #[test]
    fn reading_stops_when_asked() {
        let file = VideoFile::open(&fixture("testsrc2-360p25.mp4")).unwrap();
        let mut n = 0;
        let summary = file
            .read(2.0, 1, |_| {
                n += 1;
                n < 3
            })
            .unwrap();
        assert!(summary.stopped && summary.captured == 3, "{summary:?}");
    }
}
