//! The worker thread: one context, one KV-cache sequence per stream, continuous batching.
//!
//! Each turn of the loop takes the commands that arrived (requests, pushed frames, closed
//! streams), starts the requests whose stream is free ([`admission`]), and runs one *step*
//! ([`decode`]):
//! 1. **vision** ([`vision`]): encodes images that a sequence is waiting for: one while
//!    answers are running (so a step stays short), all of them when nothing else runs;
//! 2. **image rows**: every sequence whose next inputs are encoded images puts them in one
//!    embeddings batch, one `llama_decode` for all streams;
//! 3. **tokens**: one token batch holds the last sampled token of every running answer and
//!    as much prompt text (system prompts, questions) as fits; one `llama_decode`; then each
//!    answer samples from its own entry's logits with its own sampler (seed per request).
//!
//! A sequence is `[system][frame]…[frame]` between requests ([`sequence`]). Its inputs are
//! evaluated in order from its queue, and a position is given to an input only when it is
//! evaluated. A request starts only when its sequence is idle (no answer, empty queue): it
//! then reconciles the frames in the KV cache with its own ([`reconcile`]: keeps the run
//! they share, removes the rest), queues the missing frames and its question, and its
//! answer follows. After the answer the question and answer are removed (`tail_from..`).
//! Vision embeddings are kept by picture ([`embeddings`]).
//!
//! Order between requests that wait: priority (questions, alert checks, commentary), then
//! arrival. Within a step every running answer advances by one token, in that order.

mod admission;
mod decode;
mod embeddings;
mod reconcile;
mod sequence;
mod vision;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use tokio::sync::mpsc::Sender;

use super::ffi;
use super::profile::{StepSample, Steps};
use super::{ms, EngineState, FlashAttention, LlamaConfig, SequenceState};
use crate::{EngineError, EngineInfo, Frame, Output, Priority, Request};
use embeddings::EmbeddingCache;
use reconcile::Shifts;

use sequence::{trim, End, Input, Seq};
use vision::check_plain_embeddings;

/// Where a request's answer goes.
pub(super) type Reply = Sender<Result<Output, EngineError>>;

/// The stream id of requests that come without a stream.
const ANONYMOUS: u64 = u64::MAX;

// `Inspect` comes only from `LlamaEngine::state`, which is for tests (feature `fake`).
#[cfg_attr(not(any(test, feature = "fake")), allow(dead_code))]
pub(super) enum Command {
    Submit(Job),
    Frame { stream: u64, frame: Frame },
    Close { stream: u64 },
    Inspect(mpsc::Sender<EngineState>),
}

pub(super) struct Job {
    pub stream: Option<u64>,
    pub priority: Priority,
    pub request: Request,
    pub tx: Reply,
    pub submitted: Instant,
    /// Instead of answering, send the logits of the question's last token here.
    pub probe: Option<mpsc::Sender<Vec<f32>>>,
}

pub(super) struct Worker {
    // Field order is drop order: contexts before the model they point into.
    mtmd: ffi::Mtmd,
    ctx: ffi::Context,
    model: ffi::Model,
    tokens: ffi::Batch,
    rows: ffi::Batch,
    marker: String,
    max_slices: u32,
    width: usize,
    /// Cells one sequence may hold.
    seq_ctx: i32,
    window: usize,
    rebuild_every: u32,
    /// When removed frames' positions are closed up (see `reconcile`).
    shifts: Shifts,
    /// The sequence that keeps a shared system piece (`None`: pieces are not shared).
    template: Option<Template>,
    embeddings: EmbeddingCache,
    seqs: HashMap<u64, Seq>,
    free: Vec<i32>,
    waiting: Vec<Waiting>,
    next_serial: u64,
    /// `Inspect` callers, answered when the work in hand is done.
    inspect: Vec<mpsc::Sender<EngineState>>,
    profile: Arc<std::sync::Mutex<Steps>>,
    /// What the current step has cost so far.
    sample: StepSample,
    /// `llama_synchronize` after each decode, so the profile tells GPU from host time.
    profile_sync: bool,
    /// Since when ready image rows have been left for a later step.
    rows_since: Option<Instant>,
    in_flight: Arc<AtomicUsize>,
    info: EngineInfo,
}

