//! When a spoken comment plays: plain time arithmetic, no clock and no I/O (the str0m
//! shape), so the rules below are tested over hours of fake time and the speaker's loop
//! only moves data.
//!
//! A comment talks about the newest frame of its cycle; it is spoken when the delayed
//! picture shows that frame: `play_at = captured + target_delay`. An answer to a question is
//! about now and is spoken as soon as it can be. Speech never overlaps: a clip whose turn
//! comes while the voice still speaks starts when it ends, and one that would then start
//! more than [`MAX_LATE`] after its picture is shown but not spoken (it would talk about
//! something already gone). The commentary loop is told how long the voice is busy
//! ([`Placement::Play::until`], sent as `Control::SpeakingUntil`), so its next answer is
//! ready about when the speech ends instead of piling up.

use std::time::{Duration, Instant};

/// A comment that could start this much after its picture is shown only, not spoken.
pub const MAX_LATE: Duration = Duration::from_millis(1500);

/// The soonest a clip may start after it is ready: time for a page to fetch and decode it.
pub const DELIVERY: Duration = Duration::from_millis(150);

/// What a clip talks about, which decides when it should play.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum About {
    /// A cycle's comment, about its newest frame, captured `latency` before the answer
    /// ended: it plays when the delayed picture shows that frame.
    Picture { latency: Duration },
    /// An answer to a question: about now, played as soon as it can be.
    Now,
}

/// One synthesized clip to place on the timeline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clip {
    /// When the text was complete (synthesis started).
    pub answered: Instant,
    /// When its audio was ready.
    pub ready: Instant,
    /// How long it speaks.
    pub duration: Duration,
    pub about: About,
}

impl Clip {
    /// What the sync delay must cover for comments on pictures: from the end of the answer
    /// to its first audio, and a page's fetch of the clip; so in steady state speech starts
    /// with its picture, not after it (sent as `Control::AddSpeechLatency`). `None` for
    /// answers, which have no picture to keep up with.
    pub fn delay_needed(&self) -> Option<Duration> {
        match self.about {
            About::Picture { .. } => {
                Some(self.ready.saturating_duration_since(self.answered) + DELIVERY)
            }
            About::Now => None,
        }
    }

    /// When it should start, given how late the picture is shown.
    fn play_at(&self, delay: Duration) -> Instant {
        match self.about {
            About::Picture { latency } => {
                let captured = self.answered.checked_sub(latency).unwrap_or(self.answered);
                captured + delay
            }
            About::Now => self.ready,
        }
    }
}

/// What to do with a clip.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Placement {
    /// Speak it from `start`; the voice is busy until `until`. `late` is how far after its
    /// picture it starts (zero when on time).
    Play {
        start: Instant,
        until: Instant,
        late: Duration,
    },
    /// Its turn would come `late` after its picture: show the comment, do not speak it.
    TooLate { late: Duration },
}

/// One stream's voice over time: until when it is busy.
#[derive(Debug, Clone, Default)]
pub struct SpeechTimeline {
    busy_until: Option<Instant>,
}

impl SpeechTimeline {
    /// Places `clip` when the picture is shown `delay` late: after its picture's time, after
    /// a page could fetch it, after whatever is still being spoken; or not at all when that
    /// is more than [`MAX_LATE`] after its picture.
    pub fn place(&mut self, clip: &Clip, delay: Duration) -> Placement {
        let play_at = clip.play_at(delay);
        let start = [
            play_at,
            clip.ready + DELIVERY,
            self.busy_until.unwrap_or(play_at),
        ]
        .into_iter()
        .max()
        .expect("three times");
        let late = start.saturating_duration_since(play_at);
        if late > MAX_LATE {
            return Placement::TooLate { late };
        }
        let until = start + clip.duration;
        self.busy_until = Some(until);
        Placement::Play { start, until, late }
    }

