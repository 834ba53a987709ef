//! The time rules of a source, kept free of clocks and FFmpeg so tests can drive them with
//! fake time (`now` is always a parameter):
//!
//! - [`MediaClock`]: turns a stream's raw timestamps into one media time that only grows,
//!   across file loops, reconnects and timestamp jumps.
//! - [`Pacer`]: when to show each frame, so a file plays at its native rate and a bursty
//!   live source (HLS segments, a TCP backlog) is smoothed instead of fast-forwarded.
//! - [`Capture`]: which frames go to the model, at `CAPTURE_FPS`.
//! - [`Backoff`]: how long to wait before reopening a live source.

use std::time::{Duration, Instant};

/// A jump in raw timestamps larger than this starts a new segment of media time rather
/// than being played out (e.g. an MPEG-TS timestamp wrap or a camera restart).
const MAX_JUMP: Duration = Duration::from_secs(10);

/// Continuous media time for one source.
#[derive(Debug)]
pub(crate) struct MediaClock {
    /// Media time at which the current segment started.
    base: Duration,
    /// Raw time (seconds) of the first frame of the current segment.
    first: Option<f64>,
    last: Option<Duration>,
    /// Spacing assumed between segments and for frames without a timestamp.
    frame: Duration,
}

impl MediaClock {
    pub(crate) fn new(frame: Duration) -> Self {
        Self {
            base: Duration::ZERO,
            first: None,
            last: None,
            frame,
        }
    }

    pub(crate) fn set_frame_duration(&mut self, frame: Duration) {
        if !frame.is_zero() {
            self.frame = frame;
        }
    }

    /// The next segment (a new loop of a file, a new connection) continues one frame after
    /// the last frame so far.
    pub(crate) fn new_segment(&mut self) {
        self.first = None;
        self.base = self.last.map_or(Duration::ZERO, |l| l + self.frame);
    }

    /// Media time of a frame whose raw timestamp is `raw` seconds (`None` when the stream
    /// has none: one frame after the previous).
    pub(crate) fn map(&mut self, raw: Option<f64>) -> Duration {
        let Some(raw) = raw.filter(|r| r.is_finite()) else {
            let t = self.last.map_or(self.base, |l| l + self.frame);
            self.last = Some(t);
            return t;
        };
        let first = *self.first.get_or_insert(raw);
        let offset = raw - first;
        let mut t = if offset >= 0.0 {
            Some(self.base + Duration::from_secs_f64(offset))
        } else {
            None
        };
        if let (Some(last), Some(cand)) = (self.last, t) {
            if cand > last + MAX_JUMP {
                t = None;
            } else if cand < last {
                // A small step back (a sloppy muxer) is held at the last time; a big one is a
                // restart of the source's clock.
                t = (last - cand < Duration::from_secs(1)).then_some(last);
            }
        }
        let t = t.unwrap_or_else(|| {
            self.new_segment();
            self.first = Some(raw);
            self.base
        });
        self.last = Some(t);
        t
    }
}

/// Frames that arrive this late are shown at once and the schedule restarts from them,
/// rather than rushing through a backlog.
const LATE: Duration = Duration::from_millis(500);
/// A frame due further ahead than this means the timestamps jumped: restart the schedule.
/// Large enough to smooth an HLS segment that arrives in one burst.
const MAX_HOLD: Duration = Duration::from_secs(10);
/// A live source whose frames all waited at least this long over a [`DRIFT_WINDOW`] is
/// running behind real time for no reason (a backlog after a stall, a fast camera clock):
/// the schedule is moved up to catch up.
const DRIFT_SLACK: Duration = Duration::from_millis(500);
const DRIFT_WINDOW: Duration = Duration::from_secs(10);

/// Maps media time to wall time: frame `pts` is shown at `anchor + (pts - anchor_pts)`.
#[derive(Debug)]
pub(crate) struct Pacer {
    anchor: Option<(Instant, Duration)>,
    live: bool,
    /// Smallest wait seen since `window_start` (live drift correction).
    min_hold: Duration,
    window_start: Option<Instant>,
}

impl Pacer {
    pub(crate) fn new(live: bool) -> Self {
        Self {
            anchor: None,
            live,
            min_hold: Duration::MAX,
            window_start: None,
        }
    }

    /// Forget the schedule: the next frame is shown at once (after a reconnect).
    pub(crate) fn reset(&mut self) {
        self.anchor = None;
        self.window_start = None;
        self.min_hold = Duration::MAX;
    }

    /// When to show the frame at media time `pts` that is ready at `now`. Never earlier
    /// than `now`.
    pub(crate) fn due(&mut self, pts: Duration, now: Instant) -> Instant {
        let Some((t0, p0)) = self.anchor else {
            return self.restart(pts, now);
        };
        let Some(due) = pts.checked_sub(p0).map(|d| t0 + d) else {
            return self.restart(pts, now);
        };
        if now > due + LATE || due > now + MAX_HOLD {
            return self.restart(pts, now);
        }
        if self.live {
            self.watch_drift(due, now);
        }
        due.max(now)
    }

