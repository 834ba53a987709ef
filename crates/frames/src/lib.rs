//! Frames as they travel from the decoder to the browser and to the model.
//!
//! Two stores sit behind one source: the [`DisplayBuffer`] keeps every frame as JPEG for
//! the MJPEG viewers (about 15 s, so the picture can be shown late, in sync with the
//! commentary), and the [`InferenceWindow`] keeps a few frames a second, already resized
//! for the model. Neither knows about tokio: they are plain data structures behind a lock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// A packed 8-bit RGB picture (3 bytes a pixel, rows without padding).
#[derive(Clone, PartialEq, Eq)]
pub struct Rgb {
    pub width: u32,
    pub height: u32,
    pub data: Arc<[u8]>,
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
        write!(f, "Jpeg({}x{}, {} bytes)", self.width, self.height, self.bytes.len())
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
