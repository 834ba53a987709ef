//! The alerts output: after every answered cycle, each of the stream's rules is asked as a
//! yes/no question about the newest frames, on the stream's engine session at alert
//! priority (after questions, before commentary). Whether an answer fires is the rule's
//! [`crate::alerts::Trigger`]'s decision; this loop asks the engine, asks the trigger, and
//! hands a fired alert on: to the log, as an `alert` event, and to the sink (the webhook).
//!
//! The check is a short generation ("yes" or "no", greedy) on every engine: reading the
//! first token's yes/no logits would be one step cheaper with llama.cpp, but needs an
//! engine interface for logits that the OpenAI-compatible engine cannot offer.

use std::sync::{Arc, Mutex, PoisonError};

use kibitz_commentator::Event;
use kibitz_engine::{Frame, Image, Output as Generated, Priority, Request, Sampling};
use tokio::sync::broadcast::error::RecvError;

use crate::alerts::{is_yes, Alert, AlertLog, AlertSink, Rule, RuleError, RuleSettings, Rules};
use crate::alerts::{CLIP_AFTER, CLIP_BEFORE};
use crate::output::{Output, OutputContext, StreamOutput, Task};
use crate::spec::{FieldError, Problems};
use crate::stream::StreamHandle;
use crate::StreamError;

/// The alerts output of every stream: fired alerts go to `log` and `sink`.
pub(crate) fn output(log: Arc<AlertLog>, sink: Option<Arc<dyn AlertSink>>) -> StreamOutput {
    StreamOutput::new(Alerts { log, sink })
}

#[derive(Clone)]
pub(crate) struct Alerts {
    log: Arc<AlertLog>,
    sink: Option<Arc<dyn AlertSink>>,
}

impl Output for Alerts {
    type Running = Task;

    fn name(&self) -> &'static str {
        "alerts"
    }

    /// Takes the rules the stream was started with (checked with its spec).
    fn build(self, cx: OutputContext) -> Task {
        for rule in cx.handle.spec().alerts {
            let settings = RuleSettings {
                rule,
                cooldown: None,
            };
            if let Err(e) = cx.handle.add_alert_rule(&settings) {
                tracing::warn!(stream = %cx.handle.id(), "alert rule left out: {e}");
            }
        }
        Box::pin(watch(cx, self.log, self.sink))
    }
}

impl StreamHandle {
    pub fn alert_rules(&self) -> Vec<Rule> {
        self.extension::<Rules>().list()
    }

    /// Adds a rule (checked; at most [`crate::MAX_RULES`]).
    pub fn add_alert_rule(&self, settings: &RuleSettings) -> Result<Rule, StreamError> {
        self.extension::<Rules>()
            .add(settings)
            .map_err(|RuleError { field, message }| {
                StreamError::Invalid(Problems(vec![FieldError { field, message }]))
            })
    }

    pub fn remove_alert_rule(&self, id: u64) -> Result<(), StreamError> {
        if self.extension::<Rules>().remove(id) {
            Ok(())
        } else {
            Err(StreamError::NotFound(format!("rule {id}")))
        }
    }
}

/// Checks the stream's rules after every answered cycle, until the stream stops.
async fn watch(mut cx: OutputContext, log: Arc<AlertLog>, sink: Option<Arc<dyn AlertSink>>) {
    let handle = cx.handle.clone();
    let rules = handle.extension::<Rules>();
    loop {
        let event = tokio::select! {
            _ = cx.stopped.cancelled() => return,
            event = cx.events.recv() => event,
        };
        let comment = match event {
            Ok(Event::CycleEnd(end)) if end.reason.is_none() => (!end.skipped).then_some(end.text),
            Ok(_) | Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return,
        };
        for rule in rules.list() {
            let answer = tokio::select! {
                _ = cx.stopped.cancelled() => return,
                answer = check(&handle, &rule.rule) => answer,
            };
            let yes = match answer {
                Ok(yes) => yes,
                Err(e) => {
                    tracing::warn!(stream = %handle.id(), rule = rule.id, "alert check failed: {e}");
                    continue;
                }
            };
            let now = now();
            if rules.answer(rule.id, now, yes) == Some(true) {
                let alert = log.push(Alert {
                    id: 0,
                    stream: handle.id().to_string(),
                    rule_id: rule.id,
                    rule: rule.rule.clone(),
                    comment: comment.clone().or_else(|| handle.recent_comments(1).pop()),
                    time: crate::speech::unix_ms(now),
                    clip: String::new(),
                    frame: handle.latest_frame().map(|f| f.jpeg),
                    frames: Arc::new(Mutex::new(handle.frames_since(now - CLIP_BEFORE))),
                });
                fired(&handle, &alert, sink.as_deref());
            }
        }
    }
}

/// Tells everyone: an event, the seconds after it into its clip, the sink.
fn fired(handle: &StreamHandle, alert: &Alert, sink: Option<&dyn AlertSink>) {
    tracing::info!(stream = %handle.id(), rule = %alert.rule, alert = alert.id, "alert");
    handle.emit(Event::Alert {
        alert: alert.id,
        rule: alert.rule.clone(),
        rule_id: alert.rule_id,
        comment: alert.comment.clone(),
        time: alert.time,
        clip: alert.clip.clone(),
    });
    // The seconds after it join the clip once they have happened.
    let (clip_handle, frames) = (handle.clone(), alert.frames.clone());
    tokio::spawn(async move {
        tokio::time::sleep(CLIP_AFTER).await;
        let mut frames = frames.lock().unwrap_or_else(PoisonError::into_inner);
        let last = frames.last().map(|f| f.seq);
        frames.extend(clip_handle.frames_after(last));
    });
    if let Some(sink) = sink {
        sink.deliver(alert);
    }
}

/// One yes/no question about the newest frames.
async fn check(handle: &StreamHandle, rule: &str) -> Result<bool, String> {
    let turn = handle
        .session()
        .turn(Priority::Alert, None)
        .await
        .map_err(|e| e.to_string())?;
    let spec = handle.spec();
    let frames: Vec<Frame> = handle
        .sample_frames(spec.frames_per_inference, spec.frame_stride)
        .into_iter()
        .map(|(stamp, rgb)| Frame {
            image: Image::Rgb(rgb),
            pts: stamp.pts,
        })
        .collect();
    if frames.is_empty() {
        return Err("no picture yet".into());
    }
    let mut request = Request::new(
        frames,
        "You check a live video for one condition. Answer with one word: yes or no.",
        format!(
            "Here are the last frames, oldest first. Condition: {rule}\nIs it true in the newest frame? Answer yes or no."
        ),
    );
    request.max_tokens = 3;
    request.sampling = Sampling {
        temperature: 0.0,
        ..Sampling::default()
    };
    let mut generation = turn.submit(request).map_err(|e| e.to_string())?;
    let mut text = String::new();
    while let Some(item) = generation.next().await {
        match item.map_err(|e| e.to_string())? {
            Generated::Text(piece) => text.push_str(&piece),
            Generated::Done(_) => break,
        }
    }
    Ok(is_yes(&text))
}

/// Tokio's clock, so tests with paused time drive the cooldowns.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}
