//! The writer thread: the only connection that writes.
//!
//! It sleeps on the queue, wakes for the first message, takes whatever else is already
//! waiting (up to [`BATCH`]) and commits it in one transaction. Pruning runs here too, in
//! chunks between batches, so deleting a month of rows never holds entries back for long.
//!
//! It also gives each entry its id ([`crate::schema::SLOT`]): the next free one in the
//! entry's millisecond. Entries come in time order nearly always, so the newest id it gave is
//! enough to know; an older entry asks the table what its millisecond holds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection};
use tokio::sync::oneshot;

use crate::schema::{first_id, SLOT};
use crate::{Entry, HistoryError};

/// Messages taken for one transaction at most.
const BATCH: usize = 512;
/// Rows deleted per prune step.
const PRUNE_CHUNK: i64 = 2000;
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

pub(crate) enum Msg {
    Record(Entry),
    /// An entry, and a word once its transaction is committed.
    RecordCommitted(Entry, oneshot::Sender<()>),
    /// Answered once everything queued before it is committed.
    Flush(oneshot::Sender<()>),
    Prune {
        now_ms: i64,
        done: oneshot::Sender<Result<u64, HistoryError>>,
    },
    /// Tests: stop taking messages (say so on `paused`) until `resume` is signalled.
    #[cfg(test)]
    Pause {
        paused: std::sync::mpsc::Sender<()>,
        resume: std::sync::mpsc::Receiver<()>,
    },
}

/// A prune in progress: delete rows older than `cutoff_ms`, then tell the waiters.
struct Prune {
    cutoff_ms: i64,
    deleted: u64,
    waiters: Vec<oneshot::Sender<Result<u64, HistoryError>>>,
}

pub(crate) struct Writer {
    conn: Connection,
    inbox: Receiver<Msg>,
    /// `None` keeps everything.
    retention_ms: Option<i64>,
    dropped: Arc<AtomicU64>,
    /// The highest id given so far.
    last_id: i64,
    batch: Vec<Entry>,
    flushes: Vec<oneshot::Sender<()>>,
    prune: Option<Prune>,
}

impl Writer {
    pub fn new(
        conn: Connection,
        inbox: Receiver<Msg>,
        retention: Duration,
        dropped: Arc<AtomicU64>,
    ) -> rusqlite::Result<Writer> {
        let last_id = conn.query_row("SELECT coalesce(max(id), -1) FROM entries", [], |row| {
            row.get(0)
        })?;
        let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        Ok(Writer {
            conn,
            inbox,
            retention_ms: (retention_ms > 0).then_some(retention_ms),
            dropped,
            last_id,
            batch: Vec::with_capacity(BATCH),
            flushes: Vec::new(),
            prune: None,
        })
    }

