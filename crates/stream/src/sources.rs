//! How a stream gets its source running: through [`Sources`], so the registry starts real
//! FFmpeg sources in the product and pattern pictures in tests, and everything above the
//! source (stores, commentary, outputs) is the same code in both. A *pushed* source
//! ([`SourcePlan::Pushed`]) is started by no one: it waits for a publisher in this process
//! to take its [`FrameSink`] (see [`crate::StreamHandle::publish`]).

use kibitz_media::{
    FrameSink, PushedSource, SinkConfig, Source, SourceConfig, SourceContext, SourceStatus,
};

/// A running source. Dropping it stops it and waits for its thread.
pub trait RunningSource: Send + Sync {
    fn status(&self) -> SourceStatus;

    /// The sink for a publisher, for a source fed from this process; `None` for a source
    /// that feeds itself (FFmpeg).
    fn publish(&self) -> Option<Result<FrameSink, kibitz_media::Error>> {
        None
    }
}

impl RunningSource for Source {
    fn status(&self) -> SourceStatus {
        Source::status(self)
    }
}

impl RunningSource for PushedSource {
    fn status(&self) -> SourceStatus {
        PushedSource::status(self)
    }

    fn publish(&self) -> Option<Result<FrameSink, kibitz_media::Error>> {
        Some(PushedSource::publish(self))
    }
}

/// Starts sources. `start` may block (a file is opened and probed before it returns, so a
/// missing file is its error): call it off the async runtime.
pub trait Sources: Send + Sync + 'static {
    fn start(
        &self,
        config: SourceConfig,
        cx: SourceContext,
    ) -> Result<Box<dyn RunningSource>, kibitz_media::Error>;
}

/// How a stream's source comes to be.
#[derive(Debug, Clone)]
pub enum SourcePlan {
    /// Opened by the registry's [`Sources`] (FFmpeg in the product).
    Open(SourceConfig),
    /// Fed by a publisher in this process through a [`FrameSink`]; kept out of the state
    /// file, since it is gone when its publisher is.
    Pushed(SinkConfig),
}

impl SourcePlan {
    /// Starts the source; blocks while a file is probed (call it off the runtime).
    pub(crate) fn start(
        self,
        sources: &dyn Sources,
        cx: SourceContext,
    ) -> Result<Box<dyn RunningSource>, kibitz_media::Error> {
        match self {
            SourcePlan::Open(config) => sources.start(config, cx),
            SourcePlan::Pushed(config) => Ok(Box::new(PushedSource::new(config, cx)?)),
        }
    }
}

/// FFmpeg, through `kibitz-media`.
#[derive(Debug, Default, Clone, Copy)]
pub struct FfmpegSources;

impl Sources for FfmpegSources {
    fn start(
        &self,
        config: SourceConfig,
        cx: SourceContext,
    ) -> Result<Box<dyn RunningSource>, kibitz_media::Error> {
        Ok(Box::new(config.build(cx)?))
    }
}

/// Pattern pictures at a steady rate, for tests of everything above the source.
#[cfg(any(test, feature = "fake"))]
pub mod fake {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use kibitz_frames::{Jpeg, Rgb, Stamp};
    use kibitz_media::{
        FrameSink, PushedSource, SinkConfig, SourceConfig, SourceContext, SourceStatus,
    };

    use super::{RunningSource, Sources};

    /// Every source it starts shows frames `width`x`height` at `fps`, real time, each a
    /// solid colour that names the source (its index in start order) and a frame number in
    /// the top row of pixels, so a test can tell whose picture it got. A source string
    /// starting with `missing` fails to start, like a missing file.
    #[derive(Debug, Clone)]
    pub struct PatternSources {
        pub fps: f64,
        pub width: u32,
        pub height: u32,
        /// Shown in turn instead of the tagged pictures (benchmarks want real-sized JPEGs).
        pub pictures: Option<Arc<Vec<Jpeg>>>,
        started: Arc<AtomicU64>,
    }

    impl PatternSources {
        pub fn new(fps: f64) -> PatternSources {
            PatternSources {
                fps,
                width: 32,
                height: 16,
                pictures: None,
                started: Arc::default(),
            }
        }

