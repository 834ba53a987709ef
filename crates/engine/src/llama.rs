//! MiniCPM-o 4.5 in process through llama.cpp, as a streaming, batched scheduler.
//!
//! One worker thread owns the model and one llama.cpp context (never the async runtime).
//! The context holds one KV-cache *sequence* per stream (`n_seq_max` = `max_streams` + 1;
//! the extra one serves requests that come without a stream, like `describe`). A stream's
//! sequence holds its system prompt, then its sampled frames in time order; frames pushed
//! with [`Engine::push_frame`] are vision-encoded and evaluated as they arrive, and a frame
//! that leaves the window has its positions removed and the later ones shifted down
//! (`llama_memory_seq_rm` / `llama_memory_seq_add`). A request re-uses every frame its
//! sequence already holds, evaluates the missing ones and its question, and decodes; the
//! question and answer are removed afterwards, so a sequence stays bounded for any running
//! time.
//!
//! Every active answer advances by one token in a single `llama_decode` per step, together
//! with the prompt text of requests that joined since the last step; image embeddings of
//! several streams share one embeddings batch before it. The vision encoder runs one frame
//! at a time (MiniCPM-V's projector does not batch images), one frame per step while answers
//! are running, so no stream's tokens wait long. See `worker` for the step and `docs/design.md`
//! for the layout and its measured drift.

mod ffi;
mod profile;
mod replicas;
mod sampling;
mod worker;

pub use profile::{Breakdown, Stat, StepProfile};
pub use replicas::Replicas;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use kibitz_frames::Rgb;
use serde::Serialize;

use crate::{
    Engine, EngineError, EngineInfo, Frame, Generation, Image, Priority, Request, StreamKey,
};
use worker::{Command, Job, Worker};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashAttention {
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub llm: PathBuf,
    pub mmproj: PathBuf,
    /// Layers to offload; `None` = all of them when llama.cpp has a GPU backend.
    pub gpu_layers: Option<u32>,
    /// KV cells one stream's sequence may hold: system prompt + window frames + question +
    /// answer. The context holds `context_size` x its sequences' count cells. 0 (the
    /// default) derives it from what a sequence holds: [`SYSTEM_ALLOWANCE`] + `window_frames`
    /// frames of `max_slices` slices + [`QUESTION_ALLOWANCE`] + [`ANSWER_ALLOWANCE`],
    /// rounded up to 256.
    pub context_size: u32,
    /// CPU threads; `None` = all cores.
    pub threads: Option<u32>,
    pub flash_attention: FlashAttention,
    /// Largest number of 448x448 slices an image may be cut into. 1 = every frame costs one
    /// 64-token image (the frame is scaled down to about 448x448, aspect kept).
    pub max_slices: u32,
    /// Tokens (or image-embedding rows) per `llama_decode` call.
    pub batch_size: u32,
    /// Streams whose sequences the context keeps at once. A further stream takes the
    /// sequence of the one idle longest (which then starts over at its next request).
    pub max_streams: u32,
    /// One KV buffer shared by all sequences (true), or one per sequence. This llama.cpp
    /// splits a batch that mixes sequences into one micro-batch per sequence when the
    /// buffers are split, which undoes batching; unified is the default.
    pub kv_unified: bool,
    /// Frames a stream keeps in its sequence when they are pushed as they arrive (the
    /// oldest leaves as a new one comes); a request with more frames raises it.
    pub window_frames: usize,
    /// Rebuild a stream's frames from their cached embeddings once this many frames have
    /// been shifted out since the last rebuild (0 = never). See `docs/design.md` (drift).
    pub rebuild_every: u32,
    /// Put the model and the projector on this GPU alone (an index into llama.cpp's GPUs),
    /// for one replica per GPU ([`Replicas`]); `None` = llama.cpp's default placement.
    pub gpu: Option<u32>,
    /// Call `llama_synchronize` after each decode so the step profile separates the GPU's
    /// time from the host's (see [`StepProfile`]); costs the overlap, so for benchmarks.
    pub profile_sync: bool,
    /// Streams whose system piece is the same share its KV cells: it is evaluated once and
    /// copied into each stream's sequence with `llama_memory_seq_cp` (which, in the unified
    /// cache, adds a sequence id to the cells and copies nothing), kept in a template
    /// sequence of its own. Only with `kv_unified` (across split buffers llama.cpp would copy
    /// whole buffers); off or split: each stream evaluates its own.
    pub share_system: bool,
    /// A frame leaving the window is removed without shifting the later positions down
    /// (positions may have gaps); a sequence is compacted, one shift for many frames, only
    /// when it nears its position limit. False: every removal shifts at once (the old way).
    pub lazy_shifts: bool,
}

