//! The set of upstream servers one [`OpenAiEngine`](super::OpenAiEngine) spreads its
//! requests over, and what it remembers about each.
//!
//! Sans-IO: every method that depends on time takes `now`, so the choice of upstream, the
//! rests and the half-open probes are tested without a clock or a socket.
//!
//! - A request goes to the upstream with the fewest requests in flight; ties go round-robin,
//!   so an idle cluster still spreads its load.
//! - No upstream takes more than `max_in_flight` requests at once (vLLM and SGLang batch
//!   well, llama-server has a fixed number of slots). When every candidate is at its cap,
//!   [`Pool::lease`] says so ([`NoLease::Full`]) and the request is refused: the waiting
//!   happens in the scheduler in front, which [`Pool::capacity_now`] sizes.
//! - An upstream that fails rests for a cooldown (doubling on each failure in a row, up to a
//!   limit) and is left out meanwhile. When the rest is over, one request probes it
//!   (half-open); while that probe runs the others keep going elsewhere. A success clears
//!   the record.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Url;
use serde_json::json;
use tokio::time::Instant;

use crate::metrics::{Labels, MetricFamilies};

/// How a request on one upstream ended, for its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    /// Failed; `rest` says whether the upstream itself is to blame (down, overloaded,
    /// broken stream) rather than the request (a 400, say).
    Error {
        rest: bool,
    },
    /// Failed with a `Retry-After` (429 or 503): rests at least that long, at most
    /// [`MAX_RETRY_AFTER`], even when that is longer than the cooldown's doubling says.
    RetryAfter(Duration),
    Timeout,
    /// The caller went away; says nothing about the upstream.
    Cancelled,
}

/// The longest rest a `Retry-After` buys: an upstream that asks for a day is asked again
/// within minutes (its operator may have fixed it), and a hostile one cannot shut a pool.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

#[derive(Debug)]
pub(crate) struct Upstream {
    /// Normalised base, ending in the API version (`…/v1`), no trailing slash.
    pub base: Url,
    /// `base` without any user:password part, for status, metrics and messages.
    pub shown: String,
}

#[derive(Debug, Default, Clone)]
struct State {
    in_flight: usize,
    ok: u64,
    errors: u64,
    timeouts: u64,
    cancelled: u64,
    /// Failures in a row; sets the length of the next rest.
    failures_in_row: u32,
    resting_until: Option<Instant>,
    /// A half-open probe is running: leave this upstream to it.
    probing: bool,
    last_error: Option<String>,
}

impl State {
    fn resting(&self, now: Instant) -> bool {
        self.resting_until.is_some_and(|until| until > now)
    }
}

/// Which upstreams a request may go to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Choice<'a> {
    /// Any that is not resting, not being probed and not in the list (tried already).
    Any { skip: &'a [usize] },
    /// This one, resting or not (a second try on the only upstream there is).
    Only(usize),
}

/// Why [`Pool::lease`] gave nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoLease {
    /// A candidate could take the request but is at its cap; when set, a resting candidate
    /// is back at this time.
    Full { rest_ends: Option<Instant> },
    /// Every candidate rests or is being probed: [`Pool::why_none`] says more.
    Resting,
}

pub(crate) struct Pool {
    upstreams: Vec<Upstream>,
    states: Mutex<Vec<State>>,
    /// Where the round-robin among equally loaded upstreams starts next.
    cursor: Mutex<usize>,
    cooldown: Duration,
    max_cooldown: Duration,
    /// Most requests open on one upstream at once.
    max_in_flight: usize,
}

/// A request's hold on one upstream: counts it in flight until it is finished or dropped
/// (dropped = cancelled).
pub(crate) struct Lease {
    pool: Arc<Pool>,
    pub index: usize,
    done: bool,
}

impl Lease {
    pub fn upstream(&self) -> &Upstream {
        &self.pool.upstreams[self.index]
    }

    pub fn finish(mut self, outcome: Outcome, error: Option<String>, now: Instant) {
        self.done = true;
        self.pool.record(self.index, outcome, error, now);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.done {
            self.pool
                .record(self.index, Outcome::Cancelled, None, Instant::now());
        }
    }
}

impl Pool {
    /// `max_in_flight` is at least 1 (0 is taken as 1).
    pub fn new(
        upstreams: Vec<Upstream>,
        cooldown: Duration,
        max_cooldown: Duration,
        max_in_flight: usize,
    ) -> Self {
        let states = vec![State::default(); upstreams.len()];
        Pool {
            upstreams,
            states: Mutex::new(states),
            cursor: Mutex::new(0),
            cooldown,
            max_cooldown: max_cooldown.max(cooldown),
            max_in_flight: max_in_flight.max(1),
        }
    }

