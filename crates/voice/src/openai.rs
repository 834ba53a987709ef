//! An OpenAI-compatible speech server: `POST {URL}/v1/audio/speech` with
//! `{model, voice, input, response_format: "wav"}`, one request per sentence.
//!
//! Why through the runtime's handle: the request is async (reqwest, like the engine's), but
//! [`Voice::synthesize`] blocks like the other engines, so it waits on the tokio runtime it
//! was built in (`Handle::block_on`), which is allowed on blocking threads, where it runs.
//! Every request has one deadline (`--voice-timeout`), so a dead or slow server is an error
//! in bounded time, never a stuck voice.

use std::time::Duration;

use crate::{Pcm, Voice, VoiceError, VoiceInfo, VoiceOptions};

/// The rate of `response_format: "pcm"` in OpenAI's API (raw 16-bit mono at 24 kHz); some
/// servers answer raw PCM even when asked for WAV.
const PCM_RATE: u32 = 24_000;

pub struct OpenAiSpeech {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    endpoint: String,
    base: String,
    model: String,
    voice: String,
    language: String,
    timeout: Duration,
    sample_rate: std::sync::atomic::AtomicU32,
}

impl OpenAiSpeech {
    /// `url` is the server (`http://host:port`) or its API root (`…/v1`). Checks the server
    /// speaks a word. Must run inside a tokio runtime, on a blocking thread.
    pub fn new(url: &str, options: &VoiceOptions) -> Result<OpenAiSpeech, VoiceError> {
        let base = url.trim_end_matches('/').to_string();
        let fail = |reason: String| VoiceError::Server {
            url: base.clone(),
            reason,
        };
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| fail("the openai voice needs a tokio runtime".into()))?;
        let endpoint = if base.ends_with("/v1") {
            format!("{base}/audio/speech")
        } else {
            format!("{base}/v1/audio/speech")
        };
        let client = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.timeout.min(Duration::from_secs(3)))
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let speech = OpenAiSpeech {
            client,
            runtime,
            endpoint,
            base: base.clone(),
            model: options.openai_model.clone(),
            voice: options.openai_voice.clone(),
            language: options.language.clone(),
            timeout: options.timeout,
            sample_rate: PCM_RATE.into(),
        };
        speech.synthesize("ok.")?;
        Ok(speech)
    }

    async fn request(&self, text: &str) -> Result<Pcm, String> {
        let body = serde_json::json!({
            "model": self.model,
            "voice": self.voice,
            "input": text,
            "response_format": "wav",
        });
        let response = self
            .client
            .post(&self.endpoint)
            .json(&body)
            .send()
            .await
            .map_err(|e| describe(&e, self.timeout))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| describe(&e, self.timeout))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
            return Err(format!("{status}: {}", text.trim()));
        }
        if bytes.starts_with(b"RIFF") {
            crate::read_wav(&bytes).map_err(|e| e.to_string())
        } else {
            Ok(Pcm {
                samples: bytes
                    .chunks_exact(2)
                    .map(|b| i16::from_le_bytes([b[0], b[1]]))
                    .collect(),
                sample_rate: PCM_RATE,
            })
        }
    }
}

fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        format!("no answer within {timeout:?}")
    } else if e.is_connect() {
        "cannot connect".into()
    } else {
        e.to_string()
    }
}

impl Voice for OpenAiSpeech {
    fn info(&self) -> VoiceInfo {
        VoiceInfo {
            engine: "openai",
            name: self.voice.clone(),
            language: self.language.clone(),
            sample_rate: self.sample_rate.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    fn synthesize(&self, sentence: &str) -> Result<Pcm, VoiceError> {
        let pcm = self
            .runtime
            .block_on(self.request(sentence))
            .map_err(|reason| VoiceError::Server {
                url: self.base.clone(),
                reason,
            })?;
        self.sample_rate
            .store(pcm.sample_rate, std::sync::atomic::Ordering::Relaxed);
        Ok(pcm)
    }
}
