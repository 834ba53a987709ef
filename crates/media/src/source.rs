//! Starting and stopping a source, and reading its status.
//!
//! Shaped like a Vector source: a config, a context carrying where frames go and whom to
//! tell about state changes, and `build` returning a running [`Source`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kibitz_frames::{DisplayBuffer, InferenceWindow, Rgb, Stamp, CAPTURE_FPS, JPEG_QUALITY};

use crate::decode::{self, Worker};
use crate::sink::{FrameSink, OnSampled, SinkConfig};
use crate::status::StatusCell;
use crate::{Error, Restrictions, SourceSpec, SourceState, SourceStatus};

/// How to run a source. [`SourceConfig::new`] gives the documented defaults.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub spec: SourceSpec,
    /// `JPEG_QUALITY` of re-encoded display frames.
    pub jpeg_quality: u8,
    /// `DISPLAY_MAX_WIDTH`: wider frames are shrunk for viewers (MJPEG passthrough aside).
    pub display_max_width: Option<u32>,
    /// `--max-source-pixels`: bigger pictures are shown downscaled to fit (see
    /// [`crate::MAX_SOURCE_PIXELS`]); `None`: no cap.
    pub max_pixels: Option<u64>,
    /// `CAPTURE_FPS`: frames a second resized for the model.
    pub capture_fps: f64,
    /// Model pictures are sized to about this many 448x448 slices (see
    /// [`kibitz_frames::model_size`]).
    pub max_slices: u32,
    /// Files start over at the end (on by default: a file plays as if live).
    pub looping: bool,
    /// A network source silent for this long is dropped and reconnected.
    pub io_timeout: Duration,
    /// What FFmpeg may reach while opening the source: none for the operator's own sources,
    /// those of a [`crate::SourcePolicy`] check for a source sent through the API.
    pub restrictions: Restrictions,
}

impl SourceConfig {
    pub fn new(spec: SourceSpec) -> Self {
        Self {
            spec,
            jpeg_quality: JPEG_QUALITY,
            display_max_width: None,
            max_pixels: Some(crate::MAX_SOURCE_PIXELS),
            capture_fps: CAPTURE_FPS,
            max_slices: 1,
            looping: true,
            io_timeout: Duration::from_secs(5),
            restrictions: Restrictions::default(),
        }
    }

    /// Starts the source. A file is opened and probed here, so a missing or broken file is
    /// this call's error; a live source is opened on its thread and retried there.
    pub fn build(self, cx: SourceContext) -> Result<Source, Error> {
        crate::init();
        let stop = Arc::new(AtomicBool::new(false));
        let status = StatusCell::new(
            SourceStatus::new(self.spec.to_string(), self.spec.kind()),
            cx.on_state.clone(),
        );
        let first = if self.spec.is_live() {
            None
        } else {
            Some(decode::open(&self, &stop)?)
        };
        let sink = FrameSink::new(SinkConfig::from(&self), &cx, status.clone())?;
        let worker = Worker::new(self, sink, status.clone(), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("kibitz-decode".into())
            .spawn(move || worker.run(first))?;
        Ok(Source {
            stop,
            thread: Some(thread),
            status,
            display: cx.display,
        })
    }
}

/// Where a source's frames go, and who hears about its state changes and its sampled
/// frames.
#[derive(Clone)]
pub struct SourceContext {
    pub display: Arc<DisplayBuffer>,
    pub window: Arc<InferenceWindow>,
    pub(crate) on_state: Arc<dyn Fn(&SourceState) + Send + Sync>,
    pub(crate) on_sampled: Option<(u64, OnSampled)>,
}

impl SourceContext {
    pub fn new(display: Arc<DisplayBuffer>, window: Arc<InferenceWindow>) -> Self {
        Self {
            display,
            window,
            on_state: Arc::new(|_| {}),
            on_sampled: None,
        }
    }

    /// Called on the producer's thread with every frame of the sampled set, as soon as the
    /// inference window takes it: each capture whose window `seq` is a multiple of `stride`
    /// (0 counts as 1), the phase [`InferenceWindow::sample_phased`] samples on. Keep it
    /// short and non-blocking: hand the frame on (an engine session's `push_frame`, a
    /// `watch` or `Notify` that wakes the commentary loop).
    pub fn on_sampled(
        mut self,
        stride: usize,
        f: impl Fn(u64, Stamp, &Rgb) + Send + Sync + 'static,
    ) -> Self {
        self.on_sampled = Some((stride.max(1) as u64, Arc::new(f)));
        self
    }

    /// Called on the decode thread at every state change (keep it short: hand the state to
    /// a channel, e.g. a tokio `UnboundedSender`, which never blocks).
    pub fn on_state(mut self, f: impl Fn(&SourceState) + Send + Sync + 'static) -> Self {
        self.on_state = Arc::new(f);
        self
    }
}

/// A running source. Dropping it stops the decode thread and waits for it (promptly:
/// blocking network reads are interrupted).
pub struct Source {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    status: StatusCell,
    display: Arc<DisplayBuffer>,
}

impl Source {
    /// The current status, with the frame rate measured from the display buffer.
    pub fn status(&self) -> SourceStatus {
        StatusReader {
            cell: self.status.clone(),
            display: Arc::clone(&self.display),
        }
        .get()
    }

    /// A cloneable reader of the status that outlives borrows of the `Source` (for the HTTP
    /// state).
    pub fn status_reader(&self) -> StatusReader {
        StatusReader {
            cell: self.status.clone(),
            display: Arc::clone(&self.display),
        }
    }

    /// Whether the decode thread has ended (ended or failed state, or stopped).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the decode thread and waits for it. Idempotent.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            if thread.join().is_err() {
                tracing::error!("the decode thread panicked");
            }
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("status", &self.status.get())
            .finish()
    }
}

/// Reads a source's status from anywhere.
#[derive(Clone)]
pub struct StatusReader {
    pub(crate) cell: StatusCell,
    pub(crate) display: Arc<DisplayBuffer>,
}

impl StatusReader {
    pub fn get(&self) -> SourceStatus {
        let mut s = self.cell.get();
        s.measured_fps = self.display.fps();
        s
    }
}
