//! The voice stage: a comment's text becomes 16-bit mono PCM, one sentence at a time.
//!
//! Why sentence by sentence: what a listener notices is the time to the first sound, and a
//! sentence is the unit every engine can speak on its own. [`speak`] cleans the text
//! ([`text::sentences`]) and synthesizes its sentences in order on a blocking thread, handing
//! each one over as soon as it exists.
//!
//! Why a blocking trait: two of the three engines are CPU work or a child process
//! (`espeak-ng`, piper's ONNX model), and the third is one HTTP request per sentence. So
//! [`Voice::synthesize`] blocks, and async callers go through [`speak`], which runs it with
//! `tokio::task::spawn_blocking`. **Never call `synthesize` on a runtime worker thread.**
//!
//! Engines ([`VoiceSpec`]): `espeak` (the default; the Debian program as a child process,
//! never linked, since it is GPL-3), `piper:PATH` (a Piper `.onnx` voice through ONNX
//! Runtime, loaded at run time), `openai:URL` (an OpenAI-compatible `/v1/audio/speech`) and
//! `off`. Outputs that need another rate resample ([`Resampler`]); the speech stream is
//! Ogg/Opus at 48 kHz ([`OggOpusWriter`], or [`OpusEncoder`] + [`OggMuxer`] per listener).
//!
//! How a server uses it:
//! - At start, `spawn_blocking(move || build(&spec, &options))`: it checks the voice works
//!   (speaks a word, loads the model, asks the server), so an error is one warning and
//!   speech stays off.
//! - Per comment, `speak(voice.clone(), &text)` and `Utterance::next().await` for each
//!   sentence's [`Clip`]; drop the utterance to stop. One piper model runs one sentence at a
//!   time (streams queue for it); espeak and openai run concurrently.
//! - Per stream, one [`OpusEncoder`] fed in playout order: a clip's PCM when it is due,
//!   [`OpusEncoder::silence`] for the gaps. It costs ~1 % of a core per second of audio, but a
//!   whole clip at once is ~50 ms of CPU: push it in slices (e.g. 100 ms) or from a blocking
//!   thread. Each listener gets an [`OggMuxer`]: its `headers()`, then `page()` of the
//!   frames from then on.

mod espeak;
mod ogg;
mod openai;
mod piper;
mod resample;
pub mod text;
mod wav;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use espeak::{phonemize, Espeak};
pub use ogg::{OggMuxer, OggOpusWriter, OpusEncoder, OpusFrame, OPUS_RATE};
pub use openai::OpenAiSpeech;
#[doc(hidden)]
pub use piper::read_config as read_piper_config;
pub use piper::Piper;
pub use resample::Resampler;
pub use wav::{read_wav, write_wav};

/// Everything that can go wrong in this crate, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum VoiceError {
    #[error("unknown voice '{0}': use espeak, piper:PATH, openai:URL or off")]
    BadSpec(String),
    #[error("cannot run '{program}': {source}\nhint: install espeak-ng (apt-get install espeak-ng) or pick another voice with --voice")]
    ProgramMissing {
        program: String,
        source: std::io::Error,
    },
    #[error("espeak-ng failed: {0}")]
    Espeak(String),
    #[error("cannot load the piper voice '{path}': {reason}")]
    PiperLoad { path: PathBuf, reason: String },
    #[error("the piper voice failed: {0}")]
    Piper(String),
    #[error("the speech server at {url} failed: {reason}")]
    Server { url: String, reason: String },
    #[error("bad audio: {0}")]
    Audio(String),
    #[error("opus: {0}")]
    Opus(#[from] opus::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Audio: 16-bit signed mono samples at `sample_rate`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pcm {
    pub samples: Vec<i16>,
    pub sample_rate: u32,
}

impl Pcm {
    pub fn duration(&self) -> Duration {
        if self.sample_rate == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(self.samples.len() as f64 / self.sample_rate as f64)
    }

    /// Appends `other`, which must have the same rate (an empty `self` takes `other`'s).
    pub fn append(&mut self, other: &Pcm) {
        if self.samples.is_empty() {
            self.sample_rate = other.sample_rate;
        }
        debug_assert_eq!(self.sample_rate, other.sample_rate);
        self.samples.extend_from_slice(&other.samples);
    }
}

/// What a voice is, for logs, status and `kibitz say`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VoiceInfo {
    /// `espeak`, `piper` or `openai`.
    pub engine: &'static str,
    /// The espeak voice, the piper file's stem, or the server's voice name.
    pub name: String,
    /// The language it speaks (a voice file has one).
    pub language: String,
    /// The rate of the PCM it returns (openai: of its last answer; 24 kHz before any).
    pub sample_rate: u32,
}

/// A text-to-speech engine. `synthesize` **blocks** (a child process, a model run or an HTTP
/// request): call it from a blocking thread, or use [`speak`] from async code.
pub trait Voice: Send + Sync {
    fn info(&self) -> VoiceInfo;
    /// Speaks one sentence of already-cleaned text ([`text::sentences`]).
    fn synthesize(&self, sentence: &str) -> Result<Pcm, VoiceError>;
}

/// Which engine, as `--voice` spells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoiceSpec {
    Espeak,
    Piper(PathBuf),
    OpenAi(String),
    Off,
}

