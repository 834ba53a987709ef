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

/// Most frames a second taken for the model. Each costs a decode, a scale and a
/// thumbnail; a model sees a few frames a cycle, so more than this is waste, or a typo.
pub const MAX_CAPTURE_FPS: f64 = 30.0;

/// Most frames a cycle: each is 64 or more image tokens of the model's context.
pub const MAX_FRAMES_PER_INFERENCE: usize = 16;

/// Longest the picture may start behind real time, in seconds: ten minutes of display
/// buffer is already far more than a live page holds.
pub const MAX_DELAY_INIT_SECS: f64 = 600.0;

/// Longest a cycle may wait for its answer, in seconds (a week: beyond it is a typo).
pub const MAX_CYCLE_TIMEOUT_SECS: f64 = 7.0 * 24.0 * 3600.0;

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
    /// Checks every setting by the rules below; the error names each bad field on a line of
    /// its own. Users' settings reach the loop through the stream crate's `StreamSpec`,
    /// which applies the same rules first; this catches a config built in code (`bench`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let checks = [
            check_frames_per_inference(self.frames_per_inference),
            check_frame_stride(self.frame_stride),
            check_interval(self.interval.as_secs_f64()),
            check_max_tokens(self.max_tokens),
            check_delay_init(self.delay_init),
            check_alpha(self.delay_alpha),
            check_cycle_timeout(self.cycle_timeout.as_secs_f64()),
            if self.poll.is_zero() {
                Err(ConfigError::ZeroPoll)
            } else {
                Ok(())
            },
            Profiles::get(&self.profile).map(|_| ()),
            check_instruction(&self.instruction),
            check_scene_change_threshold(self.scene_change_threshold),
        ];
        ConfigError::from_problems(checks.into_iter().filter_map(Result::err).collect())
    }
}

// The rules of the commentary settings, one function each: the one place a bound and its
// words are written. `StreamSpec` (the stream crate) calls them for every stream the
// command line, the streams file, the API and `kibitz annotate` ask for, naming the field
// with [`ConfigError::field`]; `validate` and `Control::validate` call them for configs
// and changes made in code. Every check is written so that NaN fails too.

/// Frames a second taken from a source for the model (`capture_fps`).
pub fn check_capture_fps(fps: f64) -> Result<(), ConfigError> {
    if fps > 0.0 && fps <= MAX_CAPTURE_FPS {
        Ok(())
    } else {
        Err(ConfigError::CaptureFpsOutOfRange(fps))
    }
}

/// Frames sent to the model a cycle (`frames_per_inference`).
pub fn check_frames_per_inference(frames: usize) -> Result<(), ConfigError> {
    if (1..=MAX_FRAMES_PER_INFERENCE).contains(&frames) {
        Ok(())
    } else {
        Err(ConfigError::FramesOutOfRange(frames))
    }
}

/// Every n-th frame of the window is taken (`frame_stride`).
pub fn check_frame_stride(stride: usize) -> Result<(), ConfigError> {
    if stride >= 1 {
        Ok(())
    } else {
        Err(ConfigError::ZeroStride)
    }
}

/// The pause between cycles, in seconds (`inference_interval`; also changes while running).
pub fn check_interval(secs: f64) -> Result<(), ConfigError> {
    if (0.0..=MAX_INTERVAL_SECS).contains(&secs) {
        Ok(())
    } else {
        Err(ConfigError::IntervalOutOfRange(secs))
    }
}

/// The sync delay to start with, in seconds (`stream_delay_init`); 0 turns sync off.
pub fn check_delay_init(init: f64) -> Result<(), ConfigError> {
    if (0.0..=MAX_DELAY_INIT_SECS).contains(&init) {
        Ok(())
    } else {
        Err(ConfigError::DelayOutOfRange(init))
    }
}

/// The weight of the newest latency in the delay average (`stream_delay_ema_alpha`).
pub fn check_alpha(alpha: f64) -> Result<(), ConfigError> {
    if alpha > 0.0 && alpha <= 1.0 {
        Ok(())
    } else {
        Err(ConfigError::AlphaOutOfRange(alpha))
    }
}

