//! An engine that comes later: the place of the real engine while its model is found,
//! downloaded and loaded, so that `serve` shows the video at once and the commentary starts
//! when the model is there.
//!
//! [`EngineSlot`] is an [`Engine`] that says what it waits for ([`Readiness`]: resolving,
//! downloading with bytes and speed, loading, or missing with what to do about it) and, once
//! [`EngineSlot::fill`]ed, is the engine it was given. While it is not ready it says so with
//! [`Engine::is_ready`], and the [`Scheduler`](crate::Scheduler) grants no turns: the streams'
//! commentary waits for the engine as it waits for a busy one, without failing a cycle a
//! second. Whoever fills the slot then tells the scheduler ([`Scheduler::wake`](crate::Scheduler::wake)),
//! so the waiting streams start at once. Requests submitted anyway fail with
//! [`EngineError::Unavailable`] naming what is missing.

use std::sync::{Arc, Mutex, OnceLock};

use futures::future::BoxFuture;
use kibitz_models::Transfer;
use serde::Serialize;

use crate::{
    metrics, Engine, EngineError, EngineInfo, Frame, Generation, Priority, Request, StreamKey,
};

/// Where an engine is on its way to serving.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Readiness {
    pub state: ReadyState,
    /// One line for people: what happens now, or what is missing and where it goes.
    pub message: String,
    /// The file being downloaded, while `state` is `downloading`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download: Option<Transfer>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadyState {
    /// Serving.
    Ready,
    /// Looking for the model's files (a local folder, the cache, the hub's listing).
    Resolving,
    /// Fetching a file of the model into the cache.
    Downloading,
    /// The files are there; the engine reads them into memory.
    Loading,
    /// The model cannot be had now (no network and nothing cached); tried again later.
    Missing,
    /// The model or the engine cannot be used (a bad file, a setting); not tried again.
    Failed,
}

impl Readiness {
    pub fn ready() -> Readiness {
        Readiness::new(ReadyState::Ready, "ready")
    }

    pub fn new(state: ReadyState, message: impl Into<String>) -> Readiness {
        Readiness {
            state,
            message: message.into(),
            download: None,
        }
    }

    /// Downloading `transfer`, told in one line: the file, bytes of total, speed and time left.
    pub fn downloading(transfer: Transfer) -> Readiness {
        use indicatif::{HumanBytes, HumanDuration};
        let mut message = format!(
            "downloading {} (file {} of {}): {}",
            transfer.file,
            transfer.index,
            transfer.files,
            HumanBytes(transfer.bytes)
        );
        if transfer.total > 0 {
            message.push_str(&format!(" of {}", HumanBytes(transfer.total)));
        }
        if transfer.bytes_per_s > 0.0 {
            message.push_str(&format!(
                " at {}/s",
                HumanBytes(transfer.bytes_per_s as u64)
            ));
        }
        if let Some(eta) = transfer.eta_s.filter(|s| s.is_finite()) {
            let eta = std::time::Duration::from_secs_f64(eta.max(0.0));
            message.push_str(&format!(", {} left", HumanDuration(eta)));
        }
        Readiness {
            state: ReadyState::Downloading,
            message,
            download: Some(transfer),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.state == ReadyState::Ready
    }
}

/// The engine's place until it is there; then that engine. See the module docs.
pub struct EngineSlot {
    /// Set once; read without a lock on every frame and request.
    engine: OnceLock<Arc<dyn Engine>>,
    /// What it waits for, until filled.
    waiting: Mutex<Readiness>,
    /// What it shows before the engine can say: the kind and model asked for.
    info: EngineInfo,
}

impl EngineSlot {
    /// An empty slot for the engine `info` describes, resolving its model.
    pub fn new(info: EngineInfo) -> EngineSlot {
        EngineSlot {
            engine: OnceLock::new(),
            waiting: Mutex::new(Readiness::new(
                ReadyState::Resolving,
                format!("looking for model {}", info.model),
            )),
            info,
        }
    }

    /// What it waits for now. Ignored once filled (a late progress report, say).
    pub fn set(&self, readiness: Readiness) {
        if self.engine.get().is_none() {
            *self.waiting.lock().unwrap_or_else(|e| e.into_inner()) = readiness;
        }
    }

    /// The engine is here: from now on the slot is it. A second fill is ignored. Then wake
    /// the scheduler in front of the slot, so streams waiting for it get their turns.
    pub fn fill(&self, engine: Arc<dyn Engine>) {
        let _ = self.engine.set(engine);
    }

    fn engine(&self) -> Option<&Arc<dyn Engine>> {
        self.engine.get()
    }

