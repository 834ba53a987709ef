//! One running stream: source → frame stores → commentator → sync delay → events, and the
//! [`StreamHandle`] every output is built from.
//!
//! The stream owns its wiring and its one status ([`StreamStatus`]): what `/api/status`,
//! `/metrics` and the page show is read from here and nowhere else. It knows no output:
//! outputs (MJPEG, SSE, WebSocket, speech, alerts, history; WebRTC next) are plug-ins
//! built from the handle (`crate::output`), counted by the names they give, and keep
//! whatever state they need on the stream through [`StreamHandle::extension`].

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kibitz_commentator::{Commentator, Control, Event, FrameWindow, Snapshot, WatchedWindow};
use kibitz_engine::Session;
use kibitz_frames::{DisplayBuffer, DisplayFrame, InferenceWindow};
use kibitz_media::{FrameSink, SourceContext, SourceState};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::counts::OutputCounts;
use crate::extensions::Extensions;
use crate::playout::frame_period;
use crate::sources::{RunningSource, SourcePlan, Sources};
use crate::spec::{StreamDefaults, StreamSpec};
use crate::speech::Speech;
use crate::status::{BufferStatus, Origin, SourceView, StreamStatus, StreamSummary};
use crate::{StreamError, StreamId};

/// Comments kept as context for questions.
const RECENT_KEPT: usize = 8;

/// Events a slow subscriber may fall behind by before it loses the oldest.
const EVENT_BUFFER: usize = 1024;

/// What a stream needs from the server around it to start.
#[derive(Clone)]
pub struct StartContext {
    pub defaults: Arc<StreamDefaults>,
    pub sources: Arc<dyn Sources>,
    pub scheduler: kibitz_engine::Scheduler,
    /// Every stream's events, tagged with the stream (`/api/events`).
    pub bus: broadcast::Sender<crate::StreamEvent>,
    pub voices: Arc<crate::Voices>,
    /// The history every event that leaves an entry is written to before it is shown.
    pub(crate) journal: crate::history::Journal,
}

/// A running stream. Dropping it without [`Stream::stop`] still stops the commentary
/// (its token is cancelled), but only `stop` waits for the decoder.
pub struct Stream {
    handle: StreamHandle,
    tasks: Vec<JoinHandle<()>>,
}

/// A cheap, cloneable view of a running stream: what outputs and handlers hold.
#[derive(Clone)]
pub struct StreamHandle {
    shared: Arc<Shared>,
}

struct Shared {
    id: StreamId,
    origin: Origin,
    spec: Mutex<StreamSpec>,
    defaults: Arc<StreamDefaults>,
    display: Arc<DisplayBuffer>,
    window: Arc<InferenceWindow>,
    source: Mutex<Option<Box<dyn RunningSource>>>,
    /// What the stream's parts say (commentary loop, source, outputs), in order; only the
    /// relay reads it ([`relay_events`]).
    said: broadcast::Sender<Event>,
    /// What viewers and outputs read: `said`, each event after its history row.
    events: broadcast::Sender<Event>,
    controls: mpsc::Sender<Control>,
    snapshot: watch::Receiver<Snapshot>,
    /// Outputs running, by name.
    counts: OutputCounts,
    /// The voice and its clips: what the speech outputs share.
    speech: Speech,
    /// The stream's place on the engine; the commentary loop holds a clone, questions use
    /// this one.
    session: Session,
    /// What outputs keep on the stream, by type.
    extensions: Extensions,
    /// The last few comments, oldest first: context for questions.
    recent: Mutex<std::collections::VecDeque<String>>,
    stopped: CancellationToken,
    started: Instant,
}

