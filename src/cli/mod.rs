//! The command line: parsing, and turning library results into output.
//! anyhow lives here and in main.rs only.

/// `println!` for command output: a reader that went away (`| head`, a
/// pager that quit) ends the output quietly instead of a panic, and any
/// other failure to write is the command's error.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_line(format_args!($($arg)*))?
    };
}

mod device;
mod fault_proxy;
mod flatten;
mod fuse;
mod keys;
mod maint;
mod nbd;
mod report;
mod serve;
mod tiers;
mod trace;
mod transfer;
mod ublk;
mod verify_cache;
mod vhost_user;

pub use tiers::HostCacheArgs;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::store::ec::Scheme;
use crate::store::s3::S3Options;
use crate::store::{ChunkStore, StoreOptions};

/// Chunked, convergently encrypted disk images, served lazily as block devices.
#[derive(Debug, Parser)]
#[command(name = "lazyblk", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a new tenant key file (mode 0600).
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Flatten an OCI image into one deterministic ext4 image file.
    Flatten(flatten::FlattenArgs),
    /// Cut an image into sealed chunks and upload those the store lacks.
    Push(transfer::PushArgs),
    /// Rebuild an image from the store, verifying every chunk.
    Export(transfer::ExportArgs),
    /// Attach an image as a block device (/dev/ublkbN) served lazily from
    /// the store; prints its path and id once it is live.
    Add(device::AddArgs),
    /// Flush and remove a device (-n ID, --all, --fuse MOUNTPOINT, --vhost-user-blk SOCKET or --nbd LISTENER).
    Del(device::DelArgs),
    /// List devices (live, and ublk devices whose process died) and their counters.
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Merge or show an image's access traces (recorded by `add --record-trace`).
    Trace {
        #[command(subcommand)]
        command: trace::TraceCommand,
    },
    /// Serve a `--recoverable` ublk device again after its process died.
    Recover(ublk::RecoverArgs),
    /// Delete chunks no manifest references (and that are older than the grace period).
    Gc(maint::GcArgs),
    /// Check chunks against their names; repair bad and missing ones from another store.
    Verify(maint::VerifyArgs),
    /// Check a device's cache against the image's manifest (while no device
    /// uses it); --repair drops chunks that fail so they are fetched again.
    VerifyCache(verify_cache::VerifyCacheArgs),
    /// Serve a store's chunks and manifests over HTTP (the store URL
    /// http://HOST:PORT names it to other commands).
    Serve(serve::ServeArgs),
    /// A loopback proxy injecting faults in front of an HTTP store (tests
    /// and soak runs).
    #[command(hide = true)]
    FaultProxy(fault_proxy::FaultProxyArgs),
    /// The corpus figures: dedup on upload across a version series,
    /// sharing of a base image, and (with the cold-start benchmark's
    /// results) sparsity, the starts and a tier replay; tables and SVG plots.
    Report(report::ReportArgs),
    /// Show which ublk features the running kernel's driver supports.
    Features {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// How every command that takes `--store` names and reaches it.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// The chunk store: a directory path (or file:///PATH), the URL of a
    /// chunk server (http://HOST:PORT[/PREFIX], https://…), or an S3 bucket
    /// (s3://BUCKET[/PREFIX], credentials from AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY). Given several times, the stores are tiers,
    /// fastest first (e.g. a cache fleet, then the origin): reads try each in
    /// turn and fill those above; writes go to the last.
    #[arg(long = "store", value_name = "STORE")]
    pub specs: Vec<String>,
    /// A file holding the bearer token presented to a chunk server; without
    /// it, the token in LAZYBLK_TOKEN if set.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Speak HTTP/2 to an http:// chunk server from the first byte (h2c).
    #[arg(long)]
    pub http2_prior_knowledge: bool,
    /// A PEM file of CA certificates that https:// servers (chunk servers,
    /// cache fleet nodes, an S3 endpoint) must chain to, instead of the
    /// public web roots: a private CA, or a self-signed server certificate.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// The S3 API endpoint of an s3:// store (default: AWS_ENDPOINT_URL_S3,
    /// AWS_ENDPOINT_URL, else AWS in AWS_REGION).
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// Address an s3:// store's bucket in the path (ENDPOINT/BUCKET/KEY), as
    /// MinIO and SeaweedFS expect, instead of as a subdomain.
    #[arg(long)]
    pub s3_path_style: bool,
    /// An erasure-coded cache fleet read before the store: the URLs of its
    /// cache nodes (`lazyblk serve --shard-cache-size`), comma-separated.
    /// Chunks the fleet lacks come from the store and fill the fleet.
    #[arg(long, value_name = "URL,URL,...")]
    pub ec_cache: Option<String>,
    /// How the fleet codes each chunk: K data + M parity shards on K+M
    /// distinct nodes (M = 1 is XOR parity; more is Reed-Solomon).
    #[arg(long, value_name = "K+M", default_value = "4+1", requires = "ec_cache")]
    pub ec_shards: Scheme,
}

