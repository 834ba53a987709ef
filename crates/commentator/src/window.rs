//! What the loop needs from the inference window, as a trait so tests can drive the loop
//! with a fake source on fake time.

use kibitz_frames::{InferenceWindow, Rgb, Stamp};

pub trait FrameWindow: Send + Sync {
    /// Up to `n` frames: the newest one and every `stride`-th frame before it, returned
    /// oldest first. Fewer than `n` when the window does not hold that many yet.
    fn sample(&self, n: usize, stride: usize) -> Vec<(Stamp, Rgb)>;
}

impl FrameWindow for InferenceWindow {
    fn sample(&self, n: usize, stride: usize) -> Vec<(Stamp, Rgb)> {
        InferenceWindow::sample(self, n, stride)
    }
}

/// A fake source for tests: frame `k` is captured at `start + k * period` with
/// `pts = k * period`, and exists once the clock has reached it, until `stop`.
#[cfg(test)]
pub(crate) mod fake {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use super::*;

    pub(crate) struct SteadyWindow {
        pub start: Instant,
        pub period: Duration,
        /// The source stalls here: no frame captured at or after it exists.
        pub stop: Mutex<Option<Instant>>,
    }

    impl SteadyWindow {
        pub fn new(start: Instant, period: Duration) -> Self {
            SteadyWindow {
                start,
                period,
                stop: Mutex::new(None),
            }
        }

        pub fn stall_at(&self, at: Instant) {
            *self.stop.lock().unwrap() = Some(at);
        }

        pub fn frame(&self, k: u64) -> (Stamp, Rgb) {
            let offset = self.period * k as u32;
            // The pixel values tell frames apart too.
            let rgb = Rgb {
                width: 2,
                height: 1,
                data: Arc::from(vec![k as u8; 6]),
            };
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

    impl FrameWindow for SteadyWindow {
        fn sample(&self, n: usize, stride: usize) -> Vec<(Stamp, Rgb)> {
            self.sample_at(tokio::time::Instant::now().into_std(), n, stride)
        }
    }
}
