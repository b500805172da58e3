//! Layer reading throughput, single-threaded, in MB/s of uncompressed tar.
//!
//! `cargo bench --bench layer_read` builds a layer shaped like a system
//! image (many small files, some large ones, text-like content that gzip
//! shrinks about 3×; `LAZYBLK_BENCH_BYTES` sets its size, default 256 MiB),
//! then times, best of `LAZYBLK_BENCH_ROUNDS` (default 3):
//!
//! * `gunzip_mbps`: flate2 (zlib-rs) alone, the bound for gzip layers;
//! * `gzip_layer_mbps`: the whole path a flattener sees, digest check
//!   (sha256 of the compressed blob), gunzip, [`read_layer`] and every
//!   entry's data read out;
//! * `zstd_layer_mbps`: the same for a zstd layer;
//! * `tar_only_mbps`: [`read_layer`] over the uncompressed tar.
//!
//! `LAZYBLK_BENCH_LAYER=FILE.tar.gz` measures a real gzip layer instead
//! (its tar is recompressed with zstd for the zstd figure).
//!
//! Under `cargo test` (no `--bench` argument) it runs once on 1 MiB.

use std::io::{self, Read, Write};
use std::time::Instant;

use lazyblk::oci::compress::{decompressor, Compression};
use lazyblk::oci::verify::VerifiedReader;
use lazyblk::oci::{read_layer, Digest, LayerLimits};

fn env_size(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(text) => {
            let text = text.trim().to_ascii_uppercase();
            let (digits, shift) = match text.strip_suffix('M') {
                Some(d) => (d, 20),
                None => match text.strip_suffix('G') {
                    Some(d) => (d, 30),
                    None => (text.as_str(), 0),
                },
            };
            match digits.parse::<usize>() {
                Ok(n) => n << shift,
                Err(_) => {
                    eprintln!("{name}={text:?} is not a size (suffixes M, G allowed)");
                    std::process::exit(2);
                }
            }
        }
        Err(_) => default,
    }
}

/// A tar of about `total` bytes: per 1000 files, 900 of 0.5–8 KiB, 95 of
/// 16–256 KiB and 5 of 1–4 MiB, filled with words from a small vocabulary.
fn build_layer(total: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the", "image", "layer", "block", "chunk", "usr", "lib", "share", "return", "if", "static",
        "const", "void", "int", "struct", "0x7f", "ELF", "\n", "  ", "python3",
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut builder = tar::Builder::new(Vec::with_capacity(total + total / 8));
    let mut written = 0;
    let mut index = 0u64;
    while written < total {
        let roll = next() % 1000;
        let size = match roll {
            0..=899 => 512 + next() % (8 << 10),
            900..=994 => (16 << 10) + next() % (240 << 10),
            _ => (1 << 20) + next() % (3 << 20),
        } as usize;
        let mut data = Vec::with_capacity(size + 16);
        while data.len() < size {
            let word = WORDS[(next() % WORDS.len() as u64) as usize];
            data.extend_from_slice(word.as_bytes());
            data.push(if next() % 7 == 0 {
                (next() % 256) as u8
            } else {
                b' '
            });
        }
        data.truncate(size);
        let mut header = tar::Header::new_gnu();
        header.set_size(size as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        let path = format!("usr/lib/d{}/f{index}", index % 97);
        builder.append_data(&mut header, path, &data[..]).unwrap();
        written += size + 512;
        index += 1;
    }
    builder.into_inner().unwrap()
}

/// Reads a layer the way the flattener does: every entry's data drained.
fn consume(stream: impl Read, limits: &mut LayerLimits) -> u64 {
    let mut buf = vec![0u8; 128 << 10];
    let stats = read_layer(stream, "bench", limits, &mut |_, data| {
        while data.read(&mut buf)? > 0 {}
        Ok(())
    })
    .expect("the bench layer reads");
    stats.tar_bytes
}

fn best_mbps(rounds: usize, bytes: usize, mut run: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..rounds {
        let start = Instant::now();
        run();
        best = best.min(start.elapsed().as_secs_f64());
    }
    bytes as f64 / best / 1e6
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (bytes, rounds) = if bench {
        (
            env_size("LAZYBLK_BENCH_BYTES", 256 << 20),
            env_size("LAZYBLK_BENCH_ROUNDS", 3).max(1),
        )
    } else {
        (1 << 20, 1)
    };
    let (tar, gz) = match std::env::var_os("LAZYBLK_BENCH_LAYER").filter(|_| bench) {
        Some(path) => {
            let gz = std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            let mut tar = Vec::new();
            flate2::read::MultiGzDecoder::new(&gz[..])
                .read_to_end(&mut tar)
                .expect("LAZYBLK_BENCH_LAYER is a gzip file");
            (tar, gz)
        }
        None => {
            let tar = build_layer(bytes);
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(&tar).unwrap();
            (tar, gz.finish().unwrap())
        }
    };
    let zst = zstd::stream::encode_all(&tar[..], 3).unwrap();
    let (gz_digest, zst_digest) = (Digest::of(&gz), Digest::of(&zst));
    println!(
        "layer_bytes={} gzip_bytes={} zstd_bytes={}",
        tar.len(),
        gz.len(),
        zst.len()
    );

    let gunzip = best_mbps(rounds, tar.len(), || {
        let mut d = flate2::read::GzDecoder::new(&gz[..]);
        io::copy(&mut d, &mut io::sink()).unwrap();
    });
    let layer = |blob: &Vec<u8>, digest: Digest, compression: Compression| {
        let verified =
            VerifiedReader::new(io::Cursor::new(blob.clone()), digest, blob.len() as u64);
        let stream = decompressor(Box::new(verified), Some((compression, "bench"))).unwrap();
        let read = consume(stream, &mut LayerLimits::default());
        assert_eq!(read, tar.len() as u64);
    };
    let gzip_layer = best_mbps(rounds, tar.len(), || {
        layer(&gz, gz_digest, Compression::Gzip)
    });
    let zstd_layer = best_mbps(rounds, tar.len(), || {
        layer(&zst, zst_digest, Compression::Zstd)
    });
    let tar_only = best_mbps(rounds, tar.len(), || {
        consume(&tar[..], &mut LayerLimits::default());
    });
    println!("gunzip_mbps={gunzip:.0}");
    println!("gzip_layer_mbps={gzip_layer:.0}");
    println!("zstd_layer_mbps={zstd_layer:.0}");
    println!("tar_only_mbps={tar_only:.0}");
}
