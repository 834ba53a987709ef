//! MiniCPM-o 4.5 in process through llama.cpp.
//!
//! The model and its contexts live on one worker thread (never on the async runtime) that
//! takes requests from a queue in arrival order, so any number of callers share one loaded
//! model without mixing their answers. A request's frames are encoded in as few vision
//! batches as llama.cpp allows, the prompt is filled chunk by chunk, and the text streams
//! back through the request's channel; a closed channel (the caller dropped its
//! `Generation`) stops the work at the next token.
//!
//! The system prompt prefix stays in the KV cache between requests: a commentary loop sends
//! the same system prompt every cycle, and only the part after the first difference is
//! evaluated again.

mod ffi;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Instant;

use futures::future::BoxFuture;
use kibitz_frames::Rgb;
use tokio::sync::mpsc::Sender;

use crate::{Engine, EngineError, EngineInfo, Generation, Image, Output, Request, Stats};
use ffi::ChunkKind;

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
    pub context_size: u32,
    /// CPU threads; `None` = all cores.
    pub threads: Option<u32>,
    pub flash_attention: FlashAttention,
    /// Largest number of 448x448 slices an image may be cut into. 1 = every frame costs one
    /// 64-token image (the frame is scaled down to about 448x448, aspect kept).
    pub max_slices: u32,
    /// Tokens per `llama_decode` call during prefill.
    pub batch_size: u32,
}

