//! The worker thread: one context, one KV-cache sequence per stream, continuous batching.
//!
//! Each turn of the loop takes the commands that arrived (requests, pushed frames, closed
//! streams), starts the requests whose stream is free, and runs one *step*:
//! 1. **vision**: encodes images that a sequence is waiting for: one while answers are
//!    running (so a step stays short), all of them when nothing else runs;
//! 2. **image rows**: every sequence whose next inputs are encoded images puts them in one
//!    embeddings batch, one `llama_decode` for all streams;
//! 3. **tokens**: one token batch holds the last sampled token of every running answer and
//!    as much prompt text (system prompts, questions) as fits; one `llama_decode`; then each
//!    answer samples from its own entry's logits with its own sampler (seed per request).
//!
//! A sequence is `[system][frame]…[frame]` between requests. Its inputs are evaluated in
//! order from its queue, and a position is given to an input only when it is evaluated, so
//! removing a frame needs no bookkeeping beyond the shift in the KV cache. A request starts
//! only when its sequence is idle (no answer, empty queue): it then reconciles the frames in
//! the KV cache with its own (keeps the run they share, removes the rest, shifting later
//! positions down), queues the missing frames and its question, and its answer follows.
//! After the answer the question and answer are removed (`tail_from..`).
//!
//! Order between requests that wait: priority (questions, alert checks, commentary), then
//! arrival. Within a step every running answer advances by one token, in that order.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

use super::ffi::{self, ChunkKind, Token};
use super::profile::{StepSample, Steps};
use super::sampling::Sampler;
use super::{
    content_key, fit_to_slices, frame_key, frame_piece, ms, question_piece, system_piece,
    take_utf8, to_rgb, EngineState, FlashAttention, LlamaConfig, SequenceState,
};
use crate::{EngineError, EngineInfo, Frame, Output, Priority, Request, Stats};

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
    /// Positions one sequence may use.
    seq_ctx: i32,
    window: usize,
    rebuild_every: u32,
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

/// One stream's sequence.
struct Seq {
    id: i32,
    /// The system prompt at the start of the sequence (`None`: nothing there yet).
    system: Option<String>,
    sys_len: i32,
    /// In time order; the last `queued_frames` are not (all) evaluated yet.
    frames: Vec<SeqFrame>,
    queued_frames: usize,
    /// Where the next input goes.
    next_pos: i32,
    queue: VecDeque<Input>,
    /// Frames pushed while a request waited or ran, added after it.
    pending: Vec<Prepared>,
    generation: Option<Gen>,
    window: usize,
    shifted_out: u32,
    last_used: Instant,
}

struct SeqFrame {
    key: String,
    frame: Frame,
    n_pos: i32,
    image_tokens: u32,
}

/// A frame cut into what the sequence evaluates.
struct Prepared {
    key: String,
    frame: Frame,
    inputs: Vec<Input>,
    n_pos: i32,
    image_tokens: u32,
    /// Image chunks whose embeddings were cached.
    reused: u32,
}

