//! The continuous speech stream's pacing: one 20 ms Opus frame per 20 ms of real time, the
//! scheduled clip's samples while one plays, silence otherwise. Plain time arithmetic (no
//! clock, no I/O): the encoder's task asks [`Pacer::poll`] with the time and either sleeps
//! until the returned deadline or encodes the returned frame.
//!
//! Frames are due on a fixed grid from the start (`started + 20 ms × k`), not 20 ms after
//! the previous one, so a late wake-up catches up instead of drifting: the stream keeps the
//! pace of the clock a listener plays it by.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kibitz_voice::OPUS_RATE;

/// One Opus frame: 20 ms.
pub const FRAME_TIME: Duration = Duration::from_millis(20);
/// Samples in one frame at 48 kHz.
pub const FRAME: usize = 960;

/// What the encoder does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Nothing is due before this time.
    Wait(Instant),
    /// Encode this frame now.
    Frame(FrameAudio),
}

/// One frame's audio.
#[derive(Debug, Clone, PartialEq)]
pub enum FrameAudio {
    Silence,
    /// Exactly [`FRAME`] samples at 48 kHz (a clip's end padded with silence).
    Samples(Vec<i16>),
}

/// One encoder's clock and the clips it has yet to play.
#[derive(Debug)]
pub struct Pacer {
    started: Instant,
    /// The next frame's number on the grid.
    next: u32,
    /// Clips to play, by start time, at 48 kHz.
    queue: VecDeque<(Instant, Arc<Vec<i16>>)>,
    /// The clip playing and how far into it.
    playing: Option<(Arc<Vec<i16>>, usize)>,
}

impl Pacer {
    /// A pacer whose first frame is due at `now`.
    pub fn new(now: Instant) -> Pacer {
        Pacer {
            started: now,
            next: 0,
            queue: VecDeque::new(),
            playing: None,
        }
    }

    /// Plays `samples` (48 kHz) from `start`. Clips come in the order they start (the
    /// speech timeline never overlaps them).
    pub fn schedule(&mut self, start: Instant, samples: Arc<Vec<i16>>) {
        self.queue.push_back((start, samples));
    }

    /// The next frame if it is due at `now`, else when it will be.
    pub fn poll(&mut self, now: Instant) -> Step {
        let slot = self.started + FRAME_TIME * self.next;
        if now < slot {
            return Step::Wait(slot);
        }
        self.next += 1;
        if self.playing.is_none() {
            self.playing = self.due(slot);
        }
        let Some((samples, at)) = self.playing.take() else {
            return Step::Frame(FrameAudio::Silence);
        };
        let end = (at + FRAME).min(samples.len());
        let mut chunk = samples[at..end].to_vec();
        chunk.resize(FRAME, 0);
        if end < samples.len() {
            self.playing = Some((samples, end));
        }
        Step::Frame(FrameAudio::Samples(chunk))
    }

