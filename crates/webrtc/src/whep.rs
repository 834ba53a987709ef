//! A WHEP viewer as an output of its stream (counted as [`VIEWER`], which keeps the
//! stream's H.264 encoder and Opus encoder running): a task that moves the stream's
//! encoded access units, Opus frames and commentary events to the viewer's session in the
//! driver. It decides nothing about timing (the encoders and the playout did); it only
//! skips what the viewer can no longer use: after falling behind, video until the next
//! keyframe (asked for at once).
//!
//! The data channel carries each event as the SSE stream has it, plus `rtp_timestamp`:
//! the RTP time of the newest frame the cycle looked at (`cycle_start`, `cycle_end`, and
//! that cycle's `token` and `speech` events), so the page can show the words with that
//! frame (`requestVideoFrameCallback`'s `rtpTimestamp`).

use std::sync::Arc;

use kibitz_commentator::Event;
use kibitz_stream::{Output, OutputContext, Task};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::driver::Command;
use crate::sessions::{Media, SessionId};
use crate::video::{rtp_of_seconds, VideoFeed, VIEWER};

/// 20 ms at 48 kHz: one Opus frame's RTP step.
const OPUS_FRAME_TICKS: u64 = 960;

pub(crate) struct ViewerOutput {
    pub session: SessionId,
    pub commands: mpsc::Sender<Command>,
    pub ended: CancellationToken,
    /// The offer had a data channel: send the events.
    pub data: bool,
}

impl Output for ViewerOutput {
    type Running = Task;

    fn name(&self) -> &'static str {
        VIEWER
    }

    fn build(self, cx: OutputContext) -> Task {
        Box::pin(forward(cx, self))
    }
}

/// Runs until the session ends or the stream stops.
async fn forward(mut cx: OutputContext, viewer: ViewerOutput) {
    let feed = cx.handle.extension::<VideoFeed>();
    let mut units = feed.subscribe();
    let (mut opus, _) = cx.handle.speech_frames();
    let mut audio_rtp: u64 = 0;
    let mut tags = CycleTags::default();
    let mut waiting_for_keyframe = false;
    loop {
        let media = tokio::select! {
            _ = viewer.ended.cancelled() => return,
            _ = cx.stopped.cancelled() => {
                let stream = cx.handle.id().to_string();
                let _ = viewer.commands.send(Command::End { stream, session: viewer.session.clone(), done: None }).await;
                return;
            }
            unit = units.recv() => match unit {
                Ok(unit) if waiting_for_keyframe && !unit.keyframe => continue,
                Ok(unit) => {
                    waiting_for_keyframe = false;
                    Media::Video(unit)
                }
                Err(RecvError::Lagged(_)) => {
                    waiting_for_keyframe = true;
                    feed.keyframes.want();
                    continue;
                }
                Err(RecvError::Closed) => return,
            },
            frame = opus.recv() => match frame {
                Ok(frame) => {
                    let rtp = audio_rtp;
                    audio_rtp += OPUS_FRAME_TICKS;
                    Media::Audio { data: Arc::from(&frame.0[..]), rtp }
                }
                Err(RecvError::Lagged(n)) => {
                    audio_rtp += OPUS_FRAME_TICKS * n;
                    continue;
                }
                Err(RecvError::Closed) => return,
            },
            event = cx.events.recv(), if viewer.data => match event {
                Ok(event) => Media::Text(tags.json(&event).into()),
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            },
        };
        let write = Command::Write {
            session: viewer.session.clone(),
            media,
        };
        // A full queue means the driver is behind: this piece is lost, never waited for.
        if let Err(mpsc::error::TrySendError::Closed(_)) = viewer.commands.try_send(write) {
            return;
        }
    }
}

/// Tags events with the RTP time of their cycle's newest frame.
#[derive(Debug, Default)]
pub(crate) struct CycleTags {
    /// The cycle last started, and its newest frame's RTP time.
    current: Option<(u64, u32)>,
}

impl CycleTags {
    /// The event as the SSE stream sends it, plus `rtp_timestamp` where it has one.
    pub(crate) fn json(&mut self, event: &Event) -> String {
        let mut value = serde_json::to_value(event).expect("events serialize");
        let rtp = match event {
            Event::CycleStart { cycle, frames } => {
                let rtp = frames.last().map(|s| rtp_of_seconds(*s));
                self.current = rtp.map(|r| (*cycle, r));
                rtp
            }
            Event::CycleEnd(end) => end.frames.last().map(|s| rtp_of_seconds(*s)),
            Event::Token { cycle, .. } | Event::Speech { cycle, .. } => {
                self.current.filter(|(c, _)| c == cycle).map(|(_, rtp)| rtp)
            }
            _ => None,
        };
        if let Some(rtp) = rtp {
            value["rtp_timestamp"] = rtp.into();
        }
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use kibitz_commentator::CycleEnd;
    use serde_json::Value;

    use super::*;

    #[test]
    fn a_cycles_events_carry_its_newest_frames_timestamp() {
        let mut tags = CycleTags::default();
        let start = Event::CycleStart {
            cycle: 7,
            frames: vec![1.0, 1.5, 2.0],
        };
        let json: Value = serde_json::from_str(&tags.json(&start)).unwrap();
        let expected = rtp_of_seconds(2.0);
        assert_eq!(json["rtp_timestamp"], expected);
        // Everything else is the SSE event as it is.
        assert_eq!(json["type"], "cycle_start");
        assert_eq!(json["frames"], serde_json::json!([1.0, 1.5, 2.0]));

        let token = Event::Token {
            cycle: 7,
            text: "a ball".into(),
        };
        let json: Value = serde_json::from_str(&tags.json(&token)).unwrap();
        assert_eq!(json["rtp_timestamp"], expected);
        assert_eq!(json["text"], "a ball");

        let other = Event::Token {
            cycle: 8,
            text: "x".into(),
        };
        let json: Value = serde_json::from_str(&tags.json(&other)).unwrap();
        assert!(json.get("rtp_timestamp").is_none());

        let end = Event::CycleEnd(CycleEnd {
            cycle: 7,
            text: "a ball rolls".into(),
            skipped: false,
            reason: None,
            frames: vec![1.0, 1.5, 2.0],
            latency: 0.5,
            inference_ms: 10.0,
            target_delay: 1.0,
            first_token_latency: Some(0.2),
        });
        let json: Value = serde_json::from_str(&tags.json(&end)).unwrap();
        assert_eq!(json["rtp_timestamp"], expected);
    }

    #[test]
    fn events_without_frames_have_no_timestamp() {
        let mut tags = CycleTags::default();
        let source = Event::Source {
            state: "live".into(),
            detail: None,
        };
        let json: Value = serde_json::from_str(&tags.json(&source)).unwrap();
        assert_eq!(json["type"], "source");
        assert!(json.get("rtp_timestamp").is_none());
    }
}
