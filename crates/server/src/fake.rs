//! A server made of fakes for tests, the page test and the viewer benchmark: real
//! streams and registry (`kibitz-stream`) on pattern-picture sources and a scripted
//! engine, so everything from the stream up is the product's own code. Behind the `fake`
//! feature: never in a release build.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use kibitz_engine::fake::FakeEngine;
use kibitz_engine::Scheduler;
use kibitz_frames::Jpeg;
use kibitz_media::SourcePolicy;
use kibitz_stream::sources::fake::PatternSources;
use kibitz_stream::{RegistryConfig, StreamDefaults, StreamHandle, Streams, Voices};
use tokio_util::sync::CancellationToken;

use crate::auth::Access;
use crate::{AppState, Parts};

/// The profile names, as the commentary crate lists them.
pub fn profiles() -> Vec<String> {
    kibitz_commentator::Profiles::names()
        .into_iter()
        .map(String::from)
        .collect()
}

/// A test picture: a colour and a bar that depend on `index`, a gradient, and `noise`
/// (0–255) of pseudo-random grain, which is what makes a JPEG big. Quality 80, 4:2:0, as
/// the display buffer encodes.
pub fn pattern_jpeg(width: u32, height: u32, index: u32, noise: u8) -> Jpeg {
    let (w, h) = (width as usize, height as usize);
    let hue = [
        [230, 80, 60],
        [60, 170, 90],
        [70, 110, 230],
        [220, 190, 60],
        [170, 80, 200],
    ][index as usize % 5];
    let bar = (index as usize * w / 7 + w / 10) % w.max(1);
    let mut seed = 0x9e37_79b9_u32 ^ index.wrapping_mul(0x85eb_ca6b);
    let mut pixels = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let grain = if noise == 0 {
                0
            } else {
                (seed % (u32::from(noise) + 1)) as i32 - i32::from(noise) / 2
            };
            let shade = ((x + y) * 96 / (w + h).max(1)) as i32;
            let on_bar = x.abs_diff(bar) < w / 20 + 1;
            for (c, base) in hue.iter().enumerate() {
                let v = if on_bar {
                    245
                } else {
                    base + shade - 48 + grain
                };
                pixels[(y * w + x) * 3 + c] = v.clamp(0, 255) as u8;
            }
        }
    }
    let image = turbojpeg::Image {
        pixels: pixels.as_slice(),
        width: w,
        pitch: w * 3,
        height: h,
        format: turbojpeg::PixelFormat::RGB,
    };
    let bytes = turbojpeg::compress(image, 80, turbojpeg::Subsamp::Sub2x2)
        .expect("turbojpeg encodes an RGB picture");
    Jpeg {
        width,
        height,
        bytes: bytes::Bytes::copy_from_slice(&bytes),
    }
}

/// How to build a [`Harness`].
pub struct Options {
    /// Streams started as if from the command line (`ID=SOURCE`, sources are names only).
    pub streams: Vec<String>,
    pub engine: FakeEngine,
    /// Pictures a second of every pattern source.
    pub fps: f64,
    pub defaults: StreamDefaults,
    pub token: Option<String>,
    pub token_for_viewing: bool,
    pub max_streams: usize,
    pub state_file: Option<PathBuf>,
    pub media_dir: Option<PathBuf>,
    /// Real-sized JPEGs every source shows in turn, instead of tiny tagged ones.
    pub pictures: Option<Vec<Jpeg>>,
    /// The voices streams may speak with (none by default).
    pub voices: Voices,
    /// Instead of `engine`, e.g. one whose answers depend on the question.
    pub engine_override: Option<Arc<dyn kibitz_engine::Engine>>,
    pub alert_sink: Option<Arc<dyn kibitz_stream::AlertSink>>,
    /// A history in memory (recording every stream), or none.
    pub history: bool,
    /// Host names, origins and proxies answered besides the server's own.
    pub origins: crate::Origins,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            streams: vec!["s1=one.mp4".into()],
            engine: FakeEngine::saying(
                "a ball rolls",
                Duration::from_millis(50),
                Duration::from_millis(10),
            ),
            fps: 10.0,
            defaults: StreamDefaults {
                // No sync delay: tests see the newest picture at once.
                stream_delay_init: 0.0,
                inference_interval: 0.2,
                // The pattern pictures barely change; these tests are not about the gate.
                scene_change_threshold: 0.0,
                ..StreamDefaults::default()
            },
            token: None,
            token_for_viewing: false,
            max_streams: 16,
            state_file: None,
            media_dir: None,
            pictures: None,
            voices: Voices::off(),
            engine_override: None,
            alert_sink: None,
            history: false,
            origins: crate::Origins::default(),
        }
    }
}