    pub fn run(mut self) {
        let mut next_prune = Instant::now();
        loop {
            if self.retention_ms.is_some() && Instant::now() >= next_prune {
                self.start_prune(now_ms(), None);
                next_prune = Instant::now() + PRUNE_EVERY;
            }
            // With a prune under way, only look at the queue; otherwise sleep on it.
            let first = if self.prune.is_some() {
                match self.inbox.try_recv() {
                    Ok(msg) => Some(msg),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                }
            } else if self.retention_ms.is_some() {
                let wait = next_prune.saturating_duration_since(Instant::now());
                match self.inbox.recv_timeout(wait.max(Duration::from_millis(1))) {
                    Ok(msg) => Some(msg),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match self.inbox.recv() {
                    Ok(msg) => Some(msg),
                    Err(_) => break,
                }
            };
            if let Some(msg) = first {
                self.take(msg);
                for _ in 1..BATCH {
                    match self.inbox.try_recv() {
                        Ok(msg) => self.take(msg),
                        Err(_) => break,
                    }
                }
            }
            self.commit();
            self.prune_step();
        }
        // Every sender is gone: the queue is empty. Write what was taken and stop.
        self.commit();
    }

    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Record(entry) => self.batch.push(entry),
            Msg::RecordCommitted(entry, done) => {
                self.batch.push(entry);
                self.flushes.push(done);
            }
            Msg::Flush(done) => self.flushes.push(done),
            Msg::Prune { now_ms, done } => self.start_prune(now_ms, Some(done)),
            #[cfg(test)]
            Msg::Pause { paused, resume } => {
                self.commit();
                let _ = paused.send(());
                let _ = resume.recv();
            }
        }
    }

    fn start_prune(
        &mut self,
        now_ms: i64,
        done: Option<oneshot::Sender<Result<u64, HistoryError>>>,
    ) {
        let Some(retention_ms) = self.retention_ms else {
            if let Some(done) = done {
                let _ = done.send(Ok(0));
            }
            return;
        };
        let cutoff_ms = now_ms.saturating_sub(retention_ms);
        let prune = self.prune.get_or_insert(Prune {
            cutoff_ms,
            deleted: 0,
            waiters: Vec::new(),
        });
        prune.cutoff_ms = prune.cutoff_ms.max(cutoff_ms);
        prune.waiters.extend(done);
    }

    /// Writes the batch in one transaction, then answers the flushes.
    fn commit(&mut self) {
        if !self.batch.is_empty() {
            if let Err(e) = insert(&mut self.conn, &mut self.last_id, &self.batch) {
                let lost = self.batch.len() as u64;
                self.dropped.fetch_add(lost, Ordering::Relaxed);
                tracing::error!(lost, "history: cannot write entries: {e}");
            }
            self.batch.clear();
        }
        for done in self.flushes.drain(..) {
            let _ = done.send(());
        }
    }

    fn prune_step(&mut self) {
        let Some(prune) = &mut self.prune else {
            return;
        };
        let result = self.conn.execute(
            "DELETE FROM entries WHERE id IN \
             (SELECT id FROM entries WHERE id < ?1 ORDER BY id LIMIT ?2)",
            params![first_id(prune.cutoff_ms), PRUNE_CHUNK],
        );
        let finished = match result {
            Ok(n) => {
                prune.deleted += n as u64;
                (n as i64) < PRUNE_CHUNK
            }
            Err(_) => true,
        };
        if finished {
            let prune = self.prune.take().expect("a prune under way");
            let outcome = result.map(|_| prune.deleted).map_err(|e| e.to_string());
            match &outcome {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "history: pruned old entries"),
                Err(e) => tracing::error!("history: cannot prune: {e}"),
            }
            for done in prune.waiters {
                let _ = done.send(outcome.clone().map_err(HistoryError::Prune));
            }
        }
    }
}

/// Inserts `entries` in one transaction. `last_id` may run ahead of the table if it fails:
/// that leaves a gap, never a clash.
fn insert(conn: &mut Connection, last_id: &mut i64, entries: &[Entry]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO entries (id, kind, stream, wall_ms, media_start, media_end, profile, \
             instruction, text, latency_s, question) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        for e in entries {
            let id = next_id(&tx, last_id, e.wall_ms)?;
            insert.execute(params![
                id,
                e.kind.as_str(),
                e.stream,
                e.wall_ms,
                e.media_start,
                e.media_end,
                e.profile,
                e.instruction,
                e.text,
                e.latency_s,
                e.question,
            ])?;
        }
    }
    tx.commit()
}

/// The first free id in `wall_ms`'s millisecond, or in the next one with room (a thousand
/// entries in one millisecond move the rest along by a millisecond).
fn next_id(conn: &Connection, last_id: &mut i64, wall_ms: i64) -> rusqlite::Result<i64> {
    let mut base = first_id(wall_ms);
    loop {
        let top: Option<i64> = if *last_id < base {
            None
        } else if *last_id < base + SLOT {
            Some(*last_id)
        } else {
            conn.prepare_cached("SELECT max(id) FROM entries WHERE id >= ?1 AND id < ?2")?
                .query_row(params![base, base + SLOT], |row| row.get(0))?
        };
        let id = match top {
            None => base,
            Some(top) if top + 1 < base + SLOT => top + 1,
            Some(_) => {
                base += SLOT;
                continue;
            }
        };
        *last_id = (*last_id).max(id);
        return Ok(id);
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
