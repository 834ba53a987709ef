//! Builds the engine the flags ask for.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use kibitz_engine::openai::{OpenAiConfig, OpenAiEngine};
use kibitz_engine::{Engine, EngineInfo, EngineSlot, Readiness, ReadyState, Sampling};

use crate::flags::{EngineArgs, EngineKind, HubArgs, SamplingArgs};

pub fn cache_dir(hub: &HubArgs) -> PathBuf {
    hub.cache_dir.clone().unwrap_or_else(|| {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
            .join(".cache/kibitz")
    })
}

/// What the engine flags ask for as a model: a path, or a hub repo fetched into the cache.
pub fn model_query(args: &EngineArgs) -> kibitz_engine::models::ModelQuery {
    let mut query = hub_query(&args.hub, &args.model, &args.quant);
    query.mmproj = args.mmproj.clone();
    query
}

/// `model` of quantization `quant`, from the hub and cache `hub` names.
pub fn hub_query(hub: &HubArgs, model: &str, quant: &str) -> kibitz_engine::models::ModelQuery {
    let mut query = kibitz_engine::models::ModelQuery::new(model, cache_dir(hub));
    query.quant = quant.to_string();
    query.endpoint = hub.hf_endpoint.trim_end_matches('/').to_string();
    query.token = hub.hf_token.clone();
    query
}

pub fn sampling(args: &SamplingArgs) -> Sampling {
    Sampling {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
    }
}

/// Checks the engine flags on their own; returns one line per problem.
pub fn problems(args: &EngineArgs) -> Vec<String> {
    let mut p = Vec::new();
    if let Some(n) = args.context_size.filter(|&n| n < 512) {
        p.push(format!("--context-size {n} is too small; at least 512"));
    }
    if args.max_slice_nums == 0 || args.max_slice_nums > 9 {
        p.push(format!(
            "--max-slice-nums {} must be between 1 and 9",
            args.max_slice_nums
        ));
    }
    if args.threads == Some(0) {
        p.push("--threads must be at least 1".into());
    }
    if args.engine == EngineKind::Openai && args.engine_url.is_empty() {
        p.push("--engine openai needs --engine-url URL (env ENGINE_URL)".into());
    }
    if let Some(spec) = &args.gpus {
        if let Err(e) = parse_gpus(spec) {
            p.push(e);
        } else if args.engine == EngineKind::Openai {
            p.push("--gpus places llama engine replicas; the openai engine's upstreams are --engine-url".into());
        }
    }
    if args.engine_max_inflight == 0 {
        p.push("--engine-max-inflight must be at least 1".into());
    }
    let durations = openai_durations(args);
    p.extend(durations.iter().filter_map(|d| d.as_ref().err().cloned()));
    if let [.., Ok(cooldown), Ok(max_cooldown)] = durations {
        if max_cooldown < cooldown {
            p.push(format!(
                "--engine-cooldown {} is above --engine-max-cooldown {} (the longest rest); \
                 raise --engine-max-cooldown too",
                args.engine_cooldown, args.engine_max_cooldown
            ));
        }
    }
    p
}

/// What `--gpus` asks for, before it is known which GPUs there are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuChoice {
    All,
    These(Vec<u32>),
}

/// Reads `--gpus`: `all`, or distinct GPU indexes separated by commas.
pub fn parse_gpus(spec: &str) -> Result<GpuChoice, String> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("all") {
        return Ok(GpuChoice::All);
    }
    let mut gpus: Vec<u32> = Vec::new();
    for part in spec.split(',') {
        let gpu = part.trim().parse::<u32>().map_err(|_| {
            format!(
                "--gpus '{spec}': takes `all` or GPU indexes like 0,1 ('{}' is not one)",
                part.trim()
            )
        })?;
        if gpus.contains(&gpu) {
            return Err(format!("--gpus '{spec}': GPU {gpu} is named twice"));
        }
        gpus.push(gpu);
    }
    Ok(GpuChoice::These(gpus))
}

