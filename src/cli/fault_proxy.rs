//! `fault-proxy` (hidden): a loopback proxy that injects faults in front of
//! an HTTP store, for tests and soak runs (see [`crate::fault_proxy`]).

use std::net::SocketAddr;

use clap::Args;
use tokio::signal::unix::{signal, SignalKind};

use crate::fault_proxy::{FaultProxy, FaultRates};

#[derive(Debug, Args)]
pub struct FaultProxyArgs {
    /// The store to stand in front of: http://HOST:PORT on loopback.
    #[arg(long, value_name = "URL")]
    pub upstream: String,
    /// The loopback address to listen on (port 0 picks a free one); the
    /// proxy's URL is printed once it listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Only GETs whose path starts with PREFIX draw faults (e.g.
    /// /v1/chunks/: manifests and listings pass unharmed).
    #[arg(long, value_name = "PREFIX", default_value = "")]
    pub only_under: String,
    /// Milliseconds added before every request is forwarded.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub latency_ms: u64,
    /// Share of GETs answered 503 without reaching the upstream.
    #[arg(long, value_name = "SHARE", default_value_t = 0.0)]
    pub error_rate: f64,
    /// Share of GETs whose connection is reset instead of answered.
    #[arg(long, value_name = "SHARE", default_value_t = 0.0)]
    pub reset_rate: f64,
    /// Share of GETs held unanswered until the rates change.
    #[arg(long, value_name = "SHARE", default_value_t = 0.0)]
    pub stall_rate: f64,
    /// Share of GETs whose body is cut short (with a matching length).
    #[arg(long, value_name = "SHARE", default_value_t = 0.0)]
    pub truncate_rate: f64,
    /// Share of GETs with one bit of the body flipped.
    #[arg(long, value_name = "SHARE", default_value_t = 0.0)]
    pub flip_rate: f64,
    /// Seeds the draws, so a run's faults can be replayed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub async fn fault_proxy(args: FaultProxyArgs) -> anyhow::Result<()> {
    let rates = FaultRates {
        only_under: args.only_under,
        latency_ms: args.latency_ms,
        error_rate: args.error_rate,
        reset_rate: args.reset_rate,
        stall_rate: args.stall_rate,
        truncate_rate: args.truncate_rate,
        flip_rate: args.flip_rate,
    };
    let proxy = FaultProxy::bind(args.listen, &args.upstream, rates.clone(), args.seed).await?;
    let bound = proxy.local_addr()?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    outln!("http://{bound}");
    tracing::info!(%bound, upstream = %args.upstream, ?rates, "injecting faults");
    tokio::select! {
        () = proxy.run() => {}
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}
