//! The history: every comment, answer and alert of every stream, kept in SQLite so that it can
//! be searched, paged through and exported after the live page has forgotten it.
//!
//! Why a writer thread and a bounded queue: the commentary loop must never wait on a disk.
//! [`History::record`] puts the entry on a bounded channel and returns at once; one thread owns
//! the only writing connection and commits whatever has queued up in one transaction, so a
//! burst costs one fsync, not one each. A full queue drops the entry and counts it
//! ([`History::dropped`]): a missing line of history is better than a stalled stream.
//!
//! Why reads on the blocking pool: searches run on tokio's blocking threads with read-only
//! connections of their own (a few kept idle for reuse). In WAL mode they read beside the
//! writer, so a slow search delays neither a write nor the runtime.
//!
//! Why FTS5 with external content: the text is stored once, in `entries`, and triggers keep
//! the index in step on insert and on prune. User text never reaches FTS5 as syntax:
//! `fts::match_expr` turns it into quoted phrases.
//!
//! Why time-ordered ids: an entry's id is its wall time in ms × 1000 plus a sequence number
//! (the writer gives it). Id order is then time order, so FTS5 hands over matches newest first
//! and a search stops at the page's end instead of sorting every match: a word in a fifth of a
//! million rows costs what a rare one does. Time ranges become id ranges.
//!
//! Why a keyset cursor: a page ends at some id and the next one starts strictly below it, so
//! rows added meanwhile neither repeat nor push others off a page.
//!
//! Retention: the writer thread prunes entries older than the retention when it starts and
//! every hour after; [`History::prune`] does it on demand (tests, or a lead with its own clock).

mod error;
mod fts;
mod read;
mod schema;
mod time;
mod vtt;
mod writer;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

pub use error::HistoryError;
pub use time::{format_time, parse_time};
pub use vtt::{webvtt, WebVttCue};

use read::Readers;
use schema::Location;
use writer::{Msg, Writer};

/// Entries waiting for the writer. At one comment a second per stream this is minutes of
/// slack; only a stuck disk fills it.
const QUEUE: usize = 4096;

/// The largest page [`History::search`] returns, and the default.
pub const MAX_LIMIT: usize = 500;
pub const DEFAULT_LIMIT: usize = 50;

/// What produced an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Comment,
    Answer,
    Alert,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Comment => "comment",
            Kind::Answer => "answer",
            Kind::Alert => "alert",
        }
    }

    fn parse(text: &str) -> Option<Kind> {
        match text {
            "comment" => Some(Kind::Comment),
            "answer" => Some(Kind::Answer),
            "alert" => Some(Kind::Alert),
            _ => None,
        }
    }
}

/// One line of history, as the stream hands it over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    pub stream: String,
    /// When it was produced, unix milliseconds.
    pub wall_ms: i64,
    /// Media time of the oldest and newest frame the model saw, in seconds.
    pub media_start: Option<f64>,
    pub media_end: Option<f64>,
    pub profile: String,
    pub instruction: String,
    /// The comment, the answer, or for an alert the comment that raised it.
    pub text: String,
    /// From the request to the last token, in seconds.
    pub latency_s: Option<f64>,
    /// The question an answer replies to, or the rule an alert fired on.
    pub question: Option<String>,
}

/// An entry as stored, with its id: `wall_ms × 1000` plus its place among the entries of that
/// millisecond, so ids sort as time does (an exact integer in JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    pub id: i64,
    #[serde(flatten)]
    pub entry: Entry,
}

/// A search. Every field narrows it; the default is the newest [`DEFAULT_LIMIT`] entries of
/// all streams.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Query {
    /// Any user text: its words must all appear (the last one as a prefix, for typing).
    pub q: Option<String>,
    pub stream: Option<String>,
    /// Inclusive lower bound, unix ms.
    pub since_ms: Option<i64>,
    /// Exclusive upper bound, unix ms.
    pub until_ms: Option<i64>,
    /// 1..=[`MAX_LIMIT`]; [`DEFAULT_LIMIT`] when `None`.
    pub limit: Option<usize>,
    /// The `next` of the previous page.
    pub before: Option<Cursor>,
}

/// One page of results, newest first, and where the next page starts (`None` on the last).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page {
    pub entries: Vec<Stored>,
    pub next: Option<Cursor>,
}

/// Where a page ended. Clients get it as an opaque string (`Display`/`FromStr`, and as a JSON
/// string) and pass it back as `before`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cursor {
    /// The last id on the page; the next page starts below it.
    id: i64,
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.id)
    }
}

impl FromStr for Cursor {
    type Err = HistoryError;

    fn from_str(text: &str) -> Result<Cursor, HistoryError> {
        match text.parse() {
            Ok(id) if id >= 0 && text.bytes().all(|b| b.is_ascii_digit()) => Ok(Cursor { id }),
            _ => Err(HistoryError::BadCursor(error::clip(text))),
        }
    }
}

impl Serialize for Cursor {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cursor {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Cursor, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The default file: `$XDG_DATA_HOME/kibitz/history.sqlite`, else
/// `~/.local/share/kibitz/history.sqlite`; `None` without a home.
pub fn default_path() -> Option<PathBuf> {
    let data = match std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".local/share")
        }
    };
    Some(data.join("kibitz").join("history.sqlite"))
}

/// The store. Cheap to clone; the writer thread ends once the last clone is dropped and the
/// queue is written out (call [`History::flush`] before exiting to be sure of that).
#[derive(Clone)]
pub struct History {
    shared: Arc<Shared>,
}

