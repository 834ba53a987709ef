//! kibitz: glue code. Flags become settings, settings become a running topology
//! (source → frame stores → commentator → engine → outputs); the stages live in their own
//! crates.

#[cfg(feature = "media")]
mod annotate;
mod bench;
#[cfg(feature = "media")]
mod describe;
mod engine;
mod flags;
mod healthcheck;
mod models;
mod say;
mod selftest;
#[cfg(feature = "media")]
mod serve;
#[cfg(feature = "media")]
mod settings;

use std::process::ExitCode;

use clap::Parser;

use flags::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(&cli.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    let result = runtime.block_on(async {
        match cli.command {
            #[cfg(feature = "media")]
            Command::Serve(args) => serve::run(*args).await,
            #[cfg(feature = "media")]
            Command::Describe(args) => describe::run(args).await,
            Command::Selftest(args) => selftest::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::MakeTestModel(args) => selftest::make_test_model(args).await,
            Command::Say(args) => say::run(args).await,
            #[cfg(feature = "media")]
            Command::Annotate(args) => annotate::run(args).await,
            Command::Models(args) => models::run(args).await,
            Command::Healthcheck(args) => healthcheck::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

/// One `kibitz: …` line (plus `hint:` lines the error carries), never a backtrace.
fn fail(e: &anyhow::Error) -> ExitCode {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message.push_str(": ");
            message.push_str(&cause);
        }
    }
    // Broken pipe (`kibitz describe … | head`) is not an error.
    if message.contains("Broken pipe") {
        return ExitCode::SUCCESS;
    }
    eprintln!("kibitz: {message}");
    ExitCode::FAILURE
}

fn init_logs(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| {
        eprintln!("kibitz: bad --log filter '{filter}', using 'info'");
        tracing_subscriber::EnvFilter::new("info")
    });
    // llama.cpp's own INFO lines are routed at debug level; keep them out unless asked.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
