//! Engines turn a few video frames and a prompt into streamed text.
//!
//! Every engine implements [`Engine`]: `submit` takes a [`Request`] and answers at once with
//! a [`Generation`], a stream of [`Output`]s that ends with [`Output::Done`] and its
//! [`Stats`]. Dropping the `Generation` cancels the request; the engine notices between two
//! tokens. Requests submitted directly queue inside the engine and never mix.
//!
//! Streams share an engine through the [`Scheduler`] instead: one [`Session`] per stream,
//! which waits for a [`Turn`] and only then builds its request from its newest frames. The
//! scheduler is the engine's one queue: it owns the waiting, the priorities and fairness
//! between streams, sizes itself from [`Engine::parallelism`], and refuses a caller at the
//! door with [`EngineError::Busy`] rather than let the queue grow (see [`scheduler`]).
//! Engines themselves never hold a request back waiting for room.
//!
//! - `llama` (feature `llama`): MiniCPM-o 4.5 in process through llama.cpp, on its own
//!   thread: one KV-cache sequence per stream, fed with frames as they arrive
//!   ([`Engine::push_frame`]), and every running answer decoded in one batch.
//! - `openai`: any OpenAI-compatible server over HTTP with SSE.
//! - [`EngineSlot`]: the place of one of these while its model is downloaded and loaded;
//!   it says what it waits for ([`Readiness`]) and the scheduler holds turns back meanwhile.
//! - `fake` (feature `fake`, and in this crate's tests): scripted tokens with delays, for
//!   tests of everything above the engine. Library builds leave it out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use kibitz_frames::{Jpeg, Rgb};
use serde::Serialize;
use tokio::sync::mpsc;

#[cfg(any(test, feature = "fake"))]
pub mod fake;
#[cfg(feature = "llama")]
pub mod llama;
pub mod metrics;
pub mod openai;
pub mod scheduler;
pub mod slot;

/// Model files (resolution, download, GGUF checks) are their own crate; the old path stays.
pub use kibitz_models as models;
pub use scheduler::{Priority, Scheduler, SchedulerStatus, Session, Turn};
pub use slot::{EngineSlot, Readiness, ReadyState};

/// Which stream a request or frame belongs to, for engines that keep state per stream (the
/// llama engine keeps each stream's frames in its own KV-cache sequence). The scheduler makes
/// one per [`Session`]; ids are unique in the process, names are for logs and status.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamKey {
    id: u64,
    name: Arc<str>,
}

impl StreamKey {
    pub fn new(name: &str) -> StreamKey {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        StreamKey {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            name: Arc::from(name),
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// One picture handed to the model, with the time it was taken on the source's clock.
#[derive(Debug, Clone)]
pub struct Frame {
    pub image: Image,
    pub pts: Duration,
}

#[derive(Debug, Clone)]
pub enum Image {
    Rgb(Rgb),
    Jpeg(Jpeg),
}

impl Image {
    pub fn width(&self) -> u32 {
        match self {
            Image::Rgb(i) => i.width,
            Image::Jpeg(i) => i.width,
        }
    }
    pub fn height(&self) -> u32 {
        match self {
            Image::Rgb(i) => i.height,
            Image::Jpeg(i) => i.height,
        }
    }
}

/// Sampling settings. `seed` makes a run repeatable on the same engine and hardware.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub seed: u32,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.7,
            top_p: 0.8,
            top_k: 100,
            seed: 42,
        }
    }
}

/// What to ask: frames in time order, a system prompt and the user's text.
#[derive(Debug, Clone)]
pub struct Request {
    pub frames: Vec<Frame>,
    pub system: String,
    pub user: String,
    pub sampling: Sampling,
    pub max_tokens: u32,
    /// Keep generating past end-of-sequence until `max_tokens` (benchmarks only).
    pub ignore_eos: bool,
}

impl Request {
    pub fn new(frames: Vec<Frame>, system: impl Into<String>, user: impl Into<String>) -> Self {
        Request {
            frames,
            system: system.into(),
            user: user.into(),
            sampling: Sampling::default(),
            max_tokens: 64,
            ignore_eos: false,
        }
    }
}

/// Where the time of one request went. Times are milliseconds of wall clock.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Every position the prompt filled, image tokens included.
    pub prompt_tokens: u32,
    /// Of `prompt_tokens`, those that came from images.
    pub image_tokens: u32,
    /// Prompt tokens found already evaluated (a kept system-prompt prefix) and skipped.
    pub cached_tokens: u32,
    pub images: u32,
    /// Image chunks whose vision embeddings were kept from an earlier request (the same
    /// frame again) instead of being encoded.
    pub reused_images: u32,
    pub vision_ms: f64,
    pub prefill_ms: f64,
    pub generated_tokens: u32,
    pub decode_ms: f64,
    pub decode_tokens_per_s: f64,
    /// From `submit` to the first text piece.
    pub first_token_ms: f64,
    /// Waiting in the engine's queue before work began.
    pub queue_ms: f64,
    pub total_ms: f64,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} images ({} image tokens), {} prompt tokens ({} cached) | vision {:.0} ms, prefill {:.0} ms, \
             first token {:.0} ms | {} tokens at {:.1} tok/s | total {:.0} ms",
            self.images,
            self.image_tokens,
            self.prompt_tokens,
            self.cached_tokens,
            self.vision_ms,
            self.prefill_ms,
            self.first_token_ms,
            self.generated_tokens,
            self.decode_tokens_per_s,
            self.total_ms
        )
    }
}

