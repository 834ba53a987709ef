//! Every comment, answer and alert into the history store, written AHEAD of viewers: a
//! stream's events pass through its relay (in [`crate::stream`]), and for an event that
//! leaves an entry the relay waits until [`History::record_committed`] says the row is
//! committed before any viewer (SSE, WebSocket, `/api/events`, outputs) gets the event. So
//! a comment someone saw is in the history even when the process is killed a moment later
//! (`kill -9`); before, the row sat in the writer's queue for a few milliseconds after the
//! event went out and was lost in 3 of 5 tries.
//!
//! The wait is bounded ([`COMMIT_WAIT`]): a stalled disk delays the commentary by at most
//! that, never stops it. The history is set on the registry
//! ([`crate::Streams::record_history`]) and read by every stream's relay through one shared
//! [`Journal`] slot, so setting it after streams started covers them too.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use kibitz_commentator::Event;
use kibitz_history::{Entry, History, Kind};

use crate::stream::StreamHandle;

/// How long an event waits for its row at most.
pub(crate) const COMMIT_WAIT: Duration = Duration::from_secs(2);

/// The history every stream of a registry writes to, once one is set.
pub(crate) type Journal = Arc<RwLock<Option<History>>>;

/// Writes what `event` leaves in the history (if anything, and if a history is set) and
/// returns once it is committed, or after [`COMMIT_WAIT`].
pub(crate) async fn write_ahead(journal: &Journal, handle: &StreamHandle, event: &Event) {
    let history = journal
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let (Some(history), Some(entry)) = (history, entry(handle, event)) else {
        return;
    };
    match tokio::time::timeout(COMMIT_WAIT, history.record_committed(entry)).await {
        Ok(true) => {}
        Ok(false) => tracing::warn!(stream = %handle.id(), "history: an entry was not kept"),
        Err(_) => tracing::warn!(
            stream = %handle.id(),
            "history: the write took longer than {COMMIT_WAIT:?}; shown before it was committed"
        ),
    }
}

/// What `event` leaves in the history, if anything.
fn entry(handle: &StreamHandle, event: &Event) -> Option<Entry> {
    let (kind, text, latency_s, question, media) = match event {
        Event::CycleEnd(end) if !end.skipped => (
            Kind::Comment,
            end.text.clone(),
            Some(end.latency),
            None,
            (end.frames.first().copied(), end.frames.last().copied()),
        ),
        Event::AnswerEnd {
            question,
            text,
            error: None,
            latency,
            ..
        } => (
            Kind::Answer,
            text.clone(),
            Some(*latency),
            Some(question.clone()),
            (None, None),
        ),
        Event::Alert { rule, comment, .. } => (
            Kind::Alert,
            comment.clone().unwrap_or_default(),
            None,
            Some(rule.clone()),
            (None, None),
        ),
        _ => return None,
    };
    let spec = handle.spec();
    Some(Entry {
        kind,
        stream: handle.id().to_string(),
        wall_ms: crate::speech::unix_ms(std::time::Instant::now()) as i64,
        media_start: media.0,
        media_end: media.1,
        profile: spec.profile.clone(),
        instruction: spec.instruction.clone(),
        text,
        latency_s,
        question,
    })
}
