//! Stand-ins for the pipeline, so the server can run without a source or a model: in its
//! own tests, in the browser test of the page, and in the viewer benchmark.
//!
//! [`FakeDisplay`] plays a few JPEGs in a loop at a fixed rate, computed from the clock
//! (tokio's, so paused-time tests drive it); [`pattern_jpeg`] makes such JPEGs;
//! [`Harness`] wires an [`AppState`] from fakes and keeps the other ends of its channels.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use kibitz_commentator::{Control, Event};
use kibitz_engine::fake::FakeEngine;
use kibitz_engine::Engine;
use kibitz_frames::{Jpeg, Stamp};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{AppState, DisplayFeed, DisplayFrame, Parts, PipelineStatus, Selection, StatusReport};

/// The profile names the fakes offer (the commentator's built-in ones).
pub const PROFILES: [&str; 5] = ["default", "sports", "security", "nature", "descriptive"];

/// A source that delivered frame `n` at `start + n / fps`, cycling through `jpegs`.
pub struct FakeDisplay {
    jpegs: Vec<Jpeg>,
    fps: f64,
    reported_fps: Option<f64>,
    start: Instant,
}

impl FakeDisplay {
    /// Frames from now on, at `fps`.
    pub fn new(jpegs: Vec<Jpeg>, fps: f64) -> FakeDisplay {
        assert!(fps > 0.0, "fps must be positive");
        FakeDisplay {
            jpegs,
            fps,
            reported_fps: Some(fps),
            start: tokio::time::Instant::now().into_std(),
        }
    }

    /// A source that has not delivered anything yet.
    pub fn empty() -> FakeDisplay {
        FakeDisplay {
            reported_fps: None,
            ..FakeDisplay::new(Vec::new(), 1.0)
        }
    }

    /// Reports this rate instead of the real one (`None`: unknown).
    pub fn with_reported_fps(mut self, fps: Option<f64>) -> FakeDisplay {
        self.reported_fps = fps;
        self
    }

    fn frame(&self, seq: u64) -> DisplayFrame {
        let pts = Duration::from_secs_f64(seq as f64 / self.fps);
        DisplayFrame {
            seq,
            stamp: Stamp {
                pts,
                captured: self.start + pts,
            },
            jpeg: self.jpegs[(seq % self.jpegs.len() as u64) as usize].clone(),
        }
    }
}

impl DisplayFeed for FakeDisplay {
    fn latest(&self) -> Option<DisplayFrame> {
        self.at(tokio::time::Instant::now().into_std())
    }

    fn at(&self, t: Instant) -> Option<DisplayFrame> {
        if self.jpegs.is_empty() {
            return None;
        }
        let since = t.checked_duration_since(self.start)?;
        Some(self.frame((since.as_secs_f64() * self.fps).floor() as u64))
    }

    fn fps(&self) -> Option<f64> {
        self.reported_fps
    }
}

/// Reports whatever it was last given.
#[derive(Default)]
pub struct FakeStatus {
    status: Mutex<PipelineStatus>,
}

impl FakeStatus {
    pub fn set(&self, status: PipelineStatus) {
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = status;
    }
}

impl StatusReport for FakeStatus {
    fn pipeline(&self) -> PipelineStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
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

/// An [`AppState`] made of fakes, with the other ends of its channels.
pub struct Harness {
    pub state: AppState,
    /// Send events here as the commentary loop would.
    pub events: broadcast::Sender<Event>,
    /// What viewers asked the loop to change.
    pub controls: mpsc::Receiver<Control>,
    pub delay: watch::Sender<f64>,
    pub status: Arc<FakeStatus>,
}

impl Harness {
    /// Two small pictures at 10 fps, a fake engine, no delay.
    pub fn new() -> Harness {
        let jpegs = (0..2).map(|i| pattern_jpeg(64, 48, i, 0)).collect();
        Harness::with_display(Arc::new(FakeDisplay::new(jpegs, 10.0)))
    }

    pub fn with_display(display: Arc<dyn DisplayFeed>) -> Harness {
        Harness::build(display, Arc::new(fake_engine()), 64, 8)
    }

    pub fn with_engine(engine: Arc<dyn Engine>) -> Harness {
        let jpegs = vec![pattern_jpeg(64, 48, 0, 0)];
        Harness::build(Arc::new(FakeDisplay::new(jpegs, 10.0)), engine, 64, 8)
    }

    /// A broadcast of this capacity, to make clients lag.
    pub fn with_capacity(events: usize) -> Harness {
        let jpegs = vec![pattern_jpeg(64, 48, 0, 0)];
        Harness::build(
            Arc::new(FakeDisplay::new(jpegs, 10.0)),
            Arc::new(fake_engine()),
            events,
            8,
        )
    }

    /// A control queue of this capacity, to make it fill.
    pub fn with_control_capacity(controls: usize) -> Harness {
        let jpegs = vec![pattern_jpeg(64, 48, 0, 0)];
        Harness::build(
            Arc::new(FakeDisplay::new(jpegs, 10.0)),
            Arc::new(fake_engine()),
            64,
            controls,
        )
    }

    /// Call inside the tokio runtime (see [`AppState::new`]).
    pub fn build(
        display: Arc<dyn DisplayFeed>,
        engine: Arc<dyn Engine>,
        event_capacity: usize,
        control_capacity: usize,
    ) -> Harness {
        let (events, _) = broadcast::channel(event_capacity);
        let (control_tx, controls) = mpsc::channel(control_capacity);
        let (delay, delay_rx) = watch::channel(0.0);
        let status = Arc::new(FakeStatus::default());
        let state = AppState::new(Parts {
            display,
            events: events.clone(),
            controls: control_tx,
            delay: delay_rx,
            status: status.clone(),
            engine,
            profiles: PROFILES.iter().map(|p| p.to_string()).collect(),
            selection: Selection {
                profile: "default".into(),
                instruction: String::new(),
            },
            mjpeg_fps: 10.0,
            shutdown: CancellationToken::new(),
        })
        .expect("the fake parts are valid");
        Harness {
            state,
            events,
            controls,
            delay,
            status,
        }
    }

    pub fn router(&self) -> Router {
        crate::router(self.state.clone())
    }

    pub fn set_delay(&self, seconds: f64) {
        self.delay.send_replace(seconds);
    }
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

fn fake_engine() -> FakeEngine {
    FakeEngine::saying(
        "a ball rolls",
        Duration::from_millis(50),
        Duration::from_millis(10),
    )
}