    /// The clip whose start has come (or comes within the frame at `slot`), from the sample
    /// that is due now; one that was missed entirely (no reader then) is dropped.
    fn due(&mut self, slot: Instant) -> Option<(Arc<Vec<i16>>, usize)> {
        while let Some((start, samples)) = self.queue.front().cloned() {
            if start > slot + FRAME_TIME {
                return None;
            }
            self.queue.pop_front();
            let skip =
                (slot.saturating_duration_since(start).as_secs_f64() * OPUS_RATE as f64) as usize;
            if skip < samples.len() {
                return Some((samples, skip));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A clip whose samples say where they are: 1, 2, 3, …
    fn ramp(len: usize) -> Arc<Vec<i16>> {
        Arc::new((1..=len).map(|i| (i % 30_000) as i16).collect())
    }

    /// Runs the pacer like its task does, waking exactly at each deadline (or `lag` late),
    /// until `end`; returns each frame with the time it was due.
    fn drive(pacer: &mut Pacer, from: Instant, end: Instant, lag: Duration) -> Vec<FrameAudio> {
        let mut now = from;
        let mut frames = Vec::new();
        while now < end {
            match pacer.poll(now) {
                Step::Wait(at) => {
                    assert!(at > now, "a wait is for later");
                    now = at + lag;
                }
                Step::Frame(audio) => frames.push(audio),
            }
        }
        frames
    }

    #[test]
    fn silence_until_a_clip_then_its_samples_in_order() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(t0);
        // 2.5 frames of audio starting 100 ms in.
        pacer.schedule(t0 + ms(100), ramp(FRAME * 5 / 2));
        let frames = drive(&mut pacer, t0, t0 + ms(200), Duration::ZERO);
        assert_eq!(frames.len(), 10, "one frame per 20 ms");
        // The frame due at 80 ms covers 80–100 ms and takes the clip (it starts within it).
        assert!(frames[..4].iter().all(|f| *f == FrameAudio::Silence));
        let FrameAudio::Samples(a) = &frames[4] else {
            panic!("the clip plays")
        };
        assert_eq!(a[0], 1);
        let FrameAudio::Samples(c) = &frames[6] else {
            panic!("the clip's end plays")
        };
        assert_eq!(c[0] as usize, 2 * FRAME + 1);
        assert_eq!(c[FRAME / 2], 0, "padded with silence");
        assert_eq!(frames[7], FrameAudio::Silence);
    }

    #[test]
    fn a_clip_joined_late_starts_where_it_is_now_and_a_missed_one_is_dropped() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(t0);
        // Over before the first frame: dropped.
        pacer.schedule(t0 - ms(20), ramp(FRAME));
        // Started 10 ms before the first frame: joined 480 samples in.
        pacer.schedule(t0 - ms(10), ramp(FRAME * 4));
        let Step::Frame(FrameAudio::Samples(first)) = pacer.poll(t0) else {
            panic!("the first frame plays the second clip");
        };
        assert_eq!(first[0] as usize, FRAME / 2 + 1);
        let Step::Frame(FrameAudio::Samples(next)) = pacer.poll(t0 + ms(20)) else {
            panic!("and goes on with it");
        };
        assert_eq!(next[0] as usize, FRAME / 2 + FRAME + 1);
    }

    /// Two hours with a clip every few seconds and wake-ups up to 15 ms late: exactly one
    /// frame per 20 ms of time, never ahead of the clock, and every clip's samples go out
    /// whole and in order.
    #[test]
    fn hours_of_frames_keep_the_clock() {
        let t0 = Instant::now();
        let hours = Duration::from_secs(2 * 3600);
        let mut pacer = Pacer::new(t0);
        let mut seed = 0x9e37_79b9_u32;
        let mut random = |range: u32| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed % range
        };
        let mut clips = 0usize;
        let mut clip_samples = 0usize;
        // The ramp passes zero every 30 000 samples.
        let mut zeros = 0usize;
        let mut at = t0 + ms(500);
        while at + ms(10_000) < t0 + hours {
            // Shorter than 125 frames, where the ramp would start over at 1.
            let len = FRAME * (20 + random(100) as usize);
            pacer.schedule(at, ramp(len));
            clips += 1;
            clip_samples += len;
            zeros += len / 30_000;
            // The next one starts after this one ends, as the timeline guarantees.
            at += ms((len / 48) as u64 + 100 + u64::from(random(5000)));
        }
        let mut now = t0;
        let mut frames = 0u64;
        let mut audible = 0usize;
        let mut starts = 0usize;
        while now < t0 + hours {
            match pacer.poll(now) {
                Step::Wait(deadline) => now = deadline + ms(u64::from(random(16))),
                Step::Frame(audio) => {
                    frames += 1;
                    let due = t0 + FRAME_TIME * (frames as u32 - 1);
                    assert!(due <= now, "a frame is never made before its time");
                    assert!(now - due < ms(40), "the pacer catches up");
                    if let FrameAudio::Samples(s) = audio {
                        assert_eq!(s.len(), FRAME);
                        starts += usize::from(s[0] == 1);
                        audible += s.iter().filter(|&&v| v != 0).count();
                    }
                }
            }
        }
        assert_eq!(frames, (hours.as_millis() / 20) as u64);
        assert_eq!(starts, clips, "every clip starts from its first sample");
        assert_eq!(audible, clip_samples - zeros, "every sample plays once");
    }
}
