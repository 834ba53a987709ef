//! Video sources: FFmpeg opens and decodes them on a thread of their own and fills the two
//! frame stores of `kibitz-frames`; a [`PushedSource`] lets code in this process feed them
//! instead.
//!
//! Every producer hands its frames to a [`FrameSink`], the one fan-out: display JPEG,
//! capture-rate copy for the model, sampled-frame notices, counters. The decode thread never
//! touches async code: through its sink it pushes into the [`DisplayBuffer`] and the
//! [`InferenceWindow`] (both plain, lock-protected stores) and publishes a [`SourceStatus`]
//! snapshot plus state-change callbacks. A file plays at its native rate and loops as if
//! live; a live source that drops is reopened with backoff, forever. Only a file that cannot
//! be opened at all is an error, and that one is reported before any thread starts.
//!
//! [`DisplayBuffer`]: kibitz_frames::DisplayBuffer
//! [`InferenceWindow`]: kibitz_frames::InferenceWindow

mod convert;
mod decode;
mod image;
mod mix;
mod mux;
mod pacing;
mod policy;
mod reader;
mod sink;
mod source;
mod spec;
mod status;

pub use image::load_image;
pub use mix::{SpeechTrack, SPEECH_RATE};
pub use mux::{check_remux, remux_with_subtitles, Cue, MuxError};
pub use policy::{Allowed, PolicyError, Restrictions, SourcePolicy};
pub use reader::{Captured, ReadSummary, VideoFile, VideoInfo};
pub use sink::{FrameSink, Picture, PushedSource, SinkConfig, MAX_SOURCE_PIXELS, PUSHED};
pub use source::{Source, SourceConfig, SourceContext, StatusReader};
pub use spec::SourceSpec;
pub use status::{SourceState, SourceStatus};

/// The parsers of outside input, for the fuzz targets in `fuzz/` (not an API).
#[doc(hidden)]
pub mod fuzzing {
    use std::io;
    use std::net::IpAddr;

    use crate::{Allowed, PolicyError, SourcePolicy};

    /// What the MJPEG passthrough reads from a camera's JPEG: width, height, Huffman tables.
    pub fn jpeg_info(data: &[u8]) -> Option<(u32, u32, bool)> {
        crate::convert::jpeg_info(data).map(|i| (i.width, i.height, i.has_tables))
    }

    /// [`SourcePolicy::check`] with host names resolved by `resolve` instead of DNS.
    pub fn check_source(
        policy: &SourcePolicy,
        source: &str,
        resolve: &dyn Fn(&str, u16) -> io::Result<Vec<IpAddr>>,
    ) -> Result<Allowed, PolicyError> {
        policy.check_with(source, resolve)
    }
}

/// What can go wrong with a source or an image, phrased for the person who named it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// FFmpeg could not open or probe the input (missing file, not a video, refused).
    #[error("cannot open '{what}': {reason}")]
    Open { what: String, reason: String },
    #[error("'{what}' has no video stream (is it an audio file?)")]
    NoVideo { what: String },
    #[error("cannot decode '{what}': {reason}")]
    Decode { what: String, reason: String },
    #[error("'{0}' is not a source: give a video file, /dev/videoN, rtsp://… or http(s)://…")]
    BadSpec(String),
    #[error("cannot start the decode thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error(transparent)]
    Frames(#[from] kibitz_frames::Error),
    /// A pushed frame could not be used (counted as dropped; the source goes on).
    #[error("frame not used: {0}")]
    Picture(String),
    /// A pushed source already has its publisher.
    #[error("this source already has a publisher; stop that one first")]
    Busy,
    /// The stream a pushed source fed was removed: stop publishing.
    #[error("the stream this source fed was removed")]
    Closed,
}

/// FFmpeg's own log goes to stderr and is loud about every damaged packet, which a live
/// stream produces routinely; the source's status counts those instead. `verbose` turns
/// FFmpeg's warnings back on for debugging a source.
pub fn set_ffmpeg_verbose(verbose: bool) {
    init();
    let level = if verbose {
        ffmpeg_next::log::Level::Warning
    } else {
        ffmpeg_next::log::Level::Fatal
    };
    ffmpeg_next::log::set_level(level);
}

/// Registers FFmpeg's formats and devices once per process.
fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // `init` only fails on builds without the formats compiled in, which the open
        // right after reports more usefully.
        let _ = ffmpeg_next::init();
        ffmpeg_next::log::set_level(ffmpeg_next::log::Level::Fatal);
    });
}