    fn restart(&mut self, pts: Duration, now: Instant) -> Instant {
        self.anchor = Some((now, pts));
        self.window_start = Some(now);
        self.min_hold = Duration::MAX;
        now
    }

    fn watch_drift(&mut self, due: Instant, now: Instant) {
        self.min_hold = self.min_hold.min(due.saturating_duration_since(now));
        let start = *self.window_start.get_or_insert(now);
        if now.saturating_duration_since(start) < DRIFT_WINDOW {
            return;
        }
        if self.min_hold >= DRIFT_SLACK {
            // Keep a little slack for jitter; drop the rest of the delay.
            let catch_up = self.min_hold - Duration::from_millis(100);
            if let Some((t0, _)) = self.anchor.as_mut() {
                *t0 = t0.checked_sub(catch_up).unwrap_or(*t0);
            }
        }
        self.window_start = Some(now);
        self.min_hold = Duration::MAX;
    }
}

/// Picks frames for the model at a fixed rate, by capture time.
#[derive(Debug)]
pub(crate) struct Capture {
    period: Duration,
    next: Option<Instant>,
}

impl Capture {
    /// `fps` of 0 or less (or not a number) takes no frames.
    pub(crate) fn new(fps: f64) -> Self {
        let period = if fps.is_finite() && fps > 0.0 {
            Duration::from_secs_f64(1.0 / fps)
        } else {
            Duration::MAX
        };
        Self { period, next: None }
    }

    /// Whether the frame shown at `t` should go to the model.
    pub(crate) fn take(&mut self, t: Instant) -> bool {
        if self.period == Duration::MAX {
            return false;
        }
        match self.next {
            Some(next) if t < next => false,
            Some(next) => {
                // Keep to the grid so the average rate is exact, but never take two frames
                // less than half a period apart; after a gap (a stall, a reconnect) start a
                // new grid rather than catching up with a burst.
                let after = next + self.period;
                self.next = Some(if t >= after {
                    t + self.period
                } else {
                    after.max(t + self.period / 2)
                });
                true
            }
            None => {
                self.next = Some(t + self.period);
                true
            }
        }
    }
}

/// Reconnect delays: 1 s, doubling, at most 30 s.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    attempt: u32,
}

