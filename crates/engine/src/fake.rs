//! A scripted engine: answers with fixed pieces of text at a fixed pace. It lets the
//! commentary loop, the server and the page be tested fast and without a model.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's clock, so tests with paused time see the scripted delays.
use tokio::time::Instant;

use futures::future::BoxFuture;

use crate::{Engine, EngineError, EngineInfo, Generation, Output, Request, Stats};

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Script {
    /// These pieces, one every `per_token` after `first_token`.
    Answer(Vec<String>),
    /// Fail after the first token delay.
    Fail(String),
}

/// Answers requests from a script; when the script runs out it repeats the last entry.
#[derive(Clone)]
pub struct FakeEngine {
    inner: Arc<Inner>,
}

struct Inner {
    script: Mutex<VecDeque<Script>>,
    first_token: Duration,
    per_token: Duration,
    in_flight: AtomicUsize,
    /// What it answers to `parallelism()`; tests change it to play an engine whose capacity
    /// moves (an upstream resting, a replica down).
    parallelism: AtomicUsize,
    /// Every request seen, for assertions.
    seen: Mutex<Vec<Request>>,
}

impl FakeEngine {
    pub fn new(script: Vec<Script>, first_token: Duration, per_token: Duration) -> Self {
        FakeEngine {
            inner: Arc::new(Inner {
                script: Mutex::new(script.into()),
                first_token,
                per_token,
                in_flight: AtomicUsize::new(0),
                parallelism: AtomicUsize::new(1),
                seen: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Always answers `text`, split at spaces into pieces.
    pub fn saying(text: &str, first_token: Duration, per_token: Duration) -> Self {
        Self::new(
            vec![Script::Answer(split_pieces(text))],
            first_token,
            per_token,
        )
    }

    /// How many requests it says it serves at once (1 to start with).
    pub fn set_parallelism(&self, n: usize) {
        self.inner.parallelism.store(n, Ordering::SeqCst);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.inner.seen.lock().unwrap().clone()
    }

    fn next_script(&self) -> Script {
        let mut script = self.inner.script.lock().unwrap();
        if script.len() > 1 {
            script.pop_front().unwrap()
        } else {
            script
                .front()
                .cloned()
                .unwrap_or(Script::Answer(vec!["...".into()]))
        }
    }
}

/// "a b c" -> ["a", " b", " c"], the way a tokenizer hands out words.
pub fn split_pieces(text: &str) -> Vec<String> {
    let mut pieces: Vec<String> = Vec::new();
    for (i, word) in text.split(' ').enumerate() {
        pieces.push(if i == 0 {
            word.to_string()
        } else {
            format!(" {word}")
        });
    }
    pieces
}

impl Engine for FakeEngine {
    fn submit(&self, request: Request) -> Result<Generation, EngineError> {
        let script = self.next_script();
        let images = request.frames.len() as u32;
        self.inner.seen.lock().unwrap().push(request);
        let (tx, generation) = Generation::channel();
        let inner = self.inner.clone();
        inner.in_flight.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let start = Instant::now();
            tokio::time::sleep(inner.first_token).await;
            // Like the real engines: the count drops before the last message goes out.
            let last = match script {
                Script::Fail(message) => Err(EngineError::Failed(message)),
                Script::Answer(pieces) => {
                    let mut first_token_ms = 0.0;
                    let mut sent = 0;
                    for (i, piece) in pieces.iter().enumerate() {
                        if i > 0 {
                            tokio::time::sleep(inner.per_token).await;
                        } else {
                            first_token_ms = start.elapsed().as_secs_f64() * 1e3;
                        }
                        if tx.send(Ok(Output::Text(piece.clone()))).await.is_err() {
                            break; // cancelled
                        }
                        sent += 1;
                    }
                    let total_ms = start.elapsed().as_secs_f64() * 1e3;
                    let stats = Stats {
                        images,
                        image_tokens: images * 64,
                        prompt_tokens: images * 64 + 100,
                        generated_tokens: sent,
                        first_token_ms,
                        total_ms,
                        ..Stats::default()
                    };
                    Ok(Output::Done(stats))
                }
            };
            inner.in_flight.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(last).await;
        });
        Ok(generation)
    }

    fn info(&self) -> EngineInfo {
        EngineInfo {
            kind: "fake".into(),
            model: "scripted".into(),
            backend: "none".into(),
        }
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    fn health(&self) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }

    fn parallelism(&self) -> usize {
        self.inner.parallelism.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn streams_the_script_then_stats() {
        let engine = FakeEngine::saying(
            "a ball rolls",
            Duration::from_millis(100),
            Duration::from_millis(10),
        );
        let mut generation = engine.submit(Request::new(vec![], "sys", "user")).unwrap();
        let mut pieces = Vec::new();
        let stats = loop {
            match generation.next().await.unwrap().unwrap() {
                Output::Text(t) => pieces.push(t),
                Output::Done(stats) => break stats,
            }
        };
        assert_eq!(pieces, ["a", " ball", " rolls"]);
        assert_eq!(stats.generated_tokens, 3);
        assert!((stats.first_token_ms - 100.0).abs() < 1.0);
    }
}