/// Cells allowed for a system piece when `context_size` is derived (the profiles' are ~300
/// tokens).
pub const SYSTEM_ALLOWANCE: u32 = 512;
/// Cells allowed for a cycle's question when `context_size` is derived.
pub const QUESTION_ALLOWANCE: u32 = 128;
/// Cells allowed for an answer when `context_size` is derived (commentary asks for 64
/// tokens, a viewer's question for more).
pub const ANSWER_ALLOWANCE: u32 = 256;

impl LlamaConfig {
    pub fn new(llm: impl Into<PathBuf>, mmproj: impl Into<PathBuf>) -> Self {
        LlamaConfig {
            llm: llm.into(),
            mmproj: mmproj.into(),
            gpu_layers: None,
            context_size: 0,
            threads: None,
            flash_attention: FlashAttention::Auto,
            max_slices: 1,
            batch_size: 1024,
            max_streams: 16,
            kv_unified: true,
            window_frames: 4,
            rebuild_every: 0,
            gpu: None,
            profile_sync: false,
            share_system: true,
            lazy_shifts: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Model(String),
    #[error("the engine thread could not start: {0}")]
    Thread(String),
}

/// What the worker holds, for tests and status: one entry per stream sequence.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EngineState {
    pub sequences: Vec<SequenceState>,
    /// Sequence slots not in use.
    pub free: usize,
    /// Requests accepted and not yet started.
    pub waiting: usize,
    /// Vision embeddings kept for reuse.
    pub cached_embeddings: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SequenceState {
    /// The stream's key id (`u64::MAX` for requests without a stream).
    pub stream: u64,
    pub seq: i32,
    /// Frames in the sequence (evaluated or queued).
    pub frames: usize,
    /// Next position to evaluate: what the sequence spans once its queue is evaluated
    /// (gaps included: see `LlamaConfig::lazy_shifts`).
    pub positions: i32,
    /// Cells it holds once its queue is evaluated: system piece and frames, no gaps.
    pub held: i32,
    /// Its system piece came from another sequence (shared cells).
    pub shared_system: bool,
    /// Cells llama.cpp holds for it (largest - smallest position + 1; 0 when empty).
    pub cells: i32,
    pub generating: bool,
    /// Frames pushed while a request ran, added after it.
    pub pending: usize,
}

/// A loaded model pair with its worker thread. Cloning shares the same worker.
#[derive(Clone)]
pub struct LlamaEngine {
    worker: Arc<WorkerHandle>,
    in_flight: Arc<AtomicUsize>,
    alive: Arc<AtomicBool>,
    info: EngineInfo,
    max_streams: usize,
    profile: Arc<std::sync::Mutex<profile::Steps>>,
}

impl LlamaEngine {
    /// Loads both files on a new worker thread and returns once they are ready.
    pub fn load(config: LlamaConfig) -> Result<LlamaEngine, LoadError> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (commands, command_rx) = mpsc::channel::<Command>();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let counter = in_flight.clone();
        let alive = Arc::new(AtomicBool::new(true));
        let guard = AliveGuard(alive.clone());
        let max_streams = config.max_streams.max(1) as usize;
        let profile = Arc::new(std::sync::Mutex::new(profile::Steps::new(
            config.profile_sync,
        )));
        let steps = profile.clone();
        let thread = thread::Builder::new()
            .name("llama".into())
            .spawn(move || match Worker::load(&config, counter, steps) {
                Ok(worker) => {
                    let _guard = guard;
                    let _ = ready_tx.send(Ok(worker.info().clone()));
                    worker.run(command_rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| LoadError::Thread(e.to_string()))?;
        let info = ready_rx
            .recv()
            .map_err(|_| LoadError::Thread("it stopped while loading".into()))?
            .map_err(LoadError::Model)?;
        Ok(LlamaEngine {
            worker: Arc::new(WorkerHandle {
                commands: Some(commands),
                thread: Some(thread),
            }),
            in_flight,
            alive,
            info,
            max_streams,
            profile,
        })
    }

    /// One engine per GPU of `gpus` (indexes into [`LlamaEngine::gpus`]), each with the whole
    /// model and `config.max_streams` streams, behind one [`Replicas`]. Loaded one after
    /// another; the first that fails to load is the error.
    pub fn load_replicas(config: &LlamaConfig, gpus: &[u32]) -> Result<Replicas, LoadError> {
        let mut engines: Vec<Arc<dyn Engine>> = Vec::new();
        for &gpu in gpus {
            let mut c = config.clone();
            c.gpu = Some(gpu);
            engines.push(Arc::new(LlamaEngine::load(c)?));
        }
        if engines.is_empty() {
            return Err(LoadError::Model("no GPU to load replicas on".into()));
        }
        Ok(Replicas::new(engines))
    }

    /// The GPUs llama.cpp sees, in its order (what [`LlamaConfig::gpu`] indexes).
    pub fn gpus() -> Vec<String> {
        ffi::gpu_devices()
    }

    /// The worker's sequences once the work in hand is done (waits up to `timeout`). For
    /// tests (feature `fake`): status shows what a running server needs.
    #[cfg(any(test, feature = "fake"))]
    pub fn state(&self, timeout: Duration) -> Option<EngineState> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Inspect(tx)).ok()?;
        rx.recv_timeout(timeout).ok()
    }

    /// Builds `request`'s prompt in `stream`'s sequence (or the shared one of requests
    /// without a stream) exactly as for an answer, and returns the logits of its last token
    /// instead of answering: how drift and batching differences are measured (tests and
    /// measurements only: feature `fake`).
    #[cfg(any(test, feature = "fake"))]
    pub fn probe(
        &self,
        stream: Option<&StreamKey>,
        request: Request,
        timeout: Duration,
    ) -> Result<Vec<f32>, EngineError> {
        let (tx, mut generation) = Generation::channel();
        let (probe, logits) = mpsc::channel();
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let job = Job {
            stream: stream.map(StreamKey::id),
            priority: Priority::Question,
            request,
            tx,
            submitted: Instant::now(),
            probe: Some(probe),
        };
        if let Err(e) = self.send(Command::Submit(job)) {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(e);
        }
        let result = logits.recv_timeout(timeout);
        // An error (a bad request) comes through the generation instead.
        if let Ok(Some(Err(e))) = generation.rx.try_recv().map(Some) {
            return Err(e);
        }
        result.map_err(|_| EngineError::Timeout("no logits from the llama engine".into()))
    }

    /// Where the worker's steps went: totals since the start (or the last reset) and the
    /// p50/mean breakdown of the last 30 s (`/api/status` shows it under `steps`).
    pub fn step_profile(&self) -> StepProfile {
        self.profile
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .profile(Instant::now())
    }

    /// Forgets the steps so far, so a bench measures its run without its warm-up.
    pub fn reset_step_profile(&self) {
        self.profile
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reset();
    }

    fn send(&self, command: Command) -> Result<(), EngineError> {
        let sent = self
            .worker
            .commands
            .as_ref()
            .is_some_and(|c| c.send(command).is_ok());
        if sent {
            Ok(())
        } else {
            Err(EngineError::Unavailable(
                "the llama engine thread has stopped".into(),
            ))
        }
    }

    fn queue(
        &self,
        stream: Option<u64>,
        priority: Priority,
        request: Request,
    ) -> Result<Generation, EngineError> {
        let (tx, generation) = Generation::channel();
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let job = Job {
            stream,
            priority,
            request,
            tx,
            submitted: Instant::now(),
            probe: None,
        };
        if let Err(e) = self.send(Command::Submit(job)) {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(e);
        }
        Ok(generation)
    }
}

impl Engine for LlamaEngine {
    /// A request without a stream: it shares one sequence with every other such request
    /// (they run one after another), which keeps a repeated system prompt's KV entries.
    fn submit(&self, request: Request) -> Result<Generation, EngineError> {
        self.queue(None, Priority::Question, request)
    }

    fn submit_for(
        &self,
        stream: &StreamKey,
        priority: Priority,
        request: Request,
    ) -> Result<Generation, EngineError> {
        self.queue(Some(stream.id()), priority, request)
    }

    fn push_frame(&self, stream: &StreamKey, frame: Frame) {
        let _ = self.send(Command::Frame {
            stream: stream.id(),
            frame,
        });
    }

    fn close_stream(&self, stream: &StreamKey) {
        let _ = self.send(Command::Close {
            stream: stream.id(),
        });
    }

    /// Its streams while the worker thread runs; 0 once it has stopped (what tells
    /// [`Replicas`] that this replica failed).
    fn parallelism(&self) -> usize {
        if self.alive.load(Ordering::SeqCst) {
            self.max_streams
        } else {
            0
        }
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({ "max_streams": self.max_streams, "steps": self.step_profile() })
    }

    fn info(&self) -> EngineInfo {
        self.info.clone()
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    fn health(&self) -> BoxFuture<'_, bool> {
        let alive = self.alive.load(Ordering::SeqCst);
        Box::pin(async move { alive })
    }
}

/// Owns the worker thread. When the last engine handle goes, the queue closes and the
/// thread is joined, so llama.cpp frees its GPU memory before the process exits (CUDA
/// aborts when contexts are torn down during exit).
struct WorkerHandle {
    commands: Option<mpsc::Sender<Command>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.commands.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the llama engine thread panicked");
            }
        }
    }
}

