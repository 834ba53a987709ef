//! The one typed status of a stream, and the short form the stream list shows. Built by
//! [`crate::StreamHandle::status`] from the source, the stores, the commentary loop's
//! snapshot and the output counts; `/api/status`, `/metrics` and the page all read it.

use std::collections::BTreeMap;

use kibitz_commentator::Snapshot;
use kibitz_media::{SourceState, SourceStatus};
use serde::{Deserialize, Serialize};

use crate::counts::OutputCount;
use crate::spec::StreamSettings;
use crate::speech::SpeechStatus;
use crate::StreamId;

/// Where a stream came from: the command line (trusted, not kept in the state file) or
/// the API (its source checked by the policy, kept in the state file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Cli,
    Api,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StreamStatus {
    pub id: StreamId,
    pub origin: Origin,
    pub source: SourceView,
    pub buffers: BufferStatus,
    /// The commentary loop: phase, counters, latest latencies and comment, profile.
    pub commentary: Snapshot,
    /// Seconds behind real time the picture is shown.
    pub target_delay: f64,
    /// Outputs by name (`mjpeg`, `sse`, `ws`, `speech`, `alerts`, …): how many run now
    /// and the pictures they have sent. A name shows once an output of it has run.
    pub outputs: BTreeMap<String, OutputCount>,
    pub speech: SpeechStatus,
    /// The stream's settings (source without credentials).
    pub settings: StreamSettings,
    pub uptime_s: f64,
}

/// The source as a person reads it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SourceView {
    /// The path or URL, credentials masked.
    pub name: String,
    /// `file`, `webcam`, `rtsp`, `http` or `url`.
    pub kind: String,
    /// `connecting`, `live`, `reconnecting`, `ended`, `failed` or `stopped`.
    pub state: String,
    /// Why, in words (the retry plan, the last error).
    pub detail: Option<String>,
    /// Seconds until the next reconnect attempt, while reconnecting.
    pub retry_in: Option<f64>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub codec: Option<String>,
    /// Frames a second reaching the display buffer (measured), else the declared rate.
    pub fps: Option<f64>,
    pub passthrough: bool,
    pub frames: u64,
    pub frames_dropped: u64,
    pub frames_captured: u64,
    pub reconnects: u64,
    pub loops: u64,
}

impl From<SourceStatus> for SourceView {
    fn from(s: SourceStatus) -> SourceView {
        let retry_in = match &s.state {
            SourceState::Reconnecting { retry_in, .. } => Some(retry_in.as_secs_f64()),
            _ => None,
        };
        SourceView {
            kind: s.kind.into(),
            state: s.state.name().into(),
            detail: s
                .state
                .detail()
                .or(s.fitted.map(|(w, h)| {
                    format!(
                        "{}x{} is over --max-source-pixels: shown downscaled to {w}x{h}",
                        s.width, s.height
                    )
                }))
                .or(s.last_error.clone()),
            retry_in,
            width: (s.width > 0).then_some(s.width),
            height: (s.height > 0).then_some(s.height),
            codec: s.codec,
            fps: s.measured_fps.or(s.source_fps),
            passthrough: s.passthrough,
            frames: s.frames_decoded,
            frames_dropped: s.frames_dropped,
            frames_captured: s.frames_captured,
            reconnects: s.reconnects,
            loops: s.loops,
            name: s.source,
        }
    }
}

impl SourceView {
    pub(crate) fn stopped(name: String) -> SourceView {
        SourceView {
            name,
            state: "stopped".into(),
            ..SourceView::default()
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct BufferStatus {
    pub display_frames: usize,
    /// Seconds of picture the display buffer holds.
    pub display_seconds: f64,
    pub display_bytes: usize,
    pub window_frames: usize,
    pub window_capacity: usize,
}

impl StreamStatus {
    /// Outputs of `name` running now (0 for a name never seen).
    pub fn running(&self, name: &str) -> u64 {
        self.outputs.get(name).map_or(0, |o| o.running)
    }

    /// Pictures outputs of `name` have sent since the stream started.
    pub fn frames_sent(&self, name: &str) -> u64 {
        self.outputs.get(name).map_or(0, |o| o.frames_sent)
    }

    /// Outputs attached by clients (viewers, listeners), all names together; not those
    /// the stream runs itself.
    pub fn viewers(&self) -> u64 {
        self.outputs
            .values()
            .filter(|o| !o.per_stream)
            .map(|o| o.running)
            .sum()
    }
}

/// One line of `GET /api/streams`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StreamSummary {
    pub id: StreamId,
    /// Credentials masked.
    pub source: String,
    pub origin: Origin,
    /// The source's state.
    pub state: String,
    pub detail: Option<String>,
    pub profile: String,
    pub instruction: String,
    pub last_comment: Option<String>,
    /// Who speaks its comments (`off`, or `off (why)` when the voice could not start).
    pub voice: String,
    pub target_delay: f64,
    /// Outputs attached by clients (MJPEG, SSE, WebSocket, speech, …) together.
    pub viewers: u64,
}

impl From<&StreamStatus> for StreamSummary {
    fn from(s: &StreamStatus) -> StreamSummary {
        StreamSummary {
            id: s.id.clone(),
            source: s.source.name.clone(),
            origin: s.origin,
            state: s.source.state.clone(),
            detail: s.source.detail.clone(),
            profile: s.settings.profile.clone().unwrap_or_default(),
            instruction: s.settings.instruction.clone().unwrap_or_default(),
            last_comment: s.commentary.last_comment.clone(),
            voice: s.speech.voice.clone(),
            target_delay: s.target_delay,
            viewers: s.viewers(),
        }
    }
}
