//! Settings of the commentary loop and the crate's one error type.
//!
//! Everything a user can get wrong is checked up front by [`CommentatorConfig::validate`],
//! which reports every problem at once, one line each, so a bad start-up is fixed in one go.

use std::time::Duration;

use kibitz_engine::Sampling;

use crate::profile::{Profiles, DEFAULT_PROFILE};

/// Longest free-text instruction a user may give, in characters.
pub const MAX_INSTRUCTION_CHARS: usize = 2000;

/// Longest pause between cycles, in seconds. Longer is no longer live commentary, and a
/// typo (a value in milliseconds) is caught.
pub const MAX_INTERVAL_SECS: f64 = 3600.0;

#[derive(Debug, Clone, PartialEq)]
pub struct CommentatorConfig {
    /// Frames sent to the engine per cycle (`FRAMES_PER_INFERENCE`).
    pub frames_per_inference: usize,
    /// Take every n-th frame of the inference window (`FRAME_STRIDE`).
    pub frame_stride: usize,
    /// Idle time between the end of one cycle and the start of the next (`INFERENCE_INTERVAL`).
    pub interval: Duration,
    pub max_tokens: u32,
    pub sampling: Sampling,
    /// Starting target delay in seconds (`STREAM_DELAY_INIT`); 0 turns sync off.
    pub delay_init: f64,
    /// Weight of the newest latency in the delay average (`STREAM_DELAY_EMA_ALPHA`).
    pub delay_alpha: f64,
    /// A cycle without an answer after this long is abandoned with an error event.
    pub cycle_timeout: Duration,
    /// How soon to look again when there are not enough new frames or the engine is busy.
    pub poll: Duration,
    pub profile: String,
    /// Extra free-text instruction for the model; empty for none.
    pub instruction: String,
}

impl Default for CommentatorConfig {
    fn default() -> Self {
        CommentatorConfig {
            frames_per_inference: 4,
            frame_stride: 2,
            interval: Duration::from_secs(1),
            max_tokens: 64,
            sampling: Sampling::default(),
            delay_init: 5.0,
            delay_alpha: 0.2,
            cycle_timeout: Duration::from_secs(30),
            poll: Duration::from_millis(100),
            profile: DEFAULT_PROFILE.to_string(),
            instruction: String::new(),
        }
    }
}

impl CommentatorConfig {
    /// Checks every setting; the error lists each problem on its own line.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if let Err(e) = check_interval(self.interval.as_secs_f64()) {
            problems.push(e);
        }
        if self.frames_per_inference == 0 {
            problems.push(ConfigError::ZeroFrames);
        }
        if self.frame_stride == 0 {
            problems.push(ConfigError::ZeroStride);
        }
        if self.max_tokens == 0 {
            problems.push(ConfigError::ZeroMaxTokens);
        }
        if let Err(e) = check_alpha(self.delay_alpha) {
            problems.push(e);
        }
        if let Err(e) = check_delay_init(self.delay_init) {
            problems.push(e);
        }
        if self.cycle_timeout.is_zero() {
            problems.push(ConfigError::ZeroCycleTimeout);
        }
        if self.poll.is_zero() {
            problems.push(ConfigError::ZeroPoll);
        }
        if let Err(e) = Profiles::get(&self.profile) {
            problems.push(e);
        }
        if let Err(e) = check_instruction(&self.instruction) {
            problems.push(e);
        }
        ConfigError::from_problems(problems)
    }
}

pub(crate) fn check_alpha(alpha: f64) -> Result<(), ConfigError> {
    // Written so that NaN fails too.
    if alpha > 0.0 && alpha <= 1.0 {
        Ok(())
    } else {
        Err(ConfigError::AlphaOutOfRange(alpha))
    }
}

pub(crate) fn check_delay_init(init: f64) -> Result<(), ConfigError> {
    if init >= 0.0 && init.is_finite() {
        Ok(())
    } else {
        Err(ConfigError::NegativeDelay(init))
    }
}

/// Checks a pause between cycles, in seconds (also used for changes while running).
pub(crate) fn check_interval(secs: f64) -> Result<(), ConfigError> {
    // Written so that NaN fails too.
    if (0.0..=MAX_INTERVAL_SECS).contains(&secs) {
        Ok(())
    } else {
        Err(ConfigError::IntervalOutOfRange(secs))
    }
}

/// Checks a user's free-text instruction (also used for changes while running).
pub fn check_instruction(instruction: &str) -> Result<(), ConfigError> {
    let chars = instruction.chars().count();
    if chars > MAX_INSTRUCTION_CHARS {
        Err(ConfigError::InstructionTooLong {
            chars,
            max: MAX_INSTRUCTION_CHARS,
        })
    } else {
        Ok(())
    }
}

