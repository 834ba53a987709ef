//! Where a worker step's time goes, for `/api/status` and `kibitz bench`.
//!
//! `llama_decode` only queues work on a GPU: the wait happens later, at the first logits
//! read (sampling) or the next input copy, so a profile without a synchronize books GPU time
//! as host time. With `LlamaConfig::profile_sync` the worker calls `llama_synchronize` after
//! each decode and the wait is booked as `sync_ms`, apart from the host's own work. That
//! costs the overlap of host and GPU work, so it is off by default and meant for the bench.
//!
//! Each step leaves one [`StepSample`]; the totals grow for the worker's life, and the
//! breakdown (p50 and mean per part) is taken over the samples of the last
//! [`RECENT`] (or since [`Steps::reset`], whichever is shorter), so a bench that reads it at
//! the end of a run at N streams sees N streams' steps.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

/// How far back the breakdown looks.
pub const RECENT: Duration = Duration::from_secs(30);

/// One step of the worker.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepSample {
    /// Vision encoding (the projector), host and GPU together (mtmd synchronizes).
    pub vision_ms: f64,
    /// Host time filling the embeddings and token batches.
    pub build_ms: f64,
    /// Time inside `llama_decode` calls (queueing the graph; all of it on the CPU backend).
    pub decode_ms: f64,
    /// Time waiting in `llama_synchronize` after the decodes (0 without `profile_sync`).
    pub sync_ms: f64,
    pub sampling_ms: f64,
    /// KV cells the sequences hold after the step (a shared system piece counted once).
    pub cells: u32,
    /// Tokens in the step's token batch, and of them the running answers' own.
    pub tokens: u32,
    pub answers: u32,
    /// Image-embedding rows in the step's embeddings batch.
    pub rows: u32,
    /// Frames vision-encoded in the step.
    pub images: u32,
    /// KV edits since the previous step: position shifts (`seq_add`), removals (`seq_rm`)
    /// and shared copies (`seq_cp`).
    pub shifts: u32,
    pub removes: u32,
    pub copies: u32,
}

/// What the worker's steps cost: totals since the start, and the recent breakdown.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StepProfile {
    /// Whether decodes are followed by a synchronize (`profile_sync`).
    pub synced: bool,
    pub steps: u64,
    pub vision_ms: f64,
    /// Image-embedding rows evaluated, and the time of their batches.
    pub image_rows: u64,
    pub image_decode_ms: f64,
    /// Tokens evaluated (answers' and prompt text), and the time of their batches.
    pub tokens: u64,
    /// Of `tokens`, the answers' own: one per running answer a step.
    pub answer_tokens: u64,
    pub token_decode_ms: f64,
    pub sampling_ms: f64,
    pub shifts: u64,
    pub removes: u64,
    pub copies: u64,
    /// p50 and mean per part over the recent steps; `None` before the first step.
    pub recent: Option<Breakdown>,
}

/// The median and the mean of one part over the recent steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stat {
    pub p50: f64,
    pub mean: f64,
}

