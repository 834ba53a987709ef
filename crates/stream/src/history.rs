//! Every comment, answer and alert into the history store: an output every stream runs
//! ([`output`]), reading its stream's events. `History::record` only queues, so the
//! commentary never waits on the disk.

use kibitz_commentator::Event;
use kibitz_history::{Entry, History, Kind};
use tokio::sync::broadcast::error::RecvError;

use crate::output::{Output, OutputContext, StreamOutput, Task};

/// The history output, to register with [`crate::Streams::add_output`].
pub fn output(history: History) -> StreamOutput {
    StreamOutput::new(Recorder { history })
}

#[derive(Clone)]
struct Recorder {
    history: History,
}

impl Output for Recorder {
    type Running = Task;

    fn name(&self) -> &'static str {
        "history"
    }

    fn build(self, cx: OutputContext) -> Task {
        Box::pin(run(cx, self.history))
    }
}

/// Records until the stream stops.
async fn run(mut cx: OutputContext, history: History) {
    loop {
        let event = tokio::select! {
            _ = cx.stopped.cancelled() => return,
            event = cx.events.recv() => event,
        };
        match event {
            Ok(event) => {
                if let Some(entry) = entry(&cx, event) {
                    history.record(entry);
                }
            }
            Err(RecvError::Lagged(missed)) => tracing::warn!(
                stream = %cx.handle.id(),
                missed,
                "the history fell behind the events; some are not kept"
            ),
            Err(RecvError::Closed) => return,
        }
    }
}

/// What `event` leaves in the history, if anything.
fn entry(cx: &OutputContext, event: Event) -> Option<Entry> {
    let spec = cx.handle.spec();
    let wall_ms = crate::speech::unix_ms(std::time::Instant::now()) as i64;
    let entry =
        |kind, text: String, latency_s, question, media: (Option<f64>, Option<f64>)| Entry {
            kind,
            stream: cx.handle.id().to_string(),
            wall_ms,
            media_start: media.0,
            media_end: media.1,
            profile: spec.profile.clone(),
            instruction: spec.instruction.clone(),
            text,
            latency_s,
            question,
        };
    Some(match event {
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
        _ => return None,
    })
}