    /// Until when the voice is busy, if it has spoken at all.
    pub fn busy_until(&self) -> Option<Instant> {
        self.busy_until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn comment(answered: Instant, synth: Duration, latency: Duration, len: Duration) -> Clip {
        Clip {
            answered,
            ready: answered + synth,
            duration: len,
            about: About::Picture { latency },
        }
    }

    #[test]
    fn a_comment_plays_with_its_picture() {
        let t0 = Instant::now();
        let mut timeline = SpeechTimeline::default();
        // Captured at t0, answered 2 s later, ready 0.3 s after that; shown 4 s late.
        let clip = comment(t0 + ms(2000), ms(300), ms(2000), ms(1000));
        assert_eq!(
            timeline.place(&clip, ms(4000)),
            Placement::Play {
                start: t0 + ms(4000),
                until: t0 + ms(5000),
                late: Duration::ZERO
            }
        );
        assert_eq!(clip.delay_needed(), Some(ms(300) + DELIVERY));
    }

    #[test]
    fn clips_never_overlap_and_too_late_ones_are_dropped() {
        let t0 = Instant::now();
        let mut timeline = SpeechTimeline::default();
        let long = comment(t0, ms(100), Duration::ZERO, ms(3000));
        let Placement::Play { until, .. } = timeline.place(&long, ms(1000)) else {
            panic!("the first clip plays");
        };
        // Its picture comes 0.5 s into the first clip: it waits 2.5 s, too long.
        let second = comment(t0 + ms(500), ms(100), Duration::ZERO, ms(1000));
        assert_eq!(
            timeline.place(&second, ms(1000)),
            Placement::TooLate { late: ms(2500) }
        );
        // One whose picture comes 1 s before the first ends waits 1 s and plays.
        let third = comment(t0 + ms(2000), ms(100), Duration::ZERO, ms(1000));
        assert_eq!(
            timeline.place(&third, ms(1000)),
            Placement::Play {
                start: until,
                until: until + ms(1000),
                late: ms(1000)
            }
        );
    }

    #[test]
    fn an_answer_plays_as_soon_as_a_page_can_fetch_it() {
        let t0 = Instant::now();
        let mut timeline = SpeechTimeline::default();
        let answer = Clip {
            answered: t0,
            ready: t0 + ms(200),
            duration: ms(800),
            about: About::Now,
        };
        assert_eq!(answer.delay_needed(), None);
        assert_eq!(
            timeline.place(&answer, ms(9000)),
            Placement::Play {
                start: t0 + ms(200) + DELIVERY,
                until: t0 + ms(200) + DELIVERY + ms(800),
                late: DELIVERY
            }
        );
    }

    /// Three hours of commentary with uneven latencies, synthesis times and lengths, and a
    /// delay that follows what speech needs (as the sync delay does): every spoken clip
    /// starts at or after its picture and after the last one ended, never more than
    /// `MAX_LATE` late; every dropped one was more than `MAX_LATE` late; and with a delay
    /// that covers the voice, nearly all are spoken on time.
    #[test]
    fn hours_of_commentary_keep_every_rule() {
        let t0 = Instant::now();
        let mut timeline = SpeechTimeline::default();
        let mut seed = 0x2545_f491_u32;
        let mut random = |range: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            u64::from(seed) % range
        };
        let mut delay = ms(1500);
        let mut now = t0;
        let (mut spoken, mut dropped, mut on_time) = (0u32, 0u32, 0u32);
        let mut last_until: Option<Instant> = None;
        while now < t0 + Duration::from_secs(3 * 3600) {
            // A cycle every 1.5–4.5 s; the voice takes 1–4 s to say it.
            now += ms(1500 + random(3000));
            let clip = comment(
                now,
                ms(50 + random(400)),
                ms(300 + random(1500)),
                ms(1000 + random(3000)),
            );
            let need = clip.delay_needed().unwrap() + ms(1800);
            delay = delay.max(need);
            let play_at = match clip.about {
                About::Picture { latency } => clip.answered - latency + delay,
                About::Now => unreachable!(),
            };
            match timeline.place(&clip, delay) {
                Placement::Play { start, until, late } => {
                    spoken += 1;
                    assert!(start >= play_at && start >= clip.ready + DELIVERY);
                    assert!(last_until.is_none_or(|t| start >= t), "overlap");
                    assert_eq!(late, start - play_at);
                    assert!(late <= MAX_LATE);
                    assert_eq!(until, start + clip.duration);
                    on_time += u32::from(late.is_zero());
                    last_until = Some(until);
                }
                Placement::TooLate { late } => {
                    dropped += 1;
                    assert!(late > MAX_LATE);
                    assert_eq!(
                        timeline.busy_until(),
                        last_until,
                        "a dropped clip holds nothing"
                    );
                }
            }
        }
        assert!(spoken > 2000, "{spoken} spoken, {dropped} dropped");
        assert!(dropped > 0, "clips longer than the gaps must lose some");
        assert!(on_time * 2 > spoken, "{on_time} of {spoken} on time");
    }
}