impl Stream {
    /// Starts the source (off the runtime: a file is probed before this returns, so a
    /// missing file is this call's error), then the commentary loop on its own engine
    /// session, then the task that tags its events onto the bus.
    pub async fn start(
        spec: StreamSpec,
        origin: Origin,
        plan: SourcePlan,
        cx: &StartContext,
    ) -> Result<Stream, StreamError> {
        let defaults = cx.defaults.clone();
        let window_size = defaults.window_size;
        let display = Arc::new(DisplayBuffer::new(defaults.display_span));
        let window = Arc::new(InferenceWindow::new(window_size));
        let (events, _) = broadcast::channel::<Event>(EVENT_BUFFER);
        let (said, said_rx) = broadcast::channel::<Event>(EVENT_BUFFER);
        let session: Session = cx.scheduler.open_session(spec.id.as_str());
        let watched = Arc::new(WatchedWindow::new(window.clone()));
        let source_cx = source_context(&spec, &display, &window, &said, &session, &watched);
        let sources = cx.sources.clone();
        let started = tokio::task::spawn_blocking(move || plan.start(sources.as_ref(), source_cx))
            .await
            .map_err(|e| StreamError::Internal(format!("the source start panicked: {e}")))
            .and_then(|started| started.map_err(|e| StreamError::Open(e.to_string())));
        let source = match started {
            Ok(source) => source,
            Err(e) => {
                session.close();
                return Err(e);
            }
        };

        let (voice, voice_name) = build_voice(&cx.voices, &spec).await;
        let commentator = Commentator::new(spec.commentator(&defaults), now())
            .map_err(|e| StreamError::Internal(e.to_string()))?;
        let (snapshot_tx, snapshot) = watch::channel(commentator.snapshot());
        let (controls, controls_rx) = mpsc::channel(16);
        let stopped = CancellationToken::new();
        let commentary = tokio::spawn(kibitz_commentator::run(
            commentator,
            watched as Arc<dyn FrameWindow>,
            session.clone(),
            said.clone(),
            controls_rx,
            snapshot_tx,
            stopped.clone(),
        ));
        let handle = StreamHandle {
            shared: Arc::new(Shared {
                id: spec.id.clone(),
                origin,
                spec: Mutex::new(spec),
                defaults,
                display,
                window,
                source: Mutex::new(Some(source)),
                said,
                events,
                controls,
                snapshot,
                counts: OutputCounts::default(),
                speech: Speech::new(voice, voice_name),
                session,
                extensions: Extensions::default(),
                recent: Mutex::default(),
                stopped,
                started: Instant::now(),
            }),
        };
        let forward = tokio::spawn(relay_events(
            handle.clone(),
            said_rx,
            cx.journal.clone(),
            cx.bus.clone(),
        ));
        Ok(Stream {
            handle,
            tasks: vec![commentary, forward],
        })
    }

    pub fn handle(&self) -> &StreamHandle {
        &self.handle
    }

    /// Keeps a task that runs on this stream (an output it runs itself) so that
    /// [`Stream::stop`] waits for it; it must end when the stream's token is cancelled.
    pub(crate) fn keep(&mut self, task: JoinHandle<()>) {
        self.tasks.push(task);
    }

    /// Ends the commentary (cancelling a request in flight), every attached output, and
    /// the decoder, and frees the buffers even while someone still holds a handle.
    pub async fn stop(mut self) {
        let shared = &self.handle.shared;
        shared.stopped.cancel();
        // Withdraws waiting questions and cancels whatever this stream has running.
        shared.session.close();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        let source = shared
            .source
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // Joining the decode thread blocks; a stuck network read is interrupted by it.
        let _ = tokio::task::spawn_blocking(move || drop(source)).await;
        shared.display.clear();
        shared.window.clear();
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.handle.shared.stopped.cancel();
    }
}

/// A handle that does not keep the stream alive: what a leak check holds (every handle,
/// task and output of a removed stream must let go of it).
#[derive(Clone)]
pub struct WeakStreamHandle(std::sync::Weak<Shared>);

impl WeakStreamHandle {
    /// The stream, while anything still holds it.
    pub fn upgrade(&self) -> Option<StreamHandle> {
        self.0.upgrade().map(|shared| StreamHandle { shared })
    }
}

impl StreamHandle {
    pub fn downgrade(&self) -> WeakStreamHandle {
        WeakStreamHandle(Arc::downgrade(&self.shared))
    }

