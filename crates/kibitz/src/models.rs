//! `kibitz models`: the model cache, apart from running a model. `list` shows what is
//! there, `pull` downloads a hub repo's pair into it (what `serve` would otherwise fetch on
//! its first run), `rm` removes one. The work is `kibitz_models`'; this prints it.

use std::io::IsTerminal;
use std::process::ExitCode;

use indicatif::HumanBytes;
use kibitz_engine::models::{self, Report, Transfer};

use crate::engine::{cache_dir, hub_query};
use crate::flags::{ModelsArgs, ModelsCommand};

pub async fn run(args: ModelsArgs) -> anyhow::Result<ExitCode> {
    let cache = cache_dir(&args.hub);
    match args.command {
        ModelsCommand::List { json } => {
            let repos = models::list(&cache)?;
            if json {
                let out = serde_json::json!({ "cache": cache, "models": repos });
                println!("{out}");
            } else if repos.is_empty() {
                println!("no models in {}", cache.display());
            }
            for repo in repos.iter().filter(|_| !json) {
                println!(
                    "{}\t{}\t{}",
                    repo.repo,
                    HumanBytes(repo.bytes()),
                    repo.path.display()
                );
                for file in &repo.files {
                    let partial = if file.partial { " (partial)" } else { "" };
                    println!("  {}\t{}{partial}", file.name, HumanBytes(file.bytes));
                }
            }
        }
        ModelsCommand::Pull { repo, quant } => {
            let mut query = hub_query(&args.hub, &repo, &quant);
            if std::io::stderr().is_terminal() {
                query.progress = true;
            } else {
                query.report = Some(every_tenth());
            }
            let files = models::resolve(&query).await?;
            println!("{}", files.llm.display());
            println!("{}", files.mmproj.display());
            eprintln!("kibitz: ready for `kibitz serve --model {repo} --quant {quant}`");
        }
        ModelsCommand::Rm { repo, quant } => {
            for path in models::remove(&cache, &repo, quant.as_deref())? {
                println!("removed {}", path.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Progress for a log rather than a terminal: a line at the start of each file and at every
/// tenth of it.
fn every_tenth() -> Report {
    let last = std::sync::Mutex::new((String::new(), u64::MAX));
    Report::new(move |t: &Transfer| {
        let tenth = (t.bytes * 10).checked_div(t.total).unwrap_or(0);
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        if last.0 != t.file || last.1 != tenth {
            *last = (t.file.clone(), tenth);
            let line = kibitz_engine::Readiness::downloading(t.clone()).message;
            eprintln!("kibitz: {line}");
        }
    })
}
