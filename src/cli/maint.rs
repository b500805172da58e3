//! `gc` and `verify`: store upkeep with progress on stderr and a summary
//! (or JSON) on stdout.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::StoreArgs;
use crate::maint::{self, GcOptions, VerifyOptions};
use crate::store::open_store;

#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Never delete a chunk written or relied on more recently than this
    /// (e.g. 30s, 10m, 1h, 2d): longer than any push takes.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub grace: Duration,
    /// Report what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Check only the chunks of this manifest (default: every chunk, and
    /// every chunk any manifest references).
    #[arg(long)]
    pub name: Option<String>,
    /// Replace bad and missing chunks with verified copies from this store
    /// (reached with the same token options).
    #[arg(long, value_name = "STORE")]
    pub repair_from: Option<String>,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
}

/// A duration: a whole number with a unit of s, m, h or d.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (e.g. 30s, 10m, 1h, 2d)");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (digits, unit) = s.split_at(split);
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(bad()),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .map(Duration::from_secs)
        .ok_or_else(bad)
}

/// A bar on stderr that follows the phases of a long run (drawn only when
/// stderr is a terminal).
fn phase_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} eta {eta}")
            .expect("template is valid")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

pub async fn gc(args: GcArgs) -> anyhow::Result<()> {
    let store = args.store.open_origin("gc")?;
    let bar = phase_bar();
    let progress = |phase: &'static str, done: u64, total: u64| {
        bar.set_message(phase);
        bar.set_length(total);
        bar.set_position(done);
    };
    let opts = GcOptions {
        grace: args.grace,
        dry_run: args.dry_run,
    };
    let report = maint::collect_garbage(&*store, &opts, &progress)
        .await
        .with_context(|| format!("gc {}", store.describe()))?;
    bar.finish_and_clear();
    if args.json {
        outln!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let verb = if report.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    outln!("gc {} (grace {:?})", store.describe(), args.grace);
    outln!("  manifests        {}", report.manifests);
    outln!("  chunks listed    {}", report.chunks_listed);
    outln!("  referenced       {}", report.chunks_referenced);
    outln!("  within grace     {}", report.chunks_recent);
    outln!(
        "  {verb:<16} {} chunks, {:.1} MiB",
        report.chunks_deleted,
        mib(report.bytes_freed)
    );
    outln!("  time             {:.2} s", report.elapsed_secs);
    Ok(())
}

pub async fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let store = args.store.open_origin("verify")?;
    let repair_from = match &args.repair_from {
        Some(spec) => Some(
            open_store(spec, &args.store.options()?)
                .with_context(|| format!("open repair store {spec}"))?,
        ),
        None => None,
    };
    let bar = phase_bar();
    let progress = |phase: &'static str, done: u64, total: u64| {
        bar.set_message(phase);
        bar.set_length(total);
        bar.set_position(done);
    };
    let opts = VerifyOptions {
        name: args.name.clone(),
        repair_from,
    };
    let report = maint::verify(&*store, &opts, &progress)
        .await
        .with_context(|| format!("verify {}", store.describe()))?;
    bar.finish_and_clear();
    if args.json {
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        outln!("verify {}", store.describe());
        outln!("  chunks checked   {}", report.chunks_checked);
        outln!("  good             {}", report.chunks_good);
        for id in &report.bad {
            outln!("  bad              {id}");
        }
        for id in &report.missing {
            outln!("  missing          {id}");
        }
        for id in &report.repaired {
            outln!("  repaired         {id}");
        }
        for failed in &report.unrepaired {
            outln!("  not repaired     {}: {}", failed.id, failed.reason);
        }
        outln!("  time             {:.2} s", report.elapsed_secs);
    }
    if !report.is_sound() {
        anyhow::bail!(
            "verify {}: {} bad and {} missing chunks, {} repaired",
            store.describe(),
            report.bad.len(),
            report.missing.len(),
            report.repaired.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_only() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in [
            "",
            "1",
            "h",
            "1.5h",
            "-1h",
            "1w",
            "1 h",
            "99999999999999999999d",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("not a duration"), "{bad:?}: {err}");
        }
    }
}
