//! A stream's sequence: what it holds, what it has queued, and its running request.

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::super::ffi::{self, Token};
use super::super::sampling::Sampler;
use super::embeddings::ChunkKey;
use super::reconcile::{self, KvEdit, Layout, Plan, Shifts};
use super::Reply;
use crate::{EngineError, Frame, Priority, Stats};

/// One stream's sequence.
pub(super) struct Seq {
    pub(super) id: i32,
    /// The system prompt at the start of the sequence (`None`: nothing there yet).
    pub(super) system: Option<String>,
    pub(super) sys_len: i32,
    /// The system piece's cells came from another sequence (see `Worker::copy_system`).
    pub(super) shared_system: bool,
    /// Where the first frame lies: `sys_len`, or later when frames left without a shift
    /// (see `reconcile`).
    pub(super) frames_from: i32,
    /// In time order; the last `queued_frames` are not (all) evaluated yet.
    pub(super) frames: Vec<SeqFrame>,
    pub(super) queued_frames: usize,
    /// Where the next input goes.
    pub(super) next_pos: i32,
    pub(super) queue: VecDeque<Input>,
    /// Frames pushed while a request waited or ran, added after it.
    pub(super) pending: Vec<Prepared>,
    pub(super) generation: Option<Gen>,
    pub(super) window: usize,
    pub(super) shifted_out: u32,
    pub(super) last_used: Instant,
}

pub(super) struct SeqFrame {
    pub(super) key: String,
    pub(super) frame: Frame,
    pub(super) n_pos: i32,
    pub(super) image_tokens: u32,
}

/// A frame cut into what the sequence evaluates.
pub(super) struct Prepared {
    pub(super) key: String,
    pub(super) frame: Frame,
    pub(super) inputs: Vec<Input>,
    pub(super) n_pos: i32,
    pub(super) image_tokens: u32,
    /// Image chunks whose embeddings were cached.
    pub(super) reused: u32,
}

pub(super) enum Input {
    Text {
        tokens: Vec<Token>,
        /// Logits for its last token (the question: the answer starts there).
        logits: bool,
        ends_frame: bool,
    },
    Image {
        key: ChunkKey,
        n_tokens: usize,
        data: ImageData,
        ends_frame: bool,
    },
}

pub(super) enum ImageData {
    Raw(Rc<ffi::Chunks>, usize),
    Encoded(Arc<Vec<f32>>),
}

/// A running request.
pub(super) struct Gen {
    pub(super) tx: Reply,
    pub(super) ignore_eos: bool,
    pub(super) submitted: Instant,
    pub(super) started: Instant,
    pub(super) sampler: Sampler,
    pub(super) stats: Stats,
    pub(super) vision: Duration,
    /// Where the question starts: everything from here is removed afterwards.
    pub(super) tail_from: i32,
    pub(super) budget: u32,
    /// Sampled, to be evaluated in the next step (`None` while the prompt is evaluated).
    pub(super) next: Option<Token>,
    pub(super) decode_started: Option<Instant>,
    pub(super) first_token_at: Option<Instant>,
    pub(super) bytes: Vec<u8>,
    pub(super) outbox: String,
    pub(super) priority: Priority,
    pub(super) serial: u64,
    pub(super) probe: Option<mpsc::Sender<Vec<f32>>>,
}

pub(super) enum End {
    Done,
    Cancelled,
    Failed(EngineError),
}

impl Seq {
    pub(super) fn new(id: i32, window: usize) -> Seq {
        Seq {
            id,
            system: None,
            sys_len: 0,
            shared_system: false,
            frames_from: 0,
            frames: Vec::new(),
            queued_frames: 0,
            next_pos: 0,
            queue: VecDeque::new(),
            pending: Vec::new(),
            generation: None,
            window,
            shifted_out: 0,
            last_used: Instant::now(),
        }
    }

    pub(super) fn idle(&self) -> bool {
        self.generation.is_none() && self.queue.is_empty()
    }

    /// Position of frame `i` (all frames before it evaluated or queued in order).
    pub(super) fn frame_start(&self, i: usize) -> i32 {
        self.frames_from + self.frames[..i].iter().map(|f| f.n_pos).sum::<i32>()
    }

    /// Where its pieces lie, for [`reconcile`].
    pub(super) fn layout(&self) -> Layout {
        Layout {
            sys_len: self.sys_len,
            frames_from: self.frames_from,
            frames: self.frames.iter().map(|f| f.n_pos).collect(),
            queued: self.queued_frames,
            next_pos: self.next_pos,
        }
    }

    /// Makes a plan's edits in the KV cache and takes its layout; the plan's frames must be
    /// the first or last of the sequence's (`kept`: which of them stay). False when llama.cpp
    /// can't (the sequence is then started over).
    pub(super) fn apply(
        &mut self,
        ctx: &mut ffi::Context,
        plan: Plan,
        kept: std::ops::Range<usize>,
    ) -> bool {
        let shifts = plan.edits.iter().any(|e| matches!(e, KvEdit::Shift { .. }));
        if shifts && !ctx.can_shift() {
            self.reset(ctx);
            return false;
        }
        for edit in plan.edits {
            let ok = match edit {
                KvEdit::Remove { from, to } => ctx.seq_rm(self.id, from, to),
                KvEdit::Shift { from, delta } => {
                    ctx.seq_shift(self.id, from, delta);
                    true
                }
            };
            if !ok {
                self.reset(ctx);
                return false;
            }
        }
        self.shifted_out += kept.start as u32;
        self.frames.truncate(kept.end);
        self.frames.drain(..kept.start);
        self.frames_from = plan.layout.frames_from;
        self.next_pos = plan.layout.next_pos;
        debug_assert_eq!(self.layout(), plan.layout);
        true
    }

    /// Empties the sequence: it starts over with the next request.
    pub(super) fn reset(&mut self, ctx: &mut ffi::Context) {
        ctx.seq_rm(self.id, -1, -1);
        self.system = None;
        self.sys_len = 0;
        self.shared_system = false;
        self.frames_from = 0;
        self.frames.clear();
        self.queued_frames = 0;
        self.next_pos = 0;
        self.queue.clear();
        self.shifted_out = 0;
    }

    /// Queues a frame after the last one (an older or repeated frame is ignored).
    pub(super) fn append(&mut self, prepared: Prepared) {
        if let Some(last) = self.frames.last() {
            if prepared.frame.pts <= last.frame.pts {
                return;
            }
        }
        self.queue.extend(prepared.inputs);
        self.frames.push(SeqFrame {
            key: prepared.key,
            frame: prepared.frame,
            n_pos: prepared.n_pos,
            image_tokens: prepared.image_tokens,
        });
        self.queued_frames += 1;
    }
}

/// Keeps at most the stream's window of frames, removing the oldest evaluated ones.
pub(super) fn trim(ctx: &mut ffi::Context, seq: &mut Seq, shifts: Shifts) {
    let in_kv = seq.frames.len() - seq.queued_frames;
    let excess = seq.frames.len().saturating_sub(seq.window).min(in_kv);
    if excess > 0 {
        let plan = reconcile::drop_front(&seq.layout(), excess, shifts);
        seq.apply(ctx, plan, excess..seq.frames.len());
    }
}

impl Input {
    pub(super) fn is_raw(&self) -> bool {
        matches!(
            self,
            Input::Image {
                data: ImageData::Raw(..),
                ..
            }
        )
    }
}