struct Shared {
    queue: SyncSender<Msg>,
    /// Entries lost: queue full, or a failed write (shared with the writer).
    dropped: Arc<AtomicU64>,
    readers: Readers,
}

impl History {
    /// Opens (or creates, with its folders) the history file, upgrades its schema, and starts
    /// the writer thread, which first prunes entries older than `retention`
    /// (`Duration::ZERO` keeps everything). Blocks for the opening only: call it at startup.
    pub fn open(path: impl AsRef<Path>, retention: Duration) -> Result<History, HistoryError> {
        let path = path.as_ref();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| HistoryError::CreateDir {
                path: parent.to_owned(),
                source,
            })?;
        }
        History::start(Location::File(path.to_owned()), retention)
    }

    /// A history in memory, gone with the last clone: for tests. Keeps everything.
    pub fn in_memory() -> Result<History, HistoryError> {
        History::start(Location::memory(), Duration::ZERO)
    }

    fn start(location: Location, retention: Duration) -> Result<History, HistoryError> {
        let conn = schema::open_writer(&location)?;
        let readers = Readers::new(location);
        // Fail now, not at the first search, if a reader cannot open.
        readers.with(|_| Ok(()))?;
        let (queue, inbox) = mpsc::sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let writer = Writer::new(conn, inbox, retention, dropped.clone())?;
        std::thread::Builder::new()
            .name("kibitz-history".into())
            .spawn(move || writer.run())
            .map_err(HistoryError::Thread)?;
        Ok(History {
            shared: Arc::new(Shared {
                queue,
                dropped,
                readers,
            }),
        })
    }

    /// Queues an entry for writing and returns at once, from any thread or task. `false` when
    /// the queue is full (or the writer gone): the entry is dropped, counted and warned about.
    pub fn record(&self, entry: Entry) -> bool {
        match self.shared.queue.try_send(Msg::Record(entry)) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                let n = self.shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n == 1 || n.is_multiple_of(1000) {
                    tracing::warn!(dropped = n, "history: writer behind, entry dropped");
                }
                false
            }
        }
    }

    /// Queues an entry like [`History::record`] and waits until it is committed: what a
    /// caller shows after this returns `true` survives the process being killed (the WAL
    /// holds it; `synchronous = NORMAL` leaves only a power cut between it and the disk).
    /// `false` when it was dropped (full queue, writer gone) or its write failed.
    pub async fn record_committed(&self, entry: Entry) -> bool {
        let (done, committed) = oneshot::channel();
        let before = self.dropped();
        match self
            .shared
            .queue
            .try_send(Msg::RecordCommitted(entry, done))
        {
            Ok(()) => committed.await.is_ok() && self.dropped() == before,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                let n = self.shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n == 1 || n.is_multiple_of(1000) {
                    tracing::warn!(dropped = n, "history: writer behind, entry dropped");
                }
                false
            }
        }
    }

    /// Entries lost so far: dropped on a full queue or in a failed write.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Waits until everything recorded before this call is committed.
    pub async fn flush(&self) -> Result<(), HistoryError> {
        let (done, wait) = oneshot::channel();
        self.send(Msg::Flush(done)).await?;
        wait.await.map_err(|_| HistoryError::Closed)
    }

    /// Deletes entries older than the retention counted back from `now_ms` (unix ms), on the
    /// writer thread, and returns how many went. The writer also does this by itself at start
    /// and every hour; with `retention` zero this deletes nothing.
    pub async fn prune(&self, now_ms: i64) -> Result<u64, HistoryError> {
        let (done, wait) = oneshot::channel();
        self.send(Msg::Prune { now_ms, done }).await?;
        wait.await.map_err(|_| HistoryError::Closed)?
    }

    /// A control message waits for room in the queue (on a blocking thread), unlike entries.
    async fn send(&self, msg: Msg) -> Result<(), HistoryError> {
        let queue = self.shared.queue.clone();
        tokio::task::spawn_blocking(move || queue.send(msg).map_err(drop))
            .await
            .map_err(|_| HistoryError::Closed)?
            .map_err(|_| HistoryError::Closed)
    }

    /// Full-text search and listing, newest first.
    pub async fn search(&self, query: Query) -> Result<Page, HistoryError> {
        let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(HistoryError::BadLimit {
                got: limit,
                max: MAX_LIMIT,
            });
        }
        self.read(move |conn| read::search(conn, &query, limit))
            .await
    }

    /// The newest `n` entries of a stream (at most [`MAX_LIMIT`]), oldest first: what the page
    /// shows when it opens.
    pub async fn last(&self, stream: &str, n: usize) -> Result<Vec<Stored>, HistoryError> {
        let stream = stream.to_owned();
        let n = n.min(MAX_LIMIT);
        self.read(move |conn| read::last(conn, &stream, n)).await
    }

    /// The comments of a stream in `[since_ms, until_ms)` as WebVTT: cue times count from
    /// `since_ms`, or from the first comment without it.
    pub async fn vtt(
        &self,
        stream: &str,
        since_ms: Option<i64>,
        until_ms: Option<i64>,
    ) -> Result<String, HistoryError> {
        let stream = stream.to_owned();
        self.read(move |conn| read::vtt(conn, &stream, since_ms, until_ms))
            .await
    }

    async fn read<T, F>(&self, f: F) -> Result<T, HistoryError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> Result<T, HistoryError> + Send + 'static,
    {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.readers.with(f))
            .await
            .map_err(|_| HistoryError::Closed)?
    }

    #[cfg(test)]
    fn queue(&self) -> &SyncSender<Msg> {
        &self.shared.queue
    }
}

#[cfg(test)]
mod tests;
