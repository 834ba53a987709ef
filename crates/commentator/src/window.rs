//! What the loop needs from the inference window, as a trait so tests can drive the loop
//! with a fake source on fake time.

use std::sync::Arc;

use kibitz_frames::{InferenceWindow, Rgb, Stamp};
use tokio::sync::watch;

pub trait FrameWindow: Send + Sync {
    /// Up to `n` frames: the newest one and every `stride`-th frame before it, returned
    /// oldest first. Fewer than `n` when the window does not hold that many yet.
    fn sample(&self, n: usize, stride: usize) -> Vec<(Stamp, Rgb)>;

    /// Changes whenever a frame of the sampled set comes in, so the loop starts a cycle on
    /// the captured frame itself; `None` (the default) has the loop poll instead.
    fn captures(&self) -> Option<watch::Receiver<u64>> {
        None
    }
}

/// The inference window plus a notice of every capture of its sampled set: what a stream
/// gives its commentary loop. The source's sampled-frame callback calls
/// [`WatchedWindow::captured`].
pub struct WatchedWindow {
    window: Arc<InferenceWindow>,
    newest: watch::Sender<u64>,
}

impl WatchedWindow {
    pub fn new(window: Arc<InferenceWindow>) -> Self {
        Self {
            window,
            newest: watch::Sender::new(0),
        }
    }

    /// The window took frame `seq` of the sampled set. Never blocks (any thread).
    pub fn captured(&self, seq: u64) {
        self.newest.send_replace(seq);
    }
}

impl FrameWindow for WatchedWindow {
    fn sample(&self, n: usize, stride: usize) -> Vec<(Stamp, Rgb)> {
        self.window.sample_phased(n, stride)
    }

    fn captures(&self) -> Option<watch::Receiver<u64>> {
        Some(self.newest.subscribe())
    }
}

/// The live window samples on a fixed phase (every stride-th capture), so the frames of one
/// cycle are the next cycle's too and each enters the engine once, as it arrives.
impl FrameWindow for InferenceWindow {
    fn sample(&self, n: usize, stride: usize) -> Vec<(Stamp, Rgb)> {
        InferenceWindow::sample_phased(self, n, stride)
    }
}

/// A fake source for tests: frame `k` is captured at `start + k * period` with
/// `pts = k * period`, and exists once the clock has reached it, until `stop`. Its picture
/// is [`fake::moving`] unless a test shows another.
#[cfg(test)]
pub(crate) mod fake {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use super::*;

    /// Frame `k`'s picture.
    pub(crate) type Picture = Arc<dyn Fn(u64) -> Rgb + Send + Sync>;

    pub(crate) struct SteadyWindow {
        pub start: Instant,
        pub period: Duration,
        /// The source stalls here: no frame captured at or after it exists.
        pub stop: Mutex<Option<Instant>>,
        picture: Mutex<Picture>,
    }

    /// The default picture, 2x1: the first pixel is grey level `k` (so tests can tell frames
    /// apart by it), the second one of four greys 64 apart, so two frames fewer than 256
    /// apart always differ by 4 grey levels or more, and the scene-change gate (default 1.5)
    /// lets every cycle ask.
    pub fn moving(k: u64) -> Rgb {
        let a = k as u8;
        let b = (k % 4 * 64) as u8;
        Rgb {
            width: 2,
            height: 1,
            data: Arc::from(vec![a, a, a, b, b, b]),
        }
    }

    impl SteadyWindow {
        pub fn new(start: Instant, period: Duration) -> Self {
            SteadyWindow {
                start,
                period,
                stop: Mutex::new(None),
                picture: Mutex::new(Arc::new(moving)),
            }
        }

        /// From now on, frame `k` shows `picture(k)` (frames already sampled keep theirs).
        pub fn show(&self, picture: impl Fn(u64) -> Rgb + Send + Sync + 'static) {
            *self.picture.lock().unwrap() = Arc::new(picture);
        }

        pub fn stall_at(&self, at: Instant) {
            *self.stop.lock().unwrap() = Some(at);
        }

        pub fn frame(&self, k: u64) -> (Stamp, Rgb) {
            let offset = self.period * k as u32;
            let picture = Arc::clone(&self.picture.lock().unwrap());
            let rgb = picture(k);
            (
                Stamp {
                    pts: offset,
                    captured: self.start + offset,
                },
                rgb,
            )
        }

        pub fn sample_at(&self, now: Instant, n: usize, stride: usize) -> Vec<(Stamp, Rgb)> {
            let mut last = now;
            if let Some(stop) = *self.stop.lock().unwrap() {
                if stop <= last {
                    // Frames at or after `stop` never come.
                    last = match stop.checked_sub(Duration::from_nanos(1)) {
                        Some(t) => t,
                        None => return Vec::new(),
                    };
                }
            }
            if last < self.start {
                return Vec::new();
            }
            let newest =
                (last.duration_since(self.start).as_nanos() / self.period.as_nanos()) as u64;
            let mut frames: Vec<_> = (0..n as u64)
                .map_while(|i| newest.checked_sub(i * stride as u64))
                .map(|k| self.frame(k))
                .collect();
            frames.reverse();
            frames
        }
    }

    /// Size of the test scenes: 160x90, so a thumbnail cell is 5x5 pixels and a region of
    /// the scene-change gate 40x30.
    pub const SCENE_WIDTH: u32 = 160;
    pub const SCENE_HEIGHT: u32 = 90;

    /// Frame `k` of a still scene (eight grey bars) as a camera sees it: every frame with
    /// its own noise of ±2 grey levels per channel, plus `extra(x, y)` levels.
    pub fn scene(k: u64, extra: impl Fn(u32, u32) -> i32) -> Rgb {
        let mut seed = k.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut data = Vec::with_capacity((SCENE_WIDTH * SCENE_HEIGHT * 3) as usize);
        for y in 0..SCENE_HEIGHT {
            for x in 0..SCENE_WIDTH {
                let level = 40 + (x / 20) as i32 * 25 + extra(x, y);
                for _ in 0..3 {
                    // xorshift64
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let noise = (seed >> 33) as i32 % 5 - 2;
                    data.push((level + noise).clamp(0, 255) as u8);
                }
            }
        }
        Rgb::new(SCENE_WIDTH, SCENE_HEIGHT, data).unwrap()
    }

    /// The still scene with nothing added.
    pub fn still(k: u64) -> Rgb {
        scene(k, |_, _| 0)
    }

    /// An object covering 5% of the scene (36x20 pixels of 160x90), `contrast` grey levels
    /// brighter than what is behind it, centred on the point where four of the gate's
    /// regions meet (80, 30), so that each holds only a quarter of it: the place where it
    /// is hardest to see.
    pub fn object(contrast: i32) -> impl Fn(u32, u32) -> i32 {
        move |x, y| {
            if (62..98).contains(&x) && (20..40).contains(&y) {
                contrast
            } else {
                0
            }
        }
    }

    impl FrameWindow for SteadyWindow {
        fn sample(&self, n: usize, stride: usize) -> Vec<(Stamp, Rgb)> {
            self.sample_at(tokio::time::Instant::now().into_std(), n, stride)
        }
    }
}
