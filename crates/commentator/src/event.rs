//! What the commentary loop tells the outside world, and what it can be told.
//! These are the wire format of `/api/stream` and `/api/ws` (one JSON object per event,
//! tagged by `type`), so fields are only ever added.

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A cycle began with these frames (media seconds), sent to the engine, unless the
    /// `cycle_end` that follows at once has `reason` `"unchanged"`.
    CycleStart {
        cycle: u64,
        frames: Vec<f64>,
    },
    /// A streamed piece of the answer.
    Token {
        cycle: u64,
        text: String,
    },
    CycleEnd(CycleEnd),
    /// A cycle failed; the loop goes on.
    Error {
        cycle: Option<u64>,
        message: String,
    },
    /// The source changed state (`connecting`, `live`, `reconnecting`, `ended`, `failed`).
    Source {
        state: String,
        detail: Option<String>,
    },
    /// A viewer's question about what the stream shows now; its answer follows as
    /// `answer_token` pieces and one `answer_end`.
    AnswerStart {
        answer: u64,
        question: String,
    },
    AnswerToken {
        answer: u64,
        text: String,
    },
    /// The whole answer (or, with `error`, why there is none).
    AnswerEnd {
        answer: u64,
        question: String,
        text: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// From the question to the end of the answer, in seconds.
        latency: f64,
    },
    /// An alert rule turned from no to yes.
    Alert {
        alert: u64,
        rule: String,
        rule_id: u64,
        comment: Option<String>,
        /// Unix milliseconds.
        time: f64,
        /// The seconds of picture around it: `/api/alerts/{alert}/clip`.
        clip: String,
    },
    /// A cycle's comment is spoken: the clip at `clip` (WAV) plays at `play_at`, in
    /// milliseconds of the server's clock (unix epoch), when the delayed picture shows the
    /// newest frame it talks about.
    Speech {
        cycle: u64,
        clip: String,
        play_at: f64,
        duration: f64,
        /// Seconds after its picture the clip starts: 0 when on time, more when the voice
        /// was still speaking or synthesis took longer than the delay allowed.
        late: f64,
    },
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CycleEnd {
    pub cycle: u64,
    /// The whole answer, trimmed. Empty when skipped.
    pub text: String,
    /// Nothing to show or speak: the model said nothing changed ("..." or nothing at all),
    /// or, with `reason`, the model was not asked.
    pub skipped: bool,
    /// Why the cycle ended without asking the model: `"unchanged"`, the scene-change gate
    /// found its frames no different from those of the last answered cycle (then
    /// `inference_ms` is 0 and `latency` is the newest frame's age). Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Media time (seconds) of each frame sent, oldest first.
    pub frames: Vec<f64>,
    /// From the capture of the newest frame to the end of the answer, in seconds.
    pub latency: f64,
    /// Time inside the engine, in milliseconds.
    pub inference_ms: f64,
    /// How far behind real time the picture is shown after this cycle, in seconds.
    pub target_delay: f64,
    /// From the capture of the newest frame to the first piece of the answer, in seconds
    /// (what a viewer waits for the first word about a picture); `None` without text.
    pub first_token_latency: Option<f64>,
}

/// Changes a user can make while the loop runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    SetProfile(String),
    /// An extra instruction for the model; empty clears it.
    SetInstruction(String),
    /// The pause between cycles (`INFERENCE_INTERVAL`), in seconds: 0 to 3600. Seconds as
    /// the user sent them, not a `Duration`, so that [`Control::validate`] can refuse a
    /// negative, NaN or huge number with its reason.
    SetInterval(f64),
    /// Someone listens to the stream's voice (or no one any more): prompts ask for
    /// sentences that sound right aloud while this is on.
    SetSpoken(bool),
    /// The last answered cycle's first audio was ready this many seconds after its text:
    /// with a voice heard, the sync delay counts the time to first audio too, so speech
    /// never starts before its picture.
    AddSpeechLatency(f64),
    /// The voice speaks until this instant: the next comment is not wanted before then,
    /// so the next cycle waits until its picture would be shown right as the speech ends
    /// (no pile-up, no long silence).
    SpeakingUntil(std::time::Instant),
}

impl Control {
    /// The one check of a change. A web handler calls it before queueing the change, to
    /// answer with the reason; the loop calls it again before applying one, and reports a
    /// bad change as an error event instead.
    pub fn validate(&self) -> Result<(), crate::ConfigError> {
        match self {
            Control::SetProfile(name) => crate::Profiles::get(name).map(|_| ()),
            Control::SetInstruction(text) => crate::check_instruction(text),
            Control::SetInterval(secs) => crate::config::check_interval(*secs),
            Control::AddSpeechLatency(secs)
                if !(secs.is_finite() && (0.0..=60.0).contains(secs)) =>
            {
                Err(crate::ConfigError::BadSpeechLatency(*secs))
            }
            Control::SetSpoken(_) | Control::AddSpeechLatency(_) | Control::SpeakingUntil(_) => {
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_is_sent_only_when_there_is_one() {
        let end = CycleEnd {
            cycle: 3,
            text: String::new(),
            skipped: true,
            reason: None,
            frames: vec![1.0],
            latency: 0.5,
            inference_ms: 0.0,
            target_delay: 5.0,
            first_token_latency: None,
        };
        let json = serde_json::to_value(Event::CycleEnd(end.clone())).unwrap();
        assert_eq!(json["type"], "cycle_end");
        assert!(json.get("reason").is_none(), "{json}");
        let json = serde_json::to_value(Event::CycleEnd(CycleEnd {
            reason: Some("unchanged".into()),
            ..end
        }))
        .unwrap();
        assert_eq!(json["reason"], "unchanged");
        assert_eq!(json["skipped"], true);
    }
}
