//! The `billing-gateway` command: parse and dispatch to [`cli`] (contract §2).

mod cli;

use std::process::ExitCode;

use clap::Parser;

/// Faster than glibc malloc on the request path's many small allocations (bench/RESULTS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    billing_gateway::install_crypto_provider();
    match cli::run(cli::Cli::parse().command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