    pub fn upstreams(&self) -> &[Upstream] {
        &self.upstreams
    }

    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// Requests that may be open at once over all upstreams, resting ones included.
    pub fn capacity(&self) -> usize {
        self.upstreams.len().saturating_mul(self.max_in_flight)
    }

    /// Requests that may be open at once now: `max_in_flight` on each upstream that is
    /// not resting, and on one being probed only the probe. What the scheduler in front
    /// lets through.
    pub fn capacity_now(&self, now: Instant) -> usize {
        let states = self.states.lock().unwrap();
        states
            .iter()
            .map(|s| match () {
                () if s.resting(now) => 0,
                () if s.probing => s.in_flight,
                () => self.max_in_flight,
            })
            .sum()
    }

    /// Picks the least-loaded upstream that `choice` allows and that has a free slot, and
    /// counts the request on it.
    pub fn lease(self: &Arc<Self>, choice: Choice<'_>, now: Instant) -> Result<Lease, NoLease> {
        let mut states = self.states.lock().unwrap();
        let skip = match choice {
            Choice::Only(i) => {
                return if states[i].in_flight < self.max_in_flight {
                    Ok(self.take(&mut states[i], i))
                } else {
                    Err(NoLease::Full { rest_ends: None })
                };
            }
            Choice::Any { skip } => skip,
        };
        let mut cursor = self.cursor.lock().unwrap();
        let n = self.upstreams.len();
        let mut best: Option<usize> = None;
        let mut full = false;
        let mut rest_ends: Option<Instant> = None;
        for offset in 0..n {
            let i = (*cursor + offset) % n;
            let s = &states[i];
            if skip.contains(&i) || s.probing {
                continue;
            }
            if let Some(until) = s.resting_until.filter(|&until| until > now) {
                rest_ends = Some(rest_ends.map_or(until, |soonest| soonest.min(until)));
                continue;
            }
            if s.in_flight >= self.max_in_flight {
                full = true;
                continue;
            }
            // Strictly fewer, so the first in round-robin order wins a tie.
            if best.is_none_or(|b| s.in_flight < states[b].in_flight) {
                best = Some(i);
            }
        }
        match best {
            Some(i) => {
                *cursor = (i + 1) % n;
                Ok(self.take(&mut states[i], i))
            }
            None if full => Err(NoLease::Full { rest_ends }),
            None => Err(NoLease::Resting),
        }
    }

    fn take(self: &Arc<Self>, s: &mut State, i: usize) -> Lease {
        if s.failures_in_row > 0 {
            s.probing = true;
        }
        s.in_flight += 1;
        Lease {
            pool: self.clone(),
            index: i,
            done: false,
        }
    }

    fn record(&self, i: usize, outcome: Outcome, error: Option<String>, now: Instant) {
        let mut states = self.states.lock().unwrap();
        let s = &mut states[i];
        s.in_flight -= 1;
        s.probing = false;
        let rest = match outcome {
            Outcome::Ok => {
                s.ok += 1;
                s.failures_in_row = 0;
                s.resting_until = None;
                false
            }
            Outcome::Error { rest } => {
                s.errors += 1;
                rest
            }
            Outcome::RetryAfter(_) => {
                s.errors += 1;
                true
            }
            Outcome::Timeout => {
                s.timeouts += 1;
                true
            }
            Outcome::Cancelled => {
                s.cancelled += 1;
                false
            }
        };
        if let Some(error) = error {
            s.last_error = Some(error);
        }
        if rest {
            let doublings = s.failures_in_row.min(16);
            let pause = self
                .cooldown
                .saturating_mul(1 << doublings)
                .min(self.max_cooldown);
            let asked = match outcome {
                Outcome::RetryAfter(wait) => wait.min(MAX_RETRY_AFTER),
                _ => Duration::ZERO,
            };
            s.failures_in_row += 1;
            s.resting_until = Some(now + pause.max(asked));
        }
    }

    /// Indices of the upstreams not resting now.
    #[cfg(test)]
    pub fn up(&self, now: Instant) -> Vec<usize> {
        let states = self.states.lock().unwrap();
        (0..states.len())
            .filter(|&i| !states[i].resting(now))
            .collect()
    }

