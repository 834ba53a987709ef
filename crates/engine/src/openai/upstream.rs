//! The set of upstream servers one [`OpenAiEngine`](super::OpenAiEngine) spreads its
//! requests over, and what it remembers about each.
//!
//! Sans-IO: every method that depends on time takes `now`, so the choice of upstream, the
//! rests and the half-open probes are tested without a clock or a socket.
//!
//! - A request goes to the upstream with the fewest requests in flight; ties go round-robin,
//!   so an idle cluster still spreads its load.
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

/// How a request on one upstream ended, for its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    /// Failed; `rest` says whether the upstream itself is to blame (down, overloaded,
    /// broken stream) rather than the request (a 400, say).
    Error {
        rest: bool,
    },
    Timeout,
    /// The caller went away; says nothing about the upstream.
    Cancelled,
}

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

pub(crate) struct Pool {
    upstreams: Vec<Upstream>,
    states: Mutex<Vec<State>>,
    /// Where the round-robin among equally loaded upstreams starts next.
    cursor: Mutex<usize>,
    cooldown: Duration,
    max_cooldown: Duration,
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
    pub fn new(upstreams: Vec<Upstream>, cooldown: Duration, max_cooldown: Duration) -> Self {
        let states = vec![State::default(); upstreams.len()];
        Pool {
            upstreams,
            states: Mutex::new(states),
            cursor: Mutex::new(0),
            cooldown,
            max_cooldown: max_cooldown.max(cooldown),
        }
    }

    pub fn upstreams(&self) -> &[Upstream] {
        &self.upstreams
    }

    /// Picks the least-loaded upstream that is not resting and not in `skip`, and counts
    /// the request on it. `None` when every candidate rests (or is being probed).
    pub fn lease(self: &Arc<Self>, skip: &[usize], now: Instant) -> Option<Lease> {
        let mut states = self.states.lock().unwrap();
        let mut cursor = self.cursor.lock().unwrap();
        let n = self.upstreams.len();
        let mut best: Option<usize> = None;
        for offset in 0..n {
            let i = (*cursor + offset) % n;
            let s = &states[i];
            if skip.contains(&i) || s.resting(now) || s.probing {
                continue;
            }
            // Strictly fewer, so the first in round-robin order wins a tie.
            if best.is_none_or(|b| s.in_flight < states[b].in_flight) {
                best = Some(i);
            }
        }
        let i = best?;
        *cursor = (i + 1) % n;
        Some(self.take(&mut states[i], i))
    }

