//! Flattens one generated layer of many small files: the driver
//! `scripts/bench-flatten-memory.sh` measures the flattener's memory per
//! file with. Only the flattener runs (no tar, no decompression), so the
//! peak resident set is the metadata tree plus a fixed part.
//!
//! `cargo run --release --example flatten_synthetic -- OUT.ext4 FILES [SIZE [PER_DIR]]`
//! writes FILES regular files of SIZE bytes (default 100: one data block
//! each, the common case), PER_DIR (default 1,000) to a directory under
//! `/usr/lib/`, named with 19 bytes (the mean length of a name under a
//! Debian `/usr` is about 20). It prints the flatten report as JSON with `peak_rss_bytes` (the
//! kernel's VmHWM) added.

use std::fs;
use std::io::Cursor;

use anyhow::{bail, Context, Result};
use lazyblk::flatten::{FlattenOptions, Flattener};
use lazyblk::oci::entry::{EntryKind, EntryMeta, EntryPath, LayerEntry, Timestamp};

/// The process's peak resident set so far, in bytes.
fn peak_rss() -> Result<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

fn meta(mode: u32, secs: i64) -> EntryMeta {
    EntryMeta {
        mode,
        uid: 0,
        gid: 0,
        mtime: Timestamp { secs, nanos: 0 },
        xattrs: Vec::new(),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.len() > 4 {
        bail!("usage: flatten_synthetic OUT.ext4 FILES [SIZE [PER_DIR]]");
    }
    let files: u64 = args[1].parse().context("FILES")?;
    let size: u64 = match args.get(2) {
        Some(s) => s.parse().context("SIZE")?,
        None => 100,
    };
    let per_dir: u64 = match args.get(3) {
        Some(s) => s.parse().context("PER_DIR")?,
        None => 1000,
    };
    if per_dir == 0 {
        bail!("PER_DIR must be at least 1");
    }
    let out = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&args[0])
        .with_context(|| format!("create {}", args[0]))?;
    let mut f = Flattener::new(out, FlattenOptions::default())?;
    f.begin_layer("synthetic")?;
    let mut data = vec![0u8; size as usize];
    for i in 0..files {
        let dir = format!("usr/lib/pkg-{:07}", i / per_dir);
        if i % per_dir == 0 {
            let entry = LayerEntry {
                path: EntryPath::parse(dir.as_bytes())?,
                kind: EntryKind::Directory,
                meta: meta(0o755, 1_700_000_000),
            };
            f.apply(entry, &mut std::io::empty())?;
        }
        let path = format!("{dir}/module_{i:07}.data");
        // Distinct contents, so no block is all zeros.
        data.iter_mut()
            .zip(i.to_le_bytes().iter().cycle())
            .for_each(|(d, b)| *d = b | 1);
        let entry = LayerEntry {
            path: EntryPath::parse(path.as_bytes())?,
            kind: EntryKind::Regular { size },
            meta: meta(0o644, 1_700_000_000 + i as i64),
        };
        f.apply(entry, &mut Cursor::new(&data))?;
    }
    f.end_layer()?;
    let report = f.finish()?;
    let mut json = serde_json::to_value(&report)?;
    json["peak_rss_bytes"] = peak_rss()?.into();
    println!("{json}");
    Ok(())
}
