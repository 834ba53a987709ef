//! KV reconciliation: which frames a sequence keeps, what is removed, and what shifts.
//!
//! Pure functions over a [`Layout`] (where a sequence's pieces lie) that return the KV edits
//! to make and the layout after them; the worker applies the edits to llama.cpp. A sequence
//! between requests is `[system][gap][frame]…[frame]`: the system piece at 0, then its
//! frames one after another from `frames_from`. With [`Shifts::Eager`] (the old way) the
//! gap is always empty: a frame leaving the window is removed and every later position
//! shifted down at once (one `llama_memory_seq_add`, which re-rotates those keys). With
//! [`Shifts::AtLimit`] a leaving frame is only removed, leaving a gap after the system
//! piece; the frames are moved down in one shift (compaction) only when the sequence would
//! otherwise pass its position limit. Attention does not care about the gap (RoPE sees
//! relative positions; the frames keep theirs among themselves and to the question), and
//! llama.cpp requires only that new positions follow the sequence's largest one.

use std::ops::Range;

use std::time::{Duration, Instant};

use super::super::sampling::Sampler;

use super::super::ffi::Token;
use super::super::{content_key, frame_key, ms, question_piece, system_piece};
use super::sequence::{Gen, Input, Prepared};
use super::vision::prepare;
use super::{Job, Worker};
use crate::{EngineError, Request, Stats};

/// A request matched against its stream's sequence (see `Worker::match_request`).
struct Matched {
    system_tokens: Vec<Token>,
    question: Vec<Token>,
    same_system: bool,
    /// The run of the sequence's frames it keeps: `first..first + kept`.
    first: usize,
    kept: usize,
    kept_pos: i32,
    kept_image_tokens: u32,
    /// The request's frames after the run, prepared.
    fresh: Vec<Prepared>,
    sys_len: i32,
    /// Positions of all its frames, and of its whole prompt without gaps.
    frames_pos: i32,
    needed: i32,
}

impl Worker {
    /// Reconciles the stream's sequence with the request's frames and queues the rest:
    /// the frames it lacks, its question, and its answer's start.
    pub(super) fn start(&mut self, stream: u64, serial: u64, job: Job) -> Result<(), EngineError> {
        let started = Instant::now();
        let request = &job.request;
        let Matched {
            system_tokens,
            question,
            same_system,
            first,
            kept,
            kept_pos,
            kept_image_tokens,
            fresh,
            sys_len,
            frames_pos,
            needed,
        } = self.match_request(stream, request)?;
        let rebuilt = self.keep_frames(stream, same_system, first..first + kept)?;
        let copied = self.seqs[&stream].system.is_none()
            && self.copy_system(stream, &request.system, sys_len);
        let limit = self.position_limit();
        let (shifts, seq_ctx) = (self.shifts, self.seq_ctx);
        let seq = self.seqs.get_mut(&stream).unwrap();
        seq.last_used = started;
        seq.window = seq.window.max(request.frames.len());
        let cached = match (&seq.system, rebuilt) {
            (None, _) => 0,
            (Some(_), _) if copied => seq.sys_len,
            (Some(_), true) => seq.sys_len,
            (Some(_), false) => seq.sys_len + kept_pos,
        };
        if seq.system.is_none() {
            seq.system = Some(request.system.clone());
            seq.sys_len = sys_len;
            seq.frames_from = sys_len;
            seq.queue.push_back(Input::Text {
                tokens: system_tokens,
                logits: false,
                ends_frame: false,
            });
        }
        let question_len = question.len() as i32;
        // The answer's room, in cells and then in positions: close the gaps if the fresh
        // frames, the question and the answer would pass the position limit.
        let room = (seq_ctx - needed).max(0);
        let answer = (job.request.max_tokens as i32).min(room);
        let fresh_pos: i32 = fresh.iter().map(|p| p.n_pos).sum();
        let extra = fresh_pos + question_len + answer;
        if let Some(plan) = make_room(&seq.layout(), extra, shifts) {
            let all = 0..seq.frames.len();
            seq.apply(&mut self.ctx, plan, all);
        }
        let reused = kept as u32 + fresh.iter().map(|p| p.reused).sum::<u32>();
        let image_tokens = kept_image_tokens + fresh.iter().map(|p| p.image_tokens).sum::<u32>();
        let last_pts = request.frames.last().map(|f| f.pts);
        for prepared in fresh {
            seq.append(prepared);
        }
        // Pushed frames this request already covers are not needed any more.
        seq.pending
            .retain(|p| last_pts.is_some_and(|last| p.frame.pts > last));
        let tail_from = seq.frame_start(seq.frames.len());
        debug_assert_eq!(tail_from, seq.frames_from + frames_pos);
        seq.queue.push_back(Input::Text {
            tokens: question,
            logits: true,
            ends_frame: false,
        });
        let budget = answer.min(limit - tail_from - question_len).max(0) as u32;
        seq.generation = Some(Gen {
            ignore_eos: job.request.ignore_eos,
            submitted: job.submitted,
            started,
            sampler: Sampler::new(&job.request.sampling),
            stats: Stats {
                queue_ms: ms(started - job.submitted),
                images: job.request.frames.len() as u32,
                image_tokens,
                reused_images: reused,
                prompt_tokens: (sys_len + frames_pos + question_len) as u32,
                cached_tokens: cached as u32,
                ..Stats::default()
            },
            vision: Duration::ZERO,
            tail_from,
            budget,
            next: None,
            decode_started: None,
            first_token_at: None,
            bytes: Vec::new(),
            outbox: String::new(),
            priority: job.priority,
            serial,
            probe: job.probe,
            tx: job.tx,
        });
        Ok(())
    }