struct Waiting {
    serial: u64,
    job: Job,
}

/// The spare sequence that keeps the system piece streams last shared, so it outlives the
/// streams that evaluated it.
struct Template {
    id: i32,
    /// The piece it holds and its length.
    system: Option<(String, i32)>,
}

/// Where the model runs: which GPU (if any), how many layers on it, CPU threads, attention.
struct Placement {
    gpu: Option<String>,
    gpu_layers: i32,
    threads: i32,
    flash_attn: llama_cpp_sys_2::llama_flash_attn_type,
}

fn placement(config: &LlamaConfig) -> Result<Placement, String> {
    let gpus = ffi::gpu_devices();
    if let Some(i) = config.gpu {
        if i as usize >= gpus.len() {
            return Err(format!(
                "GPU {i} asked for, but llama.cpp sees {} GPU(s)",
                gpus.len()
            ));
        }
    }
    let gpu = match config.gpu {
        Some(i) => gpus.get(i as usize).cloned(),
        None => gpus.first().cloned(),
    };
    let gpu_layers = match (config.gpu_layers, &gpu) {
        (Some(n), _) => n as i32,
        (None, Some(_)) => -1, // all
        (None, None) => 0,
    };
    let threads = config.threads.map(|t| t as i32).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as i32)
            .unwrap_or(4)
    });
    let flash_attn = match config.flash_attention {
        FlashAttention::Auto => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_AUTO,
        FlashAttention::On => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED,
        FlashAttention::Off => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED,
    };
    Ok(Placement {
        gpu,
        gpu_layers,
        threads,
        flash_attn,
    })
}

/// llama.cpp's `LLAMA_MAX_SEQ`.
const MAX_SEQ: u32 = 256;

/// How far positions may run with lazy shifts (within the model's training context).
const LAZY_POSITIONS: i32 = 4096;

/// Cells a stream's sequence needs: what it holds between requests (system piece and the
/// window's frames, sized by a 16:9 frame of `max_slices` slices) and a cycle's question
/// and answer (see `LlamaConfig::context_size`).
fn derived_cells(
    mtmd: &mut ffi::Mtmd,
    marker: &str,
    max_slices: u32,
    window: usize,
) -> Result<u32, String> {
    let frame = vision::frame_positions(mtmd, marker, max_slices)? as u32;
    let need = super::SYSTEM_ALLOWANCE
        + window as u32 * frame
        + super::QUESTION_ALLOWANCE
        + super::ANSWER_ALLOWANCE;
    Ok(need.div_ceil(256) * 256)
}