impl VoiceSpec {
    /// `espeak`, `piper:/path/voice.onnx`, `openai:http://host:port` or `off`.
    pub fn parse(s: &str) -> Result<VoiceSpec, VoiceError> {
        let s = s.trim();
        let bad = || VoiceError::BadSpec(s.to_string());
        match s {
            "espeak" | "espeak-ng" => return Ok(VoiceSpec::Espeak),
            "off" | "none" => return Ok(VoiceSpec::Off),
            _ => {}
        }
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        match kind {
            "piper" if !rest.is_empty() => Ok(VoiceSpec::Piper(PathBuf::from(rest))),
            "openai" if rest.starts_with("http://") || rest.starts_with("https://") => {
                Ok(VoiceSpec::OpenAi(rest.trim_end_matches('/').to_string()))
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for VoiceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VoiceSpec::Espeak => f.write_str("espeak"),
            VoiceSpec::Piper(path) => write!(f, "piper:{}", path.display()),
            VoiceSpec::OpenAi(url) => write!(f, "openai:{url}"),
            VoiceSpec::Off => f.write_str("off"),
        }
    }
}

impl std::str::FromStr for VoiceSpec {
    type Err = VoiceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VoiceSpec::parse(s)
    }
}

/// The settings every engine reads what it needs from.
#[derive(Debug, Clone)]
pub struct VoiceOptions {
    /// The commentary's language (`en`, `de`, `fr`, …): espeak's voice unless `espeak_voice`
    /// is set; for piper and openai it is recorded (piper warns if its file speaks another).
    pub language: String,
    /// The `espeak-ng` program (a path or a name on `PATH`).
    pub espeak_program: PathBuf,
    /// An espeak voice such as `en-us` or `en+f3`, instead of the language's.
    pub espeak_voice: Option<String>,
    /// Speaking rate in words per minute (espeak; piper scales its length to match).
    pub rate_wpm: u32,
    /// openai: the model and voice names sent with each request.
    pub openai_model: String,
    pub openai_voice: String,
    /// openai: the whole request, answer included, must finish within this.
    pub timeout: Duration,
}

impl Default for VoiceOptions {
    fn default() -> Self {
        VoiceOptions {
            language: "en".into(),
            espeak_program: "espeak-ng".into(),
            espeak_voice: None,
            rate_wpm: espeak::DEFAULT_WPM,
            openai_model: "tts-1".into(),
            openai_voice: "alloy".into(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Builds the engine `spec` names and checks it works (espeak speaks a word, piper loads its
/// model, openai answers a word), so a broken voice is one error at start. `Off` is `None`.
/// Blocks: call it from a blocking thread or `spawn_blocking`.
pub fn build(
    spec: &VoiceSpec,
    options: &VoiceOptions,
) -> Result<Option<Arc<dyn Voice>>, VoiceError> {
    let voice: Arc<dyn Voice> = match spec {
        VoiceSpec::Off => return Ok(None),
        VoiceSpec::Espeak => Arc::new(Espeak::new(options)?),
        VoiceSpec::Piper(path) => Arc::new(Piper::open(path, options)?),
        VoiceSpec::OpenAi(url) => Arc::new(OpenAiSpeech::new(url, options)?),
    };
    Ok(Some(voice))
}

/// One sentence's audio, as [`speak`] hands it over.
#[derive(Debug, Clone)]
pub struct Clip {
    /// Which sentence of the text (0-based) and how many there are.
    pub index: usize,
    pub of: usize,
    pub text: String,
    pub pcm: Pcm,
    /// How long its synthesis took.
    pub took: Duration,
}

/// The sentences of one text, arriving as they are synthesized.
pub struct Utterance {
    rx: tokio::sync::mpsc::Receiver<Result<Clip, VoiceError>>,
}

impl Utterance {
    /// The next sentence, `None` after the last (or after an error, which ends it).
    pub async fn next(&mut self) -> Option<Result<Clip, VoiceError>> {
        self.rx.recv().await
    }
}

/// Speaks `text` from async code: cleans and splits it, then synthesizes sentence by sentence
/// on tokio's blocking pool (never on a runtime worker). Dropping the [`Utterance`] stops
/// after the sentence being synthesized. A text with nothing to say (`"..."`, markup only)
/// ends at once with no clip. Needs a tokio runtime.
pub fn speak(voice: Arc<dyn Voice>, text: &str) -> Utterance {
    let sentences = text::sentences(text);
    // One clip of room: the next sentence is synthesized while the caller plays this one.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    if !sentences.is_empty() {
        tokio::task::spawn_blocking(move || {
            let of = sentences.len();
            for (index, sentence) in sentences.into_iter().enumerate() {
                if tx.is_closed() {
                    return;
                }
                let started = Instant::now();
                let result = voice.synthesize(&sentence).map(|pcm| Clip {
                    index,
                    of,
                    text: sentence,
                    pcm,
                    took: started.elapsed(),
                });
                let failed = result.is_err();
                if tx.blocking_send(result).is_err() || failed {
                    return;
                }
            }
        });
    }
    Utterance { rx }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print() {
        assert_eq!(VoiceSpec::parse("espeak").unwrap(), VoiceSpec::Espeak);
        assert_eq!(VoiceSpec::parse("off").unwrap(), VoiceSpec::Off);
        assert_eq!(
            VoiceSpec::parse("piper:/v/x.onnx").unwrap(),
            VoiceSpec::Piper("/v/x.onnx".into())
        );
        assert_eq!(
            VoiceSpec::parse("openai:http://h:8000/").unwrap(),
            VoiceSpec::OpenAi("http://h:8000".into())
        );
        for bad in ["", "piper:", "openai:h:8000", "festival", "espeak:x"] {
            let e = VoiceSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains("unknown voice"), "{bad}: {e}");
        }
        for s in ["espeak", "off", "piper:/v/x.onnx", "openai:http://h:8000"] {
            assert_eq!(VoiceSpec::parse(s).unwrap().to_string(), s);
        }
    }
}
