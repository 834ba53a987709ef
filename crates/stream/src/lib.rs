//! Streams as the unit of kibitz: one source with its frame stores, commentary loop, sync
//! delay and events, and the set of them a server runs.
//!
//! - [`StreamSpec`] / [`StreamSettings`]: what a stream is, checked in one place.
//! - [`topology::plan`]: the command line's streams, every problem reported at once.
//! - [`Stream`] / [`StreamHandle`]: one running stream, which outputs are built from.
//! - [`Output`] / [`OutputContext`] / [`StreamOutput`]: outputs as plug-ins, counted by
//!   name; `outputs` holds the ones every stream runs itself (speaker, encoder, alerts).
//! - [`Playout`]: which picture is on screen now, given the delay (sans-IO).
//! - [`Streams`]: the registry: add, change, remove, the state file, the tagged event bus.
//! - [`Sources`]: how sources start (FFmpeg; pattern pictures behind the `fake` feature).
//! - [`speech`]: the voice's shared state and its timing ([`SpeechTimeline`], [`Pacer`],
//!   sans-IO); [`Trigger`]: when an alert fires (sans-IO).

mod alerts;
mod ask;
mod clip;
mod counts;
mod events;
mod extensions;
pub mod history;
mod id;
mod output;
mod outputs;
mod playout;
mod registry;
pub mod sources;
mod spec;
pub mod speech;
mod status;
mod stream;
pub mod topology;
mod voices;

pub use alerts::{
    check_rule, is_yes, Alert, AlertLog, AlertSink, Rule, RuleError, RuleSettings, Trigger,
    MAX_RULES, MAX_RULE_CHARS,
};
pub use ask::{AnswerPiece, MAX_QUESTION_CHARS};
pub use clip::clip_times;
pub use counts::{OutputCount, Running};
pub use events::{StreamEvent, StreamEventKind};
pub use id::{StreamId, MAX_ID_LEN};
pub use output::{Demand, Output, OutputContext, StreamOutput, Task};
pub use playout::{frame_period, Playout};
pub use registry::{RegistryConfig, Streams};
pub use sources::{FfmpegSources, RunningSource, SourcePlan, Sources};
pub use spec::{
    parse_streams_file, FieldError, Problems, StreamDefaults, StreamSettings, StreamSpec,
    LIVE_FIELDS,
};
pub use speech::{unix_ms, Pacer, SpeechStatus, SpeechTimeline, MAX_LATE};
pub use status::{BufferStatus, Origin, SourceView, StreamStatus, StreamSummary};
pub use stream::{StartContext, Stream, StreamHandle, WeakStreamHandle};
pub use voices::Voices;

/// What adding, changing or removing a stream can fail with. The server maps each to one
/// HTTP status; the binary prints it as one line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StreamError {
    /// A setting is unusable; each problem names its field (HTTP 422).
    #[error("{0}")]
    Invalid(Problems),
    /// The source is not allowed from the API (HTTP 422, field `source`).
    #[error("source: {0}")]
    Refused(String),
    /// The source could not be opened (a missing or broken file) (HTTP 422).
    #[error("source: {0}")]
    Open(String),
    /// A stream with this id is running (HTTP 409).
    #[error("a stream named '{0}' is already running; pick another id or delete it first")]
    Taken(StreamId),
    /// `--max-streams` are running (HTTP 429).
    #[error(
        "{0} streams are running, the most this server takes (--max-streams); delete one first"
    )]
    Full(usize),
    /// No such stream (HTTP 404).
    #[error("no stream named '{0}'")]
    NotFound(String),
    /// The stream's loop has not taken the last change yet (HTTP 429).
    #[error("{0}")]
    Busy(String),
    /// The stream stopped while being changed (HTTP 503).
    #[error("the stream has stopped")]
    Stopped,
    #[error("internal error: {0}")]
    Internal(String),
}

impl StreamError {
    /// The field a 422 is about, for clients that highlight it.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            StreamError::Invalid(p) => p.0.first().map(|p| p.field),
            StreamError::Refused(_) | StreamError::Open(_) => Some("source"),
            _ => None,
        }
    }
}
