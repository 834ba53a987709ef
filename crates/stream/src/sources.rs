//! How a stream gets its source running: through [`Sources`], so the registry starts real
//! FFmpeg sources in the product and pattern pictures in tests, and everything above the
//! source (stores, commentary, outputs) is the same code in both.

use kibitz_media::{Source, SourceConfig, SourceContext, SourceStatus};

/// A running source. Dropping it stops it and waits for its thread.
pub trait RunningSource: Send + Sync {
    fn status(&self) -> SourceStatus;
}

impl RunningSource for Source {
    fn status(&self) -> SourceStatus {
        Source::status(self)
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
    use kibitz_media::{SourceConfig, SourceContext, SourceState, SourceStatus};

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

    struct Running {
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
        status: SourceStatus,
        frames: Arc<AtomicU64>,
    }

    impl RunningSource for Running {
        fn status(&self) -> SourceStatus {
            SourceStatus {
                frames_decoded: self.frames.load(Ordering::Relaxed),
                ..self.status.clone()
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
            let frames = Arc::new(AtomicU64::new(0));
            let (fps, w, h) = (self.fps, self.width, self.height);
            let pictures = self.pictures.clone();
            let capture_every = (fps / config.capture_fps).round().max(1.0) as u64;
            let thread = {
                let (stop, frames, name) = (stop.clone(), frames.clone(), name.clone());
                std::thread::spawn(move || {
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
                        cx.display.push(stamp, picture);
                        if k.is_multiple_of(capture_every) {
                            let mut data = vec![index; (w * h * 3) as usize];
                            data[0] = (k % 256) as u8;
                            cx.window.push(
                                stamp,
                                Rgb {
                                    width: w,
                                    height: h,
                                    data: data.into(),
                                },
                            );
                        }
                        frames.fetch_add(1, Ordering::Relaxed);
                        k += 1;
                        let next = start + period * k as u32;
                        std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    }
                })
            };
            let mut status = SourceStatus::new(name, config.spec.kind());
            status.state = SourceState::Live;
            status.width = w;
            status.height = h;
            status.source_fps = Some(fps);
            Ok(Box::new(Running {
                stop,
                thread: Some(thread),
                status,
                frames,
            }))
        }
    }
}
