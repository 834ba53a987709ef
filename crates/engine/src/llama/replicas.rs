//! Several engines behind one: one llama engine per GPU, each stream on one of them.
//!
//! A stream's state lives in one replica's KV cache, so a stream is placed once, on the
//! replica with the fewest streams (then the fewest requests in flight), and stays there
//! while it lives; closing it frees its place. Requests without a stream go to the replica
//! with the fewest requests in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;

use crate::{Engine, EngineError, EngineInfo, Frame, Generation, Priority, Request, StreamKey};

pub struct Replicas {
    engines: Vec<Arc<dyn Engine>>,
    /// Stream id → replica.
    placed: Mutex<HashMap<u64, usize>>,
}

impl Replicas {
    /// Engines to share the streams (at least one).
    pub fn new(engines: Vec<Arc<dyn Engine>>) -> Replicas {
        assert!(!engines.is_empty(), "Replicas needs at least one engine");
        Replicas {
            engines,
            placed: Mutex::new(HashMap::new()),
        }
    }

    /// Where `stream` runs (placing it now if it is new).
    pub fn replica_of(&self, stream: &StreamKey) -> usize {
        let mut placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&i) = placed.get(&stream.id()) {
            return i;
        }
        let mut streams = vec![0usize; self.engines.len()];
        for &i in placed.values() {
            streams[i] += 1;
        }
        let i = (0..self.engines.len())
            .min_by_key(|&i| (streams[i], self.engines[i].in_flight(), i))
            .unwrap();
        placed.insert(stream.id(), i);
        i
    }

    /// Streams placed on each replica.
    pub fn streams(&self) -> Vec<usize> {
        let placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        let mut streams = vec![0; self.engines.len()];
        for &i in placed.values() {
            streams[i] += 1;
        }
        streams
    }
}

impl Engine for Replicas {
    fn submit(&self, request: Request) -> Result<Generation, EngineError> {
        let i = (0..self.engines.len())
            .min_by_key(|&i| (self.engines[i].in_flight(), i))
            .unwrap();
        self.engines[i].submit(request)
    }

    fn submit_for(
        &self,
        stream: &StreamKey,
        priority: Priority,
        request: Request,
    ) -> Result<Generation, EngineError> {
        self.engines[self.replica_of(stream)].submit_for(stream, priority, request)
    }

    fn push_frame(&self, stream: &StreamKey, frame: Frame) {
        self.engines[self.replica_of(stream)].push_frame(stream, frame)
    }

    fn close_stream(&self, stream: &StreamKey) {
        let placed = self
            .placed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&stream.id());
        if let Some(i) = placed {
            self.engines[i].close_stream(stream);
        }
    }

    fn parallelism(&self) -> usize {
        self.engines.iter().map(|e| e.parallelism()).sum()
    }

    fn info(&self) -> EngineInfo {
        let mut info = self.engines[0].info();
        info.backend = self
            .engines
            .iter()
            .map(|e| e.info().backend)
            .collect::<Vec<_>>()
            .join(" + ");
        info
    }

    fn in_flight(&self) -> usize {
        self.engines.iter().map(|e| e.in_flight()).sum()
    }

    fn health(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            for e in &self.engines {
                if !e.health().await {
                    return false;
                }
            }
            true
        })
    }

    fn status(&self) -> serde_json::Value {
        let streams = self.streams();
        serde_json::Value::Array(
            self.engines
                .iter()
                .zip(streams)
                .map(|(e, n)| serde_json::json!({ "streams": n, "engine": e.status() }))
                .collect(),
        )
    }
}
