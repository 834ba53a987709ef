//! `kibitz serve`: wires source → frame stores → commentator → engine → HTTP, and stops
//! them in reverse on Ctrl-C or SIGTERM.
//!
//! The stages only meet here, through small adapters: the server sees the display buffer as
//! a `DisplayFeed`, the commentator sees the inference window as a `FrameWindow`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use kibitz_commentator::{Commentator, Event, FrameWindow, Profiles};
use kibitz_frames::{DisplayBuffer, InferenceWindow};
use kibitz_media::{SourceContext, StatusReader};
use kibitz_server::{
    AppState, BufferStatus, DisplayFeed, DisplayFrame, Parts, PipelineStatus, Selection,
    SourceStatus, StatusReport,
};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::flags::ServeArgs;
use crate::settings::Settings;

pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::from_args(args)?;
    // Cheap checks first: a taken port or a missing file should not wait for a model load.
    let listener = tokio::net::TcpListener::bind(settings.bind)
        .await
        .with_context(|| format!("cannot listen on {}", settings.bind))?;

    let display = Arc::new(DisplayBuffer::new(settings.display_span));
    let window = Arc::new(InferenceWindow::new(settings.window_size));
    let (events, _) = broadcast::channel::<Event>(1024);
    let source_events = events.clone();
    let cx = SourceContext::new(display.clone(), window.clone()).on_state(move |state| {
        let _ = source_events.send(Event::Source {
            state: state.name().into(),
            detail: state.detail(),
        });
    });
    let source_config = settings.source.clone();
    let source = tokio::task::spawn_blocking(move || source_config.build(cx)).await??;

    let engine = crate::engine::build(&settings.engine).await?;
    let info = engine.info();
    tracing::info!(engine = %info.kind, model = %info.model, backend = %info.backend, "engine ready");

    let commentator = Commentator::new(settings.commentator.clone(), Instant::now())?;
    let (snapshot_tx, mut snapshot_rx) = watch::channel(commentator.snapshot());
    let (delay_tx, delay_rx) = watch::channel(commentator.snapshot().target_delay);
    let (controls_tx, controls_rx) = mpsc::channel(16);
    let shutdown = CancellationToken::new();

    let loop_task = tokio::spawn(kibitz_commentator::run(
        commentator,
        window.clone() as Arc<dyn FrameWindow>,
        engine.clone(),
        events.clone(),
        controls_rx,
        snapshot_tx,
        shutdown.clone(),
    ));
    // The server follows the delay alone; the loop publishes its whole snapshot.
    tokio::spawn(async move {
        while snapshot_rx.changed().await.is_ok() {
            let delay = snapshot_rx.borrow_and_update().target_delay;
            delay_tx.send_if_modified(|d| std::mem::replace(d, delay) != delay);
        }
    });

    let state = AppState::new(Parts {
        display: Arc::new(DisplayFeedOf(display.clone())),
        events,
        controls: controls_tx,
        delay: delay_rx,
        status: Arc::new(Pipeline {
            source: source.status_reader(),
            display,
            window,
            window_capacity: settings.window_size,
        }),
        engine,
        profiles: Profiles::names().into_iter().map(String::from).collect(),
        selection: Selection {
            profile: settings.commentator.profile.clone(),
            instruction: settings.commentator.instruction.clone(),
        },
        mjpeg_fps: settings.mjpeg_fps,
        shutdown: shutdown.clone(),
    })?;

    let stop = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping");
        stop.cancel();
    });
    // The address actually bound (`--bind 127.0.0.1:0` picks a free port).
    let addr = listener.local_addr()?;
    println!(
        "kibitz: serving http://{addr} (source: {})",
        source.status().source
    );
    kibitz_server::serve(listener, state).await?;
    shutdown.cancel();
    let _ = loop_task.await;
    tokio::task::spawn_blocking(move || drop(source)).await?;
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

struct DisplayFeedOf(Arc<DisplayBuffer>);

impl DisplayFeed for DisplayFeedOf {
    fn latest(&self) -> Option<DisplayFrame> {
        self.0.latest()
    }
    fn at(&self, t: Instant) -> Option<DisplayFrame> {
        self.0.at(t)
    }
    fn fps(&self) -> Option<f64> {
        self.0.fps()
    }
}

struct Pipeline {
    source: StatusReader,
    display: Arc<DisplayBuffer>,
    window: Arc<InferenceWindow>,
    window_capacity: usize,
}

impl StatusReport for Pipeline {
    fn pipeline(&self) -> PipelineStatus {
        let s = self.source.get();
        let retry_in = match &s.state {
            kibitz_media::SourceState::Reconnecting { retry_in, .. } => {
                Some(retry_in.as_secs_f64())
            }
            _ => None,
        };
        PipelineStatus {
            source: SourceStatus {
                name: s.source.clone(),
                state: s.state.name().into(),
                detail: s.state.detail().or(s.last_error.clone()),
                retry_in,
                width: (s.width > 0).then_some(s.width),
                height: (s.height > 0).then_some(s.height),
                frames: s.frames_decoded,
                reconnects: s.reconnects,
            },
            buffers: BufferStatus {
                display_frames: self.display.len(),
                display_seconds: self.display.duration().as_secs_f64(),
                display_bytes: self.display.bytes(),
                window_frames: self.window.len(),
                window_capacity: self.window_capacity,
            },
            extra: serde_json::json!({
                "kind": s.kind,
                "codec": s.codec,
                "source_fps": s.source_fps,
                "measured_fps": s.measured_fps,
                "passthrough": s.passthrough,
                "frames_dropped": s.frames_dropped,
                "frames_captured": s.frames_captured,
                "loops": s.loops,
            }),
        }
    }
}
