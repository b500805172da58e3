//! The dedup goals of the layout, measured on 512 KiB chunks as the chunker
//! cuts them (all-zero chunks are never stored):
//! * an image built FROM a base reuses at least 90% of the base's chunks;
//! * an added layer costs at most (its bytes / chunk size) × 1.25 + 16 new
//!   chunks;
//! * a one-line change in the top layer costs at most 4 new chunks.

mod common;
mod flatten_support;

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::path::Path;

use flatten_support::*;
use lazyblk::flatten::FlattenOptions;
use lazyblk::oci::entry::EntryKind;

const CHUNK: usize = 512 << 10;

/// The digests of an image's non-zero chunks.
fn chunks(image: &Path) -> HashSet<[u8; 32]> {
    let mut f = fs::File::open(image).unwrap();
    let mut buf = vec![0u8; CHUNK];
    let mut out = HashSet::new();
    loop {
        let mut got = 0;
        while got < CHUNK {
            let n = f.read(&mut buf[got..]).unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        if got == 0 {
            return out;
        }
        buf[got..].fill(0);
        if buf.iter().any(|&b| b != 0) {
            out.insert(<sha2::Sha256 as sha2::Digest>::digest(&buf).into());
        }
    }
}

/// A base of a few thousand files in a few hundred directories, ~120 MiB,
/// with some large files, symlinks and hard links.
fn base() -> Vec<In> {
    let t = 1_700_000_000;
    let mut l = Vec::new();
    let mut seed = 0;
    for d in 0..150 {
        for f in 0..20 {
            seed += 1;
            let size = [
                0, 120, 900, 3000, 4096, 7000, 12_000, 30_000, 65_000, 200_000,
            ][(d * 7 + f) % 10];
            let path = format!("usr/lib/pkg{d:03}/sub{}/file{f:02}.so", f % 3);
            l.push(file(
                &path,
                bytes(seed, size),
                meta(0o644, 0, 0, t + seed as i64, 0),
            ));
        }
        l.push(ent(
            &format!("usr/lib/pkg{d:03}/link"),
            EntryKind::Symlink {
                target: b"sub0/file00.so".to_vec(),
            },
            meta(0o777, 0, 0, t, 0),
        ));
    }
    for i in 0..6 {
        l.push(file(
            &format!("opt/big{i}.bin"),
            bytes(10_000 + i, 8 << 20),
            meta(0o644, 0, 0, t, 0),
        ));
    }
    for i in 0..400 {
        l.push(file(
            &format!("etc/conf{i:03}.conf"),
            format!("setting{i} = {i}\n").repeat(20).into_bytes(),
            meta(0o644, 0, 0, t, 0),
        ));
    }
    l.push(ent(
        "usr/bin/alias",
        EntryKind::HardLink {
            target: p("usr/lib/pkg000/sub0/file00.so"),
        },
        meta(0, 0, 0, 0, 0),
    ));
    l
}

/// An application layer: new files in new and existing directories, a
/// changed base file, a removed one. `line` is its config's one variable line.
fn app(line: &str) -> Vec<In> {
    let t = 1_800_000_000;
    let mut l = Vec::new();
    for i in 0..40 {
        l.push(file(
            &format!("app/lib/mod{i:02}.py"),
            bytes(50_000 + i, 20_000 + 997 * i as usize),
            meta(0o644, 1000, 1000, t, 0),
        ));
    }
    let mut config = String::new();
    for i in 0..300 {
        config.push_str(&format!("option_{i} = value_{i}\n"));
    }
    config.insert_str(config.len() / 2, &format!("{line}\n"));
    l.push(file(
        "app/config.ini",
        config.into_bytes(),
        meta(0o644, 1000, 1000, t, 0),
    ));
    l.push(file(
        "app/data.bin",
        bytes(60_000, 3 << 20),
        meta(0o644, 1000, 1000, t, 0),
    ));
    l.push(file(
        "usr/lib/pkg010/sub1/extra.so",
        bytes(60_001, 40_000),
        meta(0o755, 0, 0, t, 0),
    ));
    l.push(file(
        "etc/conf007.conf",
        b"changed = yes\n".to_vec(),
        meta(0o644, 0, 0, t, 0),
    ));
    l.push(ent(
        "etc/conf008.conf",
        EntryKind::Whiteout,
        meta(0, 0, 0, 0, 0),
    ));
    l
}

fn layer_bytes(l: &[In]) -> u64 {
    l.iter()
        .filter_map(|i| i.data.as_ref().map(|d| d.size()))
        .sum()
}

#[test]
fn derived_images_keep_their_base_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let opts = || FlattenOptions {
        free_space: 64 << 20,
    };
    let (b, d1, d2) = (
        dir.path().join("base"),
        dir.path().join("d1"),
        dir.path().join("d2"),
    );
    let base_layer = base();
    let base_report = build_with(&vec![base_layer.clone()], &b, opts());
    assert!(
        base_report.bytes > 100 << 20,
        "a base of realistic size: {}",
        base_report.bytes
    );
    let app1 = app("version = 1");
    build_with(&vec![base_layer.clone(), app1.clone()], &d1, opts());
    build_with(&vec![base_layer, app("version = 22")], &d2, opts());
    for image in [&b, &d1, &d2] {
        fsck(image);
    }

    let (cb, c1, c2) = (chunks(&b), chunks(&d1), chunks(&d2));
    let reused = cb.intersection(&c1).count();
    let reuse = reused as f64 / cb.len() as f64;
    let new1 = c1.difference(&cb).count();
    let budget = layer_bytes(&app1) as f64 / CHUNK as f64 * 1.25 + 16.0;
    let new2 = c2.difference(&c1).count();
    println!("base {} chunks, derived reuses {reused} ({:.1}%), adds {new1} (budget {budget:.1}); one-line change adds {new2}", cb.len(), reuse * 100.0);
    assert!(
        reuse >= 0.90,
        "derived image reuses {:.1}% of the base's chunks",
        reuse * 100.0
    );
    assert!(
        new1 as f64 <= budget,
        "the layer costs {new1} new chunks, budget {budget:.1}"
    );
    assert!(new2 <= 4, "a one-line change costs {new2} new chunks");
}

/// A file of the top layer that grows past a block boundary shifts the files
/// after it, but only up to the layer's next resynchronisation point: the
/// cost stays a handful of chunks, not the rest of the layer.
#[test]
fn a_file_growing_by_a_block_costs_a_bounded_number_of_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let opts = || FlattenOptions {
        free_space: 16 << 20,
    };
    let top = |grow: usize| -> Vec<In> {
        let mut l = vec![file(
            "app/first.txt",
            vec![b'x'; 10_000 + grow],
            meta(0o644, 0, 0, 1, 0),
        )];
        for i in 0..400 {
            l.push(file(
                &format!("app/lib/f{i:03}.bin"),
                bytes(70_000 + i, 100_000),
                meta(0o644, 0, 0, 1, 0),
            ));
        }
        l
    };
    let base = vec![file("etc/base", bytes(1, 1 << 20), meta(0o644, 0, 0, 1, 0))];
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let report = build_with(&vec![base.clone(), top(0)], &a, opts());
    build_with(&vec![base, top(5_000)], &b, opts());
    fsck(&b);
    let (ca, cb) = (chunks(&a), chunks(&b));
    let new = cb.difference(&ca).count();
    println!(
        "layer of {} MB: growing its first file by a block costs {new} of {} chunks",
        report.bytes >> 20,
        cb.len()
    );
    assert!(
        new <= 16,
        "growing one file by a block costs {new} new chunks"
    );
}
