//! Settings of the commentary loop and the crate's one error type.
//!
//! Everything a user can get wrong is checked up front by [`CommentatorConfig::validate`],
//! which reports every problem at once, one line each, so a bad start-up is fixed in one go.

use std::time::Duration;

use kibitz_engine::Sampling;

use crate::profile::{Profiles, Style, DEFAULT_PROFILE};

/// Longest free-text instruction a user may give, in characters.
pub const MAX_INSTRUCTION_CHARS: usize = 2000;

/// Longest pause between cycles, in seconds. Longer is no longer live commentary, and a
/// typo (a value in milliseconds) is caught.
pub const MAX_INTERVAL_SECS: f64 = 3600.0;

/// The scene-change gate's default threshold, in grey levels of
/// [`Thumbnail::difference`](crate::Thumbnail::difference): cycles whose frames differ less
/// from those of the last answered cycle are not asked about.
///
/// Chosen on the test media (`scripts/fixtures.sh`, frames scaled to the model's 448x252,
/// measured with `examples/scene_change.rs`):
/// - moving content, consecutive 2 fps frames: Big Buck Bunny 6.0 to 42 (median 24),
///   testsrc2 5.7 to 15 (median 11); even consecutive 25 fps frames score a median of
///   2.0 (BBB) and 4.9 (testsrc2);
/// - a still picture (`gray.png`, `photo.jpg`) repeated: 0; with independent noise of ±2
///   levels per channel: at most 0.3; with temporal sensor noise (FFmpeg's `noise` filter,
///   strength 4, 10 and 20, at 1280x720) through H.264 (crf 28, 2 s GOP) or MJPEG (q 8): at
///   most 0.65 (strength 20, a very grainy picture), 0.43 at 10;
/// - an object covering 5% of the picture appearing on the still picture: 0.14 to 0.16 per
///   grey level of contrast where four regions meet (the least sensitive place), 0.6 inside
///   one region.
///
/// 1.5 is well above the noisiest still scene (2.3 times) and far below moving content
/// (nearly 4 times under the least 2 fps pair), and lets through a 5% object of about 10
/// grey levels' contrast anywhere in the picture (2.5 inside one region). The whole
/// picture's mean difference would have been no good: one pair of BBB 2 fps frames, a real
/// change, scores only 1.5 by it, and a 5% object needs 30 levels of contrast to reach 1.5.
pub const SCENE_CHANGE_THRESHOLD: f64 = 1.5;

/// The longest the scene-change gate keeps the model from being asked, measured in capture
/// time from the newest frame of the last answered cycle: after that a cycle asks however
/// little changed, in case the change is one the thumbnails cannot see (small, or slow and
/// too faint to add up). At 60 s a still camera costs one question a minute.
pub const SCENE_MAX_QUIET: Duration = Duration::from_secs(60);

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
    /// The scene-change gate (`SCENE_CHANGE_THRESHOLD`), in grey levels, 0 to 255; 0 turns
    /// it off. Before a cycle asks, each of its frames captured after the newest frame of
    /// the last answered cycle (skips by the model included) is compared with that frame by
    /// [`Thumbnail::difference`](crate::Thumbnail::difference): the largest mean absolute
    /// difference of the twelve regions of a 4x3 grid over the picture, on 32x18 grey
    /// thumbnails. When every one scores under the threshold, the cycle ends at once as
    /// skipped, reason `unchanged`, without a question. Comparing with the last *answered*
    /// frame, not the last looked at, lets a slow change add up until it counts; a cycle
    /// asks anyway [`SCENE_MAX_QUIET`] after that frame, and after a change of profile or
    /// instruction. Default [`SCENE_CHANGE_THRESHOLD`].
    pub scene_change_threshold: f64,
    /// The answers' language and whether a voice speaks them.
    pub style: Style,
    /// A cycle's question is only the last comment, the instruction and a short cue, the
    /// rest being in the system prompt (`Profile::cue`); false: the long wording of
    /// `Profile::user_prompt`, for benchmarks that measure the difference.
    pub short_question: bool,
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
            scene_change_threshold: SCENE_CHANGE_THRESHOLD,
            style: Style::default(),
            short_question: true,
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
        if let Err(e) = check_scene_change_threshold(self.scene_change_threshold) {
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

/// Checks the scene-change gate's threshold, in grey levels.
pub(crate) fn check_scene_change_threshold(levels: f64) -> Result<(), ConfigError> {
    // Written so that NaN fails too.
    if (0.0..=255.0).contains(&levels) {
        Ok(())
    } else {
        Err(ConfigError::SceneThresholdOutOfRange(levels))
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
    #[error("SCENE_CHANGE_THRESHOLD is {0}: it must be 0 (gate off) to 255 grey levels (default {SCENE_CHANGE_THRESHOLD})")]
    SceneThresholdOutOfRange(f64),
    #[error("a speech latency of {0} s is not a time to first audio (0 to 60 s)")]
    BadSpeechLatency(f64),
    #[error("'{0}' is not a language code: use one like en, de, pt-BR (KIBITZ_LANGUAGE)")]
    BadLanguage(String),
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
    fn scene_change_threshold_bounds() {
        for good in [0.0, SCENE_CHANGE_THRESHOLD, 255.0] {
            assert!(check_scene_change_threshold(good).is_ok(), "{good}");
        }
        for bad in [-0.1, 255.5, f64::NAN, f64::INFINITY] {
            let err = check_scene_change_threshold(bad).unwrap_err();
            assert!(
                err.to_string().starts_with("SCENE_CHANGE_THRESHOLD is "),
                "{err}"
            );
        }
        let config = CommentatorConfig {
            scene_change_threshold: -1.0,
            frame_stride: 0,
            ..CommentatorConfig::default()
        };
        let message = config.validate().unwrap_err().to_string();
        assert!(
            message.contains(
                "SCENE_CHANGE_THRESHOLD is -1: it must be 0 (gate off) to 255 grey levels (default 1.5)"
            ),
            "{message}"
        );
        assert_eq!(message.lines().count(), 2, "{message}");
    }

    #[test]
    fn instruction_limit_counts_characters_not_bytes() {
        assert!(check_instruction(&"é".repeat(MAX_INSTRUCTION_CHARS)).is_ok());
        assert!(check_instruction(&"é".repeat(MAX_INSTRUCTION_CHARS + 1)).is_err());
    }
}
