//! Alerts: rules in plain words ("a person climbs the fence"), what fired, and where it
//! goes. The rules are checked by the alerts output (`crate::outputs::alerts`), which asks
//! each rule's [`Trigger`] whether an answer fires it.
//!
//! A rule fires when its answer turns from no to yes, not on every yes, and then rests for
//! its cooldown ([`Trigger`], sans-IO). Firing keeps the seconds of picture around it as a
//! clip and hands the alert to the [`AlertSink`] (the webhook), which must never block.
//!
//! This module knows no stream: a rule is checked here ([`check_rule`]) for the streams
//! file and the API alike, and the stream keeps its rules as an extension.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kibitz_frames::{DisplayFrame, Jpeg};
use serde::{Deserialize, Serialize};

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

    /// Keeps `alert`, numbered; returns it with its id and clip address.
    pub(crate) fn push(&self, mut alert: Alert) -> Alert {
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

/// When a rule fires: on its answer's edge from no to yes, and not again until its cooldown
/// has passed. Plain time arithmetic (`now` passed in, no clock), so it is tested over
/// hours of fake time; the watching task only asks it.
///
/// An edge during the cooldown is not fired, and a yes that then holds does not fire when
/// the cooldown ends: the rule waits for the next no → yes, so one long event is one alert.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trigger {
    last: Option<bool>,
    fired_at: Option<Instant>,
}

impl Trigger {
    /// Takes the answer `yes` checked at `now`; true when the rule fires.
    pub fn check(&mut self, now: Instant, yes: bool, cooldown: Duration) -> bool {
        let was = self.last.replace(yes).unwrap_or(false);
        let rested = self
            .fired_at
            .is_none_or(|t| now.saturating_duration_since(t) >= cooldown);
        let fire = yes && !was && rested;
        if fire {
            self.fired_at = Some(now);
        }
        fire
    }

    /// The last answer, `None` before the first.
    pub fn last(&self) -> Option<bool> {
        self.last
    }
}

/// One stream's rules.
#[derive(Default)]
pub(crate) struct Rules {
    rules: Mutex<Vec<(Rule, Trigger)>>,
}

impl Rules {
    pub(crate) fn list(&self) -> Vec<Rule> {
        lock(&self.rules).iter().map(|(r, _)| r.clone()).collect()
    }

    /// Adds a checked rule, at most [`MAX_RULES`].
    pub(crate) fn add(&self, settings: &RuleSettings) -> Result<Rule, RuleError> {
        let rule = check_rule(settings)?;
        let mut rules = lock(&self.rules);
        if rules.len() >= MAX_RULES {
            return Err(RuleError {
                field: "rule",
                message: format!(
                    "this stream has {MAX_RULES} rules, the most it takes; delete one first"
                ),
            });
        }
        rules.push((rule.clone(), Trigger::default()));
        Ok(rule)
    }

    /// Removes rule `id`; false when there is none.
    pub(crate) fn remove(&self, id: u64) -> bool {
        let mut rules = lock(&self.rules);
        let before = rules.len();
        rules.retain(|(r, _)| r.id != id);
        rules.len() != before
    }

    /// Takes rule `id`'s answer `yes` at `now`: whether it fires. `None` when the rule was
    /// deleted meanwhile.
    pub(crate) fn answer(&self, id: u64, now: Instant, yes: bool) -> Option<bool> {
        let mut rules = lock(&self.rules);
        let (rule, trigger) = rules.iter_mut().find(|(r, _)| r.id == id)?;
        let fire = trigger.check(now, yes, Duration::from_secs_f64(rule.cooldown));
        rule.last = trigger.last();
        rule.checks += 1;
        rule.fired += u64::from(fire);
        Some(fire)
    }
}

/// A rule that cannot be taken, naming its field (`rule`, `cooldown`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RuleError {
    pub field: &'static str,
    pub message: String,
}

/// Checks `settings`: the one place a rule is validated.
pub fn check_rule(settings: &RuleSettings) -> Result<Rule, RuleError> {
    let text = settings.rule.trim();
    let chars = text.chars().count();
    if chars == 0 || chars > MAX_RULE_CHARS {
        return Err(RuleError {
            field: "rule",
            message: format!("must be 1 to {MAX_RULE_CHARS} characters, got {chars}"),
        });
    }
    let cooldown = settings.cooldown.unwrap_or(DEFAULT_COOLDOWN.as_secs_f64());
    if !(cooldown.is_finite() && (0.0..=86_400.0).contains(&cooldown)) {
        return Err(RuleError {
            field: "cooldown",
            message: format!("must be 0 to 86400 seconds, got {cooldown}"),
        });
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
    fn fires_on_the_edge_then_rests() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut trigger = Trigger::default();
        let cooldown = s(60);
        assert!(!trigger.check(t0, false, cooldown));
        assert!(trigger.check(t0 + s(3), true, cooldown), "no → yes fires");
        assert!(
            !trigger.check(t0 + s(6), true, cooldown),
            "yes → yes does not"
        );
        assert!(!trigger.check(t0 + s(9), false, cooldown));
        assert!(
            !trigger.check(t0 + s(12), true, cooldown),
            "an edge in the cooldown"
        );
        assert!(
            !trigger.check(t0 + s(70), true, cooldown),
            "a yes held past it"
        );
        assert!(!trigger.check(t0 + s(73), false, cooldown));
        assert!(
            trigger.check(t0 + s(76), true, cooldown),
            "the next edge after it"
        );
        let mut first = Trigger::default();
        assert!(first.check(t0, true, cooldown), "a first yes is an edge");
    }

    /// Six hours of answers every 2–5 s that flip at random, for cooldowns from none to
    /// ten minutes: every alert is a yes after a no (or the first answer), alerts are at
    /// least a cooldown apart, and an edge is let pass only inside the cooldown.
    #[test]
    fn hours_of_answers_fire_only_on_rested_edges() {
        let t0 = Instant::now();
        let mut seed = 0x1234_5678_u32;
        let mut random = |range: u32| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed % range
        };
        for cooldown in [0, 5, 60, 600].map(Duration::from_secs) {
            let mut trigger = Trigger::default();
            let (mut now, mut last, mut fired_at) = (t0, None::<bool>, None::<Instant>);
            let (mut fired, mut passed) = (0u32, 0u32);
            while now < t0 + Duration::from_secs(6 * 3600) {
                now += Duration::from_millis(2000 + u64::from(random(3000)));
                // Long stretches of the same answer, as a scene holds.
                let yes = match last {
                    Some(was) if random(10) < 8 => was,
                    _ => random(3) == 0,
                };
                let edge = yes && !last.unwrap_or(false);
                if trigger.check(now, yes, cooldown) {
                    assert!(edge, "fired without an edge");
                    assert!(
                        fired_at.is_none_or(|t| now - t >= cooldown),
                        "fired resting"
                    );
                    fired_at = Some(now);
                    fired += 1;
                } else if edge {
                    assert!(fired_at.is_some_and(|t| now - t < cooldown), "an edge lost");
                    passed += 1;
                }
                assert_eq!(trigger.last(), Some(yes));
                last = Some(yes);
            }
            assert!(fired > 10, "{fired} alerts with {cooldown:?}");
            if cooldown.is_zero() {
                assert_eq!(passed, 0, "with no cooldown every edge fires");
            } else if cooldown >= Duration::from_secs(60) {
                assert!(passed > 0, "some edges fall in the cooldown");
            }
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