    /// What the stream's sequence keeps for `request` (the system prompt if unchanged, then
    /// the longest run of its frames that the request's frames start with) and what it lacks
    /// (prepared); refuses a prompt that can't fit a sequence's cells.
    fn match_request(&mut self, stream: u64, request: &Request) -> Result<Matched, EngineError> {
        let keys: Vec<String> = request
            .frames
            .iter()
            .map(|f| frame_key(f.pts, &content_key(&f.image)))
            .collect();
        let system_tokens = self.model.tokenize(&system_piece(&request.system), true);
        let question = self.model.tokenize(&question_piece(&request.user), false);
        let seq = &self.seqs[&stream];
        let same_system = seq.system.as_deref() == Some(request.system.as_str());
        let (first, kept) = if same_system {
            let held: Vec<&str> = seq.frames.iter().map(|f| f.key.as_str()).collect();
            let wanted: Vec<&str> = keys.iter().map(String::as_str).collect();
            matching_run(&held, &wanted)
        } else {
            (seq.frames.len(), 0)
        };
        let kept_frames = &seq.frames[first..first + kept];
        let kept_pos: i32 = kept_frames.iter().map(|f| f.n_pos).sum();
        let kept_image_tokens: u32 = kept_frames.iter().map(|f| f.image_tokens).sum();
        let fresh = request.frames[kept..]
            .iter()
            .enumerate()
            .map(|(i, f)| {
                self.prepare(f)
                    .map_err(|e| EngineError::BadRequest(format!("frame {}: {e}", kept + i)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let sys_len = system_tokens.len() as i32;
        let frames_pos: i32 = kept_pos + fresh.iter().map(|p| p.n_pos).sum::<i32>();
        let needed = sys_len + frames_pos + question.len() as i32;
        if needed + 1 > self.seq_ctx {
            return Err(EngineError::BadRequest(format!(
                "the prompt needs {needed} positions but a stream's context holds {}; raise --context-size or send fewer frames",
                self.seq_ctx
            )));
        }
        Ok(Matched {
            system_tokens,
            question,
            same_system,
            first,
            kept,
            kept_pos,
            kept_image_tokens,
            fresh,
            sys_len,
            frames_pos,
            needed,
        })
    }

    /// Positions a sequence may use: its cells, or more with lazy shifts (gaps).
    fn position_limit(&self) -> i32 {
        match self.shifts {
            Shifts::Eager => self.seq_ctx,
            Shifts::AtLimit { limit } => limit,
        }
    }

    /// Gives the stream's empty sequence the system piece `system` (`sys_len` tokens) from
    /// a sequence that holds it evaluated: the template, or another stream's (which then
    /// becomes the template's too). With a unified KV cache `seq_cp` only adds the sequence
    /// id to the piece's cells, so all streams of one profile attend to one copy. False when
    /// pieces are not shared or none holds it: the stream evaluates its own.
    fn copy_system(&mut self, stream: u64, system: &str, sys_len: i32) -> bool {
        let Some(template) = &self.template else {
            return false;
        };
        let template_id = template.id;
        let in_template = template
            .system
            .as_ref()
            .is_some_and(|(t, n)| t == system && *n == sys_len);
        let source = if in_template {
            Some(template_id)
        } else {
            self.seqs
                .iter()
                .find(|(&k, s)| {
                    k != stream
                        && s.system.as_deref() == Some(system)
                        && s.sys_len == sys_len
                        && s.next_pos >= s.sys_len
                })
                .map(|(_, s)| s.id)
        };
        let Some(source) = source else {
            return false;
        };
        if source != template_id {
            self.ctx.seq_rm(template_id, -1, -1);
            self.ctx.seq_cp(source, template_id, 0, sys_len);
            if let Some(t) = &mut self.template {
                t.system = Some((system.to_string(), sys_len));
            }
        }
        let seq = self.seqs.get_mut(&stream).unwrap();
        self.ctx.seq_cp(source, seq.id, 0, sys_len);
        seq.system = Some(system.to_string());
        seq.sys_len = sys_len;
        seq.shared_system = true;
        seq.frames_from = sys_len;
        seq.next_pos = sys_len;
        true
    }

    /// Keeps frames `keep` of the stream's sequence when its system piece is the request's
    /// (else empties it), and rebuilds them from cached embeddings when `rebuild_every`
    /// frames have left since the last rebuild. True when it rebuilt them.
    fn keep_frames(
        &mut self,
        stream: u64,
        same_system: bool,
        keep: std::ops::Range<usize>,
    ) -> Result<bool, EngineError> {
        let seq = self.seqs.get_mut(&stream).unwrap();
        if !same_system {
            seq.reset(&mut self.ctx);
            return Ok(false);
        }
        let plan = keep_run(&seq.layout(), keep.clone(), self.shifts);
        if !seq.apply(&mut self.ctx, plan, keep) {
            return Ok(false);
        }
        if self.rebuild_every == 0 || seq.shifted_out < self.rebuild_every {
            return Ok(false);
        }
        // The kept frames again, from their cached embeddings: a fresh copy without the
        // drift of the shifts.
        let from = seq.sys_len;
        self.ctx.seq_rm(seq.id, from, -1);
        seq.next_pos = from;
        seq.frames_from = from;
        let old = std::mem::take(&mut seq.frames);
        seq.shifted_out = 0;
        for f in old {
            let prepared = prepare(
                &mut self.mtmd,
                &self.embeddings,
                &self.marker,
                self.max_slices,
                &f.frame,
            )
            .map_err(EngineError::Failed)?;
            seq.append(prepared);
        }
        Ok(true)
    }
}

/// One edit of a sequence's KV cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvEdit {
    /// Forget positions `from..to` (`to < 0`: to the end).
    Remove { from: i32, to: i32 },
    /// Move positions `from..` by `delta`.
    Shift { from: i32, delta: i32 },
}

/// When positions are moved down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shifts {
    /// At every removal: the sequence is always contiguous.
    Eager,
    /// Only when the sequence would pass `limit` positions.
    AtLimit { limit: i32 },
}

/// Where a sequence's pieces lie. `frames` are the frames' position counts in time order;
/// the last `queued` of them are not evaluated yet (they get positions from `next_pos` as
/// they are), so only the others hold cells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub sys_len: i32,
    pub frames_from: i32,
    pub frames: Vec<i32>,
    pub queued: usize,
    /// Where the next input goes.
    pub next_pos: i32,
}

impl Layout {
    /// Position of frame `i` (the frames before it evaluated or queued in order).
    pub fn frame_start(&self, i: usize) -> i32 {
        self.frames_from + self.frames[..i].iter().sum::<i32>()
    }

