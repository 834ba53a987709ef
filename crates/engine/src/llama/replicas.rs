//! Several engines behind one: one llama engine per GPU (`serve --gpus`, `bench --gpus`),
//! each stream on one of them.
//!
//! A stream's state lives in one replica's KV cache, so a stream is placed once, when it
//! first reaches the engine, on the working replica with the fewest streams (then the
//! fewest requests in flight, then the lowest index), and stays there while it lives;
//! closing it frees its place. Requests without a stream go to the working replica with
//! the fewest requests in flight.
//!
//! A replica has failed when its engine refuses work as unavailable (the llama engine's
//! thread has stopped) or says it can take nothing (`parallelism() == 0`). Then every
//! stream placed on it moves at once to the other replicas, least loaded first, and the
//! request that found it failed is sent again there. A moved stream's KV state is gone with
//! the failed replica: its new replica evaluates the frames its next request carries (a
//! re-prefill), and the frames pushed from then on go there. Answers that were running on
//! the failed replica end with its error; the stream's next cycle runs on the new one. A
//! failed replica is not used again while the process runs.
//!
//! The scheduler in front is told the working replicas' summed parallelism, so its
//! concurrency shrinks when one fails. Status and metrics show each replica's streams and
//! load.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::BoxFuture;
use serde_json::json;

use crate::{Engine, EngineError, EngineInfo, Frame, Generation, Priority, Request, StreamKey};

pub struct Replicas {
    replicas: Vec<Replica>,
    /// Where each stream runs, by stream id, and the one lock every placement decision
    /// takes.
    placed: Mutex<HashMap<u64, Placed>>,
}

struct Replica {
    engine: Arc<dyn Engine>,
    /// Why it failed, once it has (it is not used again).
    failed: Mutex<Option<String>>,
}

struct Placed {
    replica: usize,
    key: StreamKey,
}

impl Replicas {
    /// Engines to share the streams (at least one).
    pub fn new(engines: Vec<Arc<dyn Engine>>) -> Replicas {
        assert!(!engines.is_empty(), "Replicas needs at least one engine");
        Replicas {
            replicas: engines
                .into_iter()
                .map(|engine| Replica {
                    engine,
                    failed: Mutex::new(None),
                })
                .collect(),
            placed: Mutex::new(HashMap::new()),
        }
    }

    /// Where `stream` runs, placing it now if it is new or its replica has failed;
    /// `None` when every replica has failed.
    pub fn replica_of(&self, stream: &StreamKey) -> Option<usize> {
        self.place(stream).ok()
    }

    /// Streams placed on each replica.
    pub fn streams(&self) -> Vec<usize> {
        let placed = self.lock();
        let mut streams = vec![0; self.replicas.len()];
        for p in placed.values() {
            streams[p.replica] += 1;
        }
        streams
    }