    /// Counts a request on upstream `i` whatever its state (a second try on the only
    /// upstream there is).
    pub fn lease_index(self: &Arc<Self>, i: usize) -> Lease {
        let mut states = self.states.lock().unwrap();
        self.take(&mut states[i], i)
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
            s.failures_in_row += 1;
            s.resting_until = Some(now + pause);
        }
    }

    /// Indices of the upstreams not resting now.
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

    pub fn metrics(&self, now: Instant) -> String {
        let states = self.states.lock().unwrap();
        let mut out = String::new();
        let rows: Vec<(String, &State)> = self
            .upstreams
            .iter()
            .map(|u| label(&u.shown))
            .zip(states.iter())
            .collect();
        out.push_str(
            "# HELP kibitz_upstream_in_flight Requests open on each OpenAI-compatible upstream.\n",
        );
        out.push_str("# TYPE kibitz_upstream_in_flight gauge\n");
        for (url, s) in &rows {
            let _ = writeln!(
                out,
                "kibitz_upstream_in_flight{{url=\"{url}\"}} {}",
                s.in_flight
            );
        }
        out.push_str("# HELP kibitz_upstream_requests_total Requests finished on each upstream, by result.\n");
        out.push_str("# TYPE kibitz_upstream_requests_total counter\n");
        for (url, s) in &rows {
            for (result, n) in [
                ("ok", s.ok),
                ("error", s.errors),
                ("timeout", s.timeouts),
                ("cancelled", s.cancelled),
            ] {
                let _ = writeln!(
                    out,
                    "kibitz_upstream_requests_total{{url=\"{url}\",result=\"{result}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP kibitz_upstream_up 1 when the upstream takes requests, 0 while it rests after a failure.\n");
        out.push_str("# TYPE kibitz_upstream_up gauge\n");
        for (url, s) in &rows {
            let up = !s.resting(now);
            let _ = writeln!(out, "kibitz_upstream_up{{url=\"{url}\"}} {}", u8::from(up));
        }
        out
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
        ))
    }

    #[test]
    fn least_in_flight_then_round_robin() {
        let pool = pool(3);
        let now = Instant::now();
        let a = pool.lease(&[], now).unwrap();
        let b = pool.lease(&[], now).unwrap();
        let c = pool.lease(&[], now).unwrap();
        assert_eq!([a.index, b.index, c.index], [0, 1, 2]);
        // u1 frees up: it alone has the fewest in flight.
        b.finish(Outcome::Ok, None, now);
        let d = pool.lease(&[], now).unwrap();
        assert_eq!(d.index, 1);
        drop((a, c, d));
        // All idle again: the round-robin goes on from after the last pick.
        let picks: Vec<usize> = (0..3)
            .map(|_| {
                let l = pool.lease(&[], now).unwrap();
                let i = l.index;
                l.finish(Outcome::Ok, None, now);
                i
            })
            .collect();
        assert_eq!(picks, [2, 0, 1]);
    }

    #[test]
    fn a_failed_upstream_rests_with_doubling_cooldown_then_is_probed_once() {
        let pool = pool(2);
        let t0 = Instant::now();
        let a = pool.lease(&[1], t0).unwrap();
        a.finish(
            Outcome::Error { rest: true },
            Some("connection refused".into()),
            t0,
        );
        // Resting: every request goes to u1.
        for _ in 0..3 {
            let l = pool.lease(&[], t0 + Duration::from_secs(9)).unwrap();
            assert_eq!(l.index, 1);
            l.finish(Outcome::Ok, None, t0);
        }
        assert!(pool.lease(&[1], t0 + Duration::from_secs(9)).is_none());
        // Rest over: one probe goes to u0, and while it runs u0 is left alone.
        let t1 = t0 + Duration::from_secs(10);
        let probe = pool.lease(&[1], t1).unwrap();
        assert_eq!(probe.index, 0);
        assert!(
            pool.lease(&[1], t1).is_none(),
            "a second request must not join the probe"
        );
        probe.finish(Outcome::Timeout, Some("first-token timeout".into()), t1);
        // Failed again: twice the rest.
        assert!(pool.lease(&[1], t1 + Duration::from_secs(19)).is_none());
        let t2 = t1 + Duration::from_secs(20);
        let probe = pool.lease(&[1], t2).unwrap();
        probe.finish(Outcome::Ok, None, t2);
        assert!(pool.status(t2)[0]["up"].as_bool().unwrap());
        assert_eq!(pool.status(t2)[0]["failures_in_row"], 0);
    }

    #[test]
    fn cooldown_stops_doubling_at_its_limit() {
        let pool = pool(1);
        let mut now = Instant::now();
        for _ in 0..8 {
            let l = pool.lease_index(0);
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
        pool.lease(&[], now).unwrap().finish(
            Outcome::Error { rest: false },
            Some("HTTP 400".into()),
            now,
        );
        drop(pool.lease(&[], now).unwrap());
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
        pool.lease(&[], now).unwrap().finish(
            Outcome::Error { rest: true },
            Some("HTTP 503".into()),
            now,
        );
        assert!(pool.lease(&[], now).is_none());
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
        pool.lease(&[], now).unwrap().finish(Outcome::Ok, None, now);
        pool.lease(&[], now)
            .unwrap()
            .finish(Outcome::Error { rest: true }, None, now);
        let m = pool.metrics(now);
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
            m.contains("kibitz_upstream_up{url=\"http://u1:8000/v1\"} 0"),
            "{m}"
        );
    }
}