/// The GPU indexes `choice` names among the `visible` ones llama.cpp sees.
#[cfg_attr(not(feature = "llama"), allow(dead_code))]
pub fn resolve_gpus(choice: &GpuChoice, visible: &[String]) -> Result<Vec<u32>, String> {
    let seen = || {
        if visible.is_empty() {
            "llama.cpp sees no GPU (a build without --features cuda, or no driver)".to_string()
        } else {
            let list: Vec<String> = visible
                .iter()
                .enumerate()
                .map(|(i, name)| format!("{i}: {name}"))
                .collect();
            format!("llama.cpp sees {}", list.join(", "))
        }
    };
    match choice {
        GpuChoice::All if visible.is_empty() => Err(format!("--gpus all: {}", seen())),
        GpuChoice::All => Ok((0..visible.len() as u32).collect()),
        GpuChoice::These(gpus) => match gpus.iter().find(|&&g| g as usize >= visible.len()) {
            Some(missing) => Err(format!("--gpus: there is no GPU {missing}; {}", seen())),
            None => Ok(gpus.clone()),
        },
    }
}

/// The openai engine's timeouts and cooldowns from their flags, in `OpenAiConfig` order:
/// connect, first token, total, cooldown, max cooldown. Each is checked on its own.
fn openai_durations(args: &EngineArgs) -> [Result<Duration, String>; 5] {
    [
        ("--engine-connect-timeout", args.engine_connect_timeout),
        (
            "--engine-first-token-timeout",
            args.engine_first_token_timeout,
        ),
        ("--engine-total-timeout", args.engine_total_timeout),
        ("--engine-cooldown", args.engine_cooldown),
        ("--engine-max-cooldown", args.engine_max_cooldown),
    ]
    .map(|(flag, seconds)| seconds_flag(flag, seconds))
}

/// A number of seconds that must be above zero and finite, as a `Duration`; a week at
/// most, so a typo (`--engine-total-timeout 1e12`) is caught rather than waited out.
fn seconds_flag(flag: &str, seconds: f64) -> Result<Duration, String> {
    const MAX_SECONDS: f64 = 7.0 * 24.0 * 3600.0;
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!(
            "{flag} {seconds} must be a number of seconds above 0"
        ));
    }
    if seconds > MAX_SECONDS {
        return Err(format!("{flag} {seconds} is more than a week of seconds"));
    }
    let duration = Duration::from_secs_f64(seconds);
    if duration.is_zero() {
        return Err(format!("{flag} {seconds} is less than a nanosecond"));
    }
    Ok(duration)
}

/// The openai engine's settings from the flags; [`problems`] must have passed.
fn openai_config(args: &EngineArgs) -> anyhow::Result<OpenAiConfig> {
    let mut config = OpenAiConfig::new(args.engine_url.clone());
    config.model = args.engine_model.clone();
    config.api_key = args.api_key.clone();
    config.max_in_flight = args.engine_max_inflight;
    let [connect, first_token, total, cooldown, max_cooldown] =
        openai_durations(args).map(|d| d.map_err(anyhow::Error::msg));
    config.connect_timeout = connect?;
    config.first_token_timeout = first_token?;
    config.total_timeout = total?;
    config.cooldown = cooldown?;
    config.max_cooldown = max_cooldown?;
    Ok(config)
}

/// The engine for one stream at a time (`describe`, `annotate`, `bench`).
pub async fn build(args: &EngineArgs) -> anyhow::Result<Arc<dyn Engine>> {
    build_for(args, 1).await
}

/// The engine for up to `streams` streams at once: the llama engine keeps a sequence (and
/// its KV room) for each.
pub async fn build_for(args: &EngineArgs, streams: usize) -> anyhow::Result<Arc<dyn Engine>> {
    let problems = problems(args);
    if !problems.is_empty() {
        bail!("{}", problems.join("\nkibitz: "));
    }
    match args.engine {
        EngineKind::Llama => build_llama(args, streams).await,
        EngineKind::Openai => {
            let engine = OpenAiEngine::new(openai_config(args)?)?;
            Ok(Arc::new(engine))
        }
    }
}