    /// Why nothing can be picked: the soonest end of a rest and the freshest error.
    pub fn why_none(&self, now: Instant) -> String {
        let states = self.states.lock().unwrap();
        let soonest = states
            .iter()
            .filter_map(|s| s.resting_until)
            .filter(|&u| u > now)
            .min();
        let mut message = format!(
            "all {} upstream(s) are resting after failures",
            states.len()
        );
        if let Some(until) = soonest {
            let _ = write!(
                message,
                "; the next is tried again in {:.1} s",
                (until - now).as_secs_f64()
            );
        }
        if states.iter().any(|s| s.probing) {
            message.push_str("; one is being probed");
        }
        for (u, s) in self.upstreams.iter().zip(states.iter()) {
            if let Some(e) = &s.last_error {
                let _ = write!(message, "; {}: {e}", u.shown);
            }
        }
        message
    }

    pub fn status(&self, now: Instant) -> serde_json::Value {
        let states = self.states.lock().unwrap();
        let list: Vec<_> = self
            .upstreams
            .iter()
            .zip(states.iter())
            .map(|(u, s)| {
                let resting_ms = s
                    .resting_until
                    .filter(|&until| until > now)
                    .map(|until| (until - now).as_millis() as u64);
                json!({
                    "url": u.shown,
                    "up": resting_ms.is_none(),
                    "in_flight": s.in_flight,
                    "max_in_flight": self.max_in_flight,
                    "ok": s.ok,
                    "errors": s.errors,
                    "timeouts": s.timeouts,
                    "cancelled": s.cancelled,
                    "failures_in_row": s.failures_in_row,
                    "resting_for_ms": resting_ms,
                    "probing": s.probing,
                    "last_error": s.last_error,
                })
            })
            .collect();
        json!(list)
    }

