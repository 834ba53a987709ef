//! How many outputs of each name run on a stream now, and how many pictures each name has
//! shown: the one place outputs are counted, by the name they give, so a new kind of output
//! shows up in status and `/metrics` without any list here knowing it.
//!
//! The running counts sit in a `watch`, so what depends on them (the speech encoder, which
//! runs only while someone reads the speech stream) is woken by a change instead of
//! polling for one.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;
use tokio::sync::watch;

/// Outputs running now, by name.
pub type Running = BTreeMap<&'static str, u64>;

/// One name's counts, as status shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct OutputCount {
    /// Running now.
    pub running: u64,
    /// Pictures shown by outputs of this name since the stream started, all together.
    pub frames_sent: u64,
    /// Run by the stream itself (alerts, the speaker), not attached by a client.
    pub per_stream: bool,
}

/// A stream's output counts.
#[derive(Debug)]
pub(crate) struct OutputCounts {
    running: watch::Sender<Running>,
    names: Mutex<BTreeMap<&'static str, Name>>,
}

#[derive(Debug, Clone)]
struct Name {
    sent: Arc<AtomicU64>,
    per_stream: bool,
}

impl Default for OutputCounts {
    fn default() -> OutputCounts {
        OutputCounts {
            running: watch::Sender::new(Running::new()),
            names: Mutex::default(),
        }
    }
}

impl OutputCounts {
    /// Counts one more `name` until [`OutputCounts::leave`]; returns the counter its
    /// pictures are added to.
    pub(crate) fn enter(&self, name: &'static str, per_stream: bool) -> Arc<AtomicU64> {
        let sent = self
            .names()
            .entry(name)
            .or_insert_with(|| Name {
                sent: Arc::default(),
                per_stream,
            })
            .sent
            .clone();
        self.running
            .send_modify(|running| *running.entry(name).or_default() += 1);
        sent
    }

    /// One `name` fewer.
    pub(crate) fn leave(&self, name: &'static str) {
        self.running.send_modify(|running| {
            if let Some(n) = running.get_mut(name) {
                *n = n.saturating_sub(1);
            }
        });
    }

    /// Running now, by name; changes wake the receiver.
    pub(crate) fn watch(&self) -> watch::Receiver<Running> {
        self.running.subscribe()
    }

    pub(crate) fn running(&self, name: &str) -> u64 {
        self.running.borrow().get(name).copied().unwrap_or(0)
    }

    /// Every name seen on this stream, with its counts.
    pub(crate) fn all(&self) -> BTreeMap<String, OutputCount> {
        let running = self.running.borrow().clone();
        self.names()
            .iter()
            .map(|(name, n)| {
                let count = OutputCount {
                    running: running.get(name).copied().unwrap_or(0),
                    frames_sent: n.sent.load(Ordering::Relaxed),
                    per_stream: n.per_stream,
                };
                (name.to_string(), count)
            })
            .collect()
    }

    fn names(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Name>> {
        self.names.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_by_name_while_held() {
        let counts = OutputCounts::default();
        let mut seen = counts.watch();
        let sent = counts.enter("mjpeg", false);
        counts.enter("mjpeg", false);
        counts.enter("alerts", true);
        sent.fetch_add(3, Ordering::Relaxed);
        assert!(seen.has_changed().unwrap());
        assert_eq!(counts.running("mjpeg"), 2);
        counts.leave("mjpeg");
        counts.leave("alerts");
        let all = counts.all();
        assert_eq!(
            all["mjpeg"],
            OutputCount {
                running: 1,
                frames_sent: 3,
                per_stream: false
            }
        );
        assert_eq!(all["alerts"].running, 0, "a name stays once seen");
        assert_eq!(seen.borrow_and_update().get("mjpeg"), Some(&1));
        counts.leave("mjpeg");
        assert_eq!(counts.running("mjpeg"), 0);
    }
}