/// One item of a [`Generation`].
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// The next piece of text, already detokenized (never a special token).
    Text(String),
    /// The request is finished; nothing follows.
    Done(Stats),
}

/// The answer to one request, as it is produced. Drop it to cancel.
#[derive(Debug)]
pub struct Generation {
    rx: mpsc::Receiver<Result<Output, EngineError>>,
}

impl Generation {
    /// A channel whose sender an engine fills. A small buffer keeps a slow reader from
    /// letting the engine run far ahead.
    pub fn channel() -> (mpsc::Sender<Result<Output, EngineError>>, Generation) {
        let (tx, rx) = mpsc::channel(64);
        (tx, Generation { rx })
    }

    pub async fn next(&mut self) -> Option<Result<Output, EngineError>> {
        self.rx.recv().await
    }

    /// For callers outside an async runtime (the `describe` command, tests).
    pub fn blocking_next(&mut self) -> Option<Result<Output, EngineError>> {
        self.rx.blocking_recv()
    }

    /// Waits for the whole answer.
    pub async fn collect(mut self) -> Result<(String, Stats), EngineError> {
        let mut text = String::new();
        while let Some(item) = self.next().await {
            match item? {
                Output::Text(t) => text.push_str(&t),
                Output::Done(stats) => return Ok((text, stats)),
            }
        }
        Err(EngineError::Stopped(
            "the engine ended the answer without finishing it".into(),
        ))
    }
}

/// What an engine is, for status pages and logs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EngineInfo {
    /// `llama`, `openai` or `fake`.
    pub kind: String,
    /// Model name or path.
    pub model: String,
    /// Where the work runs: `CPU`, `CUDA`, an upstream URL.
    pub backend: String,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EngineError {
    /// The request itself is unusable (no frames where needed, an image that can't be read).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The engine is busy and the caller asked not to wait.
    #[error("engine busy: {0}")]
    Busy(String),
    /// The engine can't serve now (its thread died, an upstream is down).
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// The request failed while it ran.
    #[error("generation failed: {0}")]
    Failed(String),
    /// The engine stopped before the answer was complete.
    #[error("engine stopped: {0}")]
    Stopped(String),
    #[error("timed out: {0}")]
    Timeout(String),
}

/// The one interface every stage above uses.
pub trait Engine: Send + Sync + 'static {
    /// Queues a request. Errors here mean it was not accepted; errors while it runs come
    /// through the `Generation`.
    fn submit(&self, request: Request) -> Result<Generation, EngineError>;

    fn info(&self) -> EngineInfo;

    /// Requests accepted and not yet finished (queued or running).
    fn in_flight(&self) -> usize;

    /// Whether the engine can serve now.
    fn health(&self) -> BoxFuture<'_, bool>;

    /// Whether the engine is there at all (its model found and loaded). The scheduler grants
    /// no turns while it is not; cheap, read on every grant. Only an [`EngineSlot`] is ever
    /// not ready.
    fn is_ready(&self) -> bool {
        true
    }

    /// What the engine waits for before it can serve, for status, the page and `/readyz`.
    fn readiness(&self) -> Readiness {
        Readiness::ready()
    }

    /// Extra engine-specific state for `/api/status` (per-upstream health, say).
    fn status(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Adds this engine's metric families (read now) to `/metrics`' registry: usually one
    /// [`metrics::MetricFamilies`], registered.
    fn register_metrics(&self, _registry: &mut metrics::Registry) {}

    /// This engine's metrics alone, as OpenMetrics text (what [`Engine::register_metrics`]
    /// adds, encoded): for tests and logs.
    fn metrics(&self) -> String {
        let mut registry = metrics::Registry::default();
        self.register_metrics(&mut registry);
        metrics::encode(&registry)
    }

    /// Queues a request of `stream` (what [`Turn::submit`] calls). Engines that keep state
    /// per stream use the key; the default forgets it and calls [`Engine::submit`].
    fn submit_for(
        &self,
        stream: &StreamKey,
        priority: Priority,
        request: Request,
    ) -> Result<Generation, EngineError> {
        let _ = (stream, priority);
        self.submit(request)
    }

    /// A frame of `stream`'s sampled set, handed over as soon as it is captured, so an engine
    /// that keeps per-stream state can prepare it before the next request asks about it.
    /// Frames come in time order. The default ignores them: every request carries its frames.
    fn push_frame(&self, stream: &StreamKey, frame: Frame) {
        let _ = (stream, frame);
    }

    /// `stream` is gone: free what the engine keeps for it. Its running request, if any, is
    /// cancelled by its caller separately.
    fn close_stream(&self, stream: &StreamKey) {
        let _ = stream;
    }

    /// How many requests the engine serves well at once *now*: 1 for an engine that runs one
    /// request at a time. The [`Scheduler`] reads it whenever it grants turns, so an engine
    /// whose capacity moves (upstreams resting, a replica down) says so here and the queue
    /// follows.
    fn parallelism(&self) -> usize {
        1
    }
}
