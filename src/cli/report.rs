//! `report`: the paper's figures on a corpus of images in a store, and on
//! the cold-start benchmark's results; printed as tables, plotted as SVG.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use super::{parse_size, StoreArgs};
use crate::chunk::{PublicManifest, DEFAULT_CHUNK_SIZE};
use crate::report::results::{self, Row, Sparsity};
use crate::report::tiers::{read_set, replay, ReplayOptions, TierTable};
use crate::report::{dedup, plot, sharing, Image};
use crate::store::ChunkStore;

#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The base image's manifest name (pushed first).
    #[arg(long)]
    pub base: String,
    /// The version series' manifest names, in push order (comma-separated).
    #[arg(long, value_delimiter = ',', required = true)]
    pub series: Vec<String>,
    /// Other images built on the base, for the sharing figure.
    #[arg(long, value_delimiter = ',')]
    pub other: Vec<String>,
    /// The cold-start benchmark's results (JSON lines, from
    /// scripts/bench-coldstart.sh): adds sparsity, the starts and the tier
    /// replay.
    #[arg(long, value_name = "FILE")]
    pub results: Option<PathBuf>,
    /// Write SVG plots into this directory (created).
    #[arg(long, value_name = "DIR")]
    pub plots: Option<PathBuf>,
    /// Image starts replayed for the tier table.
    #[arg(long, default_value_t = 5000)]
    pub replay_starts: usize,
    /// Hosts in the replay, each with a host cache of --replay-host-cache.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub replay_hosts: u64,
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub replay_host_cache: u64,
    /// The fleet cache shared by the replay's hosts.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub replay_fleet: u64,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

async fn load_image(store: &dyn ChunkStore, name: &str) -> anyhow::Result<Image> {
    let sealed = store
        .get_manifest(name)
        .await
        .with_context(|| format!("read manifest {name:?}"))?;
    let manifest = PublicManifest::parse(name, &sealed)?;
    Ok(Image::from_manifest(name, &manifest))
}

pub async fn report(args: ReportArgs) -> anyhow::Result<()> {
    let store = args.store.open()?;
    let base = load_image(store.as_ref(), &args.base).await?;
    let mut series = Vec::new();
    for name in &args.series {
        series.push(load_image(store.as_ref(), name).await?);
    }
    let mut others = Vec::new();
    for name in &args.other {
        others.push(load_image(store.as_ref(), name).await?);
    }
    let dedup = dedup(std::slice::from_ref(&base), &series);
    let built_on_base: Vec<Image> = series.iter().chain(&others).cloned().collect();
    let sharing = sharing(&base, &built_on_base);
    let starts = match &args.results {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("read results {}", path.display()))?;
            results::parse(&text).with_context(|| format!("results {}", path.display()))?
        }
        None => Vec::new(),
    };
    let sparsity = results::sparsity(&starts);
    let rows = results::rows(&starts);
    let options = ReplayOptions {
        starts: args.replay_starts,
        hosts: args.replay_hosts as usize,
        host_cache_bytes: args.replay_host_cache,
        fleet_bytes: args.replay_fleet,
        chunk_bytes: u64::from(DEFAULT_CHUNK_SIZE),
        seed: 0x7135,
    };
    let tiers = (!sparsity.is_empty()).then(|| {
        replay(
            &replay_workloads(&built_on_base, &args.series, &sparsity),
            &options,
        )
    });

    if let Some(dir) = &args.plots {
        write_plots(dir, &rows, &sparsity)?;
    }
    if args.json {
        let value = serde_json::json!({
            "dedup": dedup, "sharing": sharing, "sparsity": sparsity,
            "starts": rows, "tiers": tiers,
        });
        outln!("{value}");
        return Ok(());
    }
    outln!(
        "Dedup on upload: the series pushed in order onto a store holding {:?}",
        base.name
    );
    outln!(
        "  {:<16} {:>9} {:>6} {:>7}",
        "push",
        "distinct",
        "new",
        "new %"
    );
    for push in &dedup.pushes {
        outln!(
            "  {:<16} {:>9} {:>6} {:>7.2}",
            push.name,
            push.chunks_distinct,
            push.chunks_new,
            push.percent_new()
        );
    }
    outln!(
        "  pushes uploading no new chunk {:.0}%, new chunks per push: mean {:.2}%, median {:.2}% (paper: 80%, 4.3%, 2.5%)",
        dedup.zero_new_percent,
        dedup.mean_new_percent,
        dedup.median_new_percent
    );
    outln!(
        "Cross-image sharing: chunks of {:?} each image reuses",
        base.name
    );
    outln!(
        "  {:<16} {:>7} {:>10} {:>11}",
        "image",
        "reused",
        "% of base",
        "% of image"
    );
    for share in &sharing {
        outln!(
            "  {:<16} {:>7} {:>10.1} {:>11.1}",
            share.name,
            share.reused,
            share.percent_of_base(),
            share.percent_of_image()
        );
    }
    if starts.is_empty() {
        outln!("(no --results: no sparsity, starts or tier table)");
        return Ok(());
    }
    print_sparsity(&sparsity)?;
    print_rows(&rows)?;
    if let Some(tiers) = tiers {
        print_tiers(&tiers, &options)?;
    }
    Ok(())
}

/// The replay's workloads: each measured workload's fraction applied to
/// its own image and, for a workload of the series, to every version of
/// it; the newest version first (the most popular).
fn replay_workloads(
    images: &[Image],
    series: &[String],
    sparsity: &[Sparsity],
) -> Vec<Vec<crate::chunk::ChunkId>> {
    let mut workloads = Vec::new();
    for image in images.iter().rev() {
        for measured in sparsity {
            let same_family = measured.image == image.name
                || (series.contains(&measured.image) && series.contains(&image.name));
            if same_family {
                workloads.push(read_set(image, measured.percent_read() / 100.0));
            }
        }
    }
    workloads
}