impl LlamaConfig {
    pub fn new(llm: impl Into<PathBuf>, mmproj: impl Into<PathBuf>) -> Self {
        LlamaConfig {
            llm: llm.into(),
            mmproj: mmproj.into(),
            gpu_layers: None,
            context_size: 4096,
            threads: None,
            flash_attention: FlashAttention::Auto,
            max_slices: 1,
            batch_size: 1024,
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

/// Where a request's answer goes.
type Reply = Sender<Result<Output, EngineError>>;

struct Job {
    request: Request,
    tx: Reply,
    submitted: Instant,
}

/// A loaded model pair with its worker thread. Cloning shares the same worker.
#[derive(Clone)]
pub struct LlamaEngine {
    worker: Arc<WorkerHandle>,
    in_flight: Arc<AtomicUsize>,
    alive: Arc<AtomicBool>,
    info: EngineInfo,
}

impl LlamaEngine {
    /// Loads both files on a new worker thread and returns once they are ready.
    pub fn load(config: LlamaConfig) -> Result<LlamaEngine, LoadError> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let counter = in_flight.clone();
        let alive = Arc::new(AtomicBool::new(true));
        let guard = AliveGuard(alive.clone());
        let thread = thread::Builder::new()
            .name("llama".into())
            .spawn(move || match Worker::load(&config) {
                Ok(mut worker) => {
                    let _guard = guard;
                    let _ = ready_tx.send(Ok(worker.info.clone()));
                    for job in job_rx {
                        // The count drops before the last message goes out, so a caller that
                        // has its answer never sees its own request still in flight.
                        let (tx, last) = worker.serve(job);
                        counter.fetch_sub(1, Ordering::SeqCst);
                        if let Some(last) = last {
                            let _ = tx.blocking_send(last);
                        }
                    }
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
                jobs: Some(jobs),
                thread: Some(thread),
            }),
            in_flight,
            alive,
            info,
        })
    }
}

impl Engine for LlamaEngine {
    fn submit(&self, request: Request) -> Result<Generation, EngineError> {
        let (tx, generation) = Generation::channel();
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let job = Job {
            request,
            tx,
            submitted: Instant::now(),
        };
        let sent = self
            .worker
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(job).is_ok());
        if !sent {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Unavailable(
                "the llama engine thread has stopped".into(),
            ));
        }
        Ok(generation)
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
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.jobs.take();
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

struct Worker {
    // Field order is drop order: contexts before the model they point into.
    mtmd: ffi::Mtmd,
    ctx: ffi::Context,
    model: ffi::Model,
    batch: ffi::Batch,
    marker: String,
    max_slices: u32,
    /// Tokens of the first text chunk whose KV entries are still valid, from position 0.
    cached: Vec<ffi::Token>,
    /// Vision embeddings of recent frames: consecutive commentary cycles share frames.
    embeddings: EmbeddingCache,
    info: EngineInfo,
}

impl Worker {
    fn load(config: &LlamaConfig) -> Result<Worker, String> {
        ffi::route_logs();
        let gpu = ffi::gpu_device();
        let gpu_layers = match (config.gpu_layers, &gpu) {
            (Some(n), _) => n as i32,
            (None, Some(_)) => -1, // all
            (None, None) => 0,
        };
        let threads = config.threads.map(|t| t as i32).unwrap_or_else(|| {
            thread::available_parallelism()
                .map(|n| n.get() as i32)
                .unwrap_or(4)
        });
        let flash_attn = match config.flash_attention {
            FlashAttention::Auto => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_AUTO,
            FlashAttention::On => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED,
            FlashAttention::Off => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED,
        };
        let model = ffi::Model::load(&config.llm, gpu_layers)?;
        let ctx = ffi::Context::new(
            &model,
            &ffi::ContextParams {
                n_ctx: config.context_size,
                n_batch: config.batch_size,
                threads,
                flash_attn,
            },
        )?;
        let use_gpu = gpu.is_some() && gpu_layers != 0;
        let mtmd = ffi::Mtmd::load(&config.mmproj, &model, use_gpu, threads, flash_attn)?;
        let backend = match (&gpu, use_gpu) {
            (Some(dev), true) => format!("CUDA: {dev}"),
            _ => format!("CPU ({threads} threads)"),
        };
        tracing::info!(
            model = %model.describe(),
            layers = model.n_layer(),
            offloaded = if gpu_layers < 0 { model.n_layer() } else { gpu_layers.min(model.n_layer()) },
            %backend,
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
        let batch = ffi::Batch::new(ctx.n_batch() as usize);
        Ok(Worker {
            mtmd,
            ctx,
            model,
            batch,
            marker: ffi::Mtmd::marker(),
            max_slices: config.max_slices.max(1),
            cached: Vec::new(),
            embeddings: EmbeddingCache::default(),
            info,
        })
    }

    /// Runs one job; returns its channel and the last message to send on it, if any.
    fn serve(&mut self, job: Job) -> (Reply, Option<Result<Output, EngineError>>) {
        let tx = job.tx.clone();
        if tx.is_closed() {
            return (tx, None); // cancelled while queued
        }
        let last = match self.generate(job) {
            Ok(stats) => Some(Ok(Output::Done(stats))),
            Err(Failure(e)) => Some(Err(e)),
            Err(Cancelled) => None,
        };
        (tx, last)
    }

    fn generate(&mut self, job: Job) -> Result<Stats, Stop> {
        let Job {
            request,
            tx,
            submitted,
        } = job;
        let started = Instant::now();
        let mut stats = Stats {
            queue_ms: ms(started - submitted),
            images: request.frames.len() as u32,
            ..Stats::default()
        };

        let bitmaps = request
            .frames
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let rgb = to_rgb(&f.image).and_then(|rgb| fit_to_slices(rgb, self.max_slices));
                let rgb = rgb.map_err(|e| bad(format!("frame {i}: {e}")))?;
                let mut bitmap = ffi::Bitmap::rgb(rgb.width, rgb.height, &rgb.data)
                    .map_err(|e| bad(format!("frame {i}: {e}")))?;
                bitmap.set_id(&frame_key(f.pts, &rgb));
                Ok(bitmap)
            })
            .collect::<Result<Vec<_>, Stop>>()?;
        let prompt = chat_prompt(&request, &self.marker);
        let chunks = self.mtmd.tokenize(&prompt, &bitmaps).map_err(bad)?;

