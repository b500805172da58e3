//! The engine alone, no frontend: a cold sequential read of a whole image
//! from a directory store, against the crypto bound of this machine.
//!
//! `cargo bench --bench engine` seals a 1 GiB image of random data
//! (`LAZYBLK_BENCH_BYTES` changes the size) into a directory store under
//! `LAZYBLK_BENCH_DIR` (default `/dev/shm`, so the store is memory and the
//! figure is the engine's), then, for each of `LAZYBLK_BENCH_ROUNDS` rounds
//! (default 3, the best counts), opens a fresh cache beside it and reads the
//! image through [`Engine::submit`] in 512 KiB requests:
//!
//! * `sequential_mbps`: one reader, one request after another: what
//!   readahead makes of a cold scan;
//! * `parallel_mbps`: as many readers as twice the cores, each on its own
//!   stripe, so every core can verify and decrypt;
//! * `open_chunk_mbps`: [`open_chunk`] of the same chunks on one core, and
//!   `bound_mbps` that times the cores: the most the engine could reach;
//! * `parallel_ratio` and `sequential_ratio`: each against the bound;
//! * `fill_mbps`: what one core does per chunk when it does everything a
//!   cold read cannot avoid, one chunk after another: read the envelope
//!   from the store's file, [`open_chunk_in_place`], write the plaintext
//!   into a fresh sparse file beside the caches, copy it into the reader's
//!   buffer; `fill_bound_mbps` times the cores, and the `*_fill_ratio`
//!   figures are against that: the bound with the bytes' unavoidable moves
//!   counted;
//! * `*_cpu_ratio`: the CPU time `open_chunk` of every chunk takes on one
//!   core, against the CPU time (user and system, all threads, from
//!   `/proc/self/stat`) the engine spent reading the image: how much of its
//!   work is the crypto. Other processes on the machine slow a run down
//!   but barely change what it costs, so on a busy machine this is the
//!   steadier figure.
//!
//! Under `cargo test` (no `--bench` argument) it reads a few chunks once.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use lazyblk::chunk::{
    manifest_digest, open_chunk, open_chunk_in_place, seal_chunk, Manifest, ManifestEntry, Salt,
    TenantKey, DEFAULT_CHUNK_SIZE,
};
use lazyblk::engine::{Engine, EngineOptions, Request, SyncIo};
use lazyblk::store::dir::DirStore;
use lazyblk::store::ChunkStore;
use rand::RngCore;
use rayon::prelude::*;

const CHUNK: usize = DEFAULT_CHUNK_SIZE as usize;

fn env_bytes(name: &str, default: usize) -> usize {
    let Ok(text) = std::env::var(name) else {
        return default;
    };
    let text = text.trim().to_ascii_uppercase();
    let (digits, shift) = match text.chars().last() {
        Some('K') => (&text[..text.len() - 1], 10),
        Some('M') => (&text[..text.len() - 1], 20),
        Some('G') => (&text[..text.len() - 1], 30),
        _ => (&text[..], 0),
    };
    match digits.parse::<usize>() {
        Ok(n) => n << shift,
        Err(_) => {
            eprintln!("{name}={text:?} is not a size (suffixes K, M, G allowed)");
            std::process::exit(2);
        }
    }
}

fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let (bytes, rounds) = if benchmarking {
        (
            env_bytes("LAZYBLK_BENCH_BYTES", 1 << 30),
            env_bytes("LAZYBLK_BENCH_ROUNDS", 3).max(1),
        )
    } else {
        (8 * CHUNK, 1)
    };
    let chunks = (bytes / CHUNK).max(1);
    let base = std::env::var_os("LAZYBLK_BENCH_DIR").unwrap_or_else(|| "/dev/shm".into());
    let base = if Path::new(&base).is_dir() {
        base
    } else {
        std::env::temp_dir().into()
    };
    let work = tempfile::tempdir_in(base).expect("create the bench directory");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("build a runtime");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    eprintln!("sealing {chunks} chunks of random data");
    let salt = Salt([3; 32]);
    let sealed: Vec<_> = (0..chunks)
        .into_par_iter()
        .map(|i| {
            let mut plaintext = vec![0u8; CHUNK];
            rand::thread_rng().fill_bytes(&mut plaintext);
            plaintext[..8].copy_from_slice(&(i as u64).to_le_bytes());
            seal_chunk(&salt, &plaintext)
        })
        .collect();
    let store = Arc::new(DirStore::open(&work.path().join("store")).expect("open the store"));
    runtime.block_on(async {
        for chunk in &sealed {
            store
                .put(&chunk.id, Bytes::from(chunk.envelope.clone()))
                .await
                .expect("store a chunk");
        }
    });
    let manifest = Manifest {
        image_size: (chunks * CHUNK) as u64,
        chunk_size: DEFAULT_CHUNK_SIZE,
        salt_domain: "bench".into(),
        source_digest: [0; 32],
        entries: sealed
            .iter()
            .map(|c| ManifestEntry::Chunk {
                id: c.id,
                key: c.key.clone(),
            })
            .collect(),
    };
    let digest = manifest_digest(&manifest.seal(&TenantKey([1; 32])));

    // The bound: opening every chunk on one core, times the cores.
    let mut open_best = 0f64;
    for _ in 0..rounds {
        let started = Instant::now();
        for chunk in &sealed {
            std::hint::black_box(
                open_chunk(&chunk.id, &chunk.key, chunk.envelope.clone()).expect("open a chunk"),
            );
        }
        open_best = open_best.max(bytes_per_sec(chunks, started));
    }

    // The bound with the moves of the bytes counted, on one core.
    let mut fill_best = 0f64;
    for round in 0..rounds {
        let path = work.path().join(format!("fill-{round}"));
        let cache = std::fs::File::create(&path).expect("create the fill file");
        cache
            .set_len((chunks * CHUNK) as u64)
            .expect("size the fill file");
        let mut reader = vec![0u8; CHUNK];
        let started = Instant::now();
        for (index, chunk) in sealed.iter().enumerate() {
            let mut envelope = std::fs::read(store.chunk_path(&chunk.id)).expect("read a chunk");
            let plaintext =
                open_chunk_in_place(&chunk.id, &chunk.key, &mut envelope).expect("open a chunk");
            cache
                .write_all_at(plaintext, (index * CHUNK) as u64)
                .expect("fill");
            reader.copy_from_slice(plaintext);
            std::hint::black_box(&reader);
        }
        fill_best = fill_best.max(bytes_per_sec(chunks, started));
        drop(cache);
        std::fs::remove_file(&path).expect("remove the fill file");
    }

    let open_cpu = {
        let started = cpu_seconds();
        for chunk in &sealed {
            std::hint::black_box(
                open_chunk(&chunk.id, &chunk.key, chunk.envelope.clone()).expect("open a chunk"),
            );
        }
        cpu_seconds() - started
    };

    let mut best = [0f64; 2];
    let mut least_cpu = [f64::MAX; 2];
    for round in 0..rounds {
        for (slot, readers) in [(0, 1), (1, 2 * cores)] {
            let cache = work.path().join(format!("cache-{round}-{readers}"));
            let engine = Engine::open(
                manifest.clone(),
                digest,
                store.clone(),
                &cache,
                EngineOptions::default(),
                runtime.handle().clone(),
            )
            .expect("open the engine");
            let started = Instant::now();
            let cpu = cpu_seconds();
            runtime.block_on(read_all(&engine, chunks, readers));
            best[slot] = best[slot].max(bytes_per_sec(chunks, started));
            least_cpu[slot] = least_cpu[slot].min(cpu_seconds() - cpu);
            let stats = engine.stats();
            assert_eq!(
                stats.chunks_fetched, chunks as u64,
                "every chunk fetched once"
            );
            drop(engine);
            std::fs::remove_dir_all(&cache).expect("remove the cache");
        }
    }
    let bound = open_best * cores as f64;
    println!("image_bytes={}", chunks * CHUNK);
    println!("cores={cores}");
    println!("sequential_mbps={:.0}", best[0] / 1e6);
    println!("parallel_mbps={:.0}", best[1] / 1e6);
    println!("open_chunk_mbps={:.0}", open_best / 1e6);
    println!("bound_mbps={:.0}", bound / 1e6);
    println!("sequential_ratio={:.2}", best[0] / bound);
    println!("parallel_ratio={:.2}", best[1] / bound);
    let fill_bound = fill_best * cores as f64;
    println!("fill_mbps={:.0}", fill_best / 1e6);
    println!("fill_bound_mbps={:.0}", fill_bound / 1e6);
    println!("sequential_fill_ratio={:.2}", best[0] / fill_bound);
    println!("parallel_fill_ratio={:.2}", best[1] / fill_bound);
    println!("open_chunk_cpu_s={open_cpu:.2}");
    println!("sequential_cpu_s={:.2}", least_cpu[0]);
    println!("parallel_cpu_s={:.2}", least_cpu[1]);
    println!("sequential_cpu_ratio={:.2}", open_cpu / least_cpu[0]);
    println!("parallel_cpu_ratio={:.2}", open_cpu / least_cpu[1]);
}

/// CPU time this process has used so far, user and system, all threads.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
    // The command name may hold spaces; the fields after it may not.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("a stat line") + 2..]
        .split(' ')
        .collect();
    // utime and stime, fields 14 and 15 of the line, in clock ticks.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // USER_HZ, which Linux fixes at 100 for every user-space interface.
    ticks as f64 / 100.0
}

fn bytes_per_sec(chunks: usize, started: Instant) -> f64 {
    (chunks * CHUNK) as f64 / started.elapsed().as_secs_f64()
}

/// Reads chunks `0..chunks` whole, `readers` at a time, reader `r` taking
/// every `readers`-th chunk from `r` on, in order.
async fn read_all(engine: &Arc<Engine>, chunks: usize, readers: usize) {
    let tasks: Vec<_> = (0..readers)
        .map(|first| {
            let engine = Arc::clone(engine);
            tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                for index in (first..chunks).step_by(readers) {
                    let read = Request::Read {
                        offset: (index * CHUNK) as u64,
                        buf: (&mut buf).into(),
                    };
                    engine.submit(&SyncIo, read).await.expect("read a chunk");
                    assert_eq!(buf[..8], (index as u64).to_le_bytes(), "chunk {index}");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("reader task");
    }
}
