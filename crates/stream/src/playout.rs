//! Which picture is on screen now, given the sync delay: plain time arithmetic, no clock
//! and no I/O (the str0m shape), so MJPEG today and speech and WebRTC later ask the same
//! question the same way, and tests answer it on fake time.
//!
//! A [`Playout`] is one viewer's cursor over a stream's display buffer. At each wake-up the
//! output calls [`Playout::poll`] with the time, the stream's target delay and frame period
//! and a lookup into the buffer; it gets the frame to show (if a new one is due) and reads
//! [`Playout::wake_at`] for when to ask again.
//!
//! The wake-up follows the source's own rhythm: right after a frame is shown, the cursor
//! sleeps until the following one should be due (its capture time plus the delay plus a
//! sliver of margin for capture jitter). A fixed ticker at the same rate would beat against
//! the source and show some frames twice and skip others. A frame that is late is looked
//! for again soon, less often the longer it stays away. Only forward: a frame already shown
//! (or an older one, when the delay just grew) is not shown again; the picture holds until
//! time catches up.

use std::time::{Duration, Instant};

use kibitz_frames::DisplayFrame;

/// Rates outside this range are a broken source report, not a wish.
const MIN_FPS: f64 = 0.2;
const MAX_FPS: f64 = 120.0;

/// How long after a frame is due a viewer wakes to show it, at most.
const MAX_MARGIN: Duration = Duration::from_millis(5);

/// One viewer's position in a stream's delayed picture.
#[derive(Debug, Clone)]
pub struct Playout {
    next: Instant,
    last_seq: Option<u64>,
    /// Wake-ups in a row that found no new frame.
    misses: u32,
}

impl Playout {
    /// A cursor that looks for its first frame at `now`.
    pub fn new(now: Instant) -> Playout {
        Playout {
            next: now,
            last_seq: None,
            misses: 0,
        }
    }

    /// When to call [`Playout::poll`] next.
    pub fn wake_at(&self) -> Instant {
        self.next
    }

    /// The frame to show at `now`, if one is due that this viewer has not shown yet.
    /// `frame_at(t)` returns the frame that was newest at `t` (the display buffer's `at`).
    pub fn poll(
        &mut self,
        now: Instant,
        delay: Duration,
        period: Duration,
        frame_at: impl FnOnce(Instant) -> Option<DisplayFrame>,
    ) -> Option<DisplayFrame> {
        let frame = now
            .checked_sub(delay)
            .and_then(frame_at)
            .filter(|f| self.last_seq.is_none_or(|last| f.seq > last));
        let Some(frame) = frame else {
            self.misses = (self.misses + 1).min(3);
            self.next = now + (period / 8 * (1 << self.misses)).min(period);
            return None;
        };
        self.misses = 0;
        let margin = (period / 10).min(MAX_MARGIN);
        let due = frame.stamp.captured + delay + period + margin;
        // Never sooner than half a period (a burst of old frames is not worth sending) nor
        // later than one (a buffer that answers with its oldest frame when the delay is
        // longer than it keeps must still play on).
        self.next = due.clamp(now + period / 2, now + period + margin);
        self.last_seq = Some(frame.seq);
        Some(frame)
    }
}

/// The frame period: the source's rate when known, else `fallback_fps` (`MJPEG_FPS`).
pub fn frame_period(fps: Option<f64>, fallback_fps: f64) -> Duration {
    let fps = fps
        .filter(|f| f.is_finite() && *f > 0.0)
        .unwrap_or(fallback_fps);
    Duration::from_secs_f64(1.0 / fps.clamp(MIN_FPS, MAX_FPS))
}

#[cfg(test)]
mod tests {
    use kibitz_frames::{Jpeg, Stamp};

    use super::*;

    /// A source of `fps` frames a second from `start`: frame k captured at start + k/fps.
    fn source(start: Instant, fps: f64) -> impl Fn(Instant) -> Option<DisplayFrame> {
        move |t: Instant| {
            let since = t.checked_duration_since(start)?;
            let seq = (since.as_secs_f64() * fps).floor() as u64;
            Some(DisplayFrame {
                seq,
                stamp: Stamp {
                    pts: Duration::from_secs_f64(seq as f64 / fps),
                    captured: start + Duration::from_secs_f64(seq as f64 / fps),
                },
                jpeg: Jpeg {
                    width: 1,
                    height: 1,
                    bytes: Default::default(),
                },
            })
        }
    }

    #[test]
    fn shows_each_frame_once_at_the_source_rate_and_delay() {
        let start = Instant::now();
        let frames = source(start, 25.0);
        let delay = Duration::from_secs(2);
        let period = frame_period(Some(25.0), 10.0);
        let mut playout = Playout::new(start);
        let mut shown = Vec::new();
        let mut now = start;
        while now < start + Duration::from_secs(12) {
            if let Some(frame) = playout.poll(now, delay, period, &frames) {
                // The frame on screen was captured `delay` ago, give or take a period.
                let age = now - frame.stamp.captured;
                assert!(age >= delay && age < delay + period * 2, "{age:?}");
                shown.push(frame.seq);
            }
            now = playout.wake_at().max(now + Duration::from_micros(1));
        }
        // 10 s of picture after the 2 s delay, each frame once and in order.
        assert!(shown.windows(2).all(|w| w[1] == w[0] + 1), "{shown:?}");
        assert!((248..=252).contains(&shown.len()), "{}", shown.len());
    }

    #[test]
    fn nothing_before_the_delay_then_back_off_while_waiting() {
        let start = Instant::now();
        let frames = source(start, 10.0);
        let period = frame_period(None, 10.0);
        let mut playout = Playout::new(start);
        assert!(playout
            .poll(start, Duration::from_secs(5), period, &frames)
            .is_none());
        let first_wait = playout.wake_at() - start;
        let later = playout.wake_at();
        assert!(playout
            .poll(later, Duration::from_secs(5), period, &frames)
            .is_none());
        assert!(playout.wake_at() - later > first_wait, "backs off");
        assert!(playout.wake_at() - later <= period);
    }

    #[test]
    fn a_growing_delay_holds_the_picture_instead_of_going_back() {
        let start = Instant::now();
        let frames = source(start, 10.0);
        let period = frame_period(Some(10.0), 10.0);
        let mut playout = Playout::new(start);
        let now = start + Duration::from_secs(10);
        let shown = playout.poll(now, Duration::ZERO, period, &frames).unwrap();
        // The delay jumps to 3 s: the frame of 3 s ago is older than the one shown.
        assert!(playout
            .poll(now + period, Duration::from_secs(3), period, &frames)
            .is_none());
        let resumed = playout
            .poll(
                now + Duration::from_secs(4),
                Duration::from_secs(3),
                period,
                &frames,
            )
            .unwrap();
        assert!(resumed.seq > shown.seq);
    }

    #[test]
    fn period_is_clamped_and_falls_back() {
        assert_eq!(frame_period(Some(25.0), 10.0), Duration::from_millis(40));
        assert_eq!(frame_period(None, 10.0), Duration::from_millis(100));
        assert_eq!(
            frame_period(Some(f64::NAN), 5.0),
            Duration::from_millis(200)
        );
        assert_eq!(
            frame_period(Some(10_000.0), 5.0),
            Duration::from_secs_f64(1.0 / 120.0)
        );
    }
}