        let n_ctx = self.ctx.n_ctx() as i32;
        let needed = chunks.n_positions();
        if needed + 1 > n_ctx {
            return Err(bad(format!(
                "the prompt needs {needed} positions but the context holds {n_ctx}; raise --context-size or send fewer frames"
            )));
        }
        stats.prompt_tokens = needed as u32;
        stats.image_tokens = (0..chunks.len())
            .filter(|&i| chunks.kind(i) == ChunkKind::Image)
            .map(|i| chunks.n_tokens(i) as u32)
            .sum();

        // Vision: frames seen in an earlier cycle reuse their embeddings; the rest are
        // encoded together, batched.
        let t = Instant::now();
        let keys = image_keys(&chunks);
        let mut embeddings: HashMap<usize, Arc<Vec<f32>>> = keys
            .iter()
            .filter_map(|(i, key)| Some((*i, self.embeddings.get(key)?)))
            .collect();
        stats.reused_images = embeddings.len() as u32;
        let fresh = self
            .mtmd
            .encode_images(&chunks, self.model.n_embd_inp(), |i| {
                !embeddings.contains_key(&i)
            })
            .map_err(failed)?;
        for (i, floats) in fresh {
            let floats = Arc::new(floats);
            if let Some((_, key)) = keys.iter().find(|(k, _)| *k == i) {
                self.embeddings.insert(key.clone(), floats.clone());
            }
            embeddings.insert(i, floats);
        }
        stats.vision_ms = ms(t.elapsed());
        if tx.is_closed() {
            return Err(Cancelled);
        }

        // Prefill, reusing the KV entries of an unchanged prefix.
        let t = Instant::now();
        let mut pos = 0i32;
        let last = chunks.len() - 1;
        for i in 0..chunks.len() {
            match chunks.kind(i) {
                ChunkKind::Text => {
                    let tokens = chunks.text_tokens(i);
                    let mut skip = 0;
                    if i == 0 {
                        skip = common_prefix(&self.cached, tokens);
                        if skip == tokens.len() && i == last {
                            skip -= 1; // the last token must be evaluated for its logits
                        }
                        self.ctx.forget_from(skip as i32);
                        self.cached.clear();
                        stats.cached_tokens = skip as u32;
                    }
                    self.ctx
                        .decode_tokens(
                            &mut self.batch,
                            &tokens[skip..],
                            pos + skip as i32,
                            i == last,
                        )
                        .map_err(failed)?;
                    if i == 0 {
                        self.cached = tokens.to_vec();
                    }
                    pos += tokens.len() as i32;
                }
                ChunkKind::Image => {
                    pos = self
                        .mtmd
                        .decode_image(&mut self.ctx, &chunks, i, &embeddings[&i], pos)
                        .map_err(failed)?;
                }
                ChunkKind::Other => return Err(bad("audio input is not supported".into())),
            }
            if tx.is_closed() {
                return Err(Cancelled);
            }
        }
        stats.prefill_ms = ms(t.elapsed());

        // Decode.
        let t = Instant::now();
        let s = request.sampling;
        let mut sampler = ffi::Sampler::new(s.temperature, s.top_p, s.top_k, s.seed);
        let mut pending = Vec::new(); // bytes of a UTF-8 character split across tokens
        let mut first_token_at = None;
        let budget = request.max_tokens.min((n_ctx - pos) as u32);
        for _ in 0..budget {
            let token = sampler.sample(&mut self.ctx);
            if self.model.is_end(token) && !request.ignore_eos {
                break;
            }
            stats.generated_tokens += 1;
            self.model.piece(token, &mut pending);
            let text = take_utf8(&mut pending);
            if !text.is_empty() {
                first_token_at.get_or_insert_with(Instant::now);
                if tx.blocking_send(Ok(Output::Text(text))).is_err() {
                    return Err(Cancelled);
                }
            }
            if stats.generated_tokens == budget {
                break;
            }
            self.ctx
                .decode_tokens(&mut self.batch, &[token], pos, true)
                .map_err(failed)?;
            pos += 1;
        }
        if !pending.is_empty() {
            let _ = tx.blocking_send(Ok(Output::Text(
                String::from_utf8_lossy(&pending).into_owned(),
            )));
        }
        stats.decode_ms = ms(t.elapsed());
        if stats.generated_tokens > 0 && stats.decode_ms > 0.0 {
            stats.decode_tokens_per_s = stats.generated_tokens as f64 / (stats.decode_ms / 1e3);
        }
        stats.first_token_ms = first_token_at.map(|at| ms(at - submitted)).unwrap_or(0.0);
        stats.total_ms = ms(submitted.elapsed());
        Ok(stats)
    }
}

