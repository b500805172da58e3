//! `push` and `export`: progress on a terminal, a summary (or JSON) at the end.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::flatten::{flatten_into, is_source, open_spec, SourceArgs};
use super::keys::load_key;
use super::{parse_size, tiers, HostCacheArgs, ImageArgs};
use crate::chunk::{
    derive_salt, validate_chunk_size, validate_salt_domain, Salt, TenantKey, DEFAULT_CHUNK_SIZE,
};
use crate::flatten::ChunkSink;
use crate::store::ChunkStore;
use crate::transfer::{self, PushOptions, PushReport, TransferError};

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The image: a regular file or block device, or an OCI image
    /// (oci:DIR[:TAG], docker-archive:FILE, docker://HOST/REPO:TAG), which is
    /// flattened and chunked in one pass, with no image file, and records
    /// its digest as the source digest.
    pub image: String,
    #[command(flatten)]
    pub target: ImageArgs,
    /// Salt domain; rotating it (per region, per month) bounds how far one
    /// popular chunk is shared.
    #[arg(long, default_value = "default", value_parser = parse_salt_domain)]
    pub salt_domain: String,
    /// An operator-wide salt secret file: chunks then deduplicate across
    /// tenants that share it. Without it the salt comes from the tenant key.
    #[arg(long)]
    pub shared_salt: Option<PathBuf>,
    /// Chunk size: a power of two from 64K to 4M (suffixes K and M allowed).
    #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE, value_parser = parse_chunk_size)]
    pub chunk_size: u32,
    /// The digest of what the image was made from (64 hex digits, optionally
    /// prefixed `sha256:`), recorded in the manifest.
    #[arg(long, value_parser = parse_digest)]
    pub source_digest: Option<[u8; 32]>,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub source_args: SourceArgs,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub source: ImageArgs,
    #[command(flatten)]
    pub host_cache: HostCacheArgs,
    /// Where to write the image (replaced atomically when complete).
    #[arg(long)]
    pub out: PathBuf,
}

fn parse_salt_domain(s: &str) -> Result<String, String> {
    validate_salt_domain(s).map(|()| s.to_owned())
}

fn parse_chunk_size(s: &str) -> Result<u32, String> {
    let size = u32::try_from(parse_size(s)?).map_err(|_| format!("{s:?} is too large"))?;
    validate_chunk_size(size).map(|()| size)
}

fn parse_digest(s: &str) -> Result<[u8; 32], String> {
    let hex_digits = s.strip_prefix("sha256:").unwrap_or(s);
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex_digits, &mut digest)
        .map_err(|_| format!("{s:?} is not a SHA-256 digest (64 hex digits)"))?;
    Ok(digest)
}

fn progress_bar(message: &'static str) -> ProgressBar {
    // indicatif draws only when stderr is a terminal.
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("template is valid")
        .progress_chars("=> "),
    );
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

