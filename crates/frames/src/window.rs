//! The inference window: the last few seconds at a low frame rate, ready for the model.
//!
//! The commentary loop asks for a handful of frames spread over the recent past (newest
//! last, `stride` apart), so the model sees motion, not one still. Frames are resized when
//! they come in (twice a second), not when the loop asks, so a cycle starts without work.

use std::collections::VecDeque;
use std::sync::RwLock;
use std::time::Instant;

use crate::{Rgb, Stamp};

/// The newest `capacity` model-sized frames. Share it as `Arc<InferenceWindow>`.
#[derive(Debug)]
pub struct InferenceWindow {
    capacity: usize,
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    frames: VecDeque<(u64, Stamp, Rgb)>,
    next_seq: u64,
}

impl InferenceWindow {
    /// A window of `capacity` frames (see [`crate::WINDOW_SIZE`]); 0 counts as 1.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            inner: RwLock::new(Inner::default()),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Adds the newest frame, dropping the oldest beyond capacity. Returns its `seq`.
    pub fn push(&self, stamp: Stamp, rgb: Rgb) -> u64 {
        let mut inner = self.write();
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.frames.push_back((seq, stamp, rgb));
        while inner.frames.len() > self.capacity {
            inner.frames.pop_front();
        }
        seq
    }

    /// Up to `n` frames, oldest first, ending with the newest: newest, newest - stride,
    /// newest - 2 * stride, ... (fewer when the window does not reach back that far).
    /// A `stride` of 0 counts as 1.
    pub fn sample(&self, n: usize, stride: usize) -> Vec<(Stamp, Rgb)> {
        let stride = stride.max(1);
        let inner = self.read();
        let len = inner.frames.len();
        let mut out: Vec<_> = (0..n)
            .map_while(|k| len.checked_sub(1 + k * stride))
            .map(|i| {
                let (_, stamp, rgb) = &inner.frames[i];
                (*stamp, rgb.clone())
            })
            .collect();
        out.reverse();
        out
    }

    /// Like [`InferenceWindow::sample`], but on a fixed phase: the newest frame whose `seq`
    /// is a multiple of `stride`, and every `stride`-th before it. Consecutive samples then
    /// share their frames exactly (each frame of the set is new once), which is what lets an
    /// engine prepare every sampled frame once, as it arrives.
    pub fn sample_phased(&self, n: usize, stride: usize) -> Vec<(Stamp, Rgb)> {
        let stride = stride.max(1) as u64;
        let inner = self.read();
        let Some(newest) = inner
            .frames
            .iter()
            .rposition(|(seq, _, _)| seq % stride == 0)
        else {
            return Vec::new();
        };
        let stride = stride as usize;
        let mut out: Vec<_> = (0..n)
            .map_while(|k| newest.checked_sub(k * stride))
            .map(|i| {
                let (_, stamp, rgb) = &inner.frames[i];
                (*stamp, rgb.clone())
            })
            .collect();
        out.reverse();
        out
    }

    /// The frames newer than `seq` (all for `None`), oldest first, with their `seq`.
    pub fn since(&self, seq: Option<u64>) -> Vec<(u64, Stamp, Rgb)> {
        self.read()
            .frames
            .iter()
            .filter(|(s, _, _)| seq.is_none_or(|seq| *s > seq))
            .cloned()
            .collect()
    }

    /// The frame captured closest to `t` (either side).
    pub fn nearest(&self, t: Instant) -> Option<(Stamp, Rgb)> {
        let inner = self.read();
        let distance = |s: &Stamp| {
            if s.captured > t {
                s.captured - t
            } else {
                t - s.captured
            }
        };
        inner
            .frames
            .iter()
            .min_by_key(|(_, s, _)| distance(s))
            .map(|(_, s, rgb)| (*s, rgb.clone()))
    }

    /// The newest frame.
    pub fn latest(&self) -> Option<(Stamp, Rgb)> {
        self.read()
            .frames
            .back()
            .map(|(_, s, rgb)| (*s, rgb.clone()))
    }

    /// `seq` of the newest frame (grows by one per push), `None` while empty: the commentary
    /// loop compares it with the last cycle's to know whether anything new came in.
    pub fn seq(&self) -> Option<u64> {
        self.read().frames.back().map(|(seq, _, _)| *seq)
    }

