//! What a stream is made of: [`StreamSettings`] as a user writes them (every field
//! optional: a `--streams` table, a `POST /api/streams` body, a `PATCH`), resolved against
//! the global flags ([`StreamDefaults`]) into a complete, checked [`StreamSpec`].
//!
//! This module is the one owner of per-stream validation: the command line, the streams
//! file and the HTTP API all go through [`StreamSpec::resolve`] and [`StreamSpec::patch`],
//! so a value refused in one place is refused, with the same words, in all of them. Each
//! problem names its field, which the API turns into a `422`.

use std::fmt;
use std::time::Duration;

use kibitz_commentator::{
    check_alpha, check_capture_fps, check_delay_init, check_frame_stride,
    check_frames_per_inference, check_instruction, check_interval, check_scene_change_threshold,
    CommentatorConfig, Language, Profiles, Style,
};
use kibitz_engine::Sampling;
use serde::{Deserialize, Serialize};

use crate::id::StreamId;

/// A source string longer than this is not a URL anyone typed.
const MAX_SOURCE_LEN: usize = 4096;

/// Every per-stream setting, each optional. Field names are the flags' and env vars'
/// (`capture_fps` is `--capture-fps` / `CAPTURE_FPS`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instruction: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture_fps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frames_per_inference: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frame_stride: Option<usize>,
    /// Seconds between the end of one cycle and the start of the next.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inference_interval: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_delay_init: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_delay_ema_alpha: Option<f64>,
    /// Grey levels of change below which a cycle is not asked (0: always ask).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scene_change_threshold: Option<f64>,
    /// The commentary's language (`en`, `de`, `pt-BR`), in the prompt and the voice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Who speaks the comments: `espeak`, `piper:PATH`, `openai:URL` or `off`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voice: Option<String>,
    /// Alert rules the stream starts with (`POST …/alerts` adds more while it runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alerts: Option<Vec<String>>,
}

/// One stream, complete and checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamSpec {
    pub id: StreamId,
    /// As given: a path or URL, credentials included (never shown; see
    /// [`StreamSpec::source_shown`]).
    pub source: String,
    pub profile: String,
    pub instruction: String,
    pub capture_fps: f64,
    pub frames_per_inference: usize,
    pub frame_stride: usize,
    pub inference_interval: f64,
    pub stream_delay_init: f64,
    pub stream_delay_ema_alpha: f64,
    pub scene_change_threshold: f64,
    pub language: String,
    pub voice: String,
    pub alerts: Vec<String>,
}

/// The global flags: per-stream defaults, and the settings every stream shares.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamDefaults {
    pub profile: String,
    pub instruction: String,
    pub capture_fps: f64,
    pub frames_per_inference: usize,
    pub frame_stride: usize,
    pub inference_interval: f64,
    pub stream_delay_init: f64,
    pub stream_delay_ema_alpha: f64,
    pub scene_change_threshold: f64,
    pub language: String,
    /// `--voice`.
    pub voice: String,
    /// `--alert`: rules every command-line stream starts with.
    pub alerts: Vec<String>,
    /// Frames the inference window keeps (`WINDOW_SIZE`).
    pub window_size: usize,
    /// Picture the display buffer keeps (`DISPLAY_BUFFER_SECONDS`).
    pub display_span: Duration,
    pub jpeg_quality: u8,
    pub display_max_width: Option<u32>,
    /// `--max-source-pixels`: bigger sources are shown downscaled to fit; `None`: no cap.
    pub max_source_pixels: Option<u64>,
    /// Model pictures are sized to about this many 448x448 slices.
    pub max_slices: u32,
    /// MJPEG rate when a source does not say its own (`MJPEG_FPS`).
    pub mjpeg_fps: f64,
    pub cycle_timeout: Duration,
    pub max_tokens: u32,
    pub sampling: Sampling,
}