/// The scene-change gate's threshold, in grey levels (`scene_change_threshold`).
pub fn check_scene_change_threshold(levels: f64) -> Result<(), ConfigError> {
    if (0.0..=255.0).contains(&levels) {
        Ok(())
    } else {
        Err(ConfigError::SceneThresholdOutOfRange(levels))
    }
}

/// A user's free-text instruction (`instruction`; also changes while running).
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

/// Seconds before a cycle without an answer is abandoned (`cycle_timeout`).
pub fn check_cycle_timeout(secs: f64) -> Result<(), ConfigError> {
    if secs > 0.0 && secs <= MAX_CYCLE_TIMEOUT_SECS {
        Ok(())
    } else {
        Err(ConfigError::CycleTimeoutOutOfRange(secs))
    }
}

/// Tokens an answer may have (`max_tokens`).
pub fn check_max_tokens(tokens: u32) -> Result<(), ConfigError> {
    if tokens >= 1 {
        Ok(())
    } else {
        Err(ConfigError::ZeroMaxTokens)
    }
}

/// What is wrong with a setting or a requested change. Each message is the reason only, one
/// line that says what to do; [`ConfigError::field`] names the setting, and
/// [`ConfigError::Several`] (what [`CommentatorConfig::validate`] returns) prints
/// `field: reason`, a line each.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("must be above 0 and at most {MAX_CAPTURE_FPS} frames a second, got {0}")]
    CaptureFpsOutOfRange(f64),
    #[error("must be 1 to {MAX_FRAMES_PER_INFERENCE} frames a cycle, got {0}")]
    FramesOutOfRange(usize),
    #[error("must be at least 1 (1 takes every captured frame, 2 every other one)")]
    ZeroStride,
    #[error("must be 0 (back to back) to {MAX_INTERVAL_SECS} seconds, got {0}")]
    IntervalOutOfRange(f64),
    #[error("must be 0 (sync off) to {MAX_DELAY_INIT_SECS} seconds, got {0}")]
    DelayOutOfRange(f64),
    #[error("must be above 0 and at most 1, got {0}")]
    AlphaOutOfRange(f64),
    #[error("must be 0 (ask every cycle) to 255 grey levels, got {0}")]
    SceneThresholdOutOfRange(f64),
    #[error("unknown profile '{name}': choose one of {known}")]
    UnknownProfile { name: String, known: String },
    #[error("is {chars} characters long: shorten it to at most {max}")]
    InstructionTooLong { chars: usize, max: usize },
    #[error("'{0}' is not a language code: use one like en, de, pt-BR")]
    BadLanguage(String),
    #[error("must be above 0 and at most {MAX_CYCLE_TIMEOUT_SECS} seconds, got {0}")]
    CycleTimeoutOutOfRange(f64),
    #[error("must be at least 1: the model could not say anything (e.g. 64)")]
    ZeroMaxTokens,
    #[error("must be above 0: the loop would spin (e.g. 100 ms)")]
    ZeroPoll,
    #[error("must be 0 to 60 seconds of time to first audio, got {0}")]
    BadSpeechLatency(f64),
    #[error("{}", lines(.0))]
    Several(Vec<ConfigError>),
}