/// What is wrong with a setting or a requested change. Each message is one line that says
/// what to do; [`ConfigError::Several`] holds more than one, a line each.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "INFERENCE_INTERVAL is {0} s: it must be 0 (back to back) to 3600 seconds (default 1)"
    )]
    IntervalOutOfRange(f64),
    #[error("FRAMES_PER_INFERENCE is 0: the model needs at least 1 frame per cycle (default 4)")]
    ZeroFrames,
    #[error("FRAME_STRIDE is 0: use 1 to take every frame of the window, 2 for every other one (default 2)")]
    ZeroStride,
    #[error("max tokens is 0: the model could not say anything; use e.g. 64")]
    ZeroMaxTokens,
    #[error("STREAM_DELAY_EMA_ALPHA is {0}: it must be above 0 and at most 1 (default 0.2)")]
    AlphaOutOfRange(f64),
    #[error("STREAM_DELAY_INIT is {0}: it must be 0 (sync off) or a positive number of seconds (default 5.0)")]
    NegativeDelay(f64),
    #[error("the cycle timeout is 0: no answer could ever arrive in time; use e.g. 30 s")]
    ZeroCycleTimeout,
    #[error("the frame poll period is 0: the loop would spin; use e.g. 100 ms")]
    ZeroPoll,
    #[error("unknown profile '{name}': choose one of {known}")]
    UnknownProfile { name: String, known: String },
    #[error("the instruction is {chars} characters long: shorten it to at most {max}")]
    InstructionTooLong { chars: usize, max: usize },
    #[error("{}", lines(.0))]
    Several(Vec<ConfigError>),
}

fn lines(problems: &[ConfigError]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    fn from_problems(mut problems: Vec<ConfigError>) -> Result<(), ConfigError> {
        match problems.len() {
            0 => Ok(()),
            1 => Err(problems.pop().expect("one problem")),
            _ => Err(ConfigError::Several(problems)),
        }
    }

    /// Each single problem, for callers that print or prefix them one by one.
    pub fn problems(&self) -> Vec<&ConfigError> {
        match self {
            ConfigError::Several(all) => all.iter().collect(),
            one => vec![one],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert_eq!(CommentatorConfig::default().validate(), Ok(()));
    }

    #[test]
    fn each_problem_gets_its_own_line() {
        let config = CommentatorConfig {
            frames_per_inference: 0,
            frame_stride: 0,
            delay_alpha: 1.5,
            delay_init: -1.0,
            profile: "opera".into(),
            instruction: "x".repeat(MAX_INSTRUCTION_CHARS + 1),
            ..CommentatorConfig::default()
        };
        let err = config.validate().unwrap_err();
        let problems = err.problems();
        assert_eq!(problems.len(), 6);
        assert!(problems.contains(&&ConfigError::ZeroFrames));
        assert!(problems.contains(&&ConfigError::ZeroStride));
        assert!(problems.contains(&&ConfigError::AlphaOutOfRange(1.5)));
        assert!(problems.contains(&&ConfigError::NegativeDelay(-1.0)));
        assert!(problems.contains(&&ConfigError::InstructionTooLong {
            chars: 2001,
            max: 2000
        }));
        let message = err.to_string();
        assert_eq!(message.lines().count(), 6);
        assert!(message.contains("FRAME_STRIDE is 0"), "{message}");
        assert!(
            message.contains("unknown profile 'opera': choose one of default, sports"),
            "{message}"
        );
    }

    #[test]
    fn alpha_bounds() {
        assert!(check_alpha(1.0).is_ok());
        assert!(check_alpha(0.2).is_ok());
        assert!(check_alpha(0.0).is_err());
        assert!(check_alpha(-0.1).is_err());
        assert!(check_alpha(f64::NAN).is_err());
    }

    #[test]
    fn one_problem_is_not_wrapped() {
        let config = CommentatorConfig {
            frame_stride: 0,
            ..CommentatorConfig::default()
        };
        assert_eq!(config.validate(), Err(ConfigError::ZeroStride));
    }

    #[test]
    fn interval_bounds() {
        assert!(check_interval(0.0).is_ok());
        assert!(check_interval(MAX_INTERVAL_SECS).is_ok());
        for bad in [-0.5, MAX_INTERVAL_SECS + 0.1, f64::NAN, f64::INFINITY] {
            let err = check_interval(bad).unwrap_err();
            assert!(
                err.to_string().starts_with("INFERENCE_INTERVAL is "),
                "{err}"
            );
        }
        let config = CommentatorConfig {
            interval: Duration::from_secs(7200),
            ..CommentatorConfig::default()
        };
        assert_eq!(
            config.validate(),
            Err(ConfigError::IntervalOutOfRange(7200.0))
        );
    }

    #[test]
    fn instruction_limit_counts_characters_not_bytes() {
        assert!(check_instruction(&"é".repeat(MAX_INSTRUCTION_CHARS)).is_ok());
        assert!(check_instruction(&"é".repeat(MAX_INSTRUCTION_CHARS + 1)).is_err());
    }
}