    pub fn id(&self) -> &StreamId {
        &self.shared.id
    }

    pub fn origin(&self) -> Origin {
        self.shared.origin
    }

    pub fn spec(&self) -> StreamSpec {
        lock(&self.shared.spec).clone()
    }

    /// The stream's events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    /// Cancelled when the stream stops.
    pub fn stopped(&self) -> CancellationToken {
        self.shared.stopped.clone()
    }

    pub(crate) fn session(&self) -> &Session {
        &self.shared.session
    }

    pub(crate) fn defaults(&self) -> &StreamDefaults {
        &self.shared.defaults
    }

    /// `n` frames of the inference window, every `stride`-th, oldest first.
    pub(crate) fn sample_frames(
        &self,
        n: usize,
        stride: usize,
    ) -> Vec<(kibitz_frames::Stamp, kibitz_frames::Rgb)> {
        self.shared.window.sample(n, stride)
    }

    /// Up to `n` of the latest comments, oldest first.
    pub(crate) fn recent_comments(&self, n: usize) -> Vec<String> {
        let recent = lock(&self.shared.recent);
        recent
            .iter()
            .skip(recent.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// The stream's one `T`, kept for outputs (alert rules, …), made with `T::default()`
    /// the first time any output asks.
    pub fn extension<T: Default + Send + Sync + 'static>(&self) -> Arc<T> {
        self.shared.extensions.get()
    }

    pub(crate) fn counts(&self) -> &OutputCounts {
        &self.shared.counts
    }

    /// The display buffer's frame that was newest at `t`.
    pub(crate) fn frame_at(&self, t: Instant) -> Option<DisplayFrame> {
        self.shared.display.at(t)
    }

    /// The display buffer's frames captured at or after `t`, oldest first.
    pub(crate) fn frames_since(&self, t: Instant) -> Vec<DisplayFrame> {
        let mut frames = self.shared.display.since(None);
        frames.retain(|f| f.stamp.captured >= t);
        frames
    }

    /// The display buffer's frames newer than `seq`.
    pub(crate) fn frames_after(&self, seq: Option<u64>) -> Vec<DisplayFrame> {
        self.shared.display.since(seq)
    }

    pub(crate) fn speech(&self) -> &Speech {
        &self.shared.speech
    }

    /// Pages with sound on and readers of the speech stream.
    pub fn listeners(&self) -> u64 {
        crate::speech::LISTENING
            .iter()
            .map(|name| self.shared.counts.running(name))
            .sum()
    }

    /// A spoken comment's audio, while it is among the last few.
    pub fn speech_clip(&self, n: u64) -> Option<Arc<kibitz_voice::Pcm>> {
        self.shared.speech.clip(n)
    }

    /// The continuous stream's Opus frames from now on, and the encoder's pre-skip for the
    /// Ogg header.
    pub fn speech_frames(&self) -> (broadcast::Receiver<kibitz_voice::OpusFrame>, u16) {
        let speech = &self.shared.speech;
        (speech.subscribe(), speech.pre_skip())
    }

    /// Tells the commentary loop something (outputs such as speech pace it).
    pub(crate) fn control(&self, control: Control) -> Result<(), StreamError> {
        self.shared.controls.try_send(control).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => StreamError::Busy("the loop is behind".into()),
            mpsc::error::TrySendError::Closed(_) => StreamError::Stopped,
        })
    }

    /// Publishes an event of the stream's own (speech, an output's error).
    pub(crate) fn emit(&self, event: Event) {
        let _ = self.shared.said.send(event);
    }

    /// Changes the voice of a running stream.
    pub(crate) async fn set_voice(&self, voices: &Arc<crate::Voices>, spec: &StreamSpec) {
        let (voice, name) = build_voice(voices, spec).await;
        self.shared.speech.set_voice(voice, name);
    }

    /// The sink of a pushed source (`"source": "push"`), for the one publisher that feeds
    /// the stream now: `Busy` while another holds it, `Invalid` for a stream whose source
    /// feeds itself. Dropping the sink ends the source until the next publisher.
    pub fn publish(&self) -> Result<FrameSink, StreamError> {
        let source = lock(&self.shared.source);
        let published = source
            .as_ref()
            .ok_or(StreamError::Stopped)?
            .publish()
            .ok_or_else(|| {
                StreamError::Invalid(crate::Problems(vec![crate::FieldError {
                    field: "source",
                    message: format!(
                        "stream '{}' reads its own source; only a \"push\" source takes frames",
                        self.shared.id
                    ),
                }]))
            })?;
        published.map_err(|e| match e {
            kibitz_media::Error::Busy => StreamError::Busy(e.to_string()),
            kibitz_media::Error::Closed => StreamError::Stopped,
            e => StreamError::Internal(e.to_string()),
        })
    }

    /// The newest picture (real time, not delayed).
    pub fn latest_frame(&self) -> Option<DisplayFrame> {
        self.shared.display.latest()
    }

    /// How late the picture is shown so it matches the words; never negative.
    pub fn target_delay(&self) -> Duration {
        let delay = self.shared.snapshot.borrow().target_delay;
        if delay.is_finite() && delay > 0.0 {
            Duration::from_secs_f64(delay)
        } else {
            Duration::ZERO
        }
    }

    /// The source's frame period, or `MJPEG_FPS`'s while it is unknown.
    pub fn frame_period(&self) -> Duration {
        frame_period(self.shared.display.fps(), self.shared.defaults.mjpeg_fps)
    }

    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.is_cancelled()
    }

    /// Applies a checked new spec: the live settings go to the commentary loop, all or
    /// nothing. The spec comes from [`StreamSpec::patch`], which did the checking.
    pub(crate) fn apply(&self, next: StreamSpec) -> Result<(), StreamError> {
        let current = self.spec();
        let mut controls = Vec::with_capacity(3);
        if next.profile != current.profile {
            controls.push(Control::SetProfile(next.profile.clone()));
        }
        if next.instruction != current.instruction {
            controls.push(Control::SetInstruction(next.instruction.clone()));
        }
        if next.inference_interval != current.inference_interval {
            controls.push(Control::SetInterval(next.inference_interval));
        }
        if !controls.is_empty() {
            let permits = self
                .shared
                .controls
                .try_reserve_many(controls.len())
                .map_err(|e| match e {
                    mpsc::error::TrySendError::Full(()) => StreamError::Busy(
                        "the commentary loop has not taken the last change yet; try again".into(),
                    ),
                    mpsc::error::TrySendError::Closed(()) => StreamError::Stopped,
                })?;
            for (permit, control) in permits.zip(controls) {
                permit.send(control);
            }
        }
        *lock(&self.shared.spec) = next;
        Ok(())
    }

    /// The one status of this stream.
    pub fn status(&self) -> StreamStatus {
        let shared = &self.shared;
        let spec = self.spec();
        let source = lock(&shared.source)
            .as_ref()
            .map(|s| s.status())
            .map(SourceView::from)
            .unwrap_or_else(|| SourceView::stopped(spec.source_shown()));
        let outputs = shared.counts.all();
        let listeners = crate::speech::listeners(&outputs);
        // Read once, before the struct: a `borrow()` inside the literal would hold the watch's
        // read lock to the end of the statement, and `target_delay` reading it again behind
        // a waiting writer (the commentary loop) deadlocks.
        let commentary = shared.snapshot.borrow().clone();
        let target_delay = self.target_delay().as_secs_f64();
        StreamStatus {
            id: shared.id.clone(),
            origin: shared.origin,
            source,
            buffers: BufferStatus {
                display_frames: shared.display.len(),
                display_seconds: shared.display.duration().as_secs_f64(),
                display_bytes: shared.display.bytes(),
                window_frames: shared.window.len(),
                window_capacity: shared.window.capacity(),
            },
            commentary,
            target_delay,
            outputs,
            speech: shared.speech.status(listeners),
            settings: spec.settings_shown(),
            uptime_s: shared.started.elapsed().as_secs_f64(),
        }
    }

    /// The short form `GET /api/streams` lists.
    pub fn summary(&self) -> StreamSummary {
        StreamSummary::from(&self.status())
    }
}