fn lines(problems: &[ConfigError]) -> String {
    problems
        .iter()
        .map(|p| format!("{}: {p}", p.field()))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    /// Every problem of a config, each named by its field (even a single one).
    fn from_problems(problems: Vec<ConfigError>) -> Result<(), ConfigError> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Several(problems))
        }
    }

    /// The setting at fault, by the name users give it: the streams file's and the API's
    /// key, and the flag's (`capture_fps` is `--capture-fps`).
    pub fn field(&self) -> &'static str {
        match self {
            ConfigError::CaptureFpsOutOfRange(_) => "capture_fps",
            ConfigError::FramesOutOfRange(_) => "frames_per_inference",
            ConfigError::ZeroStride => "frame_stride",
            ConfigError::IntervalOutOfRange(_) => "inference_interval",
            ConfigError::DelayOutOfRange(_) => "stream_delay_init",
            ConfigError::AlphaOutOfRange(_) => "stream_delay_ema_alpha",
            ConfigError::SceneThresholdOutOfRange(_) => "scene_change_threshold",
            ConfigError::UnknownProfile { .. } => "profile",
            ConfigError::InstructionTooLong { .. } => "instruction",
            ConfigError::BadLanguage(_) => "language",
            ConfigError::CycleTimeoutOutOfRange(_) => "cycle_timeout",
            ConfigError::ZeroMaxTokens => "max_tokens",
            ConfigError::ZeroPoll => "poll",
            ConfigError::BadSpeechLatency(_) => "speech_latency",
            ConfigError::Several(all) => all.first().map_or("settings", ConfigError::field),
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
    fn each_problem_gets_its_own_line_naming_its_field() {
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
        assert!(problems.contains(&&ConfigError::FramesOutOfRange(0)));
        assert!(problems.contains(&&ConfigError::ZeroStride));
        assert!(problems.contains(&&ConfigError::AlphaOutOfRange(1.5)));
        assert!(problems.contains(&&ConfigError::DelayOutOfRange(-1.0)));
        assert!(problems.contains(&&ConfigError::InstructionTooLong {
            chars: 2001,
            max: 2000
        }));
        let message = err.to_string();
        assert_eq!(message.lines().count(), 6);
        assert!(
            message.contains("frame_stride: must be at least 1"),
            "{message}"
        );
        assert!(
            message.contains("profile: unknown profile 'opera': choose one of default, sports"),
            "{message}"
        );
    }

    #[test]
    fn one_problem_is_named_too() {
        let config = CommentatorConfig {
            frame_stride: 0,
            ..CommentatorConfig::default()
        };
        let err = config.validate().unwrap_err();
        assert_eq!(err.problems(), [&ConfigError::ZeroStride]);
        assert_eq!(err.field(), "frame_stride");
        assert!(err
            .to_string()
            .starts_with("frame_stride: must be at least 1"));
    }

    #[test]
    fn numeric_bounds_refuse_nan_and_name_their_field() {
        type Check = fn(f64) -> Result<(), ConfigError>;
        let rules: [(Check, &str, f64, f64); 6] = [
            (check_capture_fps, "capture_fps", 0.1, MAX_CAPTURE_FPS),
            (check_interval, "inference_interval", 0.0, MAX_INTERVAL_SECS),
            (
                check_delay_init,
                "stream_delay_init",
                0.0,
                MAX_DELAY_INIT_SECS,
            ),
            (check_alpha, "stream_delay_ema_alpha", 0.01, 1.0),
            (
                check_scene_change_threshold,
                "scene_change_threshold",
                0.0,
                255.0,
            ),
            (
                check_cycle_timeout,
                "cycle_timeout",
                0.1,
                MAX_CYCLE_TIMEOUT_SECS,
            ),
        ];
        for (check, field, low, high) in rules {
            assert_eq!(check(low), Ok(()), "{field} {low}");
            assert_eq!(check(high), Ok(()), "{field} {high}");
            for bad in [-0.5, high * 1.01, f64::NAN, f64::INFINITY] {
                let err = check(bad).unwrap_err();
                assert_eq!(err.field(), field);
                assert!(err.to_string().contains(&format!("got {bad}")), "{err}");
            }
        }
        assert!(check_alpha(0.0).is_err());
        assert!(check_capture_fps(0.0).is_err());
        assert!(check_cycle_timeout(0.0).is_err());
    }

    #[test]
    fn frame_counts_and_tokens() {
        assert!(check_frames_per_inference(1).is_ok());
        assert!(check_frames_per_inference(MAX_FRAMES_PER_INFERENCE).is_ok());
        assert!(check_frames_per_inference(0).is_err());
        assert!(check_frames_per_inference(MAX_FRAMES_PER_INFERENCE + 1).is_err());
        assert_eq!(check_frame_stride(0), Err(ConfigError::ZeroStride));
        assert_eq!(check_max_tokens(0), Err(ConfigError::ZeroMaxTokens));
        let config = CommentatorConfig {
            interval: Duration::from_secs(7200),
            ..CommentatorConfig::default()
        };
        assert_eq!(
            config.validate().unwrap_err().problems(),
            [&ConfigError::IntervalOutOfRange(7200.0)]
        );
    }

    #[test]
    fn instruction_limit_counts_characters_not_bytes() {
        assert!(check_instruction(&"é".repeat(MAX_INSTRUCTION_CHARS)).is_ok());
        assert!(check_instruction(&"é".repeat(MAX_INSTRUCTION_CHARS + 1)).is_err());
    }
}