    fn waiting(&self) -> Readiness {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Engine for EngineSlot {
    fn submit(&self, request: Request) -> Result<Generation, EngineError> {
        match self.engine() {
            Some(engine) => engine.submit(request),
            None => Err(EngineError::Unavailable(self.waiting().message)),
        }
    }

    fn info(&self) -> EngineInfo {
        match self.engine() {
            Some(engine) => engine.info(),
            None => self.info.clone(),
        }
    }

    fn in_flight(&self) -> usize {
        self.engine().map_or(0, |e| e.in_flight())
    }

    fn health(&self) -> BoxFuture<'_, bool> {
        match self.engine() {
            Some(engine) => engine.health(),
            None => Box::pin(async { false }),
        }
    }

    fn is_ready(&self) -> bool {
        self.engine().is_some_and(|e| e.is_ready())
    }

    fn readiness(&self) -> Readiness {
        match self.engine() {
            Some(engine) => engine.readiness(),
            None => self.waiting(),
        }
    }

    fn status(&self) -> serde_json::Value {
        self.engine()
            .map_or(serde_json::Value::Null, |e| e.status())
    }

    fn register_metrics(&self, registry: &mut metrics::Registry) {
        if let Some(engine) = self.engine() {
            engine.register_metrics(registry);
        }
    }

    fn submit_for(
        &self,
        stream: &StreamKey,
        priority: Priority,
        request: Request,
    ) -> Result<Generation, EngineError> {
        match self.engine() {
            Some(engine) => engine.submit_for(stream, priority, request),
            None => Err(EngineError::Unavailable(self.waiting().message)),
        }
    }

    fn push_frame(&self, stream: &StreamKey, frame: Frame) {
        if let Some(engine) = self.engine() {
            engine.push_frame(stream, frame);
        }
    }

    fn close_stream(&self, stream: &StreamKey) {
        if let Some(engine) = self.engine() {
            engine.close_stream(stream);
        }
    }

    fn parallelism(&self) -> usize {
        self.engine().map_or(0, |e| e.parallelism())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::fake::FakeEngine;
    use crate::Scheduler;

    const LIMIT: Duration = Duration::from_secs(10);

    fn info() -> EngineInfo {
        EngineInfo {
            kind: "llama".into(),
            model: "owner/model".into(),
            backend: "not loaded".into(),
        }
    }

    #[test]
    fn a_download_reads_as_one_line_with_size_speed_and_time_left() {
        let r = Readiness::downloading(Transfer {
            file: "model-Q4_K_M.gguf".into(),
            index: 1,
            files: 2,
            bytes: 1 << 30,
            total: 3 << 30,
            bytes_per_s: (64 << 20) as f64,
            eta_s: Some(32.0),
        });
        assert_eq!(r.state, ReadyState::Downloading);
        assert_eq!(
            r.message,
            "downloading model-Q4_K_M.gguf (file 1 of 2): 1.00 GiB of 3.00 GiB at 64.00 MiB/s, 32 seconds left"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["state"], "downloading");
        assert_eq!(json["download"]["total"], 3u64 << 30);
    }

    /// Before the engine is there, commentary waits for a turn (no failed cycles), a question
    /// is told why at once, and filling the slot and waking the scheduler lets the waiting
    /// caller in and its request through to the engine.
    #[tokio::test(start_paused = true)]
    async fn turns_wait_for_the_engine_and_come_once_it_is_filled() {
        let slot = Arc::new(EngineSlot::new(info()));
        let scheduler = Scheduler::new(slot.clone());
        let session = scheduler.open_session("s1");
        assert!(!slot.is_ready());
        assert_eq!(slot.readiness().state, ReadyState::Resolving);
        assert_eq!(slot.info().model, "owner/model");
        assert!(!slot.health().await);

        let refused = session.try_turn().err().unwrap();
        assert!(
            matches!(&refused, EngineError::Busy(m) if m.contains("not ready: looking for model owner/model")),
            "{refused}"
        );
        slot.set(Readiness::new(ReadyState::Loading, "loading the model"));
        let question = session.turn(Priority::Question, None).await.err().unwrap();
        assert!(
            matches!(&question, EngineError::Unavailable(m) if m.contains("loading the model")),
            "{question}"
        );
        let submitted = slot
            .submit(Request::new(Vec::new(), "s", "u"))
            .err()
            .unwrap();
        assert_eq!(
            submitted,
            EngineError::Unavailable("loading the model".into())
        );

        let waiting = tokio::spawn({
            let session = session.clone();
            async move { session.turn(Priority::Commentary, None).await }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(scheduler.status().waiting.commentary, 1, "still waiting");
        assert!(!waiting.is_finished());

        let engine = FakeEngine::saying("a ball", Duration::from_millis(10), Duration::ZERO);
        slot.fill(Arc::new(engine.clone()));
        slot.set(Readiness::new(ReadyState::Loading, "late report"));
        assert!(slot.readiness().is_ready(), "a late report changes nothing");
        scheduler.wake();
        let turn = tokio::time::timeout(LIMIT, waiting)
            .await
            .expect("the turn came")
            .unwrap()
            .unwrap();
        let (text, _) = turn
            .submit(Request::new(Vec::new(), "s", "u"))
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(text, "a ball");
        assert_eq!(engine.requests().len(), 1);
        assert_eq!(slot.info().kind, "fake");
    }
}