/// Clears the engine's `alive` flag when the worker thread ends, by return or by panic.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Names a picture by its size and content (the image as given, before any resize): the
/// vision embeddings depend on nothing else, so they are cached under this name (FNV-1a over
/// the bytes: ~0.3 ms for a 448x252 RGB frame, less for a JPEG).
fn content_key(image: &Image) -> String {
    let bytes: &[u8] = match image {
        Image::Rgb(rgb) => &rgb.data,
        Image::Jpeg(jpeg) => &jpeg.bytes,
    };
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("{}x{}:{hash:016x}", image.width(), image.height())
}

/// Names a frame by its time and content, so the same frame pushed, then sent in a request,
/// then in the next one, is recognised as the one already in a stream's sequence.
fn frame_key(pts: Duration, content: &str) -> String {
    format!("{}:{content}", pts.as_nanos())
}

/// The prompt is Qwen3 ChatML cut in the pieces a stream's sequence is made of, each
/// tokenized on its own: the system piece (which opens the user turn), one piece per frame
/// (its time on the source's clock, so a frame's text never changes while it stays in the
/// window), and the question (which closes the turn and opens the answer with an empty
/// think block: thinking off).
fn system_piece(system: &str) -> String {
    if system.is_empty() {
        "<|im_start|>user\n".to_string()
    } else {
        format!("<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
    }
}

fn frame_piece(pts: Duration, marker: &str) -> String {
    format!("Frame at {:.1}s: {marker}\n", pts.as_secs_f64())
}

fn question_piece(user: &str) -> String {
    format!("{user}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
}

/// The whole prompt as the pieces make it (for logs and tests).
pub fn chat_prompt(request: &Request, marker: &str) -> String {
    let mut p = system_piece(&request.system);
    for frame in &request.frames {
        p.push_str(&frame_piece(frame.pts, marker));
    }
    p.push_str(&question_piece(&request.user));
    p
}

/// The longest valid UTF-8 prefix of `bytes`, removed from it. Invalid bytes that can't
/// start a character are replaced, so a broken token never stalls the stream.
fn take_utf8(bytes: &mut Vec<u8>) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            let s = s.to_owned();
            bytes.clear();
            s
        }
        Err(e) if e.error_len().is_none() => {
            // An incomplete character at the end: keep it for the next token.
            let valid = e.valid_up_to();
            let s = String::from_utf8_lossy(&bytes[..valid]).into_owned();
            bytes.drain(..valid);
            s
        }
        Err(_) => {
            let s = String::from_utf8_lossy(bytes).into_owned();
            bytes.clear();
            s
        }
    }
}

