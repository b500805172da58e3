//! `serve`: a store's chunks and manifests over HTTP.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::signal::unix::{signal, SignalKind};

use super::{parse_size, read_token_file, StoreArgs};
use crate::metrics::Registry;
use crate::server::{Server, ServerOptions, Tokens};
use crate::store::{open_store, ChunkStore, ReadThrough};

/// The default of `--cache-size`.
pub const DEFAULT_CACHE_SIZE: u64 = 10 << 30;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Cache mode: serve STORE's chunks through a cache in --cache-dir (hits
    /// from memory and disk, each miss fetched from STORE once); writes,
    /// listings and manifests go to STORE. Replaces --store.
    #[arg(
        long,
        value_name = "STORE",
        conflicts_with = "specs",
        requires = "cache_dir"
    )]
    pub origin: Option<String>,
    /// The cache mode's directory (created 0700; survives restarts).
    #[arg(long, value_name = "DIR", requires = "origin")]
    pub cache_dir: Option<PathBuf>,
    /// Most bytes the cache keeps on disk (suffixes K, M, G); an eighth of
    /// it, up to 2 GiB, is kept in memory too.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_CACHE_SIZE, value_parser = parse_size, requires = "origin")]
    pub cache_size: u64,
    /// The address to listen on (port 0 picks a free one); the URL clients
    /// use is printed once the server listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// A file holding the token that writes need; without it the server
    /// takes no writes.
    #[arg(long, value_name = "FILE")]
    pub write_token_file: Option<PathBuf>,
    /// A file holding the token that reads need; without it reads are open
    /// (chunks and manifests are encrypted). The write token reads too.
    #[arg(long, value_name = "FILE")]
    pub read_token_file: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM, the server's own
    /// certificate first); clients name the server https://HOST:PORT and,
    /// for a private CA, trust it with --tls-ca.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM; refused if group or others may
    /// read it).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Connections served at once; more wait to be accepted.
    #[arg(long, default_value_t = ServerOptions::default().max_connections)]
    pub max_connections: usize,
    /// Milliseconds added to every chunk GET (a distant origin, for tests
    /// and benchmarks).
    #[arg(long, value_name = "MS", default_value_t = 0, hide = true)]
    pub delay: u64,
    /// Bytes a second all chunk answers share, one after another (suffixes
    /// K, M, G): a distant origin's link, for benchmarks.
    #[arg(long, value_name = "BYTES_PER_SEC", value_parser = parse_rate, hide = true)]
    pub rate: Option<u64>,
    /// Be a node of an erasure-coded cache fleet (`--ec-cache` on clients):
    /// keep up to BYTES of shards in memory (suffixes K, M, G), evicting
    /// when full. Shards never reach the store.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub shard_cache_size: Option<u64>,
}

fn parse_rate(text: &str) -> Result<u64, String> {
    match parse_size(text)? {
        0 => Err(format!(
            "{text:?}: a link carries at least one byte a second"
        )),
        rate => Ok(rate),
    }
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let read = args
        .read_token_file
        .as_deref()
        .map(read_token_file)
        .transpose()?;
    let write = args
        .write_token_file
        .as_deref()
        .map(read_token_file)
        .transpose()?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(crate::net::tls::server_config(cert, key)?),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let options = ServerOptions {
        tls,
        tokens: Tokens::new(read.as_deref(), write.as_deref()),
        chunk_delay: Duration::from_millis(args.delay),
        chunk_rate: args.rate,
        max_connections: args.max_connections.max(1),
        shard_cache_size: args.shard_cache_size,
        ..ServerOptions::default()
    };
    let store: Arc<dyn ChunkStore> = match (&args.origin, &args.cache_dir) {
        (Some(origin), Some(cache_dir)) => {
            let origin = open_store(origin, &args.store.options()?)?;
            Arc::new(ReadThrough::open(origin, cache_dir, args.cache_size)?)
        }
        _ => args.store.open()?,
    };
    let described = store.describe();
    let server = Server::bind(args.listen, store, options, Registry::new())
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let bound = server.local_addr()?;
    let mut terminate = signal(SignalKind::terminate()).context("watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("watch SIGINT")?;
    outln!("{scheme}://{bound}");
    tracing::info!(%bound, store = %described, "serving");
    server
        .run(async {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            tracing::info!("stopping: finishing requests in flight");
        })
        .await;
    Ok(())
}