    pub fn len(&self) -> usize {
        self.read().frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every frame (the `seq` keeps counting).
    pub fn clear(&self) {
        self.write().frames.clear();
    }

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
    use std::time::Duration;

    fn frame(t0: Instant, i: u64) -> (Stamp, Rgb) {
        let ms = i * 500;
        let stamp = Stamp {
            pts: Duration::from_millis(ms),
            captured: t0 + Duration::from_millis(ms),
        };
        (stamp, Rgb::new(1, 1, vec![i as u8, 0, 0]).unwrap())
    }

    fn filled(t0: Instant, count: u64, capacity: usize) -> InferenceWindow {
        let w = InferenceWindow::new(capacity);
        for i in 0..count {
            let (s, rgb) = frame(t0, i);
            w.push(s, rgb);
        }
        w
    }

    fn ids(v: &[(Stamp, Rgb)]) -> Vec<u8> {
        v.iter().map(|(_, rgb)| rgb.data[0]).collect()
    }

    #[test]
    fn keeps_the_newest_capacity_frames() {
        let t0 = Instant::now();
        let w = filled(t0, 40, 32);
        assert_eq!(w.len(), 32);
        assert_eq!(w.seq(), Some(39));
        assert_eq!(ids(&w.sample(32, 1)), (8..40).collect::<Vec<u8>>());
        assert_eq!(w.latest().unwrap().1.data[0], 39);
    }

    #[test]
    fn phased_samples_keep_to_every_stride_th_capture() {
        let t0 = Instant::now();
        // 20 frames (seq 0..=19): the newest even one is 18.
        let w = filled(t0, 20, 32);
        assert_eq!(ids(&w.sample_phased(4, 2)), vec![12, 14, 16, 18]);
        // One more capture (odd) changes nothing; the next even one moves the set by one.
        let (s, rgb) = frame(t0, 20);
        w.push(s, rgb);
        assert_eq!(ids(&w.sample_phased(4, 2)), vec![14, 16, 18, 20]);
        assert!(InferenceWindow::new(4).sample_phased(4, 2).is_empty());
        let since: Vec<u64> = w.since(Some(17)).iter().map(|(seq, _, _)| *seq).collect();
        assert_eq!(since, vec![18, 19, 20]);
    }

    #[test]
    fn sample_with_stride_newest_last() {
        let t0 = Instant::now();
        let w = filled(t0, 20, 32);
        assert_eq!(ids(&w.sample(4, 2)), vec![13, 15, 17, 19]);
        assert_eq!(ids(&w.sample(4, 1)), vec![16, 17, 18, 19]);
        assert_eq!(ids(&w.sample(1, 5)), vec![19]);
        // Stamps come with their frames, oldest first.
        let s = w.sample(3, 3);
        assert!(s.windows(2).all(|p| p[0].0.captured < p[1].0.captured));
    }

    #[test]
    fn sample_returns_fewer_when_short() {
        let t0 = Instant::now();
        let w = filled(t0, 5, 32);
        assert_eq!(ids(&w.sample(4, 2)), vec![0, 2, 4]);
        assert_eq!(ids(&w.sample(10, 1)), vec![0, 1, 2, 3, 4]);
        assert_eq!(ids(&w.sample(0, 1)), Vec::<u8>::new());
        assert_eq!(ids(&w.sample(2, 0)), vec![3, 4], "stride 0 acts as 1");
        assert!(InferenceWindow::new(4).sample(4, 2).is_empty());
    }

    #[test]
    fn nearest_either_side() {
        let t0 = Instant::now();
        let w = filled(t0, 10, 32); // frames every 500 ms
        let near = |ms: u64| w.nearest(t0 + Duration::from_millis(ms)).unwrap().1.data[0];
        assert_eq!(near(0), 0);
        assert_eq!(near(240), 0);
        assert_eq!(near(260), 1);
        assert_eq!(near(1900), 4);
        assert_eq!(near(60_000), 9);
        assert!(InferenceWindow::new(4).nearest(t0).is_none());
    }

    #[test]
    fn seq_tells_new_frames_apart_and_survives_clear() {
        let t0 = Instant::now();
        let w = InferenceWindow::new(0);
        assert_eq!(w.capacity(), 1);
        assert_eq!(w.seq(), None);
        let (s, rgb) = frame(t0, 0);
        assert_eq!(w.push(s, rgb.clone()), 0);
        let seen = w.seq();
        assert_eq!(w.seq(), seen, "no new frame, same seq");
        assert_eq!(w.push(s, rgb.clone()), 1);
        assert_ne!(w.seq(), seen);
        w.clear();
        assert!(w.is_empty());
        assert_eq!(w.push(s, rgb), 2);
    }
}