pub(crate) const BACKOFF_START: Duration = Duration::from_secs(1);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Backoff {
    pub(crate) fn new() -> Self {
        Self {
            next: BACKOFF_START,
            attempt: 0,
        }
    }

    /// The attempt number and the wait before it.
    pub(crate) fn next(&mut self) -> (u32, Duration) {
        let wait = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        self.attempt += 1;
        (self.attempt, wait)
    }

    /// The source delivered: the next drop starts again at 1 s.
    pub(crate) fn reset(&mut self) {
        *self = Self::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn media_clock_starts_at_zero_and_follows_raw() {
        let mut c = MediaClock::new(40 * MS);
        assert_eq!(c.map(Some(10.0)), Duration::ZERO);
        assert_eq!(c.map(Some(10.04)), 40 * MS);
        assert_eq!(c.map(Some(10.5)), 500 * MS);
    }

    #[test]
    fn media_clock_continues_across_loops() {
        let mut c = MediaClock::new(40 * MS);
        let mut last = Duration::ZERO;
        for _loop in 0..3 {
            c.new_segment();
            for i in 0..25 {
                let t = c.map(Some(f64::from(i) * 0.04));
                assert!(t >= last);
                last = t;
            }
        }
        // Three loops of 25 frames, 40 ms apart, no gap at the seams.
        assert_eq!(last, 74 * 40 * MS);
    }

    #[test]
    fn media_clock_handles_jumps_and_missing_stamps() {
        let mut c = MediaClock::new(40 * MS);
        assert_eq!(c.map(Some(0.0)), Duration::ZERO);
        assert_eq!(c.map(None), 40 * MS);
        assert_eq!(c.map(Some(0.08)), 80 * MS);
        // Far forward: a new segment one frame on.
        assert_eq!(c.map(Some(100.0)), 120 * MS);
        assert_eq!(c.map(Some(100.04)), 160 * MS);
        // Slightly back: held.
        assert_eq!(c.map(Some(100.03)), 160 * MS);
        // Far back (clock restarted): new segment.
        assert_eq!(c.map(Some(5.0)), 200 * MS);
        assert_eq!(c.map(Some(f64::NAN)), 240 * MS);
    }

    #[test]
    fn pacer_plays_at_native_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(false);
        // Frames decoded instantly: each is due 40 ms after the previous.
        assert_eq!(p.due(Duration::ZERO, t0), t0);
        assert_eq!(p.due(40 * MS, t0), t0 + 40 * MS);
        assert_eq!(p.due(80 * MS, t0 + 10 * MS), t0 + 80 * MS);
        // A frame ready after its time (decoder a bit slow) is shown at once...
        assert_eq!(p.due(120 * MS, t0 + 200 * MS), t0 + 200 * MS);
        // ...and the schedule holds, so the next one is back on time.
        assert_eq!(p.due(160 * MS, t0 + 150 * MS), t0 + 160 * MS);
    }

    #[test]
    fn pacer_restarts_when_far_behind_or_ahead() {
        let t0 = Instant::now();
        let mut p = Pacer::new(false);
        p.due(Duration::ZERO, t0);
        // Two seconds late: shown now, and later frames follow from here.
        let late = t0 + 2040 * MS;
        assert_eq!(p.due(40 * MS, late), late);
        assert_eq!(p.due(80 * MS, late), late + 40 * MS);
        // A jump of a minute ahead: not waited for.
        assert_eq!(p.due(60_000 * MS, late), late);
        // Going backwards: restart too.
        assert_eq!(p.due(Duration::ZERO, late + MS), late + MS);
    }

    #[test]
    fn pacer_smooths_a_burst() {
        let t0 = Instant::now();
        let mut p = Pacer::new(true);
        // A 6 s HLS segment arrives all at once: frames spread over 6 s.
        for i in 0..150u32 {
            assert_eq!(p.due(i * 40 * MS, t0), t0 + i * 40 * MS);
        }
    }

    #[test]
    fn pacer_live_catches_up_on_lasting_delay() {
        let t0 = Instant::now();
        let mut p = Pacer::new(true);
        p.due(Duration::ZERO, t0);
        // From now on every frame arrives 2 s before it is due (a backlog we are not
        // working off): after the drift window the schedule moves up.
        let mut held = Vec::new();
        for i in 1..=800u32 {
            let pts = i * 40 * MS;
            let now = t0 + pts - Duration::from_secs(2).min(pts);
            let due = p.due(pts, now);
            held.push(due - now);
        }
        assert_eq!(held[100], Duration::from_secs(2));
        assert!(
            *held.last().unwrap() <= 200 * MS,
            "caught up: {:?}",
            held.last()
        );
    }

    #[test]
    fn pacer_file_does_not_drift_correct() {
        let t0 = Instant::now();
        let mut p = Pacer::new(false);
        // A file decodes far ahead; every frame waits its full time and keeps it.
        for i in 0..1000u32 {
            assert_eq!(p.due(i * 40 * MS, t0 + i * 30 * MS), t0 + i * 40 * MS);
        }
    }

    #[test]
    fn capture_keeps_the_rate_of_a_faster_stream() {
        let t0 = Instant::now();
        let mut c = Capture::new(2.0);
        // 25 fps for 10 s: 20 frames taken, evenly.
        let taken: Vec<u32> = (0..250u32).filter(|i| c.take(t0 + i * 40 * MS)).collect();
        assert_eq!(taken.len(), 20);
        assert!(
            taken.windows(2).all(|w| (12..=13).contains(&(w[1] - w[0]))),
            "{taken:?}"
        );
    }

    #[test]
    fn capture_late_frames_stay_apart() {
        let t0 = Instant::now();
        let mut c = Capture::new(2.0);
        assert!(c.take(t0));
        // The frame after the due time comes 490 ms late (a slow decoder); the one 10 ms
        // later is not taken: the next is half a period on, then the grid goes on from there.
        assert!(c.take(t0 + 990 * MS));
        assert!(!c.take(t0 + 1000 * MS));
        assert!(!c.take(t0 + 1200 * MS));
        assert!(c.take(t0 + 1240 * MS));
        assert!(!c.take(t0 + 1500 * MS));
        assert!(c.take(t0 + 1740 * MS));
    }

    #[test]
    fn capture_after_a_gap_does_not_burst() {
        let t0 = Instant::now();
        let mut c = Capture::new(2.0);
        assert!(c.take(t0));
        // Ten seconds of nothing, then 25 fps again: one frame now, the next 500 ms later.
        let back = t0 + Duration::from_secs(10);
        let taken: Vec<u32> = (0..25u32).filter(|i| c.take(back + i * 40 * MS)).collect();
        assert_eq!(taken, vec![0, 13]);
    }

    #[test]
    fn capture_slower_stream_takes_every_frame_and_zero_fps_none() {
        let t0 = Instant::now();
        let mut c = Capture::new(2.0);
        assert!((0..10u32).all(|i| c.take(t0 + i * Duration::from_secs(1))));
        let mut off = Capture::new(0.0);
        assert!(!(0..10u32).any(|i| off.take(t0 + i * 100 * MS)));
    }

    #[test]
    fn backoff_doubles_to_thirty_and_resets() {
        let mut b = Backoff::new();
        let waits: Vec<u64> = (0..8).map(|_| b.next().1.as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(b.next().0, 9);
        b.reset();
        assert_eq!(b.next(), (1, Duration::from_secs(1)));
    }
}
