use std::process::ExitCode;

use clap::Parser;
use mail_relay::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    cli::run(Cli::parse()).await
}