impl StreamSpec {
    /// The settings as status shows them: the source without credentials.
    fn settings_shown(&self) -> crate::StreamSettings {
        crate::StreamSettings {
            source: Some(self.source_shown()),
            ..self.settings()
        }
    }
}

/// The stream's voice, or none with the reason in its name (a broken voice leaves the
/// stream silent, never stopped).
async fn build_voice(
    voices: &Arc<crate::Voices>,
    spec: &StreamSpec,
) -> (Option<Arc<dyn kibitz_voice::Voice>>, String) {
    let voices = voices.clone();
    let (name, language) = (spec.voice.clone(), spec.language.clone());
    let built = tokio::task::spawn_blocking({
        let name = name.clone();
        move || voices.get(&name, &language)
    })
    .await
    .unwrap_or_else(|e| Err(format!("building the voice panicked: {e}")));
    match built {
        Ok(Some(voice)) => (Some(voice), name),
        Ok(None) => (None, "off".into()),
        Err(e) => (None, format!("off ({name}: {e})")),
    }
}

/// Where the source's frames go and whom it tells: its state changes become the stream's
/// `source` events, and every frame of the sampled set (every stride-th capture, the phase
/// the commentary samples on) goes to the engine session as soon as it is captured, so the
/// engine can prepare it before the cycle that uses it (the llama engine encodes it into the
/// stream's sequence; other engines ignore it), and wakes the commentary loop, so a cycle
/// starts on the captured frame itself.
fn source_context(
    spec: &StreamSpec,
    display: &Arc<DisplayBuffer>,
    window: &Arc<InferenceWindow>,
    events: &broadcast::Sender<Event>,
    session: &Session,
    watched: &Arc<WatchedWindow>,
) -> SourceContext {
    let source_events = events.clone();
    let (session, watched) = (session.clone(), watched.clone());
    SourceContext::new(display.clone(), window.clone())
        .on_state(move |state: &SourceState| {
            let _ = source_events.send(Event::Source {
                state: state.name().into(),
                detail: state.detail(),
            });
        })
        .on_sampled(spec.frame_stride, move |seq, stamp, rgb| {
            session.push_frame(kibitz_engine::Frame {
                image: kibitz_engine::Image::Rgb(rgb.clone()),
                pts: stamp.pts,
            });
            watched.captured(seq);
        })
}

