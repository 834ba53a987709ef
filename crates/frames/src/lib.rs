//! Frames as they travel from the decoder to the browser and to the model.
//!
//! Two stores sit behind one source: the [`DisplayBuffer`] keeps every frame as JPEG for
//! the MJPEG viewers (about 15 s, so the picture can be shown late, in sync with the
//! commentary), and the [`InferenceWindow`] keeps a few frames a second, already resized
//! for the model. Neither knows about tokio: they are plain data structures behind a lock,
//! shared by one writer (the decode thread) and many readers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

mod display;
mod jpeg;
mod resize;
mod window;

pub use display::{DisplayBuffer, DisplayFrame};
pub use jpeg::{JpegEncoder, Range, Subsampling, YuvPlanes};
pub use resize::{model_size, Resizer, SIZE_MULTIPLE, SLICE_SIDE};
pub use window::InferenceWindow;

/// JPEG quality of the display frames when nothing else is configured (`JPEG_QUALITY`).
pub const JPEG_QUALITY: u8 = 80;
/// How much picture the display buffer keeps (`DISPLAY_BUFFER_SECONDS`): enough to show
/// the video as late as the commentary needs.
pub const DISPLAY_BUFFER_SECONDS: f64 = 15.0;
/// Frames kept for the model (`WINDOW_SIZE`).
pub const WINDOW_SIZE: usize = 32;
/// Frames a second taken for the model (`CAPTURE_FPS`).
pub const CAPTURE_FPS: f64 = 2.0;

/// What can go wrong while encoding or resizing a frame.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("JPEG encoding failed: {0}")]
    Jpeg(#[from] turbojpeg::Error),
    #[error("image resize failed: {0}")]
    Resize(String),
    /// The caller passed a picture whose buffer does not match its size; a bug upstream.
    #[error("bad picture: {0}")]
    BadPicture(String),
    #[error("JPEG quality must be 1..=100, got {0}")]
    BadQuality(u8),
}

/// A packed 8-bit RGB picture (3 bytes a pixel, rows without padding).
#[derive(Clone, PartialEq, Eq)]
pub struct Rgb {
    pub width: u32,
    pub height: u32,
    pub data: Arc<[u8]>,
}

impl Rgb {
    /// Wraps packed RGB bytes, checking that there are exactly `width * height * 3`.
    pub fn new(width: u32, height: u32, data: impl Into<Arc<[u8]>>) -> Result<Self, Error> {
        let data = data.into();
        let want = width as usize * height as usize * 3;
        if width == 0 || height == 0 || data.len() != want {
            return Err(Error::BadPicture(format!(
                "{width}x{height} RGB needs {want} bytes, got {}",
                data.len()
            )));
        }
        Ok(Self {
            width,
            height,
            data,
        })
    }
}

impl std::fmt::Debug for Rgb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rgb({}x{})", self.width, self.height)
    }
}

/// A JPEG file in memory.
#[derive(Clone, PartialEq, Eq)]
pub struct Jpeg {
    pub width: u32,
    pub height: u32,
    pub bytes: Bytes,
}

impl std::fmt::Debug for Jpeg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Jpeg({}x{}, {} bytes)",
            self.width,
            self.height,
            self.bytes.len()
        )
    }
}

/// When a frame was taken: `pts` on the source's own clock (media time, starts near 0 and
/// keeps growing across file loops), `captured` on this process's clock. Sync and latency
/// use `captured`; `pts` is for people and subtitles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub pts: Duration,
    pub captured: Instant,
}