impl Worker {
    pub fn load(
        config: &LlamaConfig,
        in_flight: Arc<AtomicUsize>,
        profile: Arc<std::sync::Mutex<Steps>>,
    ) -> Result<Worker, String> {
        ffi::route_logs();
        let Placement {
            gpu,
            gpu_layers,
            threads,
            flash_attn,
        } = placement(config)?;
        let pin = config.gpu.map(|i| i as usize);
        let model = ffi::Model::load(&config.llm, gpu_layers, pin)?;
        let use_gpu = gpu.is_some() && gpu_layers != 0;
        let mut mtmd = ffi::Mtmd::load(&config.mmproj, &model, use_gpu, threads, flash_attn, pin)?;
        let marker = ffi::Mtmd::marker();
        check_plain_embeddings(&mut mtmd, &marker)?;
        let max_slices = config.max_slices.max(1);
        let window = config.window_frames.max(1);
        // One sequence a stream, one for requests without a stream, and the template of a
        // shared system piece (llama.cpp allows `LLAMA_MAX_SEQ`, 256).
        let streams = config.max_streams.max(1) + 1;
        let share = config.share_system && config.kv_unified && streams < MAX_SEQ;
        let n_seq = streams + u32::from(share);
        let seq_cells = match config.context_size {
            0 => derived_cells(&mut mtmd, &marker, max_slices, window)?,
            n => n,
        };
        let ctx = ffi::Context::new(
            &model,
            &ffi::ContextParams {
                n_ctx: seq_cells.saturating_mul(n_seq),
                n_batch: config.batch_size,
                n_seq_max: n_seq,
                kv_unified: config.kv_unified,
                threads,
                flash_attn,
            },
        )?;
        let backend = match (&gpu, use_gpu) {
            (Some(dev), true) => format!("CUDA: {dev}"),
            _ => format!("CPU ({threads} threads)"),
        };
        let seq_ctx = (ctx.n_ctx() / n_seq) as i32;
        let shifts = if config.lazy_shifts {
            // Gaps cost positions, not cells: let positions run past the cells a sequence
            // holds, within what the model was trained on.
            let limit = seq_ctx.max(LAZY_POSITIONS.min(model.n_ctx_train()));
            Shifts::AtLimit { limit }
        } else {
            Shifts::Eager
        };
        tracing::info!(
            model = %model.describe(),
            layers = model.n_layer(),
            offloaded = if gpu_layers < 0 { model.n_layer() } else { gpu_layers.min(model.n_layer()) },
            %backend,
            streams = config.max_streams,
            cells_per_stream = seq_ctx,
            derived = config.context_size == 0,
            kv_unified = config.kv_unified,
            shared_system = share,
            ?shifts,
            "llama engine ready"
        );
        let info = EngineInfo {
            kind: "llama".into(),
            model: config
                .llm
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            backend,
        };
        let n_batch = ctx.n_batch() as usize;
        let width = model.n_embd_inp();
        Ok(Worker {
            tokens: ffi::Batch::new(n_batch),
            rows: ffi::Batch::embeddings(n_batch, width),
            mtmd,
            ctx,
            model,
            marker,
            max_slices,
            width,
            seq_ctx,
            window,
            rebuild_every: config.rebuild_every,
            shifts,
            template: share.then_some(Template {
                id: streams as i32,
                system: None,
            }),
            embeddings: EmbeddingCache::new(64 + 8 * n_seq as usize),
            seqs: HashMap::new(),
            free: (0..streams as i32).rev().collect(),
            waiting: Vec::new(),
            next_serial: 0,
            inspect: Vec::new(),
            profile,
            sample: StepSample::default(),
            profile_sync: config.profile_sync,
            rows_since: None,
            in_flight,
            info,
        })
    }

    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// Serves until every engine handle is gone and the work in hand is finished.
    pub fn run(mut self, commands: mpsc::Receiver<Command>) {
        let mut open = true;
        loop {
            if !self.has_work() {
                let state = self.state();
                for reply in self.inspect.drain(..) {
                    let _ = reply.send(state.clone());
                }
                if !open {
                    return;
                }
                match commands.recv() {
                    Ok(c) => self.handle(c),
                    Err(_) => return,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(c) => self.handle(c),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.drop_cancelled();
            self.admit();
            self.feed();
            self.step();
        }
    }

    fn has_work(&self) -> bool {
        !self.waiting.is_empty()
            || self.seqs.values().any(|s| {
                s.generation.is_some()
                    || !s.queue.is_empty()
                    || (s.system.is_some() && !s.pending.is_empty())
                    || s.pending.iter().any(|p| p.inputs.iter().any(Input::is_raw))
            })
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Submit(job) => {
                let serial = self.next_serial;
                self.next_serial += 1;
                self.waiting.push(Waiting { serial, job });
            }
            Command::Frame { stream, frame } => self.push_frame(stream, frame),
            Command::Close { stream } => self.close(stream),
            Command::Inspect(reply) => self.inspect.push(reply),
        }
    }

    fn state(&self) -> EngineState {
        let mut sequences: Vec<SequenceState> = self
            .seqs
            .iter()
            .map(|(&stream, s)| {
                let (lo, hi) = (self.ctx.seq_pos_min(s.id), self.ctx.seq_pos_max(s.id));
                SequenceState {
                    stream,
                    seq: s.id,
                    frames: s.frames.len(),
                    positions: s.next_pos,
                    cells: if hi < 0 { 0 } else { hi - lo + 1 },
                    held: s.layout().held(),
                    shared_system: s.shared_system,
                    generating: s.generation.is_some(),
                    pending: s.pending.len(),
                }
            })
            .collect();
        sequences.sort_by_key(|s| s.seq);
        EngineState {
            sequences,
            free: self.free.len(),
            waiting: self.waiting.len(),
            cached_embeddings: self.embeddings.entries.len(),
        }
    }

    /// The sequence of `stream`, made if needed (taking the slot of the stream idle longest
    /// when none is free). `None` when every sequence is busy.
    fn seq_for(&mut self, stream: u64) -> Option<&mut Seq> {
        if !self.seqs.contains_key(&stream) {
            let id = match self.free.pop() {
                Some(id) => id,
                None => {
                    let waiting: Vec<u64> = self.waiting.iter().map(|w| key(&w.job)).collect();
                    let (&victim, _) = self
                        .seqs
                        .iter()
                        .filter(|(k, s)| s.idle() && !waiting.contains(k))
                        .min_by_key(|(_, s)| s.last_used)?;
                    self.release(victim);
                    self.free.pop()?
                }
            };
            self.seqs.insert(stream, Seq::new(id, self.window));
        }
        self.seqs.get_mut(&stream)
    }

    /// Frees a stream's sequence (its answer, if any, must be finished already).
    fn release(&mut self, stream: u64) {
        if let Some(seq) = self.seqs.remove(&stream) {
            self.ctx.seq_rm(seq.id, -1, -1);
            self.free.push(seq.id);
        }
    }

    fn push_frame(&mut self, stream: u64, frame: Frame) {
        let prepared = match self.prepare(&frame) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(stream, "a pushed frame was dropped: {e}");
                return;
            }
        };
        let Some(seq) = self.seq_for(stream) else {
            return; // every sequence is busy: the next request brings its frames
        };
        seq.last_used = Instant::now();
        seq.pending.push(prepared);
        let excess = seq.pending.len().saturating_sub(seq.window);
        seq.pending.drain(..excess);
    }

    /// Pushed frames go into sequences that are free for them: nothing queued, no answer
    /// running or request waiting. The oldest frames leave so the window's frames stay.
    fn feed(&mut self) {
        let waiting: Vec<u64> = self.waiting.iter().map(|w| key(&w.job)).collect();
        for (stream, seq) in &mut self.seqs {
            let free = seq.system.is_some() && seq.idle() && !waiting.contains(stream);
            if !free || seq.pending.is_empty() {
                continue;
            }
            for p in std::mem::take(&mut seq.pending) {
                seq.append(p);
            }
            trim(&mut self.ctx, seq, self.shifts);
            // The new frames take positions after the last; close the gaps first if they
            // would pass the limit.
            let queued: i32 = seq.frames[seq.frames.len() - seq.queued_frames..]
                .iter()
                .map(|f| f.n_pos)
                .sum();
            if let Some(plan) = reconcile::make_room(&seq.layout(), queued, self.shifts) {
                let all = 0..seq.frames.len();
                seq.apply(&mut self.ctx, plan, all);
            }
        }
    }

    fn close(&mut self, stream: u64) {
        let in_flight = &self.in_flight;
        self.waiting.retain(|w| {
            let mine = key(&w.job) == stream;
            if mine {
                in_flight.fetch_sub(1, Ordering::SeqCst);
            }
            !mine
        });
        if self.seqs.contains_key(&stream) {
            self.end(stream, End::Cancelled);
            self.release(stream);
        }
    }

    /// Requests whose callers left: gone from the queue, and running ones stop.
    fn drop_cancelled(&mut self) {
        let in_flight = &self.in_flight;
        self.waiting.retain(|w| {
            let gone = w.job.tx.is_closed();
            if gone {
                in_flight.fetch_sub(1, Ordering::SeqCst);
            }
            !gone
        });
        let gone: Vec<u64> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.generation.as_ref().is_some_and(|g| g.tx.is_closed()))
            .map(|(&k, _)| k)
            .collect();
        for stream in gone {
            self.end(stream, End::Cancelled);
        }
    }

    fn fail_seq(&mut self, stream: u64, message: String) {
        tracing::warn!(stream, "llama sequence failed: {message}");
        self.end(stream, End::Failed(EngineError::Failed(message)));
        if let Some(seq) = self.seqs.get_mut(&stream) {
            seq.reset(&mut self.ctx);
        }
    }

    /// Ends the stream's running answer (if any): removes its question and answer from the
    /// sequence, sends the last message, and lets pushed frames in.
    fn end(&mut self, stream: u64, end: End) {
        let Some(seq) = self.seqs.get_mut(&stream) else {
            return;
        };
        let Some(mut g) = seq.generation.take() else {
            return;
        };
        // The question and answer go; so do frames queued for the request but not evaluated
        // yet (a cancel mid-prompt): the sequence keeps what is complete in the KV cache.
        let evaluated = seq.next_pos.min(g.tail_from);
        seq.queue.clear();
        seq.queued_frames = 0;
        if evaluated < seq.sys_len {
            seq.reset(&mut self.ctx);
        } else {
            let mut end_pos = seq.frames_from;
            let keep = seq
                .frames
                .iter()
                .take_while(|f| {
                    end_pos += f.n_pos;
                    end_pos <= evaluated
                })
                .count();
            seq.frames.truncate(keep);
            seq.next_pos = seq.frame_start(keep);
            if !self.ctx.seq_rm(seq.id, seq.next_pos, -1) {
                seq.reset(&mut self.ctx);
            }
        }
        seq.last_used = Instant::now();
        let last = match end {
            End::Cancelled => None,
            End::Failed(e) => Some(Err(e)),
            End::Done => {
                let now = Instant::now();
                let s = &mut g.stats;
                if g.decode_started.is_none() {
                    s.vision_ms = ms(g.vision);
                    s.prefill_ms = ms((now - g.started).saturating_sub(g.vision));
                }
                s.decode_ms = g.decode_started.map(|t| ms(now - t)).unwrap_or(0.0);
                if s.generated_tokens > 0 && s.decode_ms > 0.0 {
                    s.decode_tokens_per_s = s.generated_tokens as f64 / (s.decode_ms / 1e3);
                }
                s.first_token_ms = g
                    .first_token_at
                    .map(|at| ms(at - g.submitted))
                    .unwrap_or(0.0);
                s.total_ms = ms(g.submitted.elapsed());
                Some(Ok(Output::Done(g.stats.clone())))
            }
        };
        if last.as_ref().is_some_and(|l| l.is_ok()) {
            g.outbox
                .push_str(&String::from_utf8_lossy(&std::mem::take(&mut g.bytes)));
            if !g.outbox.is_empty() {
                let _ =
                    g.tx.blocking_send(Ok(Output::Text(std::mem::take(&mut g.outbox))));
            }
        }
        // The count drops before the last message goes out, so a caller that has its
        // answer never sees its own request still in flight.
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some(last) = last {
            let _ = g.tx.blocking_send(last);
        }
    }
}

fn key(job: &Job) -> u64 {
    job.stream.unwrap_or(ANONYMOUS)
}