fn print_sparsity(sparsity: &[Sparsity]) -> anyhow::Result<()> {
    outln!("Sparsity: chunks a start reads (readahead off) and fetches (cold, readahead on)");
    outln!(
        "  {:<10} {:<10} {:>7} {:>6} {:>7} {:>8} {:>10}",
        "workload",
        "image",
        "stored",
        "read",
        "read %",
        "fetched",
        "fetched %"
    );
    for s in sparsity {
        outln!(
            "  {:<10} {:<10} {:>7} {:>6} {:>7.1} {:>8} {:>10}",
            s.workload,
            s.image,
            s.chunks_stored,
            s.chunks_read,
            s.percent_read(),
            s.chunks_fetched_cold.map_or("-".into(), |n| n.to_string()),
            s.percent_fetched_cold()
                .map_or("-".into(), |p| format!("{p:.1}"))
        );
    }
    Ok(())
}

const VARIANTS: [&str; 4] = ["baseline", "cold", "prefetch", "warm"];

fn print_rows(rows: &[Row]) -> anyhow::Result<()> {
    outln!("Starts: seconds to first answer / to done, MB from the origin (baseline: pull + unpack + run from a loopback registry)");
    outln!(
        "  {:<10} {:<20} {:>20} {:>20} {:>20} {:>20}",
        "workload",
        "origin",
        VARIANTS[0],
        VARIANTS[1],
        VARIANTS[2],
        VARIANTS[3]
    );
    for row in rows {
        let cell = |variant: &str| match row.variants.get(variant) {
            Some(s) => format!(
                "{:.2}/{:.2} {:.0}M",
                s.ready_secs,
                s.done_secs,
                s.bytes_moved as f64 / 1e6
            ),
            None => "-".into(),
        };
        outln!(
            "  {:<10} {:<20} {:>20} {:>20} {:>20} {:>20}",
            row.workload,
            row.origin,
            cell(VARIANTS[0]),
            cell(VARIANTS[1]),
            cell(VARIANTS[2]),
            cell(VARIANTS[3])
        );
    }
    Ok(())
}

fn print_tiers(tiers: &TierTable, options: &ReplayOptions) -> anyhow::Result<()> {
    let [host, fleet, origin] = tiers.percents();
    outln!(
        "Tier hit table: {} starts on {} hosts ({} MiB host caches, {} MiB fleet), {} chunk reads",
        options.starts,
        options.hosts,
        options.host_cache_bytes >> 20,
        options.fleet_bytes >> 20,
        tiers.reads()
    );
    outln!(
        "  host cache {host:.2}%, fleet {fleet:.2}%, origin {origin:.2}% (paper: 67%, 32%, 0.06%)"
    );
    Ok(())
}

/// coldstart-WORKLOAD.svg (time to done by origin, a line per variant),
/// bytes-moved.svg and sparsity.svg.
fn write_plots(dir: &Path, rows: &[Row], sparsity: &[Sparsity]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut workloads: Vec<&str> = rows.iter().map(|r| r.workload.as_str()).collect();
    workloads.dedup();
    for workload in &workloads {
        let of_workload: Vec<&Row> = rows.iter().filter(|r| r.workload == *workload).collect();
        let origins: Vec<String> = of_workload.iter().map(|r| r.origin.clone()).collect();
        let series: Vec<plot::Series> = VARIANTS
            .iter()
            .map(|v| {
                (
                    v.to_string(),
                    of_workload.iter().map(|r| r.done(v)).collect(),
                )
            })
            .filter(|(_, values): &plot::Series| values.iter().any(Option::is_some))
            .collect();
        plot::lines(
            &dir.join(format!("coldstart-{workload}.svg")),
            &format!("{workload}: seconds from start to done, by origin latency"),
            &origins,
            "seconds",
            &series,
        )?;
    }
    // Bytes moved at each workload's first origin with a delay of 10 ms,
    // else its first.
    let chosen: Vec<&Row> = workloads
        .iter()
        .filter_map(|w| {
            let of: Vec<&Row> = rows.iter().filter(|r| r.workload == *w).collect();
            of.iter()
                .find(|r| r.delay_ms == 10 && !r.origin.contains("Mbit"))
                .or(of.first())
                .copied()
        })
        .collect();
    let labels: Vec<String> = chosen
        .iter()
        .map(|r| format!("{} ({})", r.workload, r.origin))
        .collect();
    let series: Vec<plot::Series> = VARIANTS
        .iter()
        .map(|v| {
            let mb = chosen
                .iter()
                .map(|r| r.bytes_moved(v).map(|b| b as f64 / 1e6))
                .collect();
            (v.to_string(), mb)
        })
        .filter(|(_, values): &plot::Series| values.iter().any(Option::is_some))
        .collect();
    plot::bars(
        &dir.join("bytes-moved.svg"),
        "MB moved from the origin per start",
        &labels,
        "MB",
        &series,
    )?;
    let labels: Vec<String> = sparsity.iter().map(|s| s.workload.clone()).collect();
    let series: Vec<plot::Series> = vec![
        (
            "% of chunks read".into(),
            sparsity.iter().map(|s| Some(s.percent_read())).collect(),
        ),
        (
            "% fetched cold (readahead)".into(),
            sparsity
                .iter()
                .map(Sparsity::percent_fetched_cold)
                .collect(),
        ),
    ];
    plot::bars(
        &dir.join("sparsity.svg"),
        "Share of the image's chunks a start reads and fetches",
        &labels,
        "% of stored chunks",
        &series,
    )?;
    Ok(())
}
