//! The running streams: started from the command line at boot, added, changed and removed
//! through the API while the server runs, and kept in a state file so API streams survive
//! a restart. Pushed streams (`"source": "push"`, fed by a publisher in this process) are
//! the exception: they are never kept, since they end with their publisher.
//!
//! One owner: every change goes through [`Streams`], one at a time (a tokio mutex), so the
//! id check, the stream limit, the start and the state file never race. Readers
//! ([`Streams::get`], [`Streams::list`]) take a short lock and clone handles.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use kibitz_media::{FrameSink, SinkConfig, SourceConfig, SourcePolicy, SourceSpec, PUSHED};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::alerts::AlertLog;
use crate::events::{StreamEvent, StreamEventKind};
use crate::output::StreamOutput;
use crate::sources::{SourcePlan, Sources};
use crate::spec::{Problems, StreamDefaults, StreamSettings, StreamSpec};
use crate::status::Origin;
use crate::stream::{StartContext, Stream, StreamHandle};
use crate::{StreamError, StreamId};

/// Tagged events the bus keeps for slow readers of `/api/events`.
const BUS_BUFFER: usize = 4096;

/// Everything the registry needs, given once at start.
pub struct RegistryConfig {
    pub defaults: StreamDefaults,
    pub sources: Arc<dyn Sources>,
    pub scheduler: kibitz_engine::Scheduler,
    /// What API-added sources may open.
    pub policy: SourcePolicy,
    /// `--max-streams`.
    pub max_streams: usize,
    /// Where API streams and changes are kept; `None` keeps nothing.
    pub state_file: Option<PathBuf>,
    pub voices: Arc<crate::Voices>,
    /// The webhook for alerts, when there is one.
    pub alert_sink: Option<Arc<dyn crate::AlertSink>>,
}

/// The set of running streams. Cheap to clone.
#[derive(Clone)]
pub struct Streams {
    inner: Arc<Inner>,
}

struct Inner {
    cx: StartContext,
    policy: SourcePolicy,
    max_streams: usize,
    state_file: Option<PathBuf>,
    /// In the order they started: the first one still running is the default stream of
    /// the single-stream routes.
    running: RwLock<Vec<Stream>>,
    /// The outputs every stream runs itself, built-in and added.
    outputs: RwLock<Vec<StreamOutput>>,
    /// Fired alerts of every stream.
    alerts: Arc<AlertLog>,
    /// Live-setting changes made through the API to command-line streams.
    cli_changes: Mutex<BTreeMap<StreamId, StreamSettings>>,
    /// One change at a time.
    changing: tokio::sync::Mutex<()>,
}

/// The state file: what the API added or changed.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    /// Streams added through the API, complete.
    streams: Vec<StreamSettings>,
    /// Live settings changed through the API on command-line streams, by id.
    changes: BTreeMap<String, StreamSettings>,
}