/// A running server state on fakes.
pub struct Harness {
    pub state: AppState,
    pub streams: Streams,
    pub engine: FakeEngine,
}

impl Harness {
    /// One stream `s1` at 10 fps, a fake engine, no delay, no token.
    pub async fn new() -> Harness {
        Harness::with(Options::default()).await
    }

    pub async fn with(options: Options) -> Harness {
        let engine: Arc<dyn kibitz_engine::Engine> = match options.engine_override.clone() {
            Some(engine) => engine,
            None => Arc::new(options.engine.clone()),
        };
        let scheduler = Scheduler::new(engine);
        let streams = Streams::new(RegistryConfig {
            defaults: options.defaults.clone(),
            sources: Arc::new(match options.pictures.clone() {
                Some(pictures) => PatternSources::with_pictures(options.fps, pictures),
                None => PatternSources::new(options.fps),
            }),
            scheduler,
            policy: SourcePolicy {
                media_dir: options.media_dir.clone(),
            },
            max_streams: options.max_streams,
            state_file: options.state_file.clone(),
            voices: Arc::new(options.voices),
            alert_sink: options.alert_sink.clone(),
        });
        let specs = kibitz_stream::topology::plan(
            &options
                .streams
                .iter()
                .map(|s| kibitz_stream::topology::StreamInput::from_source_flag(s))
                .collect::<Vec<_>>(),
            &options.defaults,
        )
        .expect("the harness's streams are valid");
        for spec in specs {
            streams
                .start_trusted(spec)
                .await
                .expect("pattern sources start");
        }
        let history = options.history.then(|| {
            let history = kibitz_history::History::in_memory().expect("an in-memory history");
            streams.add_output(kibitz_stream::history::output(history.clone()));
            history
        });
        let state = AppState::new(Parts {
            streams: streams.clone(),
            access: Access::new(options.token.clone(), options.token_for_viewing),
            profiles: profiles(),
            shutdown: CancellationToken::new(),
            history,
            origins: options.origins.clone(),
        });
        Harness {
            state,
            streams,
            engine: options.engine,
        }
    }

    pub fn router(&self) -> Router {
        crate::router(self.state.clone())
    }

    pub fn stream(&self, id: &str) -> StreamHandle {
        self.streams.get(id).expect("the stream runs")
    }
}

/// A voice that says a 440 Hz tone, half a second per sentence, at 16 kHz, under the name
/// `espeak` (tests of speech timing need a voice, not words).
pub struct Tone;

impl kibitz_voice::Voice for Tone {
    fn info(&self) -> kibitz_voice::VoiceInfo {
        kibitz_voice::VoiceInfo {
            engine: "espeak",
            name: "tone".into(),
            language: "en".into(),
            sample_rate: 16_000,
        }
    }

    fn synthesize(&self, _sentence: &str) -> Result<kibitz_voice::Pcm, kibitz_voice::VoiceError> {
        let samples = (0..8_000)
            .map(|i| {
                ((i as f64 * 440.0 * std::f64::consts::TAU / 16_000.0).sin() * 12_000.0) as i16
            })
            .collect();
        Ok(kibitz_voice::Pcm {
            samples,
            sample_rate: 16_000,
        })
    }
}
