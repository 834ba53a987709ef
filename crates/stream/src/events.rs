//! Every stream's events on one bus, each tagged with its stream: what `GET /api/events`
//! sends, so a page showing many streams holds one connection, not one per stream.

use kibitz_commentator::Event;
use serde_json::{json, Value};

use crate::status::StreamSummary;
use crate::StreamId;

#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    pub stream: StreamId,
    pub kind: StreamEventKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StreamEventKind {
    /// What the stream's commentary loop or source said (`cycle_start`, `token`, …).
    Commentary(Event),
    /// A stream started (`stream_added`).
    Added(StreamSummary),
    /// Its settings changed (`stream_changed`).
    Changed(StreamSummary),
    /// It was removed (`stream_removed`).
    Removed,
}

impl StreamEvent {
    pub fn commentary(stream: StreamId, event: Event) -> StreamEvent {
        StreamEvent {
            stream,
            kind: StreamEventKind::Commentary(event),
        }
    }

    /// The wire form: the event's own JSON object (tagged by `type`) with a `stream` field.
    pub fn to_json(&self) -> Value {
        let mut value = match &self.kind {
            StreamEventKind::Commentary(event) => {
                serde_json::to_value(event).expect("events serialize to JSON")
            }
            StreamEventKind::Added(summary) => {
                json!({ "type": "stream_added", "summary": summary })
            }
            StreamEventKind::Changed(summary) => {
                json!({ "type": "stream_changed", "summary": summary })
            }
            StreamEventKind::Removed => json!({ "type": "stream_removed" }),
        };
        value["stream"] = json!(self.stream);
        value
    }

    /// The `type` tag.
    pub fn kind_name(&self) -> String {
        self.to_json()["type"]
            .as_str()
            .unwrap_or("event")
            .to_string()
    }
}
