//! `verify-cache`: checks a device's cache directory against the image's
//! manifest while no device uses it (the cache's lock keeps the two apart).
//!
//! Without `--repair` nothing on disk changes: the cache is opened read-only
//! and its damage reported. With it, the cache is opened as a device opens
//! it (repairing what opening repairs) and mismatched chunks are dropped.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use super::keys::load_key;
use super::ImageArgs;
use crate::cache::check::{check_chunks, CheckReport, ReadOnlyCache};
use crate::cache::{list_indices, CacheDir};
use crate::chunk::{manifest_digest, Manifest};

#[derive(Debug, Args)]
pub struct VerifyCacheArgs {
    #[command(flatten)]
    pub image: ImageArgs,
    /// The device's cache directory.
    #[arg(long)]
    pub cache_dir: PathBuf,
    /// Drop the chunks that fail, so the next device fetches them again.
    #[arg(long)]
    pub repair: bool,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct Outcome {
    #[serde(flatten)]
    report: CheckReport,
    /// Damage found on opening the cache (repaired with `--repair`).
    repaired_on_open: Vec<String>,
    /// Whether the mismatched chunks were dropped.
    repaired: bool,
}

pub async fn verify_cache(args: VerifyCacheArgs) -> anyhow::Result<()> {
    let dir = args.cache_dir.clone();
    let has_cache = ["present", "data"]
        .iter()
        .any(|file| dir.join(file).exists());
    if !has_cache {
        bail!("{} holds no cache (no present or data file)", dir.display());
    }
    let tenant = load_key(&args.image.key)?;
    let store = args.image.store.open()?;
    let name = &args.image.name;
    let sealed = store.get_manifest(name).await?;
    let manifest = Manifest::open(name, &sealed, &tenant)?;
    let digest = manifest_digest(&sealed);
    let repair = args.repair;
    let outcome = tokio::task::spawn_blocking(move || -> anyhow::Result<Outcome> {
        if !repair {
            let cache = ReadOnlyCache::open(&dir, digest, manifest.image_size, manifest.chunk_size)
                .with_context(|| format!("open cache {}", dir.display()))?;
            let report = check_chunks(&cache, &manifest)
                .with_context(|| format!("check cache {}", dir.display()))?;
            return Ok(Outcome {
                report,
                repaired_on_open: cache.damage().iter().map(ToString::to_string).collect(),
                repaired: false,
            });
        }
        let cache =
            CacheDir::open_or_create(&dir, digest, manifest.image_size, manifest.chunk_size)
                .with_context(|| format!("open cache {}", dir.display()))?;
        let report = check_chunks(&cache, &manifest)
            .with_context(|| format!("check cache {}", dir.display()))?;
        let repaired = !report.mismatched.is_empty();
        if repaired {
            cache
                .drop_chunks(&report.mismatched)
                .with_context(|| format!("repair cache {}", dir.display()))?;
        }
        Ok(Outcome {
            report,
            repaired_on_open: cache.repairs().iter().map(ToString::to_string).collect(),
            repaired,
        })
    })
    .await??;

    let report = &outcome.report;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        let found = if args.repair {
            "repaired on open"
        } else {
            "damaged (left as it is: --repair repairs it)"
        };
        for damage in &outcome.repaired_on_open {
            outln!("{found}: {damage}");
        }
        outln!(
            "{} chunks: {} checked, {} written by the device (not checked), {} mismatched",
            report.chunks_total,
            report.chunks_checked,
            report.chunks_written,
            report.mismatched.len()
        );
        if outcome.repaired {
            outln!(
                "dropped {} chunk(s), to be fetched again: {}",
                report.mismatched.len(),
                list_indices(&report.mismatched)
            );
        }
    }
    let cache = args.cache_dir.display();
    if !report.mismatched.is_empty() && !args.repair {
        bail!(
            "cache {cache}: {} chunk(s) do not hold the manifest's bytes: {}; \
             `verify-cache --repair` drops them so they are fetched again",
            report.mismatched.len(),
            list_indices(&report.mismatched)
        );
    }
    if !outcome.repaired_on_open.is_empty() && !args.repair {
        bail!(
            "cache {cache} was damaged: {}",
            outcome.repaired_on_open.join("; ")
        );
    }
    Ok(())
}