impl Stat {
    fn of(mut values: Vec<f64>) -> Stat {
        if values.is_empty() {
            return Stat::default();
        }
        values.sort_by(f64::total_cmp);
        Stat {
            p50: values[values.len() / 2],
            mean: values.iter().sum::<f64>() / values.len() as f64,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Breakdown {
    /// Seconds the recent steps span, and how many there were.
    pub seconds: f64,
    pub steps: usize,
    pub steps_per_s: f64,
    pub step_ms: Stat,
    pub vision_ms: Stat,
    pub build_ms: Stat,
    pub decode_ms: Stat,
    pub sync_ms: Stat,
    pub sampling_ms: Stat,
    pub cells: Stat,
    pub tokens: Stat,
    pub answers: Stat,
    pub rows: Stat,
    pub images: Stat,
    pub shifts_per_s: f64,
    pub removes_per_s: f64,
    pub copies_per_s: f64,
}

/// The shared record: the worker adds, status and the bench read.
#[derive(Debug, Default)]
pub struct Steps {
    totals: StepProfile,
    recent: VecDeque<(Instant, f64, StepSample)>,
}

impl Steps {
    pub fn new(synced: bool) -> Steps {
        Steps {
            totals: StepProfile {
                synced,
                ..StepProfile::default()
            },
            recent: VecDeque::new(),
        }
    }

    /// Adds a step that ended at `now` and took `step_ms` in all.
    pub fn record(&mut self, now: Instant, step_ms: f64, s: StepSample, image_decode_ms: f64) {
        let t = &mut self.totals;
        t.steps += 1;
        t.vision_ms += s.vision_ms;
        t.image_rows += u64::from(s.rows);
        t.image_decode_ms += image_decode_ms;
        t.tokens += u64::from(s.tokens);
        t.answer_tokens += u64::from(s.answers);
        t.token_decode_ms += (s.build_ms + s.decode_ms + s.sync_ms - image_decode_ms).max(0.0);
        t.sampling_ms += s.sampling_ms;
        t.shifts += u64::from(s.shifts);
        t.removes += u64::from(s.removes);
        t.copies += u64::from(s.copies);
        while self
            .recent
            .front()
            .is_some_and(|(at, ..)| now.duration_since(*at) > RECENT)
        {
            self.recent.pop_front();
        }
        self.recent.push_back((now, step_ms, s));
    }

    /// Forgets everything so far (a bench calls it after its warm-up).
    pub fn reset(&mut self) {
        *self = Steps::new(self.totals.synced);
    }

    pub fn profile(&self, now: Instant) -> StepProfile {
        let mut p = self.totals.clone();
        p.recent = self.breakdown(now);
        p
    }

    fn breakdown(&self, now: Instant) -> Option<Breakdown> {
        let recent: Vec<&(Instant, f64, StepSample)> = self
            .recent
            .iter()
            .filter(|(at, ..)| now.duration_since(*at) <= RECENT)
            .collect();
        let (first, ..) = recent.first()?;
        let seconds = now.duration_since(*first).as_secs_f64().max(1e-3);
        let stat = |f: fn(&StepSample) -> f64| Stat::of(recent.iter().map(|r| f(&r.2)).collect());
        let per_s = |f: fn(&StepSample) -> u32| {
            recent.iter().map(|r| f64::from(f(&r.2))).sum::<f64>() / seconds
        };
        Some(Breakdown {
            seconds,
            steps: recent.len(),
            steps_per_s: recent.len() as f64 / seconds,
            step_ms: Stat::of(recent.iter().map(|r| r.1).collect()),
            vision_ms: stat(|s| s.vision_ms),
            build_ms: stat(|s| s.build_ms),
            decode_ms: stat(|s| s.decode_ms),
            sync_ms: stat(|s| s.sync_ms),
            sampling_ms: stat(|s| s.sampling_ms),
            cells: stat(|s| f64::from(s.cells)),
            tokens: stat(|s| f64::from(s.tokens)),
            answers: stat(|s| f64::from(s.answers)),
            rows: stat(|s| f64::from(s.rows)),
            images: stat(|s| f64::from(s.images)),
            shifts_per_s: per_s(|s| s.shifts),
            removes_per_s: per_s(|s| s.removes),
            copies_per_s: per_s(|s| s.copies),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breakdown_covers_the_recent_steps_only() {
        let mut steps = Steps::new(true);
        let t0 = Instant::now();
        let old = StepSample {
            decode_ms: 100.0,
            shifts: 50,
            ..StepSample::default()
        };
        steps.record(t0, 100.0, old, 0.0);
        let later = t0 + RECENT + Duration::from_secs(5);
        for i in 0..10 {
            let s = StepSample {
                decode_ms: f64::from(i),
                sync_ms: 2.0,
                shifts: 1,
                cells: 100 + i,
                ..StepSample::default()
            };
            steps.record(
                later + Duration::from_millis(100 * u64::from(i)),
                3.0,
                s,
                0.0,
            );
        }
        let now = later + Duration::from_secs(1);
        let p = steps.profile(now);
        assert_eq!(p.steps, 11, "totals keep every step");
        assert_eq!(p.shifts, 60);
        let b = p.recent.unwrap();
        assert_eq!(b.steps, 10, "the step older than RECENT is left out");
        assert_eq!(b.decode_ms.mean, 4.5);
        assert_eq!(b.decode_ms.p50, 5.0);
        assert_eq!(b.sync_ms.p50, 2.0);
        assert!((b.shifts_per_s - 10.0).abs() < 1e-9, "{b:?}");
        steps.reset();
        let p = steps.profile(now);
        assert!(p.synced && p.steps == 0 && p.recent.is_none());
    }
}
