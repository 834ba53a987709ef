//! How late the picture is shown so the words match it.
//!
//! A comment about a frame arrives `latency` after the frame was captured. Showing the
//! video `target_delay` behind real time, with `target_delay` following the latency, puts
//! each comment next to the picture it talks about. An exponential moving average keeps
//! one slow answer from making the picture jump. Sans-IO: latencies are passed in.

use std::time::Duration;

use crate::config::{check_alpha, check_delay_init, ConfigError};

#[derive(Debug, Clone, PartialEq)]
pub struct SyncDelay {
    /// Seconds. Kept as `f64` so the average is exactly the formula, not rounded to ns.
    value: f64,
    alpha: f64,
    enabled: bool,
}

impl SyncDelay {
    /// `init` seconds to start with (0 turns sync off: the delay stays 0), `alpha` the
    /// weight of each new latency, in (0, 1].
    pub fn new(init: f64, alpha: f64) -> Result<Self, ConfigError> {
        check_alpha(alpha)?;
        check_delay_init(init)?;
        Ok(SyncDelay {
            value: init,
            alpha,
            enabled: init > 0.0,
        })
    }

    /// Folds in the latency of one answered (non-skip) cycle; returns the new delay in seconds.
    pub fn observe(&mut self, latency: Duration) -> f64 {
        if self.enabled {
            self.value = self.alpha * latency.as_secs_f64() + (1.0 - self.alpha) * self.value;
        }
        self.value
    }

    /// Counts `extra` seconds more in the latency observed last: exactly the delay that
    /// observing `latency + extra` would have given.
    pub fn add_to_last(&mut self, extra: f64) -> f64 {
        if self.enabled && extra.is_finite() && extra > 0.0 {
            self.value += self.alpha * extra;
        }
        self.value
    }

    /// The current target delay in seconds.
    pub fn value(&self) -> f64 {
        self.value
    }

    /// The current target delay, for subtracting from a clock.
    pub fn delay(&self) -> Duration {
        Duration::from_secs_f64(self.value)
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn follows_the_ema_formula() {
        let mut delay = SyncDelay::new(5.0, 0.2).unwrap();
        // By hand: 0.2*2 + 0.8*5 = 4.4; 0.2*3 + 0.8*4.4 = 4.12; 0.2*1 + 0.8*4.12 = 3.496.
        for (latency, expected) in [(2.0, 4.4), (3.0, 4.12), (1.0, 3.496)] {
            let got = delay.observe(secs(latency));
            assert!(
                (got - expected).abs() < 1e-12,
                "after {latency}: {got} != {expected}"
            );
            assert_eq!(delay.value(), got);
        }
        assert!((delay.delay().as_secs_f64() - 3.496).abs() < 1e-9);
    }

    #[test]
    fn extra_latency_is_folded_into_the_last_observation() {
        let mut a = SyncDelay::new(5.0, 0.2).unwrap();
        let mut b = a.clone();
        a.observe(secs(2.0));
        a.add_to_last(0.5);
        b.observe(secs(2.5));
        assert!((a.value() - b.value()).abs() < 1e-12);
    }

    #[test]
    fn alpha_one_takes_the_latest() {
        let mut delay = SyncDelay::new(5.0, 1.0).unwrap();
        assert_eq!(delay.observe(secs(1.5)), 1.5);
        assert_eq!(delay.observe(secs(0.25)), 0.25);
    }

    #[test]
    fn zero_init_turns_sync_off() {
        let mut delay = SyncDelay::new(0.0, 0.2).unwrap();
        assert!(!delay.is_enabled());
        assert_eq!(delay.observe(secs(3.0)), 0.0);
        assert_eq!(delay.value(), 0.0);
        assert_eq!(delay.delay(), Duration::ZERO);
    }

    #[test]
    fn rejects_bad_settings() {
        assert_eq!(
            SyncDelay::new(5.0, 0.0),
            Err(ConfigError::AlphaOutOfRange(0.0))
        );
        assert_eq!(
            SyncDelay::new(5.0, 1.2),
            Err(ConfigError::AlphaOutOfRange(1.2))
        );
        assert_eq!(
            SyncDelay::new(-1.0, 0.2),
            Err(ConfigError::DelayOutOfRange(-1.0))
        );
    }
}
