//! The display buffer: every decoded frame as JPEG, for the last few seconds.
//!
//! Viewers are shown the picture `target_delay` seconds late so it lines up with the
//! commentary about it, so the buffer must reach back that far; older frames are dropped
//! on every push, which is what keeps memory flat over hours. One decode thread writes,
//! any number of HTTP viewers read; every critical section is a few pointer copies (JPEG
//! bytes are reference counted), so readers never hold up the decoder.

use std::collections::VecDeque;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use crate::{Jpeg, Stamp};

/// A frame as the buffer hands it out. `seq` grows by one per pushed frame, so a viewer can
/// tell a new frame from the one it already sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayFrame {
    pub seq: u64,
    pub stamp: Stamp,
    pub jpeg: Jpeg,
}

/// Time-bounded JPEG history of one source. Share it as `Arc<DisplayBuffer>`.
#[derive(Debug)]
pub struct DisplayBuffer {
    span: Duration,
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    frames: VecDeque<DisplayFrame>,
    /// Sum of the JPEG sizes held.
    bytes: usize,
    next_seq: u64,
}

/// Safety net against a source that floods frames (thousands a second): the span alone
/// would then let memory grow with the frame rate.
const MAX_FRAMES: usize = 4096;

/// `fps()` looks at this much recent history, so it follows rate changes quickly.
const FPS_WINDOW: Duration = Duration::from_secs(2);

impl DisplayBuffer {
    /// A buffer that keeps `span` of picture (see [`crate::DISPLAY_BUFFER_SECONDS`]).
    pub fn new(span: Duration) -> Self {
        Self {
            span,
            inner: RwLock::new(Inner::default()),
        }
    }

    /// How much picture the buffer keeps.
    pub fn span(&self) -> Duration {
        self.span
    }

    /// Adds the newest frame and drops those older than the span. Frames must come in
    /// capture order (one decode thread does that naturally). Returns the frame's `seq`.
    pub fn push(&self, stamp: Stamp, jpeg: Jpeg) -> u64 {
        let mut inner = self.write();
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.bytes += jpeg.bytes.len();
        inner.frames.push_back(DisplayFrame { seq, stamp, jpeg });
        while inner.frames.len() > 1 {
            let oldest = &inner.frames[0];
            let too_old = stamp
                .captured
                .saturating_duration_since(oldest.stamp.captured)
                > self.span;
            if !too_old && inner.frames.len() <= MAX_FRAMES {
                break;
            }
            if let Some(gone) = inner.frames.pop_front() {
                inner.bytes -= gone.jpeg.bytes.len();
            }
        }
        seq
    }

    /// The newest frame.
    pub fn latest(&self) -> Option<DisplayFrame> {
        self.read().frames.back().cloned()
    }

    /// The newest frame captured at or before `t`; the oldest frame when all are newer
    /// (a delay longer than the buffer shows the oldest picture, not nothing).
    pub fn at(&self, t: Instant) -> Option<DisplayFrame> {
        let inner = self.read();
        let after = inner.frames.partition_point(|f| f.stamp.captured <= t);
        inner.frames.get(after.saturating_sub(1)).cloned()
    }

    /// Every frame held that is newer than `seq` (all of them for `None`), oldest first:
    /// for a reader that wants each frame, not just the latest.
    pub fn since(&self, seq: Option<u64>) -> Vec<DisplayFrame> {
        let inner = self.read();
        let start = match seq {
            Some(seq) => inner.frames.partition_point(|f| f.seq <= seq),
            None => 0,
        };
        inner.frames.range(start..).cloned().collect()
    }

    /// `seq` of the newest frame, `None` while empty.
    pub fn seq(&self) -> Option<u64> {
        self.read().frames.back().map(|f| f.seq)
    }