impl Default for StreamDefaults {
    fn default() -> Self {
        let c = CommentatorConfig::default();
        StreamDefaults {
            profile: c.profile,
            instruction: c.instruction,
            capture_fps: kibitz_frames::CAPTURE_FPS,
            frames_per_inference: c.frames_per_inference,
            frame_stride: c.frame_stride,
            inference_interval: c.interval.as_secs_f64(),
            stream_delay_init: c.delay_init,
            stream_delay_ema_alpha: c.delay_alpha,
            scene_change_threshold: c.scene_change_threshold,
            language: c.style.language.code().to_string(),
            voice: "off".into(),
            alerts: Vec::new(),
            window_size: 32,
            display_span: Duration::from_secs(15),
            jpeg_quality: kibitz_frames::JPEG_QUALITY,
            display_max_width: None,
            max_source_pixels: Some(kibitz_media::MAX_SOURCE_PIXELS),
            max_slices: 1,
            mjpeg_fps: 10.0,
            cycle_timeout: c.cycle_timeout,
            max_tokens: c.max_tokens,
            sampling: c.sampling,
        }
    }
}

/// One bad value: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem of one spec, in field order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", lines(.0))]
pub struct Problems(pub Vec<FieldError>);

fn lines(problems: &[FieldError]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Settings a running stream takes without a restart; the rest need a new stream.
pub const LIVE_FIELDS: [&str; 4] = ["profile", "instruction", "inference_interval", "voice"];

impl StreamSpec {
    /// Fills what `settings` leaves out from `defaults` and checks everything. `id` is
    /// used when `settings.id` is absent.
    pub fn resolve(
        settings: &StreamSettings,
        id: Option<StreamId>,
        defaults: &StreamDefaults,
    ) -> Result<StreamSpec, Problems> {
        let mut problems = Vec::new();
        let id = match (&settings.id, id) {
            (Some(given), _) => match StreamId::new(given) {
                Ok(id) => Some(id),
                Err(message) => {
                    problems.push(FieldError {
                        field: "id",
                        message,
                    });
                    None
                }
            },
            (None, Some(id)) => Some(id),
            (None, None) => {
                problems.push(FieldError {
                    field: "id",
                    message: "missing".into(),
                });
                None
            }
        };
        let source = match settings.source.as_deref().map(str::trim) {
            Some(s) if !s.is_empty() => s.to_string(),
            _ => {
                problems.push(FieldError {
                    field: "source",
                    message: "missing: give a video file, rtsp://…, http(s)://… or another URL"
                        .into(),
                });
                String::new()
            }
        };
        let d = defaults;
        let spec = StreamSpec {
            id: id.unwrap_or_else(|| StreamId::nth(0)),
            source,
            profile: settings
                .profile
                .clone()
                .unwrap_or_else(|| d.profile.clone()),
            instruction: settings
                .instruction
                .as_deref()
                .unwrap_or(&d.instruction)
                .trim()
                .to_string(),
            capture_fps: settings.capture_fps.unwrap_or(d.capture_fps),
            frames_per_inference: settings
                .frames_per_inference
                .unwrap_or(d.frames_per_inference),
            frame_stride: settings.frame_stride.unwrap_or(d.frame_stride),
            inference_interval: settings.inference_interval.unwrap_or(d.inference_interval),
            stream_delay_init: settings.stream_delay_init.unwrap_or(d.stream_delay_init),
            stream_delay_ema_alpha: settings
                .stream_delay_ema_alpha
                .unwrap_or(d.stream_delay_ema_alpha),
            scene_change_threshold: settings
                .scene_change_threshold
                .unwrap_or(d.scene_change_threshold),
            language: settings
                .language
                .as_deref()
                .unwrap_or(&d.language)
                .trim()
                .to_string(),
            voice: settings
                .voice
                .as_deref()
                .unwrap_or(&d.voice)
                .trim()
                .to_string(),
            alerts: settings.alerts.clone().unwrap_or_else(|| d.alerts.clone()),
        };
        problems.extend(spec.check(defaults));
        if problems.is_empty() {
            Ok(spec)
        } else {
            Err(Problems(problems))
        }
    }

    /// This spec with the live settings of `change` applied. Fields that would need a new
    /// stream (the source, the frame sampling) are refused, naming the field.
    pub fn patch(
        &self,
        change: &StreamSettings,
        defaults: &StreamDefaults,
    ) -> Result<StreamSpec, Problems> {
        // What only a new stream can change, and whether `change` asks to (the same
        // value again is no change).
        let differs = |given: Option<&str>, now: &str| given.is_some_and(|v| v.trim() != now);
        let fixed = [
            ("id", differs(change.id.as_deref(), self.id.as_str())),
            ("source", differs(change.source.as_deref(), &self.source)),
            (
                "capture_fps",
                change.capture_fps.is_some_and(|v| v != self.capture_fps),
            ),
            (
                "frames_per_inference",
                change
                    .frames_per_inference
                    .is_some_and(|v| v != self.frames_per_inference),
            ),
            (
                "frame_stride",
                change.frame_stride.is_some_and(|v| v != self.frame_stride),
            ),
            (
                "stream_delay_init",
                change
                    .stream_delay_init
                    .is_some_and(|v| v != self.stream_delay_init),
            ),
            (
                "stream_delay_ema_alpha",
                change
                    .stream_delay_ema_alpha
                    .is_some_and(|v| v != self.stream_delay_ema_alpha),
            ),
            (
                "scene_change_threshold",
                change
                    .scene_change_threshold
                    .is_some_and(|v| v != self.scene_change_threshold),
            ),
            (
                "language",
                differs(change.language.as_deref(), &self.language),
            ),
        ];
        let mut problems: Vec<FieldError> = fixed
            .into_iter()
            .filter(|(_, asked)| *asked)
            .map(|(field, _)| FieldError {
                field,
                message: format!(
                    "cannot change while the stream runs (live: {}); delete the stream and add it again",
                    LIVE_FIELDS.join(", ")
                ),
            })
            .collect();
        let mut next = self.clone();
        if let Some(profile) = &change.profile {
            next.profile = profile.clone();
        }
        if let Some(instruction) = &change.instruction {
            next.instruction = instruction.trim().to_string();
        }
        if let Some(interval) = change.inference_interval {
            next.inference_interval = interval;
        }
        if change.alerts.is_some() {
            problems.push(FieldError {
                field: "alerts",
                message: "change rules with POST or DELETE /api/streams/{id}/alerts".into(),
            });
        }
        if let Some(voice) = &change.voice {
            next.voice = voice.trim().to_string();
        }
        problems.extend(next.check(defaults));
        if problems.is_empty() {
            Ok(next)
        } else {
            Err(Problems(problems))
        }
    }

    fn check(&self, d: &StreamDefaults) -> Vec<FieldError> {
        let mut problems = Vec::new();
        let mut bad =
            |field: &'static str, message: String| problems.push(FieldError { field, message });
        if self.source.len() > MAX_SOURCE_LEN || self.source.contains(['\0', '\n', '\r']) {
            bad(
                "source",
                format!("must be one line of at most {MAX_SOURCE_LEN} bytes"),
            );
        }
        // The commentary's own rules, bounds and words live beside the loop they drive
        // (`kibitz_commentator::check_*`); each names its field.
        let commentary = [
            Profiles::get(&self.profile).map(|_| ()),
            check_instruction(&self.instruction),
            check_capture_fps(self.capture_fps),
            check_frames_per_inference(self.frames_per_inference),
            check_frame_stride(self.frame_stride),
            check_interval(self.inference_interval),
            check_delay_init(self.stream_delay_init),
            check_alpha(self.stream_delay_ema_alpha),
            check_scene_change_threshold(self.scene_change_threshold),
            Language::parse(&self.language).map(|_| ()),
        ];
        for e in commentary.into_iter().filter_map(Result::err) {
            bad(e.field(), e.to_string());
        }
        // The frames a cycle takes must fit the window the stream keeps (a stream's rule:
        // the window is the stream's, not the loop's); asked only of counts that are good.
        let counts_ok = check_frames_per_inference(self.frames_per_inference).is_ok()
            && check_frame_stride(self.frame_stride).is_ok();
        let reach = self
            .frames_per_inference
            .saturating_sub(1)
            .saturating_mul(self.frame_stride)
            .saturating_add(1);
        if counts_ok && reach > d.window_size {
            bad(
                "frame_stride",
                format!(
                    "{} frames every {} need a window of {reach} frames, but --window-size is {}",
                    self.frames_per_inference, self.frame_stride, d.window_size
                ),
            );
        }
        if let Err(e) = kibitz_voice::VoiceSpec::parse(&self.voice) {
            bad("voice", e.to_string());
        }
        if self.alerts.len() > crate::MAX_RULES {
            bad(
                "alerts",
                format!(
                    "{} rules; a stream takes at most {}",
                    self.alerts.len(),
                    crate::MAX_RULES
                ),
            );
        }
        for rule in &self.alerts {
            if let Err(e) = crate::alerts::check_rule(&crate::RuleSettings {
                rule: rule.clone(),
                cooldown: None,
            }) {
                bad("alerts", e.to_string());
            }
        }
        problems
    }

    /// The source as status pages and logs show it: `user:password@` masked.
    pub fn source_shown(&self) -> String {
        match kibitz_media::SourceSpec::parse(&self.source) {
            Ok(spec) => spec.to_string(),
            Err(_) => self.source.clone(),
        }
    }

    /// The commentary loop's settings for this stream.
    pub fn commentator(&self, d: &StreamDefaults) -> CommentatorConfig {
        CommentatorConfig {
            frames_per_inference: self.frames_per_inference,
            frame_stride: self.frame_stride,
            interval: Duration::from_secs_f64(self.inference_interval),
            max_tokens: d.max_tokens,
            sampling: d.sampling,
            delay_init: self.stream_delay_init,
            delay_alpha: self.stream_delay_ema_alpha,
            cycle_timeout: d.cycle_timeout,
            profile: self.profile.clone(),
            instruction: self.instruction.clone(),
            scene_change_threshold: self.scene_change_threshold,
            style: Style {
                // Checked by `check`; a spec that reaches here has a valid code.
                language: Language::parse(&self.language).unwrap_or_default(),
                spoken: false,
            },
            ..CommentatorConfig::default()
        }
    }

    /// The settings a user gave, as they would write them again (for the state file).
    pub fn settings(&self) -> StreamSettings {
        StreamSettings {
            id: Some(self.id.to_string()),
            source: Some(self.source.clone()),
            profile: Some(self.profile.clone()),
            instruction: Some(self.instruction.clone()),
            capture_fps: Some(self.capture_fps),
            frames_per_inference: Some(self.frames_per_inference),
            frame_stride: Some(self.frame_stride),
            inference_interval: Some(self.inference_interval),
            stream_delay_init: Some(self.stream_delay_init),
            stream_delay_ema_alpha: Some(self.stream_delay_ema_alpha),
            scene_change_threshold: Some(self.scene_change_threshold),
            language: Some(self.language.clone()),
            voice: Some(self.voice.clone()),
            alerts: (!self.alerts.is_empty()).then(|| self.alerts.clone()),
        }
    }
}

/// The `--streams` file: one TOML table per stream, keyed by its id.
///
/// ```toml
/// [door]
/// source = "rtsp://cam.local/1"
/// profile = "security"
///
/// [game]
/// source = "game.mp4"
/// inference_interval = 0.5
/// ```
pub fn parse_streams_file(text: &str) -> Result<Vec<(String, StreamSettings)>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let mut streams = Vec::with_capacity(table.len());
    for (id, value) in table {
        let settings: StreamSettings = value
            .try_into()
            .map_err(|e: toml::de::Error| format!("[{id}]: {}", e.message()))?;
        if settings.id.as_deref().is_some_and(|inner| inner != id) {
            return Err(format!(
                "[{id}]: the table's name is the stream's id; leave out `id` or make it \"{id}\""
            ));
        }
        streams.push((id, settings));
    }
    Ok(streams)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_source(source: &str) -> StreamSettings {
        StreamSettings {
            source: Some(source.into()),
            ..StreamSettings::default()
        }
    }

    /// Found by `fuzz/fuzz_targets/streams_file.rs` (`inference_interval =
    /// 3.63333333333333333333333`): a float read back from JSON was a bit off (serde_json's
    /// default float parsing is not exact), so a stream came back from the state file changed,
    /// and a PATCH sending back the `capture_fps` the server showed was refused as a change.
    #[test]
    fn fuzz_settings_come_back_the_same_through_json() {
        let d = StreamDefaults::default();
        let settings = StreamSettings {
            capture_fps: Some(3.6333333333333333),
            inference_interval: Some(3.6333333333333333),
            ..with_source("a.mp4")
        };
        let spec = StreamSpec::resolve(&settings, Some(StreamId::nth(1)), &d).unwrap();
        let json = serde_json::to_string(&spec.settings()).unwrap();
        let back: StreamSettings = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec.settings(), "{json}");
        assert_eq!(spec.patch(&back, &d), Ok(spec.clone()));
    }

    #[test]
    fn defaults_fill_the_gaps() {
        let d = StreamDefaults::default();
        let spec =
            StreamSpec::resolve(&with_source(" a.mp4 "), Some(StreamId::nth(1)), &d).unwrap();
        assert_eq!(spec.id.as_str(), "s1");
        assert_eq!(spec.source, "a.mp4");
        assert_eq!(spec.frames_per_inference, 4);
        assert_eq!(spec.commentator(&d).validate(), Ok(()));
    }

    #[test]
    fn every_bad_field_is_named() {
        let settings = StreamSettings {
            id: Some("Bad Id".into()),
            source: None,
            profile: Some("opera".into()),
            instruction: Some("x".repeat(2001)),
            capture_fps: Some(-1.0),
            frames_per_inference: Some(0),
            frame_stride: Some(0),
            inference_interval: Some(f64::NAN),
            stream_delay_init: Some(-2.0),
            stream_delay_ema_alpha: Some(1.5),
            scene_change_threshold: Some(-1.0),
            language: Some("klingon!".into()),
            voice: Some("bard".into()),
            alerts: Some(vec![String::new()]),
        };
        let Problems(problems) =
            StreamSpec::resolve(&settings, None, &StreamDefaults::default()).unwrap_err();
        let fields: Vec<&str> = problems.iter().map(|p| p.field).collect();
        assert_eq!(
            fields,
            [
                "id",
                "source",
                "profile",
                "instruction",
                "capture_fps",
                "frames_per_inference",
                "frame_stride",
                "inference_interval",
                "stream_delay_init",
                "stream_delay_ema_alpha",
                "scene_change_threshold",
                "language",
                "voice",
                "alerts"
            ]
        );
        assert!(problems[2].message.contains("unknown profile 'opera'"));
    }

    #[test]
    fn patch_changes_live_fields_and_names_the_rest() {
        let d = StreamDefaults::default();
        let spec = StreamSpec::resolve(&with_source("a.mp4"), Some(StreamId::nth(1)), &d).unwrap();
        let next = spec
            .patch(
                &StreamSettings {
                    profile: Some("sports".into()),
                    instruction: Some(" goals only ".into()),
                    inference_interval: Some(0.5),
                    source: Some("a.mp4".into()),
                    ..StreamSettings::default()
                },
                &d,
            )
            .unwrap();
        assert_eq!(
            (
                next.profile.as_str(),
                next.instruction.as_str(),
                next.inference_interval
            ),
            ("sports", "goals only", 0.5)
        );
        let Problems(problems) = spec
            .patch(
                &StreamSettings {
                    source: Some("b.mp4".into()),
                    capture_fps: Some(5.0),
                    profile: Some("opera".into()),
                    ..StreamSettings::default()
                },
                &d,
            )
            .unwrap_err();
        let fields: Vec<&str> = problems.iter().map(|p| p.field).collect();
        assert_eq!(fields, ["source", "capture_fps", "profile"]);
    }

    #[test]
    fn window_must_reach_the_frames() {
        let d = StreamDefaults {
            window_size: 4,
            ..StreamDefaults::default()
        };
        let Problems(problems) =
            StreamSpec::resolve(&with_source("a.mp4"), Some(StreamId::nth(1)), &d).unwrap_err();
        assert!(problems[0].message.contains("need a window of 7 frames"));
    }

    #[test]
    fn streams_file_tables_are_streams() {
        let streams = parse_streams_file(
            "[door]\nsource = \"rtsp://cam/1\"\nprofile = \"security\"\n\n[game]\nsource = \"g.mp4\"\ninference_interval = 0.5\n",
        )
        .unwrap();
        assert_eq!(streams.len(), 2);
        assert_eq!(streams[0].0, "door");
        assert_eq!(streams[0].1.profile.as_deref(), Some("security"));
        assert_eq!(streams[1].1.inference_interval, Some(0.5));

        let err = parse_streams_file("[door]\nsauce = \"x\"\n").unwrap_err();
        assert!(err.contains("[door]") && err.contains("sauce"), "{err}");
        let err = parse_streams_file("[door]\nid = \"gate\"\nsource = \"x\"\n").unwrap_err();
        assert!(err.contains("table's name"), "{err}");
        assert!(parse_streams_file("not toml [").is_err());
    }

    #[test]
    fn credentials_are_not_shown() {
        let d = StreamDefaults::default();
        let spec = StreamSpec::resolve(
            &with_source("rtsp://admin:hunter2@cam.local/1"),
            Some(StreamId::nth(1)),
            &d,
        )
        .unwrap();
        assert_eq!(spec.source_shown(), "rtsp://***@cam.local/1");
    }
}