/// The environment variable holding a chunk server's token when no
/// `--token-file` is given.
pub const TOKEN_ENV: &str = "LAZYBLK_TOKEN";

impl StoreArgs {
    pub fn options(&self) -> anyhow::Result<StoreOptions> {
        let token = match &self.token_file {
            Some(path) => Some(read_token_file(path)?),
            None => std::env::var(TOKEN_ENV)
                .ok()
                .map(|token| token.trim().to_owned())
                .filter(|token| !token.is_empty()),
        };
        Ok(StoreOptions {
            token,
            http2_prior_knowledge: self.http2_prior_knowledge,
            tls_ca: self.tls_ca.clone(),
            s3: S3Options {
                endpoint: self.s3_endpoint.clone(),
                path_style: self.s3_path_style,
            },
        })
    }

    /// The store every `--store` names, behind the cache fleet when one is
    /// named: one store, or the tiers of a
    /// [`TieredStore`](crate::store::TieredStore).
    pub fn open(&self) -> anyhow::Result<Arc<dyn ChunkStore>> {
        Ok(tiers::open(self, &HostCacheArgs::default())?.store)
    }

    /// The store of record alone, for upkeep (`gc`, `verify`): a cache
    /// tier in front would answer for chunks the origin has lost or holds
    /// damaged, and holds nothing to collect.
    pub fn open_origin(&self, command: &str) -> anyhow::Result<Arc<dyn ChunkStore>> {
        if self.specs.len() > 1 || self.ec_cache.is_some() {
            anyhow::bail!(
                "{command} works on one store, the store of record: give one --store and no --ec-cache"
            );
        }
        self.open()
    }

    /// The last `--store`: the store of record.
    pub fn origin(&self) -> &str {
        self.specs.last().map_or("", String::as_str)
    }
}

/// A bearer token from a file: its contents without surrounding
/// whitespace, which must be non-empty visible ASCII (it goes in a header).
pub fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read token file {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        anyhow::bail!(
            "token file {}: a token is one line of visible ASCII characters",
            path.display()
        );
    }
    Ok(token.to_owned())
}

/// The arguments every command that opens an image in a store takes.
#[derive(Debug, Clone, Args)]
pub struct ImageArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The tenant key file (see `lazyblk keygen`).
    #[arg(long)]
    pub key: PathBuf,
    /// The image's manifest name in the store.
    #[arg(long)]
    pub name: String,
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    // A device process logs what it serves; a one-shot command only what went wrong.
    let default_level = match &cli.command {
        Command::Add(args) if args.foreground => "info",
        Command::Recover(args) if args.foreground => "info",
        Command::Serve(_) | Command::FaultProxy(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LAZYBLK_LOG")
        .unwrap_or_else(|_| default_level.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Keygen { out } => keys::keygen(&out),
        Command::Flatten(args) => flatten::flatten(args),
        Command::Push(args) => runtime()?.block_on(transfer::push(args)),
        Command::Export(args) => runtime()?.block_on(transfer::export(args)),
        Command::Add(args) => device::add(args),
        Command::Del(args) => runtime()?.block_on(device::del(args)),
        Command::List { json } => runtime()?.block_on(device::list(json)),
        Command::Trace { command } => runtime()?.block_on(trace::run(command)),
        Command::Recover(args) => ublk::recover(args),
        Command::Serve(args) => runtime()?.block_on(serve::serve(args)),
        Command::FaultProxy(args) => runtime()?.block_on(fault_proxy::fault_proxy(args)),
        Command::Features { json } => ublk::features(json),
        Command::Report(args) => runtime()?.block_on(report::report(args)),
        Command::Gc(args) => runtime()?.block_on(maint::gc(args)),
        Command::Verify(args) => runtime()?.block_on(maint::verify(args)),
        Command::VerifyCache(args) => runtime()?.block_on(verify_cache::verify_cache(args)),
    }
}

/// A byte count, with an optional K, M or G suffix (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, scale) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 524288, 512K, 256M, 1G)"))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Room for fetches beyond the requests that may wait on the pool.
        .max_blocking_threads(2 * crate::frontend::MAX_WAITING_REQUESTS)
        .thread_name("lazyblk-worker")
        .build()?)
}

/// One line of command output; see [`outln!`].
fn write_line(line: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    match writeln!(io::stdout().lock(), "{line}") {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("write to standard output"))
        }
        _ => Ok(()),
    }
}