fn to_rgb(image: &Image) -> Result<Rgb, String> {
    let rgb = match image {
        Image::Rgb(rgb) => rgb.clone(),
        Image::Jpeg(jpeg) => {
            let img = turbojpeg::decompress(&jpeg.bytes, turbojpeg::PixelFormat::RGB)
                .map_err(|e| format!("not a readable JPEG: {e}"))?;
            let mut data = Vec::with_capacity(img.width * img.height * 3);
            for row in img.pixels.chunks(img.pitch).take(img.height) {
                data.extend_from_slice(&row[..img.width * 3]);
            }
            Rgb {
                width: img.width as u32,
                height: img.height as u32,
                data: data.into(),
            }
        }
    };
    if rgb.width == 0 || rgb.height == 0 {
        return Err("the image is empty".into());
    }
    if rgb.data.len() != rgb.width as usize * rgb.height as usize * 3 {
        return Err(format!(
            "{} bytes of RGB do not fit {}x{}",
            rgb.data.len(),
            rgb.width,
            rgb.height
        ));
    }
    Ok(rgb)
}

/// Sizes a frame for `max_slices` slices the way the inference window does (see
/// [`kibitz_frames::model_size`]), so a still image costs what a video frame costs.
fn fit_to_slices(rgb: Rgb, max_slices: u32) -> Result<Rgb, String> {
    let (w, h) = kibitz_frames::model_size(rgb.width, rgb.height, max_slices);
    kibitz_frames::Resizer::new()
        .resize(&rgb, w, h)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_tokens_is_joined() {
        let snowman = "☃".as_bytes();
        let mut pending = snowman[..1].to_vec();
        assert_eq!(take_utf8(&mut pending), "");
        pending.extend_from_slice(&snowman[1..]);
        assert_eq!(take_utf8(&mut pending), "☃");
        assert!(pending.is_empty());
    }

    #[test]
    fn prompt_has_frames_in_order_and_no_thinking() {
        use std::time::Duration;
        let rgb = Rgb {
            width: 1,
            height: 1,
            data: vec![0, 0, 0].into(),
        };
        let frames = (0..3)
            .map(|i| Frame {
                image: Image::Rgb(rgb.clone()),
                pts: Duration::from_millis(1000 + 500 * i),
            })
            .collect();
        let p = chat_prompt(&Request::new(frames, "SYS", "What now?"), "<M>");
        assert!(p.starts_with("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n"));
        assert!(p.contains("Frame at 1.0s: <M>\nFrame at 1.5s: <M>\nFrame at 2.0s: <M>\nWhat now?"));
        assert!(p.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        assert_eq!(p.matches("<M>").count(), 3);
    }
}