    pub fn len(&self) -> usize {
        self.read().frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Memory held by the JPEGs, in bytes (the bookkeeping around them is a few dozen bytes
    /// a frame and not counted).
    pub fn bytes(&self) -> usize {
        self.read().bytes
    }

    /// Time from the oldest to the newest frame held.
    pub fn duration(&self) -> Duration {
        let inner = self.read();
        match (inner.frames.front(), inner.frames.back()) {
            (Some(a), Some(b)) => b.stamp.captured.saturating_duration_since(a.stamp.captured),
            _ => Duration::ZERO,
        }
    }

    /// Frames a second over the last two seconds of capture stamps; `None` until there are
    /// two frames with time between them.
    pub fn fps(&self) -> Option<f64> {
        let inner = self.read();
        let newest = inner.frames.back()?.stamp.captured;
        let mut count = 0usize;
        let mut oldest = newest;
        for f in inner.frames.iter().rev() {
            if newest.saturating_duration_since(f.stamp.captured) > FPS_WINDOW {
                break;
            }
            oldest = f.stamp.captured;
            count += 1;
        }
        let span = newest.saturating_duration_since(oldest).as_secs_f64();
        (count >= 2 && span > 0.0).then(|| (count - 1) as f64 / span)
    }

    /// Drops every frame (the `seq` keeps counting).
    pub fn clear(&self) {
        let mut inner = self.write();
        inner.frames.clear();
        inner.bytes = 0;
    }

    // A panic while holding the lock cannot leave the deque half-updated in a way that
    // matters to readers, so a poisoned lock is used as is rather than spreading the panic.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::Arc;

    fn jpeg(n: usize) -> Jpeg {
        Jpeg {
            width: 4,
            height: 4,
            bytes: Bytes::from(vec![0u8; n]),
        }
    }

    fn stamp(t0: Instant, ms: u64) -> Stamp {
        Stamp {
            pts: Duration::from_millis(ms),
            captured: t0 + Duration::from_millis(ms),
        }
    }

    #[test]
    fn empty_buffer() {
        let b = DisplayBuffer::new(Duration::from_secs(15));
        assert!(b.is_empty());
        assert_eq!(b.latest(), None);
        assert_eq!(b.at(Instant::now()), None);
        assert_eq!(b.seq(), None);
        assert_eq!(b.fps(), None);
        assert_eq!(b.bytes(), 0);
        assert_eq!(b.duration(), Duration::ZERO);
    }

    #[test]
    fn push_counts_seq_and_bytes() {
        let t0 = Instant::now();
        let b = DisplayBuffer::new(Duration::from_secs(15));
        assert_eq!(b.push(stamp(t0, 0), jpeg(100)), 0);
        assert_eq!(b.push(stamp(t0, 40), jpeg(50)), 1);
        assert_eq!(b.len(), 2);
        assert_eq!(b.bytes(), 150);
        let latest = b.latest().unwrap();
        assert_eq!(latest.seq, 1);
        assert_eq!(latest.stamp, stamp(t0, 40));
        assert_eq!(latest.jpeg.bytes.len(), 50);
        assert_eq!(b.seq(), Some(1));
    }

    #[test]
    fn bounded_by_span_over_a_long_run() {
        let t0 = Instant::now();
        let b = DisplayBuffer::new(Duration::from_secs(15));
        // One hour at 25 fps, pushed with fake stamps.
        for i in 0..(3600 * 25) {
            b.push(stamp(t0, i * 40), jpeg(1000));
            assert!(b.duration() <= Duration::from_secs(15));
        }
        // 15 s at 25 fps, plus the frame exactly at the edge.
        assert_eq!(b.len(), 15 * 25 + 1);
        assert_eq!(b.bytes(), b.len() * 1000);
        assert_eq!(b.duration(), Duration::from_secs(15));
        assert_eq!(b.latest().unwrap().seq, 3600 * 25 - 1);
    }

    #[test]
    fn frame_cap_bounds_a_flood() {
        let t0 = Instant::now();
        let b = DisplayBuffer::new(Duration::from_secs(15));
        for i in 0..10_000u64 {
            b.push(
                Stamp {
                    pts: Duration::ZERO,
                    captured: t0 + Duration::from_micros(i),
                },
                jpeg(1),
            );
        }
        assert_eq!(b.len(), MAX_FRAMES);
        assert_eq!(b.bytes(), MAX_FRAMES);
    }

    #[test]
    fn at_finds_newest_at_or_before() {
        let t0 = Instant::now();
        let b = DisplayBuffer::new(Duration::from_secs(15));
        for ms in [0, 100, 200, 300] {
            b.push(stamp(t0, ms), jpeg(10));
        }
        let at = |ms: u64| b.at(t0 + Duration::from_millis(ms)).unwrap().seq;
        assert_eq!(at(0), 0);
        assert_eq!(at(99), 0);
        assert_eq!(at(100), 1);
        assert_eq!(at(250), 2);
        assert_eq!(at(300), 3);
        assert_eq!(at(10_000), 3);
        // Before everything held: the oldest, not nothing.
        let b2 = DisplayBuffer::new(Duration::from_secs(15));
        b2.push(stamp(t0, 500), jpeg(10));
        assert_eq!(b2.at(t0).unwrap().seq, 0);
    }

    #[test]
    fn since_returns_newer_frames_in_order() {
        let t0 = Instant::now();
        let b = DisplayBuffer::new(Duration::from_millis(250));
        for ms in (0..=500).step_by(100) {
            b.push(stamp(t0, ms), jpeg(1));
        }
        // Frames 0..=2 fell out of the 250 ms span.
        let seqs = |v: Vec<DisplayFrame>| v.iter().map(|f| f.seq).collect::<Vec<_>>();
        assert_eq!(seqs(b.since(None)), vec![3, 4, 5]);
        assert_eq!(seqs(b.since(Some(0))), vec![3, 4, 5]);
        assert_eq!(seqs(b.since(Some(3))), vec![4, 5]);
        assert_eq!(seqs(b.since(Some(5))), Vec::<u64>::new());
        assert_eq!(seqs(b.since(Some(99))), Vec::<u64>::new());
    }

    #[test]
    fn fps_is_measured_from_recent_stamps() {
        let t0 = Instant::now();
        let b = DisplayBuffer::new(Duration::from_secs(15));
        b.push(stamp(t0, 0), jpeg(1));
        assert_eq!(b.fps(), None);
        // 10 s at 10 fps, then 3 s at 25 fps: the recent rate wins.
        let mut ms = 0;
        while ms < 10_000 {
            ms += 100;
            b.push(stamp(t0, ms), jpeg(1));
        }
        assert!((b.fps().unwrap() - 10.0).abs() < 0.01);
        let end = ms + 3000;
        while ms < end {
            ms += 40;
            b.push(stamp(t0, ms), jpeg(1));
        }
        assert!((b.fps().unwrap() - 25.0).abs() < 0.01, "{:?}", b.fps());
    }

    #[test]
    fn clear_keeps_counting() {
        let t0 = Instant::now();
        let b = DisplayBuffer::new(Duration::from_secs(1));
        b.push(stamp(t0, 0), jpeg(5));
        b.clear();
        assert!(b.is_empty());
        assert_eq!(b.bytes(), 0);
        assert_eq!(b.push(stamp(t0, 10), jpeg(5)), 1);
    }

    #[test]
    fn shared_between_a_writer_and_readers() {
        let t0 = Instant::now();
        let b = Arc::new(DisplayBuffer::new(Duration::from_secs(1)));
        let writer = {
            let b = Arc::clone(&b);
            std::thread::spawn(move || {
                for i in 0..2000 {
                    b.push(stamp(t0, i * 10), jpeg(10));
                }
            })
        };
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let b = Arc::clone(&b);
                std::thread::spawn(move || {
                    let mut last = None;
                    for _ in 0..2000 {
                        if let Some(f) = b.latest() {
                            // A reader never sees time go backwards.
                            assert!(last.is_none_or(|l| l <= f.seq));
                            last = Some(f.seq);
                        }
                    }
                })
            })
            .collect();
        writer.join().unwrap();
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(b.seq(), Some(1999));
        assert!(b.duration() <= Duration::from_secs(1));
    }
}