enum Input {
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

enum ImageData {
    Raw(Rc<ffi::Chunks>, usize),
    Encoded(Arc<Vec<f32>>),
}

/// A running request.
struct Gen {
    tx: Reply,
    ignore_eos: bool,
    submitted: Instant,
    started: Instant,
    sampler: Sampler,
    stats: Stats,
    vision: Duration,
    /// Where the question starts: everything from here is removed afterwards.
    tail_from: i32,
    budget: u32,
    /// Sampled, to be evaluated in the next step (`None` while the prompt is evaluated).
    next: Option<Token>,
    decode_started: Option<Instant>,
    first_token_at: Option<Instant>,
    bytes: Vec<u8>,
    outbox: String,
    priority: Priority,
    serial: u64,
    probe: Option<mpsc::Sender<Vec<f32>>>,
}

#[derive(Clone, Copy)]
enum BatchKind {
    Rows,
    Tokens,
}

enum End {
    Done,
    Cancelled,
    Failed(EngineError),
}

impl Worker {
    pub fn load(
        config: &LlamaConfig,
        in_flight: Arc<AtomicUsize>,
        profile: Arc<std::sync::Mutex<Steps>>,
    ) -> Result<Worker, String> {
        ffi::route_logs();
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
        let pin = config.gpu.map(|i| i as usize);
        let model = ffi::Model::load(&config.llm, gpu_layers, pin)?;
        let n_seq = config.max_streams.max(1) + 1;
        let ctx = ffi::Context::new(
            &model,
            &ffi::ContextParams {
                n_ctx: config.context_size.saturating_mul(n_seq),
                n_batch: config.batch_size,
                n_seq_max: n_seq,
                kv_unified: config.kv_unified,
                threads,
                flash_attn,
            },
        )?;
        let use_gpu = gpu.is_some() && gpu_layers != 0;
        let mut mtmd = ffi::Mtmd::load(&config.mmproj, &model, use_gpu, threads, flash_attn, pin)?;
        let marker = ffi::Mtmd::marker();
        check_plain_embeddings(&mut mtmd, &marker)?;
        let backend = match (&gpu, use_gpu) {
            (Some(dev), true) => format!("CUDA: {dev}"),
            _ => format!("CPU ({threads} threads)"),
        };
        let seq_ctx = (ctx.n_ctx() / n_seq) as i32;
        tracing::info!(
            model = %model.describe(),
            layers = model.n_layer(),
            offloaded = if gpu_layers < 0 { model.n_layer() } else { gpu_layers.min(model.n_layer()) },
            %backend,
            streams = config.max_streams,
            positions_per_stream = seq_ctx,
            kv_unified = config.kv_unified,
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
            max_slices: config.max_slices.max(1),
            width,
            seq_ctx,
            window: config.window_frames.max(1),
            rebuild_every: config.rebuild_every,
            embeddings: EmbeddingCache::new(64 + 8 * n_seq as usize),
            seqs: HashMap::new(),
            free: (0..n_seq as i32).rev().collect(),
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
            trim(&mut self.ctx, seq);
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

    /// Starts waiting requests whose sequences are idle, best first.
    fn admit(&mut self) {
        self.waiting.sort_by_key(|w| (w.job.priority, w.serial));
        let mut i = 0;
        while i < self.waiting.len() {
            let stream = key(&self.waiting[i].job);
            let ready = match self.seqs.get(&stream) {
                Some(seq) => seq.generation.is_none() && seq.queue.is_empty(),
                None => self.seq_for(stream).is_some(),
            };
            if !ready {
                i += 1;
                continue;
            }
            let Waiting { serial, job } = self.waiting.remove(i);
            let tx = job.tx.clone();
            if let Err(e) = self.start(stream, serial, job) {
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                let _ = tx.blocking_send(Err(e));
            }
        }
    }

    /// Reconciles the stream's sequence with the request's frames and queues the rest.
    fn start(&mut self, stream: u64, serial: u64, job: Job) -> Result<(), EngineError> {
        let started = Instant::now();
        let request = &job.request;
        let keys: Vec<String> = request
            .frames
            .iter()
            .map(|f| frame_key(f.pts, &content_key(&f.image)))
            .collect();
        let system_tokens = self.model.tokenize(&system_piece(&request.system), true);
        let question = self.model.tokenize(&question_piece(&request.user), false);

        // What the sequence keeps: the system prompt if unchanged, then the longest run of
        // its frames that the request's frames start with.
        let seq = &self.seqs[&stream];
        let same_system = seq.system.as_deref() == Some(request.system.as_str());
        let (first, kept) = match (same_system, keys.first()) {
            (true, Some(k0)) => match seq.frames.iter().position(|f| &f.key == k0) {
                Some(j) => {
                    let m = seq.frames[j..]
                        .iter()
                        .zip(&keys)
                        .take_while(|(f, k)| &f.key == *k)
                        .count();
                    (j, m)
                }
                None => (seq.frames.len(), 0),
            },
            _ => (seq.frames.len(), 0),
        };
        let kept_pos: i32 = seq.frames[first..first + kept]
            .iter()
            .map(|f| f.n_pos)
            .sum();
        let kept_image_tokens: u32 = seq.frames[first..first + kept]
            .iter()
            .map(|f| f.image_tokens)
            .sum();
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

        let rebuild_every = self.rebuild_every;
        let seq = self.seqs.get_mut(&stream).unwrap();
        seq.last_used = started;
        seq.window = seq.window.max(request.frames.len());
        let mut cached = 0;
        if same_system {
            cached += seq.sys_len;
            // Frames after the run, then frames before it.
            if first + kept < seq.frames.len() {
                let from = seq.frame_start(first + kept);
                self.ctx.seq_rm(seq.id, from, -1);
                seq.frames.truncate(first + kept);
                seq.next_pos = from;
            }
            if !remove_front(&mut self.ctx, seq, first) {
                seq.reset(&mut self.ctx);
            }
            let rebuild = rebuild_every > 0 && seq.shifted_out >= rebuild_every;
            if rebuild {
                // The kept frames again, from their cached embeddings: a fresh copy without
                // the drift of the shifts.
                let from = seq.sys_len;
                self.ctx.seq_rm(seq.id, from, -1);
                seq.next_pos = from;
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
            } else if seq.system.is_some() {
                cached += kept_pos;
            }
        } else {
            seq.reset(&mut self.ctx);
        }
        if seq.system.is_none() {
            seq.system = Some(request.system.clone());
            seq.sys_len = sys_len;
            seq.queue.push_back(Input::Text {
                tokens: system_tokens,
                logits: false,
                ends_frame: false,
            });
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
        let tail_from = seq.sys_len + seq.frames.iter().map(|f| f.n_pos).sum::<i32>();
        debug_assert_eq!(tail_from, sys_len + frames_pos);
        let question_len = question.len() as i32;
        seq.queue.push_back(Input::Text {
            tokens: question,
            logits: true,
            ends_frame: false,
        });
        let s = job.request.sampling;
        let budget = job
            .request
            .max_tokens
            .min((self.seq_ctx - tail_from - question_len).max(0) as u32);
        seq.generation = Some(Gen {
            tx: job.tx,
            ignore_eos: job.request.ignore_eos,
            submitted: job.submitted,
            started,
            sampler: Sampler::new(&s),
            stats: Stats {
                queue_ms: ms(started - job.submitted),
                images: job.request.frames.len() as u32,
                image_tokens,
                reused_images: reused,
                prompt_tokens: (tail_from + question_len) as u32,
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
        });
        Ok(())
    }

    fn prepare(&mut self, frame: &Frame) -> Result<Prepared, String> {
        prepare(
            &mut self.mtmd,
            &self.embeddings,
            &self.marker,
            self.max_slices,
            frame,
        )
    }

    /// Streams in the order a step serves them: running answers by priority and age, then
    /// sequences that only take frames.
    fn order(&self) -> Vec<u64> {
        let mut order: Vec<(u8, Priority, u64, u64)> = self
            .seqs
            .iter()
            .map(|(&k, s)| match &s.generation {
                Some(g) => (0, g.priority, g.serial, k),
                None => (1, Priority::Commentary, 0, k),
            })
            .collect();
        order.sort();
        order.into_iter().map(|(.., k)| k).collect()
    }

    fn step(&mut self) {
        let order = self.order();
        let t = Instant::now();
        self.sample = StepSample::default();
        self.encode(&order);
        let vision = t.elapsed();
        self.sample.vision_ms = ms(vision);
        self.decode_images(&order);
        let images = t.elapsed() - vision;
        self.sample.rows = self.rows.len() as u32;
        self.sample.answers = self
            .seqs
            .values()
            .filter(|s| s.generation.as_ref().is_some_and(|g| g.next.is_some()))
            .count() as u32;
        self.decode_tokens(&order);
        self.sample.tokens = self.tokens.len() as u32;
        self.sample.cells = self.seqs.values().map(|s| s.next_pos.max(0) as u32).sum();
        let edits = self.ctx.take_edits();
        self.sample.shifts = edits.shifts;
        self.sample.removes = edits.removes;
        self.sample.copies = edits.copies;
        let now = Instant::now();
        let total = ms(now - t);
        self.profile
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(now, total, self.sample, ms(images));
    }

    /// One `llama_decode` of `batch`, timed into the step's sample; with `profile_sync`, the
    /// wait for the GPU to finish it is timed apart.
    fn decode(&mut self, which: BatchKind) -> Result<(), String> {
        let batch = match which {
            BatchKind::Rows => &self.rows,
            BatchKind::Tokens => &self.tokens,
        };
        if batch.len() == 0 {
            return Ok(());
        }
        let t = Instant::now();
        let result = self.ctx.decode(batch);
        self.sample.decode_ms += ms(t.elapsed());
        if self.profile_sync {
            let t = Instant::now();
            self.ctx.synchronize();
            self.sample.sync_ms += ms(t.elapsed());
        }
        result
    }

    /// Vision: images sequences wait for, then pushed frames waiting to go in.
    fn encode(&mut self, order: &[u64]) {
        let decoding = self
            .seqs
            .values()
            .any(|s| s.generation.as_ref().is_some_and(|g| g.next.is_some()));
        let mut budget = if decoding { 1 } else { usize::MAX };
        for &stream in order {
            let seq = self.seqs.get_mut(&stream).unwrap();
            let inputs = seq
                .queue
                .iter_mut()
                .chain(seq.pending.iter_mut().flat_map(|p| p.inputs.iter_mut()));
            let mut spent = Duration::ZERO;
            let mut failure = None;
            for input in inputs {
                let Input::Image { key, data, .. } = input else {
                    continue;
                };
                let ImageData::Raw(chunks, index) = data else {
                    continue;
                };
                if let Some(e) = self.embeddings.get(key) {
                    *data = ImageData::Encoded(e);
                    continue;
                }
                if budget == 0 {
                    break;
                }
                budget -= 1;
                let t = Instant::now();
                self.sample.images += 1;
                match self.mtmd.encode_chunk(chunks, *index, self.width) {
                    Ok(floats) => {
                        let floats = Arc::new(floats);
                        self.embeddings.insert(key.clone(), floats.clone());
                        *data = ImageData::Encoded(floats);
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
                spent += t.elapsed();
            }
            if let Some(g) = &mut seq.generation {
                g.vision += spent;
            }
            if let Some(e) = failure {
                self.fail_seq(stream, e);
            }
        }
    }

    /// Every sequence's leading encoded images, in one embeddings batch.
    fn decode_images(&mut self, order: &[u64]) {
        let built = Instant::now();
        self.rows.clear();
        if self.defer_images() {
            return;
        }
        self.rows_since = None;
        let mut used = Vec::new();
        for &stream in order {
            let seq = self.seqs.get_mut(&stream).unwrap();
            let mut took = false;
            while let Some(Input::Image {
                n_tokens,
                data: ImageData::Encoded(floats),
                ends_frame,
                ..
            }) = seq.queue.front()
            {
                if *n_tokens > self.rows.room() {
                    break;
                }
                for (i, row) in floats.chunks_exact(self.width).enumerate() {
                    self.rows.push_row(row, seq.next_pos + i as i32, seq.id);
                }
                seq.next_pos += *n_tokens as i32;
                if *ends_frame {
                    seq.queued_frames -= 1;
                }
                seq.queue.pop_front();
                took = true;
            }
            if took {
                used.push(stream);
            }
        }
        self.sample.build_ms += ms(built.elapsed());
        if let Err(e) = self.decode(BatchKind::Rows) {
            for stream in used {
                self.fail_seq(stream, e.clone());
            }
        }
    }

    /// Whether to leave ready image rows for a later step. Each embeddings batch is a
    /// `llama_decode` of its own that every running answer waits for, so while answers run,
    /// pushed frames (needed at the next cycle, not now) are gathered into fewer, fuller
    /// batches: rows go in at once only when a request waits for them, a batch's worth is
    /// ready, or the oldest has waited `ROWS_WAIT`.
    fn defer_images(&mut self) -> bool {
        const ROWS_WAIT: Duration = Duration::from_millis(250);
        let decoding = self
            .seqs
            .values()
            .any(|s| s.generation.as_ref().is_some_and(|g| g.next.is_some()));
        if !decoding {
            return false;
        }
        let waiting: Vec<u64> = self.waiting.iter().map(|w| key(&w.job)).collect();
        let mut ready = 0;
        for (stream, seq) in &self.seqs {
            let rows: usize = seq
                .queue
                .iter()
                .map_while(|i| match i {
                    Input::Image {
                        n_tokens,
                        data: ImageData::Encoded(_),
                        ..
                    } => Some(*n_tokens),
                    _ => None,
                })
                .sum();
            let asked = seq.generation.is_some() || waiting.contains(stream);
            if rows > 0 && asked {
                return false;
            }
            ready += rows;
        }
        if ready == 0 {
            return true;
        }
        let since = *self.rows_since.get_or_insert_with(Instant::now);
        ready * 2 < self.rows.room() && since.elapsed() < ROWS_WAIT
    }

    /// Running answers' next tokens and prompt text, in one token batch; then sampling.
    fn decode_tokens(&mut self, order: &[u64]) {
        let built = Instant::now();
        self.tokens.clear();
        // (stream, batch index) of each entry whose logits are sampled.
        let mut sampled: Vec<(u64, i32)> = Vec::new();
        let mut used = Vec::new();
        // Answers' tokens by sequence id: with split KV buffers llama.cpp puts consecutive
        // sequences with one token each in one micro-batch, and only those.
        let mut by_seq: Vec<(i32, u64)> = order.iter().map(|&k| (self.seqs[&k].id, k)).collect();
        by_seq.sort();
        for (_, stream) in by_seq {
            let seq = self.seqs.get_mut(&stream).unwrap();
            if let Some(token) = seq.generation.as_mut().and_then(|g| g.next.take()) {
                let i = self.tokens.push(token, seq.next_pos, seq.id, true);
                seq.next_pos += 1;
                sampled.push((stream, i));
                used.push(stream);
            }
        }
        for &stream in order {
            let seq = self.seqs.get_mut(&stream).unwrap();
            let mut took = false;
            while self.tokens.room() > 0 {
                let Some(Input::Text {
                    tokens,
                    logits,
                    ends_frame,
                }) = seq.queue.front_mut()
                else {
                    break;
                };
                let n = tokens.len().min(self.tokens.room());
                let whole = n == tokens.len();
                for (j, &t) in tokens[..n].iter().enumerate() {
                    let last = whole && j + 1 == n;
                    let i = self.tokens.push(t, seq.next_pos, seq.id, last && *logits);
                    if last && *logits {
                        sampled.push((stream, i));
                    }
                    seq.next_pos += 1;
                }
                took = true;
                if whole {
                    if *ends_frame {
                        seq.queued_frames -= 1;
                    }
                    seq.queue.pop_front();
                } else {
                    tokens.drain(..n);
                }
            }
            if took && !used.contains(&stream) {
                used.push(stream);
            }
        }
        self.sample.build_ms += ms(built.elapsed());
        if let Err(e) = self.decode(BatchKind::Tokens) {
            for stream in used {
                self.fail_seq(stream, e.clone());
            }
            return;
        }
        let t = Instant::now();
        for (stream, index) in sampled {
            self.sample(stream, index);
        }
        self.sample.sampling_ms = ms(t.elapsed());
    }

    fn sample(&mut self, stream: u64, index: i32) {
        let Some(seq) = self.seqs.get_mut(&stream) else {
            return;
        };
        let Some(g) = seq.generation.as_mut() else {
            return;
        };
        let now = Instant::now();
        if g.decode_started.is_none() {
            g.decode_started = Some(now);
            g.stats.vision_ms = ms(g.vision);
            g.stats.prefill_ms = ms((now - g.started).saturating_sub(g.vision));
        }
        if let Some(probe) = g.probe.take() {
            let _ = probe.send(self.ctx.logits(index, self.model.n_vocab()).to_vec());
            return self.end(stream, End::Done);
        }
        let token = g
            .sampler
            .sample(self.ctx.logits(index, self.model.n_vocab()));
        if self.model.is_end(token) && !g.ignore_eos {
            return self.end(stream, End::Done);
        }
        g.stats.generated_tokens += 1;
        self.model.piece(token, &mut g.bytes);
        let text = take_utf8(&mut g.bytes);
        if !text.is_empty() {
            g.first_token_at.get_or_insert(now);
            g.outbox.push_str(&text);
        }
        if !g.outbox.is_empty() {
            match g
                .tx
                .try_send(Ok(Output::Text(std::mem::take(&mut g.outbox))))
            {
                Ok(()) => {}
                // A slow reader: keep the text for the next token (never block the others).
                Err(TrySendError::Full(Ok(Output::Text(t)))) => g.outbox = t,
                Err(_) => return self.end(stream, End::Cancelled),
            }
        }
        if g.stats.generated_tokens >= g.budget {
            return self.end(stream, End::Done);
        }
        g.next = Some(token);
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
            let mut end_pos = seq.sys_len;
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

impl Seq {
    fn new(id: i32, window: usize) -> Seq {
        Seq {
            id,
            system: None,
            sys_len: 0,
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

    fn idle(&self) -> bool {
        self.generation.is_none() && self.queue.is_empty()
    }

    /// Position of frame `i` (all frames before it evaluated or queued in order).
    fn frame_start(&self, i: usize) -> i32 {
        self.sys_len + self.frames[..i].iter().map(|f| f.n_pos).sum::<i32>()
    }

    /// Empties the sequence: it starts over with the next request.
    fn reset(&mut self, ctx: &mut ffi::Context) {
        ctx.seq_rm(self.id, -1, -1);
        self.system = None;
        self.sys_len = 0;
        self.frames.clear();
        self.queued_frames = 0;
        self.next_pos = 0;
        self.queue.clear();
        self.shifted_out = 0;
    }

    /// Queues a frame after the last one (an older or repeated frame is ignored).
    fn append(&mut self, prepared: Prepared) {
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
fn trim(ctx: &mut ffi::Context, seq: &mut Seq) {
    let in_kv = seq.frames.len() - seq.queued_frames;
    let excess = seq.frames.len().saturating_sub(seq.window).min(in_kv);
    if !remove_front(ctx, seq, excess) {
        seq.reset(ctx);
    }
}

/// Removes the first `n` frames (all evaluated) and shifts what follows down. False when
/// llama.cpp can't (the caller then starts the sequence over).
fn remove_front(ctx: &mut ffi::Context, seq: &mut Seq, n: usize) -> bool {
    if n == 0 {
        return true;
    }
    let p0 = seq.sys_len;
    let p1 = seq.frame_start(n);
    if !ctx.can_shift() || !ctx.seq_rm(seq.id, p0, p1) {
        return false;
    }
    ctx.seq_shift(seq.id, p1, p0 - p1);
    seq.frames.drain(..n);
    seq.next_pos -= p1 - p0;
    seq.shifted_out += n as u32;
    true
}

fn prepare(
    mtmd: &mut ffi::Mtmd,
    cache: &EmbeddingCache,
    marker: &str,
    max_slices: u32,
    frame: &Frame,
) -> Result<Prepared, String> {
    let content = content_key(&frame.image);
    let key = frame_key(frame.pts, &content);
    let rgb = to_rgb(&frame.image).and_then(|rgb| fit_to_slices(rgb, max_slices))?;
    let mut bitmap = ffi::Bitmap::rgb(rgb.width, rgb.height, &rgb.data)?;
    bitmap.set_id(&key);
    let chunks = Rc::new(mtmd.tokenize(&frame_piece(frame.pts, marker), &[bitmap])?);
    let mut inputs = Vec::new();
    let (mut image_tokens, mut reused, mut slice) = (0, 0, 0);
    for i in 0..chunks.len() {
        match chunks.kind(i) {
            ChunkKind::Text => inputs.push(Input::Text {
                tokens: chunks.text_tokens(i).to_vec(),
                logits: false,
                ends_frame: false,
            }),
            ChunkKind::Image => {
                let chunk_key = (content.clone(), slice);
                slice += 1;
                let n_tokens = chunks.n_tokens(i);
                image_tokens += n_tokens as u32;
                let data = match cache.get(&chunk_key) {
                    Some(e) => {
                        reused += 1;
                        ImageData::Encoded(e)
                    }
                    None => ImageData::Raw(chunks.clone(), i),
                };
                inputs.push(Input::Image {
                    key: chunk_key,
                    n_tokens,
                    data,
                    ends_frame: false,
                });
            }
            ChunkKind::Other => return Err("audio input is not supported".into()),
        }
    }
    match inputs.last_mut() {
        Some(Input::Text { ends_frame, .. }) | Some(Input::Image { ends_frame, .. }) => {
            *ends_frame = true
        }
        None => return Err("the frame gave no input".into()),
    }
    Ok(Prepared {
        key,
        frame: frame.clone(),
        inputs,
        n_pos: chunks.n_positions(),
        image_tokens,
        reused,
    })
}

impl Input {
    fn is_raw(&self) -> bool {
        matches!(
            self,
            Input::Image {
                data: ImageData::Raw(..),
                ..
            }
        )
    }
}

/// The batched path feeds image embeddings as rows of its own batches, one position each,
/// with causal attention; a projector needing M-RoPE positions or non-causal attention
/// would need llama.cpp's per-image helper instead.
fn check_plain_embeddings(mtmd: &mut ffi::Mtmd, marker: &str) -> Result<(), String> {
    let bitmap = ffi::Bitmap::rgb(28, 28, &[128; 28 * 28 * 3])?;
    let chunks = mtmd.tokenize(marker, &[bitmap])?;
    match (0..chunks.len()).find(|&i| chunks.kind(i) == ChunkKind::Image) {
        Some(i) if mtmd.plain_embeddings(&chunks, i) => Ok(()),
        Some(_) => Err(
            "this vision projector needs M-RoPE positions or non-causal image attention, which the batched engine does not feed".into(),
        ),
        None => Err("the vision projector gave no image chunk for a test image".into()),
    }
}

/// A picture's content key and the slice number within it.
type ChunkKey = (String, usize);

/// The embeddings of recent image chunks, oldest dropped first: a frame is encoded once,
/// whether it comes pushed, in a request, or again after a rebuild.
struct EmbeddingCache {
    entries: VecDeque<(ChunkKey, Arc<Vec<f32>>)>,
    capacity: usize,
}

impl EmbeddingCache {
    fn new(capacity: usize) -> EmbeddingCache {
        EmbeddingCache {
            entries: VecDeque::new(),
            capacity,
        }
    }

    fn get(&self, key: &ChunkKey) -> Option<Arc<Vec<f32>>> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn insert(&mut self, key: ChunkKey, value: Arc<Vec<f32>>) {
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back((key, value));
    }
}
