//! Alerts: rules in plain words ("a person climbs the fence") checked on every answered
//! cycle as a yes/no question about the stream's newest frames, on the stream's engine
//! session at alert priority (after questions, before commentary).
//!
//! A rule fires when its answer turns from no to yes, not on every yes, and then rests for
//! its cooldown. Firing publishes an `alert` event, keeps the seconds of picture around it
//! from the display buffer as a clip, and hands the alert to the [`AlertSink`] (the
//! webhook), which must never block the loop.
//!
//! The check is a short generation ("yes" or "no", greedy) on every engine: reading the
//! first token's yes/no logits would be one step cheaper with llama.cpp, but needs an
//! engine interface for logits that the OpenAI-compatible engine cannot offer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kibitz_commentator::Event;
use kibitz_engine::{Frame, Image, Output, Priority, Request, Sampling};
use kibitz_frames::{DisplayFrame, Jpeg};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::stream::StreamHandle;
use crate::StreamError;

/// Rules one stream may have.
pub const MAX_RULES: usize = 8;
/// Longest rule, in characters.
pub const MAX_RULE_CHARS: usize = 300;
/// Default rest after a rule fires.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(60);
/// Picture kept before and after the moment an alert fires.
pub const CLIP_BEFORE: Duration = Duration::from_secs(5);
pub const CLIP_AFTER: Duration = Duration::from_secs(3);
/// Fired alerts kept (with their clips) for `/api/alerts`.
const ALERTS_KEPT: usize = 32;

static NEXT_RULE: AtomicU64 = AtomicU64::new(1);

/// A rule as the API takes it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSettings {
    pub rule: String,
    /// Seconds to rest after firing (default 60).
    pub cooldown: Option<f64>,
}

/// A rule of one stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rule {
    pub id: u64,
    pub rule: String,
    pub cooldown: f64,
    /// The last check's answer, `None` before the first.
    pub last: Option<bool>,
    pub checks: u64,
    pub fired: u64,
}

/// A fired alert, with its picture.
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub id: u64,
    pub stream: String,
    pub rule_id: u64,
    pub rule: String,
    /// The stream's latest comment when it fired.
    pub comment: Option<String>,
    /// Unix milliseconds.
    pub time: f64,
    /// `/api/alerts/{id}/clip`.
    pub clip: String,
    #[serde(skip)]
    pub frame: Option<Jpeg>,
    #[serde(skip)]
    pub frames: Arc<Mutex<Vec<DisplayFrame>>>,
}

impl Alert {
    /// The clip: the JPEGs back to back (`video/x-motion-jpeg`, which ffplay and VLC play),
    /// each carrying its capture time so that it replays at the pace it was captured
    /// ([`crate::clip_times`] reads them back).
    pub fn clip_bytes(&self) -> Vec<u8> {
        crate::clip::mjpeg(&lock(&self.frames))
    }
}

/// Where fired alerts go besides events: the webhook. `deliver` must return at once.
pub trait AlertSink: Send + Sync + 'static {
    fn deliver(&self, alert: &Alert);
}

/// Fired alerts of every stream, newest last.
#[derive(Default)]
pub struct AlertLog {
    alerts: Mutex<VecDeque<Alert>>,
    next: AtomicU64,
}

impl AlertLog {
    pub fn get(&self, id: u64) -> Option<Alert> {
        lock(&self.alerts).iter().find(|a| a.id == id).cloned()
    }

    pub fn recent(&self) -> Vec<Alert> {
        lock(&self.alerts).iter().cloned().collect()
    }

    fn push(&self, mut alert: Alert) -> Alert {
        alert.id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        alert.clip = format!("/api/alerts/{}/clip", alert.id);
        let mut alerts = lock(&self.alerts);
        if alerts.len() == ALERTS_KEPT {
            alerts.pop_front();
        }
        alerts.push_back(alert.clone());
        alert
    }
}

/// One stream's rules.
#[derive(Default)]
pub(crate) struct Rules {
    rules: Mutex<Vec<(Rule, Option<Instant>)>>,
}

impl Rules {
    pub(crate) fn list(&self) -> Vec<Rule> {
        lock(&self.rules).iter().map(|(r, _)| r.clone()).collect()
    }
}

/// Checks `settings`: the one place a rule is validated.
pub fn check_rule(settings: &RuleSettings) -> Result<Rule, StreamError> {
    let text = settings.rule.trim();
    let chars = text.chars().count();
    let bad = |message: String| {
        StreamError::Invalid(crate::Problems(vec![crate::FieldError {
            field: "rule",
            message,
        }]))
    };
    if chars == 0 || chars > MAX_RULE_CHARS {
        return Err(bad(format!(
            "must be 1 to {MAX_RULE_CHARS} characters, got {chars}"
        )));
    }
    let cooldown = settings.cooldown.unwrap_or(DEFAULT_COOLDOWN.as_secs_f64());
    if !(cooldown.is_finite() && (0.0..=86_400.0).contains(&cooldown)) {
        return Err(StreamError::Invalid(crate::Problems(vec![
            crate::FieldError {
                field: "cooldown",
                message: format!("must be 0 to 86400 seconds, got {cooldown}"),
            },
        ])));
    }
    Ok(Rule {
        id: NEXT_RULE.fetch_add(1, Ordering::Relaxed),
        rule: text.to_string(),
        cooldown,
        last: None,
        checks: 0,
        fired: 0,
    })
}