    /// Each upstream's numbers now, labelled by its URL.
    pub fn metrics(&self, now: Instant) -> MetricFamilies {
        let states = self.states.lock().unwrap();
        let rows: Vec<(Labels, &State)> = self
            .upstreams
            .iter()
            .map(|u| vec![("url", label(&u.shown))])
            .zip(states.iter())
            .collect();
        let mut families = MetricFamilies::new();
        families.gauge(
            "kibitz_upstream_in_flight",
            "Requests open on each OpenAI-compatible upstream.",
            rows.iter().map(|(url, s)| (url.clone(), s.in_flight)),
        );
        families.gauge(
            "kibitz_upstream_max_in_flight",
            "Most requests each upstream takes at once (--engine-max-inflight).",
            rows.iter()
                .map(|(url, _)| (url.clone(), self.max_in_flight)),
        );
        families.counter(
            "kibitz_upstream_requests",
            "Requests finished on each upstream, by result.",
            rows.iter().flat_map(|(url, s)| {
                [
                    ("ok", s.ok),
                    ("error", s.errors),
                    ("timeout", s.timeouts),
                    ("cancelled", s.cancelled),
                ]
                .map(|(result, n)| {
                    let mut labels = url.clone();
                    labels.push(("result", result.to_string()));
                    (labels, n)
                })
            }),
        );
        families.gauge(
            "kibitz_upstream_up",
            "1 when the upstream takes requests, 0 while it rests after a failure.",
            rows.iter().map(|(url, s)| (url.clone(), !s.resting(now))),
        );
        families
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> Arc<Pool> {
        pool_with_cap(n, 3)
    }

    fn pool_with_cap(n: usize, cap: usize) -> Arc<Pool> {
        let upstreams = (0..n)
            .map(|i| {
                let base = Url::parse(&format!("http://u{i}:8000/v1")).unwrap();
                Upstream {
                    shown: base.to_string(),
                    base,
                }
            })
            .collect();
        Arc::new(Pool::new(
            upstreams,
            Duration::from_secs(10),
            Duration::from_secs(60),
            cap,
        ))
    }

    const ANY: Choice<'static> = Choice::Any { skip: &[] };
    const NOT_1: Choice<'static> = Choice::Any { skip: &[1] };

    #[test]
    fn least_in_flight_then_round_robin() {
        let pool = pool(3);
        let now = Instant::now();
        let a = pool.lease(ANY, now).unwrap();
        let b = pool.lease(ANY, now).unwrap();
        let c = pool.lease(ANY, now).unwrap();
        assert_eq!([a.index, b.index, c.index], [0, 1, 2]);
        // u1 frees up: it alone has the fewest in flight.
        b.finish(Outcome::Ok, None, now);
        let d = pool.lease(ANY, now).unwrap();
        assert_eq!(d.index, 1);
        drop((a, c, d));
        // All idle again: the round-robin goes on from after the last pick.
        let picks: Vec<usize> = (0..3)
            .map(|_| {
                let l = pool.lease(ANY, now).unwrap();
                let i = l.index;
                l.finish(Outcome::Ok, None, now);
                i
            })
            .collect();
        assert_eq!(picks, [2, 0, 1]);
    }

    #[test]
    fn no_upstream_takes_more_than_its_cap() {
        let pool = pool_with_cap(2, 2);
        let now = Instant::now();
        let leases: Vec<Lease> = (0..4).map(|_| pool.lease(ANY, now).unwrap()).collect();
        let picks: Vec<usize> = leases.iter().map(|l| l.index).collect();
        assert_eq!(picks, [0, 1, 0, 1]);
        assert_eq!(pool.capacity(), 4);
        assert_eq!(
            pool.lease(ANY, now).err(),
            Some(NoLease::Full { rest_ends: None })
        );
        assert_eq!(
            pool.lease(Choice::Only(1), now).err(),
            Some(NoLease::Full { rest_ends: None }),
            "a second try on one upstream keeps to its cap too"
        );
        let status = pool.status(now);
        assert_eq!(
            (
                status[1]["in_flight"].as_u64(),
                status[1]["max_in_flight"].as_u64()
            ),
            (Some(2), Some(2))
        );

        // A request that ends frees its slot.
        let mut leases = leases.into_iter();
        leases.next().unwrap().finish(Outcome::Ok, None, now);
        assert_eq!(pool.lease(ANY, now).unwrap().index, 0);
    }

    #[test]
    fn full_while_another_rests_says_when_the_rest_ends() {
        let pool = pool_with_cap(2, 1);
        let now = Instant::now();
        pool.lease(Choice::Only(0), now)
            .unwrap()
            .finish(Outcome::Error { rest: true }, None, now);
        let busy = pool.lease(ANY, now).unwrap();
        assert_eq!(busy.index, 1);
        assert_eq!(
            pool.lease(ANY, now).err(),
            Some(NoLease::Full {
                rest_ends: Some(now + Duration::from_secs(10))
            })
        );
        // Only resting ones left to try: no use waiting.
        assert_eq!(
            pool.lease(Choice::Any { skip: &[1] }, now).err(),
            Some(NoLease::Resting)
        );
        // The room the scheduler is told: the resting one's share is gone.
        assert_eq!(pool.capacity_now(now), 1);
        assert_eq!(pool.capacity_now(now + Duration::from_secs(10)), 2);
        drop(busy);
    }

    #[test]
    fn a_failed_upstream_rests_with_doubling_cooldown_then_is_probed_once() {
        let pool = pool(2);
        let t0 = Instant::now();
        let a = pool.lease(NOT_1, t0).unwrap();
        a.finish(
            Outcome::Error { rest: true },
            Some("connection refused".into()),
            t0,
        );
        // Resting: every request goes to u1.
        for _ in 0..3 {
            let l = pool.lease(ANY, t0 + Duration::from_secs(9)).unwrap();
            assert_eq!(l.index, 1);
            l.finish(Outcome::Ok, None, t0);
        }
        assert_eq!(
            pool.lease(NOT_1, t0 + Duration::from_secs(9)).err(),
            Some(NoLease::Resting)
        );
        // Rest over: one probe goes to u0, and while it runs u0 is left alone.
        let t1 = t0 + Duration::from_secs(10);
        let probe = pool.lease(NOT_1, t1).unwrap();
        assert_eq!(probe.index, 0);
        assert!(
            pool.lease(NOT_1, t1).is_err(),
            "a second request must not join the probe"
        );
        assert_eq!(pool.capacity_now(t1), 3 + 1, "u1's cap and the probe");
        probe.finish(Outcome::Timeout, Some("first-token timeout".into()), t1);
        // Failed again: twice the rest.
        assert!(pool.lease(NOT_1, t1 + Duration::from_secs(19)).is_err());
        let t2 = t1 + Duration::from_secs(20);
        let probe = pool.lease(NOT_1, t2).unwrap();
        probe.finish(Outcome::Ok, None, t2);
        assert!(pool.status(t2)[0]["up"].as_bool().unwrap());
        assert_eq!(pool.status(t2)[0]["failures_in_row"], 0);
    }

    #[test]
    fn retry_after_sets_a_longer_rest_within_its_limit() {
        let pool = pool(1);
        let now = Instant::now();
        let rest_ms = |pool: &Arc<Pool>| pool.status(now)[0]["resting_for_ms"].as_u64();
        let l = pool.lease(Choice::Any { skip: &[] }, now).unwrap();
        l.finish(Outcome::RetryAfter(Duration::from_secs(45)), None, now);
        assert_eq!(rest_ms(&pool), Some(45_000));
        let later = now + Duration::from_secs(46);
        let l = pool.lease(Choice::Any { skip: &[] }, later).unwrap();
        // Shorter than the cooldown (20 s after one failure): the cooldown wins.
        l.finish(Outcome::RetryAfter(Duration::from_secs(1)), None, later);
        assert_eq!(pool.status(later)[0]["resting_for_ms"], 20_000);
        let later = later + Duration::from_secs(21);
        let l = pool.lease(Choice::Any { skip: &[] }, later).unwrap();
        l.finish(
            Outcome::RetryAfter(Duration::from_secs(86_400)),
            None,
            later,
        );
        assert_eq!(
            pool.status(later)[0]["resting_for_ms"],
            MAX_RETRY_AFTER.as_millis() as u64
        );
    }

    #[test]
    fn cooldown_stops_doubling_at_its_limit() {
        let pool = pool(1);
        let mut now = Instant::now();
        for _ in 0..8 {
            let l = pool.lease(Choice::Only(0), now).unwrap();
            l.finish(Outcome::Error { rest: true }, None, now);
            now += Duration::from_secs(1000);
        }
        let rest = pool.status(now - Duration::from_secs(1000))[0]["resting_for_ms"]
            .as_u64()
            .unwrap();
        assert_eq!(rest, 60_000);
    }

    #[test]
    fn request_errors_and_cancellations_do_not_rest_the_upstream() {
        let pool = pool(1);
        let now = Instant::now();
        pool.lease(ANY, now).unwrap().finish(
            Outcome::Error { rest: false },
            Some("HTTP 400".into()),
            now,
        );
        drop(pool.lease(ANY, now).unwrap());
        assert_eq!(pool.up(now), [0]);
        let status = pool.status(now);
        assert_eq!(status[0]["errors"], 1);
        assert_eq!(status[0]["cancelled"], 1);
        assert_eq!(status[0]["in_flight"], 0);
        assert_eq!(status[0]["last_error"], "HTTP 400");
    }

    #[test]
    fn none_available_says_why() {
        let pool = pool(1);
        let now = Instant::now();
        pool.lease(ANY, now).unwrap().finish(
            Outcome::Error { rest: true },
            Some("HTTP 503".into()),
            now,
        );
        assert_eq!(pool.lease(ANY, now).err(), Some(NoLease::Resting));
        let why = pool.why_none(now);
        assert!(
            why.contains("resting") && why.contains("10.0 s") && why.contains("HTTP 503"),
            "{why}"
        );
        assert!(pool.up(now).is_empty());
    }

    #[test]
    fn metrics_have_one_line_per_upstream_and_result() {
        let pool = pool(2);
        let now = Instant::now();
        pool.lease(ANY, now).unwrap().finish(Outcome::Ok, None, now);
        pool.lease(ANY, now)
            .unwrap()
            .finish(Outcome::Error { rest: true }, None, now);
        let mut registry = crate::metrics::Registry::default();
        pool.metrics(now).register(&mut registry);
        let m = crate::metrics::encode(&registry);
        assert!(
            m.contains("kibitz_upstream_in_flight{url=\"http://u0:8000/v1\"} 0"),
            "{m}"
        );
        assert!(
            m.contains("kibitz_upstream_requests_total{url=\"http://u0:8000/v1\",result=\"ok\"} 1"),
            "{m}"
        );
        assert!(
            m.contains(
                "kibitz_upstream_requests_total{url=\"http://u1:8000/v1\",result=\"error\"} 1"
            ),
            "{m}"
        );
        assert!(
            m.contains("kibitz_upstream_up{url=\"http://u0:8000/v1\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("kibitz_upstream_max_in_flight{url=\"http://u1:8000/v1\"} 3"),
            "{m}"
        );
        assert!(
            m.contains("kibitz_upstream_up{url=\"http://u1:8000/v1\"} 0"),
            "{m}"
        );
    }
}