pub async fn push(args: PushArgs) -> anyhow::Result<()> {
    let tenant = load_key(&args.target.key)?;
    let salt_secret = match &args.shared_salt {
        Some(path) => load_key(path).context("shared salt")?,
        None => tenant.clone(),
    };
    let salt = derive_salt(&salt_secret.0, &args.salt_domain);
    let store = args.target.store.open()?;
    let options = PushOptions {
        name: args.target.name.clone(),
        salt_domain: args.salt_domain.clone(),
        chunk_size: args.chunk_size,
        source_digest: args.source_digest.unwrap_or([0; 32]),
    };
    let (report, source_digest) = if is_source(&args.image) {
        push_source(&args, store, tenant, salt, options).await?
    } else {
        let bar = progress_bar("push");
        let progress = |done: u64, total: u64| {
            bar.set_length(total);
            bar.set_position(done);
        };
        let source_digest = options.source_digest;
        let report = transfer::push(
            args.image.as_ref(),
            store,
            &tenant,
            &salt,
            options,
            &progress,
        )
        .await
        .with_context(|| format!("push {}", args.image))?;
        bar.finish_and_clear();
        (report, source_digest)
    };
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        // All zeros means none was named: no digest is printed rather than
        // one that reads as real.
        if source_digest != [0; 32] {
            value["source_digest"] = format!("sha256:{}", hex::encode(source_digest)).into();
        }
        outln!("{value}");
        return Ok(());
    }
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let secs = report.elapsed_secs.max(1e-9);
    outln!("pushed {} as {:?}", args.image, report.name);
    if source_digest != [0; 32] {
        outln!("  source digest    sha256:{}", hex::encode(source_digest));
    }
    outln!(
        "  image bytes      {} ({:.1} MiB)",
        report.image_bytes,
        mib(report.image_bytes)
    );
    outln!("  chunk size       {}", report.chunk_size);
    outln!("  chunks total     {}", report.chunks_total);
    outln!("  zero chunks      {}", report.chunks_zero);
    outln!(
        "  read             {:.1} MiB (holes skipped)",
        mib(report.bytes_read)
    );
    outln!("  distinct chunks  {}", report.chunks_distinct);
    outln!("  already stored   {}", report.chunks_existing);
    outln!(
        "  uploaded         {} chunks, {:.1} MiB",
        report.chunks_uploaded,
        mib(report.bytes_uploaded)
    );
    outln!(
        "  time             {:.2} s ({:.0} MB/s)",
        report.elapsed_secs,
        report.image_bytes as f64 / 1e6 / secs
    );
    Ok(())
}

/// Flattens an OCI source and pushes it in one pass: the flattener runs on
/// a thread of its own and hands chunks to the push as it completes them.
/// The image's digest is the source digest unless one was given.
async fn push_source(
    args: &PushArgs,
    store: Arc<dyn ChunkStore>,
    tenant: TenantKey,
    salt: Salt,
    mut options: PushOptions,
) -> anyhow::Result<(PushReport, [u8; 32])> {
    let (spec, source_args) = (args.image.clone(), args.source_args.clone());
    let source = tokio::task::spawn_blocking(move || open_spec(&spec, &source_args))
        .await
        .context("open task")??;
    if args.source_digest.is_none() {
        options.source_digest = source.image_digest();
    }
    let source_digest = options.source_digest;
    let (writer, pushing) = transfer::push_stream(store, tenant, salt, options)?;
    let source_args = args.source_args.clone();
    let flattening = tokio::task::spawn_blocking(move || {
        let sink = ChunkSink::new(writer)?;
        flatten_into(source.as_ref(), sink, &source_args)
    });
    let (flattened, pushed) = tokio::join!(flattening, pushing);
    let context = || format!("push {}", args.image);
    match (flattened.context("flatten task")?, pushed) {
        (Ok(_), Ok(report)) => Ok((report, source_digest)),
        // The push's own failure is the cause; the flattener only saw it stop.
        (_, Err(err)) if !matches!(err, TransferError::ImageIncomplete) => {
            Err(anyhow::Error::from(err).context(context()))
        }
        (Err(err), _) => Err(err.context(context())),
        (Ok(_), Err(err)) => Err(anyhow::Error::from(err).context(context())),
    }
}

pub async fn export(args: ExportArgs) -> anyhow::Result<()> {
    let tenant = load_key(&args.source.key)?;
    let tiers = tiers::open(&args.source.store, &args.host_cache)?;
    let bar = progress_bar("export");
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let exported = transfer::export(
        tiers.store.clone(),
        &tenant,
        &args.source.name,
        &args.out,
        &progress,
    )
    .await;
    // The chunks read from lower tiers reach the host cache before exit,
    // whether or not the export as a whole succeeded.
    tiers.settle().await;
    let report = exported
        .with_context(|| format!("export {:?} to {}", args.source.name, args.out.display()))?;
    bar.finish_and_clear();
    let mut report = serde_json::to_value(&report)?;
    let tier_stats = tiers.store.tier_stats();
    if !tier_stats.is_empty() {
        report["tiers"] = serde_json::to_value(tier_stats)?;
    }
    outln!(
        "exported {:?} to {}: {report}",
        args.source.name,
        args.out.display(),
    );
    Ok(())
}
