//! Builds the engine the flags ask for.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use kibitz_engine::models::{self, ModelQuery};
use kibitz_engine::openai::{OpenAiConfig, OpenAiEngine};
use kibitz_engine::{Engine, Sampling};

use crate::flags::{EngineArgs, EngineKind, FlashAttn, SamplingArgs};

pub fn cache_dir(args: &EngineArgs) -> PathBuf {
    args.cache_dir.clone().unwrap_or_else(|| {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
            .join(".cache/kibitz")
    })
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
    if args.context_size < 512 {
        p.push(format!(
            "--context-size {} is too small; at least 512",
            args.context_size
        ));
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
    p
}

pub async fn build(args: &EngineArgs) -> anyhow::Result<Arc<dyn Engine>> {
    let problems = problems(args);
    if !problems.is_empty() {
        bail!("{}", problems.join("\nkibitz: "));
    }
    match args.engine {
        EngineKind::Llama => build_llama(args).await,
        EngineKind::Openai => {
            let mut config = OpenAiConfig::new(args.engine_url.clone());
            config.model = args.engine_model.clone();
            config.api_key = args.api_key.clone();
            let engine = OpenAiEngine::new(config)?;
            Ok(Arc::new(engine))
        }
    }
}

#[cfg(feature = "llama")]
async fn build_llama(args: &EngineArgs) -> anyhow::Result<Arc<dyn Engine>> {
    use kibitz_engine::llama::{FlashAttention, LlamaConfig, LlamaEngine};
    use std::io::IsTerminal;

    let mut query = ModelQuery::new(args.model.clone(), cache_dir(args));
    query.mmproj = args.mmproj.clone();
    query.quant = args.quant.clone();
    query.endpoint = args.hf_endpoint.trim_end_matches('/').to_string();
    query.token = args.hf_token.clone();
    query.progress = std::io::stderr().is_terminal();
    let files = models::resolve(&query).await?;
    tracing::info!(llm = %files.llm.display(), mmproj = %files.mmproj.display(), "loading model");
    let mut config = LlamaConfig::new(files.llm, files.mmproj);
    config.gpu_layers = args.gpu_layers;
    config.context_size = args.context_size;
    config.threads = args.threads;
    config.max_slices = args.max_slice_nums;
    config.flash_attention = match args.flash_attn {
        FlashAttn::Auto => FlashAttention::Auto,
        FlashAttn::On => FlashAttention::On,
        FlashAttn::Off => FlashAttention::Off,
    };
    let engine = tokio::task::spawn_blocking(move || LlamaEngine::load(config))
        .await
        .context("the model loader stopped")??;
    Ok(Arc::new(engine))
}

#[cfg(not(feature = "llama"))]
async fn build_llama(_: &EngineArgs) -> anyhow::Result<Arc<dyn Engine>> {
    bail!("this kibitz was built without the llama engine; rebuild with --features llama, or use --engine openai")
}
