//! `kibitz serve`: wires source → frame stores → commentator → engine → HTTP.

use std::process::ExitCode;

use crate::flags::ServeArgs;

pub async fn run(_args: ServeArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("serve is being wired")
}
