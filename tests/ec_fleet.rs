//! The erasure-coded cache fleet against real `lazyblk serve` cache nodes on
//! loopback: every node is the binary, spawned here and killed on drop.

mod common;

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lazyblk::chunk::ChunkId;
use lazyblk::store::ec::{open_fleet, EcFleetStore, Scheme};
use lazyblk::store::{ChunkStore, StoreOptions};
use tempfile::TempDir;

use common::serve::Served;
use common::{lazyblk_bin, pseudo_random};

const TOKEN: &str = "fleet-test-token";

/// Starts `lazyblk serve` over `store` on a free loopback port, taking
/// writes with the fleet's token, with `extra` arguments.
fn serve(dir: &Path, store: &Path, extra: &[&str]) -> Served {
    let token_file = dir.join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let mut args = vec![
        OsStr::new("--store"),
        store.as_os_str(),
        OsStr::new("--write-token-file"),
        token_file.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    Served::start(args)
}

/// A node of the fleet: a server that keeps shards in 256 MiB of memory.
fn cache_node(dir: &Path, name: &str, extra: &[&str]) -> Served {
    let store = dir.join(name);
    let mut args = vec!["--shard-cache-size", "256M"];
    args.extend_from_slice(extra);
    serve(dir, &store, &args)
}

fn fleet(nodes: &[Served], scheme: Scheme) -> EcFleetStore {
    let urls: Vec<&str> = nodes.iter().map(|n| n.url.as_str()).collect();
    let options = StoreOptions {
        token: Some(TOKEN.into()),
        ..StoreOptions::default()
    };
    open_fleet(&urls.join(","), scheme, &options).unwrap()
}

/// Chunk-like envelopes: 512 KiB + 16 bytes, as a sealed 512 KiB chunk.
fn envelopes(count: usize, seed: u64) -> Vec<(ChunkId, Bytes)> {
    (0..count)
        .map(|i| {
            let bytes = pseudo_random(seed * 1000 + i as u64, 512 * 1024 + 16);
            (ChunkId::of_envelope(&bytes), Bytes::from(bytes))
        })
        .collect()
}

/// Reads every chunk `concurrency` at a time; returns each read's latency.
async fn read_all(
    store: &Arc<EcFleetStore>,
    chunks: &[(ChunkId, Bytes)],
    concurrency: usize,
) -> Vec<Duration> {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let reads = chunks.iter().cloned().map(|(id, envelope)| {
        let (store, semaphore) = (store.clone(), semaphore.clone());
        tokio::spawn(async move {
            let _permit = semaphore.acquire().await.unwrap();
            let started = Instant::now();
            let got = store.get(&id).await.unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(got, envelope, "chunk {id} read back different bytes");
            started.elapsed()
        })
    });
    let mut latencies = Vec::new();
    for read in reads {
        latencies.push(read.await.unwrap());
    }
    latencies
}

fn percentile(latencies: &[Duration], p: f64) -> Duration {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_plus_one_keeps_every_hit_when_a_node_stops() {
    let dir = TempDir::new().unwrap();
    let mut nodes: Vec<Served> = (0..5)
        .map(|i| cache_node(dir.path(), &format!("node{i}"), &[]))
        .collect();
    let store = Arc::new(fleet(&nodes, Scheme::DEFAULT));
    let chunks = envelopes(24, 1);
    for (id, envelope) in &chunks {
        store.put(id, envelope.clone()).await.unwrap();
    }
    read_all(&store, &chunks, 4).await;
    drop(nodes.remove(2));
    read_all(&store, &chunks, 4).await;
    let stats = store.stats();
    assert_eq!((stats.hits, stats.misses), (48, 0), "{stats:?}");
    // The stopped node was asked and its shards rebuilt from the others.
    // Which request brought the extra shard depends on timing: a
    // replacement after the failure, or a hedge sent before it (a busy
    // host makes reads slow enough to hedge).
    assert!(
        stats.node_errors > 0 && stats.reconstructed > 0,
        "{stats:?}"
    );
    assert!(stats.replacements + stats.hedges > 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_plus_two_survives_two_stopped_nodes() {
    let dir = TempDir::new().unwrap();
    let mut nodes: Vec<Served> = (0..6)
        .map(|i| cache_node(dir.path(), &format!("node{i}"), &[]))
        .collect();
    let store = Arc::new(fleet(&nodes, "4+2".parse().unwrap()));
    let chunks = envelopes(12, 2);
    for (id, envelope) in &chunks {
        store.put(id, envelope.clone()).await.unwrap();
    }
    drop(nodes.remove(4));
    drop(nodes.remove(0));
    read_all(&store, &chunks, 4).await;
    assert_eq!(store.stats().misses, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_node_is_hedged_and_then_avoided() {
    let dir = TempDir::new().unwrap();
    let mut nodes: Vec<Served> = (0..4)
        .map(|i| cache_node(dir.path(), &format!("node{i}"), &[]))
        .collect();
    nodes.push(cache_node(dir.path(), "slow", &["--delay", "300"]));
    let store = Arc::new(fleet(&nodes, Scheme::DEFAULT));
    let chunks = envelopes(40, 3);
    for (id, envelope) in &chunks {
        store.put(id, envelope.clone()).await.unwrap();
    }
    read_all(&store, &chunks, 4).await;
    let stats = store.stats();
    assert_eq!(stats.misses, 0, "{stats:?}");
    assert!(stats.hedges >= 1, "no hedge: {stats:?}");
    // Most chunks have a shard on the slow node; once it is known to be
    // slow their data is rebuilt from parity instead of waited for.
    assert!(stats.reconstructed >= 20, "{stats:?}");
}

fn lazyblk(args: &[&std::ffi::OsStr]) {
    common::run(Command::new(lazyblk_bin()).args(args));
}

/// `export` through the fleet: cold, every chunk comes from the origin;
/// with the fleet warm and a node stopped, none does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_through_the_fleet_reads_no_warm_chunk_from_the_origin() {
    let dir = TempDir::new().unwrap();
    let path = |name: &str| dir.path().join(name);
    let image = pseudo_random(11, 6 << 20);
    std::fs::write(path("image"), &image).unwrap();
    std::fs::write(path("token"), TOKEN).unwrap();
    let os = |p: &Path| p.as_os_str().to_owned();
    lazyblk(&["keygen".as_ref(), "--out".as_ref(), &os(&path("key"))]);
    lazyblk(&[
        "push".as_ref(),
        &os(&path("image")),
        "--store".as_ref(),
        &os(&path("origin")),
        "--key".as_ref(),
        &os(&path("key")),
        "--name".as_ref(),
        "app".as_ref(),
    ]);
    let origin = serve(dir.path(), &path("origin"), &[]);
    let mut nodes: Vec<Served> = (0..5)
        .map(|i| cache_node(dir.path(), &format!("node{i}"), &[]))
        .collect();
    let urls = || {
        nodes
            .iter()
            .map(|n| n.url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let export = |urls: String, out: &str| {
        lazyblk(&[
            "export".as_ref(),
            "--store".as_ref(),
            origin.url.as_ref(),
            "--ec-cache".as_ref(),
            urls.as_ref(),
            "--token-file".as_ref(),
            &os(&path("token")),
            "--key".as_ref(),
            &os(&path("key")),
            "--name".as_ref(),
            "app".as_ref(),
            "--out".as_ref(),
            &os(&path(out)),
        ]);
        assert!(
            std::fs::read(path(out)).unwrap() == image,
            "{out} differs from the image"
        );
    };

    export(urls(), "cold");
    let cold_gets = origin.chunk_gets();
    assert!(cold_gets >= 12, "{cold_gets}");

    // Warm every chunk into the fleet, as the fills of a device's reads do.
    let store = fleet(&nodes, Scheme::DEFAULT);
    let chunks = lazyblk::store::dir::DirStore::open(&path("origin")).unwrap();
    for listed in chunks.list().await.unwrap() {
        store
            .put(&listed.id, chunks.get(&listed.id).await.unwrap())
            .await
            .unwrap();
    }
    // The stopped node stays in the list: placement is by URL.
    let all_nodes = urls();
    drop(nodes.remove(3));
    export(all_nodes, "warm");
    assert_eq!(
        origin.chunk_gets(),
        cold_gets,
        "warm chunks came from the origin"
    );
}

/// A shard upload the node cannot accept is refused, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_bad_shards_and_serves_none_without_a_shard_cache() {
    let dir = TempDir::new().unwrap();
    let node = cache_node(dir.path(), "node", &[]);
    let plain = serve(dir.path(), &dir.path().join("plain"), &[]);
    let client = lazyblk::net::HttpClient::new(false);
    let id = ChunkId([7; 32]).to_hex();
    let send = |method: http::Method, url: String, body: &'static [u8]| {
        let request = http::Request::builder()
            .method(method)
            .uri(url)
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(http_body_util::Full::new(Bytes::from_static(body)))
            .unwrap();
        let client = client.clone();
        async move {
            client
                .send(request, Duration::from_secs(5), 1 << 20)
                .await
                .unwrap()
        }
    };
    let put = send(
        http::Method::PUT,
        format!("{}/v1/shards/{id}/0", node.url),
        b"not a shard",
    )
    .await;
    assert_eq!(put.status, 400);
    assert!(
        String::from_utf8_lossy(&put.body).contains("shard"),
        "{:?}",
        put.body
    );
    let bad_index = send(
        http::Method::GET,
        format!("{}/v1/shards/{id}/99", node.url),
        b"",
    )
    .await;
    assert_eq!(bad_index.status, 400);
    let absent = send(
        http::Method::GET,
        format!("{}/v1/shards/{id}/1", node.url),
        b"",
    )
    .await;
    assert_eq!(absent.status, 404);
    let no_cache = send(
        http::Method::GET,
        format!("{}/v1/shards/{id}/1", plain.url),
        b"",
    )
    .await;
    assert_eq!(no_cache.status, 404);
    assert!(String::from_utf8_lossy(&no_cache.body).contains("--shard-cache-size"));
}

/// Not a test: the figures in docs/BENCHMARKS.md (scripts/bench-ec.sh).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_chunk_latency_with_a_slow_node() {
    let chunks_count: usize = std::env::var("BENCH_EC_CHUNKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let delay_ms = std::env::var("BENCH_EC_DELAY_MS").unwrap_or_else(|_| "50".into());
    let dir = TempDir::new().unwrap();
    let chunks = envelopes(chunks_count, 9);
    let mut report = Vec::new();
    for (label, slow) in [("all nodes fast", false), ("one node slow", true)] {
        let mut nodes: Vec<Served> = (0..4)
            .map(|i| cache_node(dir.path(), &format!("{label}{i}"), &[]))
            .collect();
        let extra: Vec<&str> = if slow {
            vec!["--delay", &delay_ms]
        } else {
            vec![]
        };
        nodes.push(cache_node(dir.path(), &format!("{label}4"), &extra));
        let store = Arc::new(fleet(&nodes, Scheme::DEFAULT));
        for (id, envelope) in &chunks {
            store.put(id, envelope.clone()).await.unwrap();
        }
        // Warm connections and the latency estimates, then measure.
        read_all(&store, &chunks[..20.min(chunks.len())], 8).await;
        let before = store.stats();
        let latencies = read_all(&store, &chunks, 8).await;
        let after = store.stats();
        let reads = (after.reads - before.reads) as f64;
        let extra = (after.hedges + after.probes - before.hedges - before.probes) as f64;
        report.push((
            label,
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            extra / reads,
        ));
    }
    let (_, base_p50, base_p99, _) = report[0];
    println!("chunks {chunks_count}, concurrency 8, 4+1 over 5 nodes, slow node +{delay_ms} ms");
    for (label, p50, p99, extra) in &report {
        println!(
            "{label:16} p50 {:7.2} ms ({:.2}x)  p99 {:7.2} ms ({:.2}x)  extra requests {:.1}%",
            p50.as_secs_f64() * 1e3,
            p50.as_secs_f64() / base_p50.as_secs_f64(),
            p99.as_secs_f64() * 1e3,
            p99.as_secs_f64() / base_p99.as_secs_f64(),
            extra * 100.0
        );
    }
}

/// Not a test: encode and rebuild speed of one 512 KiB envelope, XOR
/// parity against Reed-Solomon for the same 4+1 and for 4+2.
#[test]
#[ignore]
fn bench_codec() {
    let envelope = pseudo_random(5, 512 * 1024 + 16);
    let rounds = 100;
    let time = |f: &mut dyn FnMut()| {
        let started = Instant::now();
        for _ in 0..rounds {
            f();
        }
        (envelope.len() * rounds) as f64 / started.elapsed().as_secs_f64() / 1e9
    };
    for spec in ["4+1", "4+2"] {
        let scheme: Scheme = spec.parse().unwrap();
        let shards = scheme.encode(&envelope);
        let mut lost_one: Vec<Option<Bytes>> = shards.iter().cloned().map(Some).collect();
        lost_one[1] = None;
        let encode = time(&mut || drop(scheme.encode(&envelope)));
        let decode = time(&mut || drop(scheme.decode(&lost_one, envelope.len()).unwrap()));
        println!(
            "{spec} ({}): encode {encode:.2} GB/s, rebuild one lost data shard {decode:.2} GB/s",
            if spec == "4+1" { "XOR" } else { "Reed-Solomon" }
        );
    }
    // The same 4+1 through Reed-Solomon, for the choice of XOR: the
    // envelope cut into shards and the chunk put back together counted as
    // in Scheme's figures above.
    let len = Scheme::DEFAULT.shard_len(envelope.len());
    let split = || -> Vec<Vec<u8>> {
        envelope
            .chunks(len)
            .map(|c| {
                let mut shard = c.to_vec();
                shard.resize(len, 0);
                shard
            })
            .collect()
    };
    let data = split();
    let parity = reed_solomon_simd::encode(4, 1, &data).unwrap();
    let encode = time(&mut || drop(reed_solomon_simd::encode(4, 1, split()).unwrap()));
    let decode = time(&mut || {
        let originals = [(0, &data[0]), (2, &data[2]), (3, &data[3])];
        let restored = reed_solomon_simd::decode(4, 1, originals, [(0, &parity[0])]).unwrap();
        let mut rebuilt = Vec::with_capacity(4 * len);
        for (i, shard) in data.iter().enumerate() {
            rebuilt.extend_from_slice(restored.get(&i).unwrap_or(shard));
        }
        rebuilt.truncate(envelope.len());
        drop(rebuilt)
    });
    println!(
        "4+1 (Reed-Solomon): encode {encode:.2} GB/s, rebuild one lost data shard {decode:.2} GB/s"
    );
}