    /// Whether replica `i` takes work.
    pub fn is_up(&self, i: usize) -> bool {
        let replica = &self.replicas[i];
        lock(&replica.failed).is_none() && replica.engine.parallelism() > 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Placed>> {
        lock(&self.placed)
    }

    fn place(&self, stream: &StreamKey) -> Result<usize, EngineError> {
        let mut placed = self.lock();
        if let Some(p) = placed.get(&stream.id()) {
            if self.is_up(p.replica) {
                return Ok(p.replica);
            }
            let i = p.replica;
            drop(placed);
            self.fail(i, "it can take no work (its parallelism is 0)".into());
            placed = self.lock();
            if let Some(p) = placed.get(&stream.id()) {
                return Ok(p.replica);
            }
        }
        let i = self.least_loaded(&placed)?;
        placed.insert(
            stream.id(),
            Placed {
                replica: i,
                key: stream.clone(),
            },
        );
        Ok(i)
    }

    /// The working replica with the fewest streams, then the fewest requests in flight.
    fn least_loaded(&self, placed: &HashMap<u64, Placed>) -> Result<usize, EngineError> {
        let mut streams = vec![0usize; self.replicas.len()];
        for p in placed.values() {
            streams[p.replica] += 1;
        }
        (0..self.replicas.len())
            .filter(|&i| self.is_up(i))
            .min_by_key(|&i| (streams[i], self.replicas[i].engine.in_flight(), i))
            .ok_or_else(|| self.none_left())
    }

    fn none_left(&self) -> EngineError {
        let why: Vec<String> = self
            .replicas
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let failed = lock(&r.failed).clone();
                let why = failed.unwrap_or_else(|| "it can take no work".into());
                format!("replica {i}: {why}")
            })
            .collect();
        EngineError::Unavailable(format!(
            "every engine replica has failed ({})",
            why.join("; ")
        ))
    }

    /// Marks replica `i` failed (once) and moves its streams to the others.
    fn fail(&self, i: usize, why: String) {
        {
            let mut failed = lock(&self.replicas[i].failed);
            if failed.is_none() {
                tracing::error!(
                    replica = i,
                    "engine replica failed, moving its streams: {why}"
                );
                *failed = Some(why);
            }
        }
        let mut placed = self.lock();
        let moving: Vec<u64> = placed
            .iter()
            .filter(|(_, p)| p.replica == i)
            .map(|(&id, _)| id)
            .collect();
        let mut closed = Vec::new();
        for id in moving {
            let Some(p) = placed.remove(&id) else {
                continue;
            };
            match self.least_loaded(&placed) {
                Ok(to) => {
                    tracing::warn!(
                        stream = p.key.name(),
                        from = i,
                        to,
                        "stream moved to another engine replica"
                    );
                    closed.push(p.key.clone());
                    placed.insert(
                        id,
                        Placed {
                            replica: to,
                            key: p.key,
                        },
                    );
                }
                // Nowhere to go: it is placed anew (and refused) at its next request.
                Err(_) => closed.push(p.key),
            }
        }
        drop(placed);
        // Whatever the failed engine still holds for them goes (a no-op for a stopped one).
        for key in closed {
            self.replicas[i].engine.close_stream(&key);
        }
    }

    /// Runs `send` on `stream`'s replica; when that replica turns out to have failed, on the
    /// one its streams moved to, until one takes it or none is left.
    fn with_stream(
        &self,
        stream: &StreamKey,
        send: impl Fn(&dyn Engine) -> Result<Generation, EngineError>,
    ) -> Result<Generation, EngineError> {
        for _ in 0..self.replicas.len() {
            let i = self.place(stream)?;
            match send(self.replicas[i].engine.as_ref()) {
                Err(EngineError::Unavailable(why)) => self.fail(i, why),
                answer => return answer,
            }
        }
        Err(self.none_left())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each change under these locks is a few plain assignments: a panic elsewhere leaves
    // the data consistent.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Engine for Replicas {
    fn submit(&self, request: Request) -> Result<Generation, EngineError> {
        for _ in 0..self.replicas.len() {
            let Some(i) = (0..self.replicas.len())
                .filter(|&i| self.is_up(i))
                .min_by_key(|&i| (self.replicas[i].engine.in_flight(), i))
            else {
                break;
            };
            match self.replicas[i].engine.submit(request.clone()) {
                Err(EngineError::Unavailable(why)) => self.fail(i, why),
                answer => return answer,
            }
        }
        Err(self.none_left())
    }

    fn submit_for(
        &self,
        stream: &StreamKey,
        priority: Priority,
        request: Request,
    ) -> Result<Generation, EngineError> {
        self.with_stream(stream, |engine| {
            engine.submit_for(stream, priority, request.clone())
        })
    }

    fn push_frame(&self, stream: &StreamKey, frame: Frame) {
        if let Ok(i) = self.place(stream) {
            self.replicas[i].engine.push_frame(stream, frame);
        }
    }

    fn close_stream(&self, stream: &StreamKey) {
        let placed = self.lock().remove(&stream.id());
        if let Some(p) = placed {
            self.replicas[p.replica].engine.close_stream(stream);
        }
    }

    /// The working replicas' sum: what the scheduler in front lets run at once.
    fn parallelism(&self) -> usize {
        (0..self.replicas.len())
            .filter(|&i| self.is_up(i))
            .map(|i| self.replicas[i].engine.parallelism())
            .sum()
    }

    fn info(&self) -> EngineInfo {
        let mut info = self.replicas[0].engine.info();
        info.backend = self
            .replicas
            .iter()
            .map(|r| r.engine.info().backend)
            .collect::<Vec<_>>()
            .join(" + ");
        info
    }

    fn in_flight(&self) -> usize {
        self.replicas.iter().map(|r| r.engine.in_flight()).sum()
    }

    /// Healthy while some working replica is: the streams of a failed one run on the
    /// others (status and metrics say which failed).
    fn health(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            for (i, r) in self.replicas.iter().enumerate() {
                if self.is_up(i) && r.engine.health().await {
                    return true;
                }
            }
            false
        })
    }

    fn status(&self) -> serde_json::Value {
        let placed = self.lock();
        let replicas: Vec<serde_json::Value> = self
            .replicas
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut streams: Vec<&str> = placed
                    .values()
                    .filter(|p| p.replica == i)
                    .map(|p| p.key.name())
                    .collect();
                streams.sort_unstable();
                json!({
                    "replica": i,
                    "backend": r.engine.info().backend,
                    "up": self.is_up(i),
                    "failed": *lock(&r.failed),
                    "streams": streams,
                    "in_flight": r.engine.in_flight(),
                    "parallelism": r.engine.parallelism(),
                    "engine": r.engine.status(),
                })
            })
            .collect();
        json!({ "placement": "fewest streams, then fewest requests in flight", "replicas": replicas })
    }

    fn register_metrics(&self, registry: &mut crate::metrics::Registry) {
        let n = self.replicas.len();
        let replica = |i: usize| vec![("replica", i.to_string())];
        let mut families = crate::metrics::MetricFamilies::new();
        families.gauge(
            "kibitz_replica_up",
            "1 while the engine replica takes work, 0 once it has failed.",
            (0..n).map(|i| (replica(i), self.is_up(i))),
        );
        families.gauge(
            "kibitz_replica_streams",
            "Streams placed on each engine replica.",
            self.streams()
                .into_iter()
                .enumerate()
                .map(|(i, v)| (replica(i), v)),
        );
        families.gauge(
            "kibitz_replica_in_flight",
            "Requests running on each engine replica.",
            self.replicas
                .iter()
                .enumerate()
                .map(|(i, r)| (replica(i), r.engine.in_flight())),
        );
        families.register(registry);
        for r in &self.replicas {
            r.engine.register_metrics(registry);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::fake::FakeEngine;

    /// A fake engine that can be made to fail the way a llama engine whose thread stopped
    /// does: it refuses work as unavailable and says it can take nothing.
    struct Breakable {
        inner: FakeEngine,
        broken: AtomicBool,
        closed: Mutex<Vec<String>>,
    }

    impl Breakable {
        fn new() -> Arc<Breakable> {
            Arc::new(Breakable {
                inner: FakeEngine::saying("fine", Duration::from_millis(10), Duration::ZERO),
                broken: AtomicBool::new(false),
                closed: Mutex::new(Vec::new()),
            })
        }
    }

    impl Engine for Breakable {
        fn submit(&self, request: Request) -> Result<Generation, EngineError> {
            if self.broken.load(Ordering::SeqCst) {
                return Err(EngineError::Unavailable("the thread has stopped".into()));
            }
            self.inner.submit(request)
        }
        fn close_stream(&self, stream: &StreamKey) {
            lock(&self.closed).push(stream.name().to_string());
        }
        fn info(&self) -> EngineInfo {
            self.inner.info()
        }
        fn in_flight(&self) -> usize {
            self.inner.in_flight()
        }
        fn health(&self) -> BoxFuture<'_, bool> {
            let up = !self.broken.load(Ordering::SeqCst);
            Box::pin(async move { up })
        }
        fn parallelism(&self) -> usize {
            if self.broken.load(Ordering::SeqCst) {
                0
            } else {
                2
            }
        }
    }

    fn replicas(n: usize) -> (Replicas, Vec<Arc<Breakable>>) {
        let engines: Vec<Arc<Breakable>> = (0..n).map(|_| Breakable::new()).collect();
        let dyns = engines
            .iter()
            .map(|e| e.clone() as Arc<dyn Engine>)
            .collect();
        (Replicas::new(dyns), engines)
    }

    fn request() -> Request {
        Request::new(vec![], "sys", "user")
    }

    #[tokio::test(start_paused = true)]
    async fn streams_go_to_the_fewest_and_stay_and_a_failed_replica_hands_its_streams_over() {
        let (r, engines) = replicas(2);
        let keys: Vec<StreamKey> = (0..3).map(|i| StreamKey::new(&format!("s{i}"))).collect();
        let placed: Vec<Option<usize>> = keys.iter().map(|k| r.replica_of(k)).collect();
        assert_eq!(placed, [Some(0), Some(1), Some(0)]);
        assert_eq!(r.streams(), [2, 1]);
        assert_eq!(r.parallelism(), 4);
        for k in &keys {
            let (text, _) = r
                .submit_for(k, Priority::Commentary, request())
                .unwrap()
                .collect()
                .await
                .unwrap();
            assert_eq!(text, "fine");
        }
        assert_eq!(
            keys.iter().map(|k| r.replica_of(k)).collect::<Vec<_>>(),
            placed,
            "they stay"
        );

        engines[0].broken.store(true, Ordering::SeqCst);
        // s0's next request finds its replica failed and is answered by the other.
        let (text, _) = r
            .submit_for(&keys[0], Priority::Commentary, request())
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(text, "fine");
        assert_eq!(
            r.streams(),
            [0, 3],
            "both of replica 0's streams moved at once"
        );
        let mut closed = lock(&engines[0].closed).clone();
        closed.sort();
        assert_eq!(
            closed,
            ["s0", "s2"],
            "the failed replica is told to let them go"
        );
        assert_eq!(
            r.parallelism(),
            2,
            "the scheduler is told the survivor's share"
        );
        let status = r.status();
        assert_eq!(status["replicas"][0]["up"], false);
        assert!(
            status["replicas"][0]["failed"]
                .as_str()
                .unwrap()
                .contains("no work"),
            "{status}"
        );
        assert_eq!(status["replicas"][1]["streams"], json!(["s0", "s1", "s2"]));
        let metrics = r.metrics();
        for line in [
            "kibitz_replica_up{replica=\"0\"} 0\n",
            "kibitz_replica_up{replica=\"1\"} 1\n",
            "kibitz_replica_streams{replica=\"0\"} 0\n",
            "kibitz_replica_streams{replica=\"1\"} 3\n",
            "kibitz_replica_in_flight{replica=\"1\"} 0\n",
        ] {
            assert!(metrics.contains(line), "{line} missing in:\n{metrics}");
        }
        assert!(r.health().await, "one replica still serves");

        // A stream that starts now never lands on the failed one; with none left, a clear error.
        assert_eq!(r.replica_of(&StreamKey::new("late")), Some(1));
        engines[1].broken.store(true, Ordering::SeqCst);
        let error = r
            .submit_for(&keys[1], Priority::Question, request())
            .unwrap_err();
        assert!(
            matches!(&error, EngineError::Unavailable(m) if m.contains("every engine replica has failed")),
            "{error}"
        );
        assert!(!r.health().await);
        assert_eq!(r.parallelism(), 0);
    }
}