impl Streams {
    pub fn new(config: RegistryConfig) -> Streams {
        let (bus, _) = broadcast::channel(BUS_BUFFER);
        let alerts = Arc::new(AlertLog::default());
        let outputs = crate::outputs::built_in(alerts.clone(), config.alert_sink);
        Streams {
            inner: Arc::new(Inner {
                cx: StartContext {
                    defaults: Arc::new(config.defaults),
                    sources: config.sources,
                    scheduler: config.scheduler,
                    bus,
                    voices: config.voices,
                    journal: crate::history::Journal::default(),
                },
                outputs: RwLock::new(outputs),
                alerts,
                policy: config.policy,
                max_streams: config.max_streams,
                state_file: config.state_file,
                running: RwLock::new(Vec::new()),
                cli_changes: Mutex::default(),
                changing: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub fn defaults(&self) -> &StreamDefaults {
        &self.inner.cx.defaults
    }

    pub fn scheduler(&self) -> &kibitz_engine::Scheduler {
        &self.inner.cx.scheduler
    }

    /// The voices a stream may be given through the API, `off` first.
    pub fn voices_offered(&self) -> Vec<String> {
        let mut offered = vec!["off".to_string(), "espeak".to_string()];
        let default = self.inner.cx.voices.default_spec().to_string();
        if !offered.contains(&default) {
            offered.push(default);
        }
        offered
    }

    /// Fired alerts of every stream (the last few, with their clips).
    pub fn alerts(&self) -> &AlertLog {
        &self.inner.alerts
    }

    /// Records every stream's comments, answers and alerts in `history`, each committed
    /// before viewers see it (see [`crate::history`]): streams running now and later.
    pub fn record_history(&self, history: kibitz_history::History) {
        *self
            .inner
            .cx
            .journal
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(history);
    }

    /// Registers an output every stream runs itself (history, a test's counting output):
    /// it starts on every running stream now and on every stream started later.
    pub fn add_output(&self, output: StreamOutput) {
        let mut outputs = self
            .inner
            .outputs
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for stream in self.write().iter_mut() {
            let task = output.start(stream.handle());
            stream.keep(task);
        }
        outputs.push(output);
    }

    pub fn max_streams(&self) -> usize {
        self.inner.max_streams
    }

    /// Every stream's events from now on, tagged.
    pub fn subscribe(&self) -> broadcast::Receiver<StreamEvent> {
        self.inner.cx.bus.subscribe()
    }

    pub fn get(&self, id: &str) -> Option<StreamHandle> {
        self.read()
            .iter()
            .find(|s| s.handle().id().as_str() == id)
            .map(|s| s.handle().clone())
    }

    /// The earliest-started stream still running.
    pub fn first(&self) -> Option<StreamHandle> {
        self.read().first().map(|s| s.handle().clone())
    }

    pub fn list(&self) -> Vec<StreamHandle> {
        self.read().iter().map(|s| s.handle().clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts a stream from the command line or the streams file: trusted, so its source
    /// is opened as given, and it is not written to the state file.
    pub async fn start_trusted(&self, spec: StreamSpec) -> Result<StreamHandle, StreamError> {
        let _changing = self.inner.changing.lock().await;
        if self.get(spec.id.as_str()).is_some() {
            return Err(StreamError::Taken(spec.id));
        }
        let source = SourceSpec::parse(&spec.source)
            .map_err(|e| StreamError::Invalid(problem("source", e.to_string())))?;
        let config = self.source_config(source, &spec);
        self.launch(spec, Origin::Cli, SourcePlan::Open(config))
            .await
    }

    /// Starts a stream asked for through the API: its settings are checked, its source
    /// must pass the policy, and it is kept in the state file. A `"source": "push"` stream
    /// opens nothing: it waits for a publisher in this process (see
    /// [`StreamHandle::publish`]) and is not kept.
    pub async fn add(&self, settings: StreamSettings) -> Result<StreamHandle, StreamError> {
        let _changing = self.inner.changing.lock().await;
        let spec = self.admit(&settings)?;
        let plan = if is_pushed(&spec) {
            SourcePlan::Pushed(self.sink_config(&spec))
        } else {
            // The check resolves host names, which blocks.
            let policy = self.inner.policy.clone();
            let source = spec.source.clone();
            let allowed = tokio::task::spawn_blocking(move || policy.check(&source))
                .await
                .map_err(|e| StreamError::Internal(format!("the source check panicked: {e}")))?
                .map_err(|e| StreamError::Refused(e.to_string()))?;
            let mut config = self.source_config(allowed.spec, &spec);
            config.restrictions = allowed.restrictions;
            SourcePlan::Open(config)
        };
        let pushed = matches!(plan, SourcePlan::Pushed(_));
        let handle = self.launch(spec, Origin::Api, plan).await?;
        if !pushed {
            self.save().await;
        }
        Ok(handle)
    }

    /// Starts a pushed stream and hands its sink to the caller, the stream's first
    /// publisher (a WebRTC ingest creating the stream it feeds). `settings.source` may be
    /// left out; anything but `push` is refused. Dropping the sink ends the source; a later
    /// publisher takes it again with [`StreamHandle::publish`]; `remove` ends the stream.
    pub async fn add_pushed(
        &self,
        settings: StreamSettings,
    ) -> Result<(StreamHandle, FrameSink), StreamError> {
        let source = settings.source.as_deref().map(str::trim);
        if source.is_some_and(|s| s != PUSHED) {
            return Err(StreamError::Invalid(problem(
                "source",
                format!("a pushed stream's source is \"{PUSHED}\""),
            )));
        }
        let settings = StreamSettings {
            source: Some(PUSHED.to_string()),
            ..settings
        };
        let handle = self.add(settings).await?;
        let sink = handle.publish()?;
        Ok((handle, sink))
    }

    /// The checks every API stream passes before its source is looked at: the settings,
    /// a free id, an offered voice, room under `--max-streams`.
    fn admit(&self, settings: &StreamSettings) -> Result<StreamSpec, StreamError> {
        let id = match settings.id {
            Some(_) => None,
            None => Some(self.free_id()),
        };
        let spec =
            StreamSpec::resolve(settings, id, self.defaults()).map_err(StreamError::Invalid)?;
        if self.get(spec.id.as_str()).is_some() {
            return Err(StreamError::Taken(spec.id));
        }
        self.check_voice(&settings.voice)?;
        if self.len() >= self.inner.max_streams {
            return Err(StreamError::Full(self.inner.max_streams));
        }
        Ok(spec)
    }

    /// Changes a running stream's live settings (see [`StreamSpec::patch`]).
    pub async fn update(
        &self,
        id: &str,
        change: StreamSettings,
    ) -> Result<StreamHandle, StreamError> {
        let _changing = self.inner.changing.lock().await;
        let handle = self
            .get(id)
            .ok_or_else(|| StreamError::NotFound(id.to_string()))?;
        let before = handle.spec();
        let next = before
            .patch(&change, self.defaults())
            .map_err(StreamError::Invalid)?;
        self.check_voice(&change.voice)?;
        handle.apply(next.clone())?;
        if next.voice != before.voice {
            handle.set_voice(&self.inner.cx.voices, &next).await;
        }
        if handle.origin() == Origin::Cli {
            let live = StreamSettings {
                profile: Some(next.profile),
                instruction: Some(next.instruction),
                inference_interval: Some(next.inference_interval),
                voice: Some(next.voice),
                ..StreamSettings::default()
            };
            lock(&self.inner.cli_changes).insert(handle.id().clone(), live);
        }
        self.save().await;
        self.announce(handle.id(), StreamEventKind::Changed(handle.summary()));
        Ok(handle)
    }

    /// Stops a stream (decoder, commentary, a request in flight, every attached output)
    /// and frees its buffers.
    pub async fn remove(&self, id: &str) -> Result<(), StreamError> {
        let _changing = self.inner.changing.lock().await;
        let stream = {
            let mut running = self.write();
            let at = running
                .iter()
                .position(|s| s.handle().id().as_str() == id)
                .ok_or_else(|| StreamError::NotFound(id.to_string()))?;
            running.remove(at)
        };
        let id = stream.handle().id().clone();
        lock(&self.inner.cli_changes).remove(&id);
        stream.stop().await;
        self.save().await;
        self.announce(&id, StreamEventKind::Removed);
        tracing::info!(stream = %id, "stream removed");
        Ok(())
    }

    /// Brings back what the state file kept: API streams (their sources checked again,
    /// since `--media-dir` may have changed) and changes to command-line streams. What can
    /// no longer start is reported, one line each, and left out.
    pub async fn restore(&self) -> Vec<String> {
        let Some(path) = self.inner.state_file.clone() else {
            return Vec::new();
        };
        let state = match read_state(&path).await {
            Ok(Some(state)) => state,
            Ok(None) => return Vec::new(),
            Err(e) => return vec![e],
        };
        let mut warnings = Vec::new();
        for (id, change) in state.changes {
            match self.update(&id, change).await {
                Ok(_) => {}
                Err(StreamError::NotFound(_)) => {}
                Err(e) => warnings.push(format!("stream '{id}' from {}: {e}", path.display())),
            }
        }
        for settings in state.streams {
            let id = settings.id.clone().unwrap_or_default();
            if settings.source.as_deref().map(str::trim) == Some(PUSHED) {
                // Its publisher went with the old process; a new one creates it again.
                warnings.push(format!(
                    "stream '{id}' from {} not restored: a pushed stream ends with its publisher",
                    path.display()
                ));
                continue;
            }
            if let Err(e) = self.add(settings).await {
                warnings.push(format!(
                    "stream '{id}' from {} not restored: {e}",
                    path.display()
                ));
            }
        }
        warnings
    }

    /// Stops every stream, newest first.
    pub async fn stop_all(&self) {
        let streams: Vec<Stream> = std::mem::take(&mut *self.write());
        for stream in streams.into_iter().rev() {
            stream.stop().await;
        }
    }

    async fn launch(
        &self,
        spec: StreamSpec,
        origin: Origin,
        plan: SourcePlan,
    ) -> Result<StreamHandle, StreamError> {
        let id = spec.id.clone();
        let shown = spec.source_shown();
        let mut stream = Stream::start(spec, origin, plan, &self.inner.cx).await?;
        let handle = stream.handle().clone();
        {
            // Held until the stream is listed, so an output added meanwhile
            // ([`Streams::add_output`]) starts on it exactly once.
            let outputs = self
                .inner
                .outputs
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            for output in outputs.iter() {
                stream.keep(output.start(&handle));
            }
            self.write().push(stream);
        }
        tracing::info!(stream = %id, source = %shown, "stream started");
        self.announce(&id, StreamEventKind::Added(handle.summary()));
        Ok(handle)
    }

    /// A voice named through the API must be one the server offers (see
    /// [`crate::Voices::allowed_from_api`]).
    fn check_voice(&self, voice: &Option<String>) -> Result<(), StreamError> {
        match voice {
            Some(v) if !self.inner.cx.voices.allowed_from_api(v) => {
                Err(StreamError::Invalid(problem(
                    "voice",
                    format!(
                        "'{v}' is not offered here: choose off, espeak or {}",
                        self.inner.cx.voices.default_spec()
                    ),
                )))
            }
            _ => Ok(()),
        }
    }

    fn source_config(&self, source: SourceSpec, spec: &StreamSpec) -> SourceConfig {
        let d = self.defaults();
        let mut config = SourceConfig::new(source);
        config.jpeg_quality = d.jpeg_quality;
        config.display_max_width = d.display_max_width;
        config.max_pixels = d.max_source_pixels;
        config.capture_fps = spec.capture_fps;
        config.max_slices = d.max_slices;
        config
    }

    fn sink_config(&self, spec: &StreamSpec) -> SinkConfig {
        let d = self.defaults();
        SinkConfig {
            jpeg_quality: d.jpeg_quality,
            display_max_width: d.display_max_width,
            max_pixels: d.max_source_pixels,
            capture_fps: spec.capture_fps,
            max_slices: d.max_slices,
            live: true,
        }
    }

    /// The first of `s1`, `s2`, … not taken.
    fn free_id(&self) -> StreamId {
        let running = self.read();
        (1..)
            .map(StreamId::nth)
            .find(|id| running.iter().all(|s| s.handle().id() != id))
            .expect("some id is free")
    }

    fn announce(&self, id: &StreamId, kind: StreamEventKind) {
        let _ = self.inner.cx.bus.send(StreamEvent {
            stream: id.clone(),
            kind,
        });
    }

    /// Writes the state file (whole, atomically). A failure is logged: the streams run on.
    async fn save(&self) {
        let Some(path) = self.inner.state_file.clone() else {
            return;
        };
        let state = StateFile {
            version: 1,
            streams: self
                .read()
                .iter()
                .filter(|s| s.handle().origin() == Origin::Api)
                .map(|s| s.handle().spec())
                .filter(|spec| !is_pushed(spec))
                .map(|spec| spec.settings())
                .collect(),
            changes: lock(&self.inner.cli_changes)
                .iter()
                .map(|(id, change)| (id.to_string(), change.clone()))
                .collect(),
        };
        let written = tokio::task::spawn_blocking(move || write_state(&path, &state)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("cannot save the streams: {e}"),
            Err(e) => tracing::error!("cannot save the streams: {e}"),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Stream>> {
        self.inner
            .running
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Stream>> {
        self.inner
            .running
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A stream fed by a publisher in this process rather than a source it opens.
fn is_pushed(spec: &StreamSpec) -> bool {
    spec.source == PUSHED
}

fn problem(field: &'static str, message: String) -> Problems {
    Problems(vec![crate::FieldError { field, message }])
}

async fn read_state(path: &Path) -> Result<Option<StateFile>, String> {
    let text = match tokio::fs::read_to_string(path).await {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| {
        format!(
            "{} is not a kibitz state file ({e}); starting without it",
            path.display()
        )
    })
}

/// Temp file, then rename: a crash mid-write leaves the old file, never half a new one.
/// Owner-only: sources may carry credentials.
fn write_state(path: &Path, state: &StateFile) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(state).expect("the state serializes");
    {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
