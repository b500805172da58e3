//! `flatten`: an OCI image source → one deterministic ext4 image file; and
//! the source arguments `push` shares with it.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::parse_size;
use crate::flatten::{
    flatten_source, FileSink, FlattenOptions, FlattenProgress, FlattenReport, ImageSink,
    DEFAULT_FREE_SPACE,
};
use crate::oci::layer::LayerLimits;
use crate::oci::source::{open_source, ImageSource, SourceOptions};

/// The prefixes that name an OCI image source rather than an image file.
const SOURCE_PREFIXES: [&str; 3] = ["oci:", "docker-archive:", "docker://"];

/// Whether `arg` names an OCI image source (`oci:`, `docker-archive:`,
/// `docker://`) rather than an image file.
pub fn is_source(arg: &str) -> bool {
    SOURCE_PREFIXES.iter().any(|prefix| arg.starts_with(prefix))
}

/// How an OCI source is read and flattened.
#[derive(Debug, Clone, Args)]
pub struct SourceArgs {
    /// The platform picked from a multi-platform image: os/arch[/variant].
    #[arg(long)]
    pub platform: Option<String>,
    /// Speak plain HTTP to the registry (a loopback registry without TLS).
    #[arg(long)]
    pub plain_http: bool,
    /// Free space in the image beyond its content and metadata (suffixes K, M, G).
    #[arg(long, default_value_t = DEFAULT_FREE_SPACE, value_parser = parse_size)]
    pub free_space: u64,
    /// Stop when the layers expand to more than this many bytes in total.
    #[arg(long, default_value_t = LayerLimits::default().max_bytes, value_parser = parse_size)]
    pub max_expanded_bytes: u64,
    /// Stop when the layers hold more than this many entries in total.
    #[arg(long, default_value_t = LayerLimits::default().max_entries)]
    pub max_entries: u64,
}

#[derive(Debug, Args)]
pub struct FlattenArgs {
    /// The image: oci:DIR[:TAG], docker-archive:FILE or docker://HOST/REPO:TAG.
    pub source: String,
    /// The ext4 image to write; must not exist yet.
    #[arg(short, long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub source_args: SourceArgs,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
}

/// A finished flatten: the report and the image's source digest.
pub struct Flattened {
    pub report: FlattenReport,
    pub image_digest: [u8; 32],
    pub elapsed: Duration,
}

/// Opens the image `spec` names (for a registry, fetches its manifest and
/// config).
pub fn open_spec(spec: &str, args: &SourceArgs) -> anyhow::Result<Box<dyn ImageSource>> {
    let options = SourceOptions {
        platform: args.platform.clone(),
        plain_http: args.plain_http,
        ..SourceOptions::default()
    };
    open_source(spec, &options).with_context(|| format!("open {spec}"))
}

/// Flattens `source` into `sink`, with a progress bar on a terminal.
pub fn flatten_into<S: ImageSink>(
    source: &dyn ImageSource,
    sink: S,
    args: &SourceArgs,
) -> anyhow::Result<FlattenReport> {
    let bar = flatten_bar(source.layers().len());
    let progress = |p: FlattenProgress| {
        bar.set_position(p.layer as u64 - 1);
        bar.set_message(format!("{} MB", p.layer_bytes / 1_000_000));
    };
    let mut limits = LayerLimits::new(args.max_expanded_bytes, args.max_entries);
    let opts = FlattenOptions {
        free_space: args.free_space,
    };
    let report = flatten_source(source, sink, opts, &mut limits, &progress);
    bar.finish_and_clear();
    Ok(report?)
}

/// Flattens `spec` into `out`, which must not exist. The image is written
/// beside it under a temporary name and linked into place once complete
/// and synced, so `out` never holds a partial image; the link fails rather
/// than replace a file that appeared at `out` meanwhile.
pub fn flatten_to(spec: &str, out: &Path, args: &SourceArgs) -> anyhow::Result<Flattened> {
    let started = Instant::now();
    if out.symlink_metadata().is_ok() {
        bail!(
            "{} already exists; flatten writes a new file",
            out.display()
        );
    }
    let source = open_spec(spec, args)?;
    let partial = partial_path(out);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&partial)
        .with_context(|| format!("create {}", partial.display()))?;
    let result = FileSink::new(&file)
        .map_err(anyhow::Error::from)
        .and_then(|sink| flatten_into(source.as_ref(), sink, args))
        .and_then(|report| {
            file.sync_all()
                .with_context(|| format!("sync {}", partial.display()))?;
            std::fs::hard_link(&partial, out)
                .with_context(|| format!("link {} to {}", partial.display(), out.display()))?;
            std::fs::remove_file(&partial)
                .with_context(|| format!("remove {}", partial.display()))?;
            Ok(report)
        });
    let report = result.inspect_err(|_| {
        let _ = std::fs::remove_file(&partial);
    })?;
    Ok(Flattened {
        report,
        image_digest: source.image_digest(),
        elapsed: started.elapsed(),
    })
}

/// `DIR/.NAME.partial` for `DIR/NAME`.
fn partial_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    out.with_file_name(format!(".{name}.partial"))
}

fn flatten_bar(layers: usize) -> ProgressBar {
    // indicatif draws only when stderr is a terminal.
    let bar = ProgressBar::new(layers as u64);
    bar.set_style(
        ProgressStyle::with_template("flatten layer {pos}/{len} [{bar:30}] {msg} {elapsed}")
            .expect("template is valid")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

pub fn flatten(args: FlattenArgs) -> anyhow::Result<()> {
    let done = flatten_to(&args.source, &args.out, &args.source_args)?;
    let report = &done.report;
    if args.json {
        let mut value = serde_json::to_value(report)?;
        value["source"] = args.source.clone().into();
        value["source_digest"] = format!("sha256:{}", hex::encode(done.image_digest)).into();
        value["elapsed_secs"] = done.elapsed.as_secs_f64().into();
        outln!("{value}");
        return Ok(());
    }
    let secs = done.elapsed.as_secs_f64().max(1e-9);
    outln!("flattened {} into {}", args.source, args.out.display());
    outln!(
        "  source digest    sha256:{}",
        hex::encode(done.image_digest)
    );
    outln!("  layers applied   {}", report.layers);
    outln!("  entries          {}", report.entries);
    outln!("  files            {}", report.files);
    outln!("  file bytes       {}", report.bytes);
    outln!("  image size       {}", report.image_size);
    if let Some(digest) = &report.digest {
        outln!("  image digest     {digest}");
    }
    outln!(
        "  time             {:.2} s ({:.0} MB/s of file data)",
        secs,
        report.bytes as f64 / 1e6 / secs
    );
    Ok(())
}
