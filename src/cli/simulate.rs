//! `simulate`: only the simulated Billing API, for benchmarks and the SDK tests.

use super::{env, shutdown_signal};
use anyhow::Context;
use std::net::SocketAddr;

/// `simulate`: the simulated Billing API alone, accepting the key in `SCW_SECRET_KEY`.
pub(super) async fn run(listen: SocketAddr) -> anyhow::Result<()> {
    let key = env("SCW_SECRET_KEY")
        .filter(|k| uuid::Uuid::try_parse(k).is_ok())
        .context("SCW_SECRET_KEY must hold the key (a UUID) the simulator will accept")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!("simulated Billing API at http://{}", listener.local_addr()?);
    tokio::select! {
        served = billing_sim::serve(listener, billing_sim::Simulator::new(&key)) => served?,
        () = shutdown_signal() => {}
    }
    Ok(())
}