    /// Cells the sequence holds once its queue is evaluated: system and frames, no gap.
    pub fn held(&self) -> i32 {
        self.sys_len + self.frames.iter().sum::<i32>()
    }

    fn gap(&self) -> i32 {
        self.frames_from - self.sys_len
    }
}

/// The edits and the layout after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub edits: Vec<KvEdit>,
    pub layout: Layout,
}

/// The longest run of `held` frames that `wanted` starts with: `(first, len)`, where
/// `first` is the index in `held` where it starts (`held.len()` when none).
pub fn matching_run<K: PartialEq>(held: &[K], wanted: &[K]) -> (usize, usize) {
    let Some(w0) = wanted.first() else {
        return (held.len(), 0);
    };
    match held.iter().position(|k| k == w0) {
        Some(j) => {
            let len = held[j..]
                .iter()
                .zip(wanted)
                .take_while(|(h, w)| h == w)
                .count();
            (j, len)
        }
        None => (held.len(), 0),
    }
}

/// Keeps frames `keep` of an evaluated sequence (nothing queued) and removes the others:
/// those after the run, then those before it.
pub fn keep_run(layout: &Layout, keep: Range<usize>, shifts: Shifts) -> Plan {
    debug_assert_eq!(layout.queued, 0, "reconciled only when idle");
    let mut after = layout.clone();
    let mut edits = Vec::new();
    if keep.end < after.frames.len() {
        let from = after.frame_start(keep.end);
        edits.push(KvEdit::Remove { from, to: -1 });
        after.frames.truncate(keep.end);
        after.next_pos = from;
        after = closed_when_empty(after);
    }
    let front = drop_front(&after, keep.start, shifts);
    edits.extend(front.edits);
    Plan {
        edits,
        layout: front.layout,
    }
}