/// How long `serve` waits before it looks for a missing model again (the network may be
/// back, or the files put in place).
#[cfg_attr(not(feature = "media"), allow(dead_code))]
const MODEL_RETRY: Duration = Duration::from_secs(30);

/// The engine for `serve`, which must not wait for a model download: the openai engine as
/// it is, the llama engine as an empty [`EngineSlot`] that [`fill_slot`] fills in the
/// background (returned again, to be handed to it).
#[cfg_attr(not(feature = "media"), allow(dead_code))]
pub async fn for_serve(
    args: &EngineArgs,
) -> anyhow::Result<(Arc<dyn Engine>, Option<Arc<EngineSlot>>)> {
    match args.engine {
        EngineKind::Openai => {
            let engine = build_for(args, 1).await?;
            let info = engine.info();
            tracing::info!(engine = %info.kind, model = %info.model, backend = %info.backend, "engine ready");
            Ok((engine, None))
        }
        EngineKind::Llama => {
            let slot = Arc::new(EngineSlot::new(EngineInfo {
                kind: "llama".into(),
                model: args.model.clone(),
                backend: "not loaded".into(),
            }));
            Ok((slot.clone(), Some(slot)))
        }
    }
}

/// Finds the model (downloading it into the cache if need be, its progress told to the
/// slot), loads it and fills the slot, then wakes the scheduler so the streams' commentary
/// starts. A model that cannot be had now (no network and nothing cached) is looked for
/// again every [`MODEL_RETRY`]; one that cannot be used (a bad file or setting) is told
/// once and left. Ends early on `shutdown`.
#[cfg_attr(not(feature = "media"), allow(dead_code))]
pub async fn fill_slot(
    slot: Arc<EngineSlot>,
    args: EngineArgs,
    streams: usize,
    scheduler: kibitz_engine::Scheduler,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use kibitz_engine::models::{resolve, ModelError, Report};
    use std::io::IsTerminal;

    // The slot starts out "looking for model …"; a look again keeps saying what is missing
    // until something changes (a download begins), so the page does not flicker.
    let files = loop {
        let mut query = model_query(&args);
        query.progress = std::io::stderr().is_terminal();
        let told = slot.clone();
        query.report = Some(Report::new(move |t| {
            told.set(Readiness::downloading(t.clone()))
        }));
        let retry = match resolve(&query).await {
            Ok(files) => break files,
            Err(e @ (ModelError::Offline { .. } | ModelError::Download { .. })) => e,
            Err(e) => {
                tracing::error!("no commentary: {e}");
                slot.set(Readiness::new(ReadyState::Failed, e.to_string()));
                return;
            }
        };
        tracing::warn!(
            "no commentary yet: {retry} (looking again every {}s)",
            MODEL_RETRY.as_secs()
        );
        slot.set(Readiness::new(ReadyState::Missing, retry.to_string()));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(MODEL_RETRY) => {}
        }
    };
    slot.set(Readiness::new(
        ReadyState::Loading,
        format!("loading {}", files.llm.display()),
    ));
    let loaded = tokio::select! {
        _ = shutdown.cancelled() => return,
        loaded = load_llama(&args, files, streams) => loaded,
    };
    match loaded {
        Ok(engine) => {
            let info = engine.info();
            slot.fill(engine);
            scheduler.wake();
            tracing::info!(engine = %info.kind, model = %info.model, backend = %info.backend, "engine ready");
        }
        Err(e) => {
            let line = format!("{e:#}");
            tracing::error!("no commentary: {line}");
            slot.set(Readiness::new(ReadyState::Failed, line));
        }
    }
}

