//! Every comment, answer and alert of every stream into the history store, from the tagged
//! event bus: one task for the whole server, and `History::record` only queues, so the
//! commentary never waits on the disk.

use kibitz_commentator::Event;
use kibitz_history::{Entry, History, Kind};
use tokio::sync::broadcast::error::RecvError;

use crate::{StreamEventKind, Streams};

/// Records until the bus closes (the registry is gone).
pub async fn record(streams: Streams, history: History) {
    let mut bus = streams.subscribe();
    loop {
        let event = match bus.recv().await {
            Ok(event) => event,
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "the history fell behind the events; some are not kept"
                );
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let StreamEventKind::Commentary(commentary) = event.kind else {
            continue;
        };
        let (profile, instruction) = streams
            .get(event.stream.as_str())
            .map(|s| {
                let spec = s.spec();
                (spec.profile, spec.instruction)
            })
            .unwrap_or_default();
        let wall_ms = crate::unix_ms(std::time::Instant::now()) as i64;
        let entry =
            |kind, text: String, latency_s, question, media: (Option<f64>, Option<f64>)| Entry {
                kind,
                stream: event.stream.to_string(),
                wall_ms,
                media_start: media.0,
                media_end: media.1,
                profile: profile.clone(),
                instruction: instruction.clone(),
                text,
                latency_s,
                question,
            };
        let entry = match commentary {
            Event::CycleEnd(end) if !end.skipped => entry(
                Kind::Comment,
                end.text,
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
            } => entry(
                Kind::Answer,
                text,
                Some(latency),
                Some(question),
                (None, None),
            ),
            Event::Alert { rule, comment, .. } => entry(
                Kind::Alert,
                comment.unwrap_or_default(),
                None,
                Some(rule),
                (None, None),
            ),
            _ => continue,
        };
        history.record(entry);
    }
}