impl StreamHandle {
    pub fn alert_rules(&self) -> Vec<Rule> {
        self.rules().list()
    }

    /// Adds a rule (checked; at most [`MAX_RULES`]).
    pub fn add_alert_rule(&self, settings: &RuleSettings) -> Result<Rule, StreamError> {
        let rule = check_rule(settings)?;
        let mut rules = lock(&self.rules().rules);
        if rules.len() >= MAX_RULES {
            return Err(StreamError::Invalid(crate::Problems(vec![
                crate::FieldError {
                    field: "rule",
                    message: format!(
                        "this stream has {MAX_RULES} rules, the most it takes; delete one first"
                    ),
                },
            ])));
        }
        rules.push((rule.clone(), None));
        Ok(rule)
    }

    pub fn remove_alert_rule(&self, id: u64) -> Result<(), StreamError> {
        let mut rules = lock(&self.rules().rules);
        let before = rules.len();
        rules.retain(|(r, _)| r.id != id);
        if rules.len() == before {
            return Err(StreamError::NotFound(format!("rule {id}")));
        }
        Ok(())
    }
}

/// Checks the stream's rules after every answered cycle. Runs until the stream stops.
pub(crate) async fn watch(
    handle: StreamHandle,
    log: Arc<AlertLog>,
    sink: Option<Arc<dyn AlertSink>>,
) {
    let mut events = handle.subscribe();
    let stopped = handle.stopped();
    loop {
        let event = tokio::select! {
            _ = stopped.cancelled() => return,
            event = events.recv() => event,
        };
        let comment = match event {
            Ok(Event::CycleEnd(end)) if end.reason.is_none() => (!end.skipped).then_some(end.text),
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let rules = handle.rules().list();
        for rule in rules {
            let answer = tokio::select! {
                _ = stopped.cancelled() => return,
                answer = check(&handle, &rule.rule) => answer,
            };
            let yes = match answer {
                Ok(yes) => yes,
                Err(e) => {
                    tracing::warn!(stream = %handle.id(), rule = rule.id, "alert check failed: {e}");
                    continue;
                }
            };
            let now = Instant::now();
            let fire = {
                let mut rules = lock(&handle.rules().rules);
                let Some((state, fired_at)) = rules.iter_mut().find(|(r, _)| r.id == rule.id)
                else {
                    continue; // deleted meanwhile
                };
                let was = state.last.replace(yes).unwrap_or(false);
                state.checks += 1;
                let rested = fired_at.is_none_or(|t| {
                    now.saturating_duration_since(t).as_secs_f64() >= state.cooldown
                });
                let fire = yes && !was && rested;
                if fire {
                    state.fired += 1;
                    *fired_at = Some(now);
                }
                fire
            };
            if fire {
                let alert = log.push(Alert {
                    id: 0,
                    stream: handle.id().to_string(),
                    rule_id: rule.id,
                    rule: rule.rule.clone(),
                    comment: comment.clone().or_else(|| handle.recent_comments(1).pop()),
                    time: crate::unix_ms(now),
                    clip: String::new(),
                    frame: handle.latest_frame().map(|f| f.jpeg),
                    frames: Arc::new(Mutex::new(handle.frames_since(now - CLIP_BEFORE))),
                });
                tracing::info!(stream = %handle.id(), rule = %rule.rule, alert = alert.id, "alert");
                handle.emit(Event::Alert {
                    alert: alert.id,
                    rule: alert.rule.clone(),
                    rule_id: rule.id,
                    comment: alert.comment.clone(),
                    time: alert.time,
                    clip: alert.clip.clone(),
                });
                // The seconds after it join the clip once they have happened.
                let (clip_handle, frames) = (handle.clone(), alert.frames.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(CLIP_AFTER).await;
                    let mut frames = lock(&frames);
                    let last = frames.last().map(|f| f.seq);
                    frames.extend(clip_handle.frames_after(last));
                });
                if let Some(sink) = &sink {
                    sink.deliver(&alert);
                }
            }
        }
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
            Output::Text(piece) => text.push_str(&piece),
            Output::Done(_) => break,
        }
    }
    Ok(is_yes(&text))
}

/// "Yes", "yes.", " YES!" and the like; anything else is no.
pub fn is_yes(answer: &str) -> bool {
    let word: String = answer
        .trim_start_matches(|c: char| !c.is_alphanumeric())
        .chars()
        .take_while(|c| c.is_alphanumeric())
        .collect();
    word.eq_ignore_ascii_case("yes")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yes_and_no() {
        for yes in ["yes", "Yes.", " YES!", "\"yes\"", "yes, a person"] {
            assert!(is_yes(yes), "{yes}");
        }
        for no in ["no", "No.", "", "maybe yes", "yesterday"] {
            assert!(!is_yes(no), "{no}");
        }
    }

    #[test]
    fn rules_are_checked() {
        assert!(check_rule(&RuleSettings {
            rule: "  a person climbs the fence ".into(),
            cooldown: None
        })
        .is_ok());
        for (rule, cooldown) in [
            ("", None),
            ("x".repeat(301).as_str(), None),
            ("ok", Some(-1.0)),
        ] {
            assert!(check_rule(&RuleSettings {
                rule: rule.to_string(),
                cooldown
            })
            .is_err());
        }
    }
}
