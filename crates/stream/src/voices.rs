//! The voices streams speak with, built once each and shared: a piper model loaded for one
//! stream serves every stream that names it.
//!
//! Building a voice checks that it works (espeak speaks a word, piper loads, the speech
//! server answers), so a broken one is found at start, once: the stream then runs silent
//! and its status says why.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use kibitz_voice::{Voice, VoiceOptions, VoiceSpec};

type Built = Result<Option<Arc<dyn Voice>>, String>;

pub struct Voices {
    /// `--voice`: every stream's unless its own says otherwise.
    default: String,
    options: VoiceOptions,
    built: Mutex<HashMap<(String, String), Built>>,
    /// A voice already built, answered for its spec in every language.
    preset: Option<(String, Arc<dyn Voice>)>,
}

impl Voices {
    pub fn new(default: impl Into<String>, options: VoiceOptions) -> Voices {
        Voices {
            default: default.into(),
            options,
            built: Mutex::default(),
            preset: None,
        }
    }

    /// `voice` answers for `spec`, which is also the default (a voice built elsewhere:
    /// tests use a tone generator under the name `espeak`).
    pub fn preset(spec: &str, voice: Arc<dyn Voice>) -> Voices {
        Voices {
            preset: Some((spec.to_string(), voice)),
            ..Voices::new(spec, VoiceOptions::default())
        }
    }

    /// No voice at all (tests, and servers that want silence).
    pub fn off() -> Voices {
        Voices::new("off", VoiceOptions::default())
    }

    pub fn default_spec(&self) -> &str {
        &self.default
    }

    /// Voices the API may choose: none, espeak, or the one the command line set up. A piper
    /// path or a speech server named in a request would let any client make the server
    /// read a file or call a host of its choosing.
    pub fn allowed_from_api(&self, spec: &str) -> bool {
        let spec = spec.trim();
        matches!(spec, "off" | "espeak") || spec == self.default
    }

    /// The voice `spec` names, speaking `language`; built on first use. Blocks (it may run
    /// espeak, load a model or call a server): call it off the async runtime.
    pub fn get(&self, spec: &str, language: &str) -> Built {
        if let Some((name, voice)) = &self.preset {
            if name == spec.trim() {
                return Ok(Some(voice.clone()));
            }
        }
        let key = (spec.trim().to_string(), language.to_string());
        if let Some(built) = lock(&self.built).get(&key) {
            return built.clone();
        }
        let built = VoiceSpec::parse(spec)
            .and_then(|parsed| {
                let options = VoiceOptions {
                    language: language.to_string(),
                    ..self.options.clone()
                };
                kibitz_voice::build(&parsed, &options)
            })
            .map_err(|e| e.to_string());
        if let Err(e) = &built {
            tracing::warn!("voice '{}' is off: {e}", key.0);
        }
        lock(&self.built).insert(key, built.clone());
        built
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
