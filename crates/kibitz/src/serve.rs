//! `kibitz serve`: checks the settings, starts every stream the command line asks for and
//! the ones the state file kept, serves HTTP, and stops them all on Ctrl-C or SIGTERM. The
//! llama engine's model is found, downloaded and loaded in the background meanwhile: the
//! video plays at once, and the page, `/api/status` and `/readyz` tell how far the model is.
//!
//! The stages meet in `kibitz-stream` (one stream's wiring) and `kibitz-server` (the
//! routes); this is glue only.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use kibitz_commentator::Profiles;
use kibitz_engine::Scheduler;
use kibitz_media::SourcePolicy;
use kibitz_server::auth::Access;
use kibitz_server::{AppState, Parts};
use kibitz_stream::{FfmpegSources, RegistryConfig, Streams, Voices};
use tokio_util::sync::CancellationToken;

use crate::flags::ServeArgs;
use crate::settings::Settings;

pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::from_args(args)?;
    // Each connection is a descriptor; Linux's default soft limit (1,024) is too few.
    let open_files = kibitz_server::listen::raise_open_file_limit();
    tracing::debug!(?open_files, "open-file limit");
    // Cheap checks first: a taken port should not wait for a model load.
    let listener = tokio::net::TcpListener::bind(settings.bind)
        .await
        .with_context(|| format!("cannot listen on {}", settings.bind))?;

    // The llama engine's model may still have to be downloaded: the video is served
    // meanwhile, and the commentary starts when the engine is there (see `fill_slot`).
    let (engine, slot) = crate::engine::for_serve(&settings.engine).await?;
    // The engine's one queue, sized by the engine itself.
    let scheduler = Scheduler::new(engine);

    // The address actually bound (`--bind 127.0.0.1:0` picks a free port).
    let addr = listener.local_addr()?;
    let scheme = if settings.serve.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let alert_sink = settings.webhook.clone().map(|(url, secret)| {
        kibitz_server::alert_sink(kibitz_server::Webhook::start(
            url,
            secret,
            format!("{scheme}://{addr}"),
        ))
    });
    let streams = Streams::new(RegistryConfig {
        defaults: settings.defaults.clone(),
        sources: Arc::new(FfmpegSources),
        scheduler,
        policy: SourcePolicy {
            media_dir: settings.media_dir.clone(),
        },
        max_streams: settings.max_streams,
        state_file: Some(settings.state_file.clone()),
        voices: Arc::new(Voices::new(
            settings.defaults.voice.clone(),
            settings.voice.clone(),
        )),
        alert_sink,
    });
    start_streams(&streams, &settings).await?;
    let history = open_history(&streams, &settings).await?;
    let shutdown = CancellationToken::new();
    let state = AppState::new(Parts {
        streams: streams.clone(),
        access: Access::new(settings.token.clone(), settings.token_for_viewing),
        profiles: Profiles::names().into_iter().map(String::from).collect(),
        shutdown: shutdown.clone(),
        history: history.clone(),
        origins: settings.origins.clone(),
    });

    if let Some(slot) = slot {
        tokio::spawn(crate::engine::fill_slot(
            slot,
            settings.engine.clone(),
            settings.max_streams,
            streams.scheduler().clone(),
            shutdown.clone(),
        ));
    }
    let stop = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping");
        stop.cancel();
    });
    let names: Vec<String> = streams
        .list()
        .iter()
        .map(|s| format!("{}: {}", s.id(), s.spec().source_shown()))
        .collect();
    if names.is_empty() {
        println!("kibitz: serving {scheme}://{addr} (no streams yet: add one on the page or with POST /api/streams)");
    } else {
        println!("kibitz: serving {scheme}://{addr} ({})", names.join(", "));
    }
    kibitz_server::serve_with(listener, state, settings.serve.clone()).await?;
    shutdown.cancel();
    streams.stop_all().await;
    if let Some(history) = history {
        // What the last cycles said reaches the file before the process ends.
        if let Err(e) = history.flush().await {
            tracing::warn!("the history's last entries may be lost: {e}");
        }
    }
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

/// The command line's streams, then those the state file kept. Every stream that cannot
/// start is named before giving up, like a bad setting.
async fn start_streams(streams: &Streams, settings: &Settings) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    for spec in settings.streams.clone() {
        let id = spec.id.clone();
        if let Err(e) = streams.start_trusted(spec).await {
            failures.push(format!("stream '{id}': {e}"));
        }
    }
    if !failures.is_empty() {
        streams.stop_all().await;
        anyhow::bail!("{}", failures.join("\nkibitz: "));
    }
    for warning in streams.restore().await {
        tracing::warn!("{warning}");
    }
    Ok(())
}

/// The history, recorded as an output of every stream. One that cannot be opened (a
/// corrupt file, a read-only folder) is one warning: kibitz serves without it.
async fn open_history(
    streams: &Streams,
    settings: &Settings,
) -> anyhow::Result<Option<kibitz_history::History>> {
    Ok(match settings.history.clone() {
        Some((path, retention)) => {
            match tokio::task::spawn_blocking(move || {
                kibitz_history::History::open(&path, retention)
            })
            .await?
            {
                Ok(history) => {
                    streams.add_output(kibitz_stream::history::output(history.clone()));
                    Some(history)
                }
                Err(e) => {
                    tracing::warn!("history is off: {e}");
                    eprintln!("kibitz: warning: history is off: {e}");
                    None
                }
            }
        }
        None => None,
    })
}