/// Removes the first `n` frames (all evaluated). Eager: what follows shifts down at once.
pub fn drop_front(layout: &Layout, n: usize, shifts: Shifts) -> Plan {
    let mut after = layout.clone();
    if n == 0 {
        return Plan {
            edits: Vec::new(),
            layout: after,
        };
    }
    debug_assert!(
        n <= layout.frames.len() - layout.queued,
        "only evaluated frames"
    );
    let p0 = layout.frames_from;
    let p1 = layout.frame_start(n);
    after.frames.drain(..n);
    let mut edits = vec![KvEdit::Remove { from: p0, to: p1 }];
    match shifts {
        Shifts::Eager => {
            // Down to where the removed frames began (the system piece's end).
            edits.push(KvEdit::Shift {
                from: p1,
                delta: p0 - p1,
            });
            after.next_pos -= p1 - p0;
        }
        Shifts::AtLimit { .. } => after.frames_from = p1,
    }
    Plan {
        edits,
        layout: closed_when_empty(after),
    }
}

/// With no frame left in the cache, the next input goes right after the system piece: a
/// gap may lie between cells, never after the last one (llama.cpp wants new positions to
/// follow the largest one).
fn closed_when_empty(mut layout: Layout) -> Layout {
    if layout.frames.len() == layout.queued {
        layout.frames_from = layout.sys_len;
        layout.next_pos = layout.sys_len;
    }
    layout
}