#[cfg(feature = "llama")]
async fn build_llama(args: &EngineArgs, streams: usize) -> anyhow::Result<Arc<dyn Engine>> {
    use std::io::IsTerminal;

    let mut query = model_query(args);
    query.progress = std::io::stderr().is_terminal();
    let files = kibitz_engine::models::resolve(&query).await?;
    load_llama(args, files, streams).await
}

#[cfg(not(feature = "llama"))]
async fn build_llama(_: &EngineArgs, _: usize) -> anyhow::Result<Arc<dyn Engine>> {
    bail!("{NO_LLAMA}")
}

#[cfg(not(feature = "llama"))]
const NO_LLAMA: &str = "this kibitz was built without the llama engine; rebuild with --features llama, or use --engine openai";

/// The llama engine on `files`, for up to `streams` streams at once.
#[cfg(feature = "llama")]
pub async fn load_llama(
    args: &EngineArgs,
    files: kibitz_engine::models::ModelFiles,
    streams: usize,
) -> anyhow::Result<Arc<dyn Engine>> {
    use crate::flags::FlashAttn;
    use anyhow::Context;
    use kibitz_engine::llama::{FlashAttention, LlamaConfig, LlamaEngine};

    tracing::info!(llm = %files.llm.display(), mmproj = %files.mmproj.display(), "loading model");
    let mut config = LlamaConfig::new(files.llm, files.mmproj);
    config.gpu_layers = args.gpu_layers;
    // 0: derived from what a stream's sequence holds.
    config.context_size = args.context_size.unwrap_or(0);
    config.max_streams = streams.max(1) as u32;
    config.threads = args.threads;
    config.max_slices = args.max_slice_nums;
    config.flash_attention = match args.flash_attn {
        FlashAttn::Auto => FlashAttention::Auto,
        FlashAttn::On => FlashAttention::On,
        FlashAttn::Off => FlashAttention::Off,
    };
    if let Some(spec) = &args.gpus {
        let choice = parse_gpus(spec).map_err(anyhow::Error::msg)?;
        let gpus = resolve_gpus(&choice, &LlamaEngine::gpus()).map_err(anyhow::Error::msg)?;
        // Each replica keeps room for every stream, so that when one fails the others take
        // its streams without pushing out theirs (KV memory is per GPU: see docs/design.md).
        tracing::info!(?gpus, "loading one engine replica per GPU");
        let replicas =
            tokio::task::spawn_blocking(move || LlamaEngine::load_replicas(&config, &gpus))
                .await
                .context("the model loader stopped")??;
        return Ok(Arc::new(replicas));
    }
    let engine = tokio::task::spawn_blocking(move || LlamaEngine::load(config))
        .await
        .context("the model loader stopped")??;
    Ok(Arc::new(engine))
}