enum Stop {
    Cancelled,
    Failure(EngineError),
}
use Stop::{Cancelled, Failure};

fn bad(message: String) -> Stop {
    Failure(EngineError::BadRequest(message))
}

fn failed(message: String) -> Stop {
    Failure(EngineError::Failed(message))
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Names a frame by its time, size and content, so the same frame sent again in a later
/// request is recognised (FNV-1a over the pixels: ~0.3 ms for a 448x252 frame).
fn frame_key(pts: std::time::Duration, rgb: &Rgb) -> String {
    let hash = rgb.data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!(
        "{}:{}x{}:{hash:016x}",
        pts.as_nanos(),
        rgb.width,
        rgb.height
    )
}

/// (chunk index, (frame key, slice number)) of every image chunk: a frame cut into slices
/// gives several chunks with the same bitmap id.
fn image_keys(chunks: &ffi::Chunks) -> Vec<(usize, ChunkKey)> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    (0..chunks.len())
        .filter(|&i| chunks.kind(i) == ChunkKind::Image)
        .filter_map(|i| {
            let id = chunks.id(i)?;
            let n = seen.entry(id.clone()).or_insert(0);
            *n += 1;
            Some((i, (id, *n - 1)))
        })
        .collect()
}

/// The embeddings of the last few image chunks, oldest dropped first.
#[derive(Default)]
struct EmbeddingCache {
    entries: std::collections::VecDeque<(ChunkKey, Arc<Vec<f32>>)>,
}

/// A frame's key and the slice number within it.
type ChunkKey = (String, usize);

impl EmbeddingCache {
    /// A commentary window spans 32 frames; a 9-slice frame is 10 chunks.
    const CAPACITY: usize = 64;

    fn get(&self, key: &ChunkKey) -> Option<Arc<Vec<f32>>> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn insert(&mut self, key: ChunkKey, value: Arc<Vec<f32>>) {
        if self.entries.len() == Self::CAPACITY {
            self.entries.pop_front();
        }
        self.entries.push_back((key, value));
    }
}

fn common_prefix(a: &[ffi::Token], b: &[ffi::Token]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
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

/// Qwen3 ChatML with the frames as media markers in time order and thinking turned off
/// (an empty think block after the assistant tag, as Qwen3's template does for
/// `enable_thinking=false`).
pub fn chat_prompt(request: &Request, marker: &str) -> String {
    let mut p = String::with_capacity(request.system.len() + request.user.len() + 256);
    if !request.system.is_empty() {
        p.push_str("<|im_start|>system\n");
        p.push_str(&request.system);
        p.push_str("<|im_end|>\n");
    }
    p.push_str("<|im_start|>user\n");
    let first = request.frames.first().map(|f| f.pts);
    for (i, frame) in request.frames.iter().enumerate() {
        let offset = frame
            .pts
            .saturating_sub(first.unwrap_or_default())
            .as_secs_f64();
        p.push_str(&format!("Frame {} (+{offset:.1}s): {marker}\n", i + 1));
    }
    p.push_str(&request.user);
    p.push_str("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
    p
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
        use crate::Frame;
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
        assert!(p.contains(
            "Frame 1 (+0.0s): <M>\nFrame 2 (+0.5s): <M>\nFrame 3 (+1.0s): <M>\nWhat now?"
        ));
        assert!(p.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        assert_eq!(p.matches("<M>").count(), 3);
    }
}