        /// Shows `pictures` in turn, at `fps`.
        pub fn with_pictures(fps: f64, pictures: Vec<Jpeg>) -> PatternSources {
            PatternSources {
                pictures: Some(Arc::new(pictures)),
                ..PatternSources::new(fps)
            }
        }
    }

    /// A pattern source is a pushed source with its publisher, a thread, built in.
    struct Running {
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
        /// What a file or camera would show in status: its name, kind, size and rate.
        shown: SourceStatus,
        pushed: PushedSource,
    }

    impl RunningSource for Running {
        fn status(&self) -> SourceStatus {
            let fed = self.pushed.status();
            SourceStatus {
                state: fed.state,
                frames_decoded: fed.frames_decoded,
                frames_captured: fed.frames_captured,
                frames_dropped: fed.frames_dropped,
                measured_fps: fed.measured_fps,
                ..self.shown.clone()
            }
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    /// Pictures `width`x`height` at `fps`, real time, into `sink` until `stop`: each a
    /// colour that names the source (`index`) and a frame number in the top row of pixels
    /// for the model, and a JPEG tagged with `name#k` (or one of `pictures`) for viewers.
    pub fn feed(mut sink: FrameSink, pattern: Pattern, stop: Arc<AtomicBool>) {
        let Pattern {
            name,
            index,
            fps,
            width,
            height,
            pictures,
        } = pattern;
        let start = Instant::now();
        let period = Duration::from_secs_f64(1.0 / fps);
        let mut k: u64 = 0;
        while !stop.load(Ordering::SeqCst) {
            let stamp = Stamp {
                pts: period * k as u32,
                captured: Instant::now(),
            };
            let picture = match &pictures {
                Some(p) if !p.is_empty() => p[k as usize % p.len()].clone(),
                _ => tagged_jpeg(&format!("{name}#{k}")),
            };
            let model = || {
                let mut data = vec![index; (width * height * 3) as usize];
                data[0] = (k % 256) as u8;
                Rgb {
                    width,
                    height,
                    data: data.into(),
                }
            };
            if sink.push_prepared(stamp, picture, model).is_err() {
                return; // the stream was removed
            }
            k += 1;
            let next = start + period * k as u32;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    }

    /// What [`feed`] shows.
    #[derive(Debug, Clone)]
    pub struct Pattern {
        pub name: String,
        /// The value of every pixel but the first of the model's pictures.
        pub index: u8,
        pub fps: f64,
        pub width: u32,
        pub height: u32,
        pub pictures: Option<Arc<Vec<Jpeg>>>,
    }

    /// A tiny JPEG whose bytes carry `tag` (a comment segment), so tests can read back
    /// which source and frame a picture came from without decoding it.
    pub fn tagged_jpeg(tag: &str) -> Jpeg {
        // SOI, COM segment with the tag, EOI: enough for anyone who only looks at bytes.
        let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xFE];
        let len = (tag.len() + 2) as u16;
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(tag.as_bytes());
        bytes.extend_from_slice(&[0xFF, 0xD9]);
        Jpeg {
            width: 1,
            height: 1,
            bytes: bytes.into(),
        }
    }

    impl Sources for PatternSources {
        fn start(
            &self,
            config: SourceConfig,
            cx: SourceContext,
        ) -> Result<Box<dyn RunningSource>, kibitz_media::Error> {
            let name = config.spec.to_string();
            if name.starts_with("missing") {
                return Err(kibitz_media::Error::Open {
                    what: name,
                    reason: "no such file".into(),
                });
            }
            let index = self.started.fetch_add(1, Ordering::SeqCst) as u8;
            let stop = Arc::new(AtomicBool::new(false));
            let pushed = PushedSource::new(SinkConfig::from(&config), cx)?;
            let sink = pushed.publish()?;
            let pattern = Pattern {
                name: name.clone(),
                index,
                fps: self.fps,
                width: self.width,
                height: self.height,
                pictures: self.pictures.clone(),
            };
            let thread = {
                let stop = stop.clone();
                std::thread::spawn(move || feed(sink, pattern, stop))
            };
            let mut shown = SourceStatus::new(name, config.spec.kind());
            shown.width = self.width;
            shown.height = self.height;
            shown.source_fps = Some(self.fps);
            Ok(Box::new(Running {
                stop,
                thread: Some(thread),
                shown,
                pushed,
            }))
        }
    }
}
