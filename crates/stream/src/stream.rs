//! One running stream: source → frame stores → commentator → sync delay → events, and the
//! [`StreamHandle`] every output attaches to.
//!
//! The stream owns its wiring and its one status ([`StreamStatus`]): what `/api/status`,
//! `/metrics` and the page show is read from here and nowhere else. Outputs (MJPEG, SSE,
//! WebSocket today; speech and WebRTC next) all attach the same way, through
//! [`StreamHandle::attach`], and get the same [`Attachment`]: the stream's events, a
//! [`Playout`] cursor over its delayed picture, and the token that ends them when the
//! stream is removed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kibitz_commentator::{Commentator, Control, Event, FrameWindow, Snapshot, WatchedWindow};
use kibitz_engine::Session;
use kibitz_frames::{DisplayBuffer, DisplayFrame, InferenceWindow};
use kibitz_media::{FrameSink, SourceContext, SourceState};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::playout::{frame_period, Playout};
use crate::sources::{RunningSource, SourcePlan, Sources};
use crate::spec::{StreamDefaults, StreamSpec};
use crate::speech::Speech;
use crate::status::{BufferStatus, SourceView, StreamStatus, StreamSummary, ViewerCounts};
use crate::{StreamError, StreamId};

/// Comments kept as context for questions.
const RECENT_KEPT: usize = 8;

/// Events a slow subscriber may fall behind by before it loses the oldest.
const EVENT_BUFFER: usize = 1024;

/// Where a stream came from: the command line (trusted, not kept in the state file) or
/// the API (its source checked by the policy, kept in the state file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Cli,
    Api,
}

/// The kinds of output that attach to a stream; each is counted in status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    Mjpeg,
    Sse,
    Ws,
    /// A reader of the continuous speech stream (Ogg/Opus).
    Speech,
    /// A page with its sound on (it plays the speech clips itself).
    Listener,
}

/// How many kinds of output there are (the size of the counters).
const OUTPUT_KINDS: usize = 5;