#[cfg(not(feature = "llama"))]
pub async fn load_llama(
    _: &EngineArgs,
    _: kibitz_engine::models::ModelFiles,
    _: usize,
) -> anyhow::Result<Arc<dyn Engine>> {
    bail!("{NO_LLAMA}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use kibitz_engine::{EngineError, Request};

    fn parse(flags: &[&str]) -> EngineArgs {
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            engine: EngineArgs,
        }
        let argv = std::iter::once("kibitz").chain(flags.iter().copied());
        Flags::try_parse_from(argv).unwrap().engine
    }

    #[test]
    fn openai_flag_defaults_are_the_engines_own() {
        let args = parse(&["--engine-url", "http://127.0.0.1:1/v1"]);
        assert!(problems(&args).is_empty(), "{:?}", problems(&args));
        let from_flags = format!("{:?}", openai_config(&args).unwrap());
        let own = format!("{:?}", OpenAiConfig::new(["http://127.0.0.1:1/v1"]));
        assert_eq!(from_flags, own);
    }

    #[test]
    fn each_bad_timeout_or_cap_is_one_line_naming_its_flag() {
        let args = parse(&[
            "--engine-connect-timeout",
            "0",
            "--engine-first-token-timeout",
            "-1",
            "--engine-total-timeout",
            "nan",
            "--engine-cooldown",
            "inf",
            "--engine-max-cooldown",
            "1e12",
            "--engine-max-inflight",
            "0",
        ]);
        let p = problems(&args);
        for flag in [
            "--engine-connect-timeout 0 ",
            "--engine-first-token-timeout -1 ",
            "--engine-total-timeout NaN ",
            "--engine-cooldown inf ",
            "--engine-max-cooldown 1000000000000 ",
            "--engine-max-inflight ",
        ] {
            assert_eq!(
                p.iter().filter(|line| line.starts_with(flag)).count(),
                1,
                "{flag}: {p:#?}"
            );
        }
        assert_eq!(p.len(), 6, "{p:#?}");

        let args = parse(&["--engine-cooldown", "30", "--engine-max-cooldown", "20"]);
        assert_eq!(
            problems(&args),
            [
                "--engine-cooldown 30 is above --engine-max-cooldown 20 (the longest rest); \
                 raise --engine-max-cooldown too"
            ]
        );
    }

    #[test]
    fn gpus_take_all_or_distinct_indexes_that_exist() {
        assert_eq!(parse_gpus("all"), Ok(GpuChoice::All));
        assert_eq!(parse_gpus(" 1, 0 "), Ok(GpuChoice::These(vec![1, 0])));
        for bad in ["", "0,,1", "one", "-1", "0,0"] {
            let args = parse(&[&format!("--gpus={bad}")]);
            let p = problems(&args);
            assert!(p.len() == 1 && p[0].starts_with("--gpus '"), "{bad}: {p:?}");
        }
        let args = parse(&[
            "--engine",
            "openai",
            "--engine-url",
            "http://h:1",
            "--gpus",
            "0",
        ]);
        assert!(problems(&args)[0].starts_with("--gpus places llama"));
        let two = ["H200".to_string(), "H200".to_string()];
        assert_eq!(resolve_gpus(&GpuChoice::All, &two), Ok(vec![0, 1]));
        assert_eq!(resolve_gpus(&GpuChoice::These(vec![1]), &two), Ok(vec![1]));
        let missing = resolve_gpus(&GpuChoice::These(vec![0, 2]), &two).unwrap_err();
        assert!(
            missing.contains("no GPU 2") && missing.contains("1: H200"),
            "{missing}"
        );
        let none = resolve_gpus(&GpuChoice::All, &[]).unwrap_err();
        assert!(none.contains("sees no GPU"), "{none}");
    }

    /// The first-token timeout given as a flag is the one that fires, against a loopback
    /// server that accepts the connection and never answers.
    #[tokio::test]
    async fn the_first_token_timeout_flag_is_honoured() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let args = parse(&[
            "--engine",
            "openai",
            "--engine-url",
            &url,
            "--engine-model",
            "m",
            "--engine-first-token-timeout",
            "0.3",
            "--engine-max-inflight",
            "3",
        ]);
        let engine = build(&args).await.unwrap();
        assert_eq!(
            engine.parallelism(),
            3,
            "one upstream × --engine-max-inflight 3"
        );
        assert_eq!(engine.status()["timeouts_ms"]["first_token"], 300);
        let started = tokio::time::Instant::now();
        let mut generation = engine.submit(Request::new(Vec::new(), "s", "u")).unwrap();
        let item = tokio::time::timeout(Duration::from_secs(30), generation.next())
            .await
            .expect("the engine hung");
        let waited = started.elapsed();
        let error = match item {
            Some(Err(e)) => e,
            other => panic!("expected a timeout, got {other:?}"),
        };
        assert!(
            matches!(&error, EngineError::Timeout(m) if m.contains("first-token") && m.contains("300ms")),
            "{error}"
        );
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(10),
            "{waited:?}"
        );
        silent.abort();
    }
}