/// Passes what the stream says on to its viewers, each event that leaves a history entry
/// only once that entry is committed (see [`crate::history`]), and tags every event onto
/// the bus, until the stream stops.
async fn relay_events(
    handle: StreamHandle,
    mut events: broadcast::Receiver<Event>,
    journal: crate::history::Journal,
    bus: broadcast::Sender<crate::StreamEvent>,
) {
    let stopped = handle.shared.stopped.clone();
    loop {
        let event = tokio::select! {
            _ = stopped.cancelled() => return,
            event = events.recv() => event,
        };
        match event {
            Ok(event) => {
                crate::history::write_ahead(&journal, &handle, &event).await;
                let _ = handle.shared.events.send(event.clone());
                if let Event::CycleEnd(end) = &event {
                    if !end.skipped {
                        let mut recent = lock(&handle.shared.recent);
                        if recent.len() == RECENT_KEPT {
                            recent.pop_front();
                        }
                        recent.push_back(end.text.clone());
                    }
                }
                let _ = bus.send(crate::StreamEvent::commentary(handle.id().clone(), event));
            }
            // Only if the history's disk stalls for long: viewers miss what the relay
            // missed, and the `cycle_end` that follows heals the page.
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(stream = %handle.id(), missed, "events relay fell behind");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Tokio's clock, so tests with paused time drive the loop.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