/// What a stream needs from the server around it to start.
#[derive(Clone)]
pub struct StartContext {
    pub defaults: Arc<StreamDefaults>,
    pub sources: Arc<dyn Sources>,
    pub scheduler: kibitz_engine::Scheduler,
    /// Every stream's events, tagged with the stream (`/api/events`).
    pub bus: broadcast::Sender<crate::StreamEvent>,
    pub voices: Arc<crate::Voices>,
    /// Fired alerts of every stream.
    pub alerts: Arc<crate::AlertLog>,
    /// The webhook, when there is one.
    pub alert_sink: Option<Arc<dyn crate::AlertSink>>,
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
    events: broadcast::Sender<Event>,
    controls: mpsc::Sender<Control>,
    snapshot: watch::Receiver<Snapshot>,
    viewers: [AtomicU64; OUTPUT_KINDS],
    speech: Speech,
    /// The stream's place on the engine; the commentary loop holds a clone, questions use
    /// this one.
    session: Session,
    rules: crate::alerts::Rules,
    /// The last few comments, oldest first: context for questions.
    recent: Mutex<std::collections::VecDeque<String>>,
    frames_sent: AtomicU64,
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
        let session: Session = cx.scheduler.open_session(spec.id.as_str());
        let watched = Arc::new(WatchedWindow::new(window.clone()));
        let source_cx = source_context(&spec, &display, &window, &events, &session, &watched);
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
        let alerts = spec.alerts.clone();
        let commentator = Commentator::new(spec.commentator(&defaults), now())
            .map_err(|e| StreamError::Internal(e.to_string()))?;
        let (snapshot_tx, snapshot) = watch::channel(commentator.snapshot());
        let (controls, controls_rx) = mpsc::channel(16);
        let stopped = CancellationToken::new();
        let commentary = tokio::spawn(kibitz_commentator::run(
            commentator,
            watched as Arc<dyn FrameWindow>,
            session.clone(),
            events.clone(),
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
                events,
                controls,
                snapshot,
                viewers: Default::default(),
                speech: Speech::new(voice, voice_name),
                session,
                recent: Mutex::default(),
                rules: crate::alerts::Rules::default(),
                frames_sent: AtomicU64::new(0),
                stopped,
                started: Instant::now(),
            }),
        };
        let forward = tokio::spawn(forward_events(handle.clone(), cx.bus.clone()));
        let speaker = tokio::spawn(crate::speech::speak_comments(handle.clone()));
        let encoder = tokio::spawn(crate::speech::encode_stream(handle.clone()));
        for rule in &alerts {
            handle.add_alert_rule(&crate::RuleSettings {
                rule: rule.clone(),
                cooldown: None,
            })?;
        }
        let watcher = tokio::spawn(crate::alerts::watch(
            handle.clone(),
            cx.alerts.clone(),
            cx.alert_sink.clone(),
        ));
        Ok(Stream {
            handle,
            tasks: vec![commentary, forward, speaker, encoder, watcher],
        })
    }

    pub fn handle(&self) -> &StreamHandle {
        &self.handle
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

/// Counts an attached output while it lives.
struct Attached {
    shared: Arc<Shared>,
    kind: OutputKind,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.shared.viewers[self.kind as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

/// What every output gets when it attaches to a stream.
pub struct Attachment {
    pub handle: StreamHandle,
    /// The stream's events from the moment of attaching.
    pub events: broadcast::Receiver<Event>,
    /// A cursor over the delayed picture; see [`Attachment::show`].
    pub playout: Playout,
    /// Cancelled when the stream is removed or the server stops.
    pub stopped: CancellationToken,
    _counted: Attached,
}

impl Attachment {
    /// The frame to show at `now`, if a new one is due (see [`Playout::poll`]); when to ask
    /// again is [`Playout::wake_at`].
    pub fn show(&mut self, now: Instant) -> Option<DisplayFrame> {
        let shared = &self.handle.shared;
        let frame = self.playout.poll(
            now,
            self.handle.target_delay(),
            self.handle.frame_period(),
            |t| shared.display.at(t),
        );
        if frame.is_some() {
            shared.frames_sent.fetch_add(1, Ordering::Relaxed);
        }
        frame
    }
}

impl StreamHandle {
    pub fn id(&self) -> &StreamId {
        &self.shared.id
    }

    pub fn origin(&self) -> Origin {
        self.shared.origin
    }

    pub fn spec(&self) -> StreamSpec {
        lock(&self.shared.spec).clone()
    }

    /// Attaches an output: counted in status until the [`Attachment`] drops.
    pub fn attach(&self, kind: OutputKind, now: Instant) -> Attachment {
        self.shared.viewers[kind as usize].fetch_add(1, Ordering::Relaxed);
        Attachment {
            handle: self.clone(),
            events: self.shared.events.subscribe(),
            playout: Playout::new(now),
            stopped: self.shared.stopped.clone(),
            _counted: Attached {
                shared: self.shared.clone(),
                kind,
            },
        }
    }

    /// How many outputs of `kind` are attached now.
    pub fn viewers(&self, kind: OutputKind) -> u64 {
        self.shared.viewers[kind as usize].load(Ordering::Relaxed)
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

    pub(crate) fn rules(&self) -> &crate::alerts::Rules {
        &self.shared.rules
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

    /// Tells the commentary loop something (outputs such as speech pace it).
    pub(crate) fn control(&self, control: Control) -> Result<(), StreamError> {
        self.shared.controls.try_send(control).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => StreamError::Busy("the loop is behind".into()),
            mpsc::error::TrySendError::Closed(_) => StreamError::Stopped,
        })
    }

    /// Publishes an event of the stream's own (speech, an output's error).
    pub(crate) fn emit(&self, event: Event) {
        let _ = self.shared.events.send(event);
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
        let viewers = |kind: OutputKind| shared.viewers[kind as usize].load(Ordering::Relaxed);
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
            commentary: shared.snapshot.borrow().clone(),
            target_delay: self.target_delay().as_secs_f64(),
            viewers: ViewerCounts {
                mjpeg: viewers(OutputKind::Mjpeg),
                sse: viewers(OutputKind::Sse),
                ws: viewers(OutputKind::Ws),
                speech: viewers(OutputKind::Speech),
                mjpeg_frames_sent: shared.frames_sent.load(Ordering::Relaxed),
            },
            speech: shared.speech.status(self.listeners()),
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

/// Tags the stream's events onto the bus until the stream stops.
async fn forward_events(handle: StreamHandle, bus: broadcast::Sender<crate::StreamEvent>) {
    let mut events = handle.shared.events.subscribe();
    let stopped = handle.shared.stopped.clone();
    loop {
        let event = tokio::select! {
            _ = stopped.cancelled() => return,
            event = events.recv() => event,
        };
        match event {
            Ok(event) => {
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
            // The bus's own subscribers see a `lagged` notice for what they miss; this
            // hop only forwards.
            Err(broadcast::error::RecvError::Lagged(_)) => {}
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