/// Before `extra` more positions go in after `next_pos`: if they would pass the limit and
/// a gap can be closed, one shift moves the frames (and whatever follows) down to the
/// system piece's end. `None` when nothing needs to move.
pub fn make_room(layout: &Layout, extra: i32, shifts: Shifts) -> Option<Plan> {
    let Shifts::AtLimit { limit } = shifts else {
        return None;
    };
    let gap = layout.gap();
    if gap <= 0 || layout.next_pos + extra <= limit {
        return None;
    }
    let mut after = layout.clone();
    after.frames_from -= gap;
    after.next_pos -= gap;
    Some(Plan {
        edits: vec![KvEdit::Shift {
            from: layout.frames_from,
            delta: -gap,
        }],
        layout: after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[system 10][frames of 5, 6, 7]`, all evaluated, contiguous.
    fn layout() -> Layout {
        Layout {
            sys_len: 10,
            frames_from: 10,
            frames: vec![5, 6, 7],
            queued: 0,
            next_pos: 28,
        }
    }

    const GAPS: Shifts = Shifts::AtLimit { limit: 100 };

    #[test]
    fn the_run_the_request_starts_with_is_found() {
        assert_eq!(matching_run(&["a", "b", "c"], &["b", "c", "d"]), (1, 2));
        assert_eq!(matching_run(&["a", "b", "c"], &["a", "b", "c"]), (0, 3));
        assert_eq!(matching_run(&["a", "b", "c"], &["x", "b"]), (3, 0));
        assert_eq!(matching_run(&["a", "b", "c"], &["b", "x"]), (1, 1));
        assert_eq!(matching_run::<&str>(&["a"], &[]), (1, 0));
        assert_eq!(matching_run(&[], &["a"]), (0, 0));
    }

    #[test]
    fn eager_removal_shifts_the_later_frames_down_at_once() {
        let plan = keep_run(&layout(), 1..3, Shifts::Eager);
        assert_eq!(
            plan.edits,
            [
                KvEdit::Remove { from: 10, to: 15 },
                KvEdit::Shift {
                    from: 15,
                    delta: -5
                }
            ]
        );
        assert_eq!(plan.layout.frames, [6, 7]);
        assert_eq!((plan.layout.frames_from, plan.layout.next_pos), (10, 23));
    }

    #[test]
    fn with_gaps_a_leaving_frame_is_removed_and_nothing_shifts() {
        let plan = keep_run(&layout(), 1..3, GAPS);
        assert_eq!(plan.edits, [KvEdit::Remove { from: 10, to: 15 }]);
        assert_eq!((plan.layout.frames_from, plan.layout.next_pos), (15, 28));
        assert_eq!(plan.layout.frame_start(1), 21);
        assert_eq!(plan.layout.held(), 23, "the gap holds no cells");
    }

    #[test]
    fn frames_after_the_run_are_cut_then_those_before_it() {
        let plan = keep_run(&layout(), 1..2, Shifts::Eager);
        assert_eq!(
            plan.edits,
            [
                KvEdit::Remove { from: 21, to: -1 },
                KvEdit::Remove { from: 10, to: 15 },
                KvEdit::Shift {
                    from: 15,
                    delta: -5
                }
            ]
        );
        assert_eq!(plan.layout.frames, [6]);
        assert_eq!(plan.layout.next_pos, 16);
        let none = keep_run(&layout(), 3..3, GAPS);
        assert_eq!(
            none.edits,
            [KvEdit::Remove { from: 10, to: 28 }],
            "no run: every frame goes"
        );
        assert!(none.layout.frames.is_empty());
        // After a gap, too, an empty sequence goes on right after its system piece.
        let gapped = keep_run(&layout(), 1..3, GAPS).layout;
        let emptied = keep_run(&gapped, 0..0, GAPS);
        assert_eq!(emptied.edits, [KvEdit::Remove { from: 15, to: -1 }]);
        assert_eq!(
            (emptied.layout.frames_from, emptied.layout.next_pos),
            (10, 10)
        );
        let dropped = drop_front(&gapped, 2, GAPS).layout;
        assert_eq!((dropped.frames_from, dropped.next_pos), (10, 10));
        let all = keep_run(&layout(), 0..3, GAPS);
        assert!(all.edits.is_empty() && all.layout == layout());
    }

    #[test]
    fn queued_frames_keep_their_place_when_older_ones_leave() {
        let mut l = layout();
        l.frames.push(9);
        l.queued = 1;
        let eager = drop_front(&l, 2, Shifts::Eager);
        assert_eq!(eager.layout.next_pos, 28 - 11);
        assert_eq!(
            eager.layout.frame_start(1),
            17,
            "the queued frame goes next"
        );
        let gaps = drop_front(&l, 2, GAPS);
        assert_eq!(gaps.layout.next_pos, 28);
        assert_eq!(gaps.layout.frame_start(1), 28);
    }

    #[test]
    fn compaction_closes_the_gap_only_near_the_limit() {
        let mut l = layout();
        for _ in 0..3 {
            // A frame leaves, a new one comes: the sequence walks up its positions.
            let p = drop_front(&l, 1, GAPS);
            assert_eq!(p.edits.len(), 1, "a removal, no shift");
            l = p.layout;
            l.frames.push(8);
            l.next_pos += 8;
        }
        assert_eq!((l.frames_from, l.next_pos), (28, 52));
        assert_eq!(make_room(&l, 40, GAPS), None, "52 + 40 fits in 100");
        let plan = make_room(&l, 60, GAPS).expect("52 + 60 does not");
        assert_eq!(
            plan.edits,
            [KvEdit::Shift {
                from: 28,
                delta: -18
            }]
        );
        assert_eq!((plan.layout.frames_from, plan.layout.next_pos), (10, 34));
        assert_eq!(plan.layout.held(), l.held());
        assert_eq!(
            make_room(&plan.layout, 90, GAPS),
            None,
            "no gap left to close"
        );
        assert_eq!(make_room(&l, 60, Shifts::Eager), None);
    }

    /// Over many frames the positions stay under the limit and the sequence holds only its
    /// window, with far fewer shifts than frames.
    #[test]
    fn a_long_run_stays_bounded_with_few_shifts() {
        let limit = 800;
        let shifts = Shifts::AtLimit { limit };
        let mut l = Layout {
            sys_len: 50,
            frames_from: 50,
            frames: Vec::new(),
            queued: 0,
            next_pos: 50,
        };
        let (mut n_shifts, mut n_removes) = (0, 0);
        for _ in 0..10_000 {
            let frame = 75;
            if let Some(p) = make_room(&l, frame, shifts) {
                n_shifts += p.edits.len();
                l = p.layout;
            }
            l.frames.push(frame);
            l.next_pos += frame;
            assert!(l.next_pos <= limit, "{l:?}");
            let excess = l.frames.len().saturating_sub(4);
            let p = drop_front(&l, excess, shifts);
            n_removes += p.edits.len();
            l = p.layout;
            assert!(l.held() <= 50 + 4 * 75);
        }
        assert_eq!(n_removes, 10_000 - 4);
        assert!(n_shifts < 10_000 / 4, "{n_shifts} shifts");
    }
}
