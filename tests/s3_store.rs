//! The S3 store against a real distributed S3 server: a SeaweedFS cluster
//! (master, three volume servers with replication, filer, S3 gateway) on
//! loopback, started by each test and killed when it ends.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::seaweedfs::Cluster;
use common::*;
use lazyblk::chunk::ChunkId;
use lazyblk::error::ErrorKind;
use lazyblk::store::dir::DirStore;
use lazyblk::store::s3::{S3Options, S3Store};
use lazyblk::store::{ChunkStore, ListedChunk};

/// An image with distinct chunks, a run of zeros, a repeated chunk and a
/// short last chunk.
fn make_image(path: &Path, seed: u64) -> Vec<u8> {
    let block = pseudo_random(seed + 1, 512 << 10);
    let mut image = pseudo_random(seed, 6 << 20);
    image.extend(vec![0u8; 1 << 20]);
    image.extend(&block);
    image.extend(&block);
    image.extend(pseudo_random(seed + 2, 300_000));
    fs::write(path, &image).unwrap();
    image
}

/// `lazyblk VERB --store STORE --key KEY`, in the cluster's environment.
fn lazyblk(cluster: &Cluster, verb: &str, store: &str, key: &Path) -> Command {
    let mut cmd = Command::new(lazyblk_bin());
    cmd.envs(cluster.env())
        .arg(verb)
        .args(["--store", store, "--key"])
        .arg(key);
    cmd
}

fn push(cluster: &Cluster, store: &str, key: &Path, image: &Path, name: &str) -> serde_json::Value {
    let out = run(lazyblk(cluster, "push", store, key)
        .arg(image)
        .args(["--name", name, "--json"]));
    serde_json::from_slice(&out.stdout).expect("push --json prints JSON")
}

fn keygen(dir: &Path) -> std::path::PathBuf {
    let key = dir.join("tenant.key");
    run(Command::new(lazyblk_bin())
        .arg("keygen")
        .arg("--out")
        .arg(&key));
    key
}

fn open(cluster: &Cluster, store: &str) -> S3Store {
    let env = cluster.env();
    S3Store::with_env(store, &S3Options::default(), |name| {
        env.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone())
    })
    .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn push_export_missing_and_list_against_seaweedfs() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let image_path = dir.path().join("image");
    let image = make_image(&image_path, 1);
    let store = cluster.store("images/test");

    let report = push(&cluster, &store, &key, &image_path, "app");
    let distinct = report["chunks_distinct"].as_u64().unwrap();
    assert_eq!(
        report["chunks_uploaded"].as_u64(),
        Some(distinct),
        "{report}"
    );
    assert_eq!(distinct, 12 + 1 + 1, "{report}");
    // Again: every chunk is found, nothing is uploaded.
    let again = push(&cluster, &store, &key, &image_path, "app");
    assert_eq!(again["chunks_uploaded"].as_u64(), Some(0), "{again}");
    assert_eq!(again["chunks_existing"].as_u64(), Some(distinct), "{again}");

    // Export with the endpoint on the command line instead of the environment.
    let out = dir.path().join("exported");
    run(lazyblk(&cluster, "export", &store, &key)
        .env_remove("AWS_ENDPOINT_URL")
        .args(["--s3-endpoint", &cluster.endpoint, "--name", "app", "--out"])
        .arg(&out));
    assert!(fs::read(&out).unwrap() == image, "exported image differs");

    // The same image and key give the same chunk ids in a directory store.
    let dir_store = dir.path().join("dir-store");
    run(Command::new(lazyblk_bin())
        .arg("push")
        .arg(&image_path)
        .arg("--store")
        .arg(&dir_store)
        .arg("--key")
        .arg(&key)
        .args(["--name", "app"]));
    let runtime = runtime();
    let s3 = open(&cluster, &store);
    let local = DirStore::open(&dir_store).unwrap();
    runtime.block_on(async {
        let ids = |listed: Vec<ListedChunk>| -> BTreeSet<ChunkId> {
            listed.into_iter().map(|chunk| chunk.id).collect()
        };
        let listed = ids(s3.list().await.unwrap());
        let expected = ids(local.list().await.unwrap());
        assert_eq!(listed.len() as u64, distinct);
        assert_eq!(listed, expected);

        let known: Vec<ChunkId> = listed.iter().copied().collect();
        let absent = ChunkId::of_envelope(b"never stored");
        let asked = [known[0], absent, known[5], known[1]];
        assert_eq!(s3.missing(&asked).await.unwrap(), [absent]);
        assert_eq!(
            s3.get(&absent).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        for id in &known {
            let envelope = s3.get(id).await.unwrap();
            assert_eq!(ChunkId::of_envelope(&envelope), *id);
        }
        let manifest = s3.get_manifest("nope").await.unwrap_err();
        assert_eq!(manifest.kind(), ErrorKind::NotFound);

        // Another prefix of the same bucket is another store.
        let other = open(&cluster, &cluster.store("elsewhere"));
        assert!(other.list().await.unwrap().is_empty());
        assert_eq!(other.missing(&known[..2]).await.unwrap(), known[..2]);

        // A body that does not hash to its id is refused by the server.
        let lie = s3.put(&absent, Bytes::from_static(b"other bytes")).await;
        assert!(lie.is_err(), "a chunk stored under a wrong id");
        s3.delete(&known[0]).await.unwrap();
        s3.delete(&known[0]).await.unwrap();
        assert_eq!(s3.missing(&known[..2]).await.unwrap(), [known[0]]);
    });
}

#[test]
fn wrong_or_missing_credentials_fail_at_once_and_say_what_to_check() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let image = dir.path().join("image");
    make_image(&image, 2);
    let store = cluster.store("p");

    let started = Instant::now();
    let mut wrong = lazyblk(&cluster, "push", &store, &key);
    wrong
        .env("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        .arg(&image)
        .args(["--name", "app"]);
    run_failing(
        &mut wrong,
        &format!("access to bucket \"{}\" denied", cluster.bucket),
    );
    run_failing(&mut wrong, "AWS_SECRET_ACCESS_KEY");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "a refusal is not retried"
    );

    let mut unset = lazyblk(&cluster, "export", &store, &key);
    unset
        .env_remove("AWS_ACCESS_KEY_ID")
        .args(["--name", "app", "--out"])
        .arg(dir.path().join("out"));
    run_failing(&mut unset, "AWS_ACCESS_KEY_ID is not set");

    let mut no_bucket = lazyblk(&cluster, "export", "s3://no-such-bucket/p", &key);
    no_bucket
        .args(["--name", "app", "--out"])
        .arg(dir.path().join("out"));
    run_failing(&mut no_bucket, "NoSuchBucket");
}

#[test]
fn every_chunk_still_reads_with_a_volume_server_down() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let image_path = dir.path().join("image");
    let image = make_image(&image_path, 3);
    let store = cluster.store("replicated");
    push(&cluster, &store, &key, &image_path, "app");

    cluster.kill_volume_server(0);

    let runtime = runtime();
    let s3 = open(&cluster, &store);
    runtime.block_on(async {
        let listed = s3.list().await.unwrap();
        assert_eq!(listed.len(), 14);
        for id in listed.iter().map(|chunk| &chunk.id) {
            let envelope = s3
                .get(id)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
            assert_eq!(ChunkId::of_envelope(&envelope), *id);
        }
    });
    let out = dir.path().join("exported");
    run(lazyblk(&cluster, "export", &store, &key)
        .args(["--name", "app", "--out"])
        .arg(&out));
    assert!(fs::read(&out).unwrap() == image, "exported image differs");

    // Two servers are left, enough for replication 001: new writes land too.
    let second = dir.path().join("second");
    let second_image = make_image(&second, 4);
    push(&cluster, &store, &key, &second, "second");
    run(lazyblk(&cluster, "export", &store, &key)
        .args(["--name", "second", "--out"])
        .arg(&out));
    assert!(
        fs::read(&out).unwrap() == second_image,
        "second image differs"
    );
}

#[test]
fn a_fuse_device_reads_its_chunks_from_s3() {
    let world = World::new();
    let cluster = Cluster::start();
    let image_path = world.path("image");
    let image = make_image(&image_path, 5);
    let store = cluster.store("fuse");
    push(&cluster, &store, &world.key(), &image_path, "app");

    let mnt = world.path("mnt");
    fs::create_dir_all(&mnt).unwrap();
    run(world
        .lazyblk()
        .envs(cluster.env())
        .args(["add", "--store", &store, "--key"])
        .arg(world.key())
        .args(["--name", "app", "--read-only", "--cache-dir"])
        .arg(world.path("cache"))
        .arg("--fuse")
        .arg(&mnt));
    let served = fs::read(mnt.join("disk"));
    let device = world.device(&mnt);
    world.del(&mnt);
    assert!(
        served.unwrap() == image,
        "the device's bytes differ from the image"
    );
    assert!(
        device["stats"]["chunks_fetched"].as_u64().unwrap_or(0) > 0,
        "no chunk came from the store: {device}"
    );
}

#[test]
fn gc_and_verify_with_repair_work_on_s3() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let image_path = dir.path().join("image");
    let image = make_image(&image_path, 6);
    let store = cluster.store("upkeep");
    push(&cluster, &store, &key, &image_path, "app");
    let dir_store = dir.path().join("dir-store");
    run(Command::new(lazyblk_bin())
        .arg("push")
        .arg(&image_path)
        .arg("--store")
        .arg(&dir_store)
        .arg("--key")
        .arg(&key)
        .args(["--name", "app"]));

    // Two chunks no manifest references, and one the image needs, lost.
    let strays = [b"stray one".as_slice(), b"stray two"];
    let runtime = runtime();
    let s3 = open(&cluster, &store);
    let lost = runtime.block_on(async {
        for stray in strays {
            let id = ChunkId::of_envelope(stray);
            s3.put(&id, Bytes::from_static(stray)).await.unwrap();
        }
        let lost = s3.list().await.unwrap()[0].id;
        s3.delete(&lost).await.unwrap();
        lost
    });
    // Past the grace period, with a second for Last-Modified's resolution.
    std::thread::sleep(Duration::from_millis(2500));

    let gc = |extra: &[&str]| -> serde_json::Value {
        let out = run(Command::new(lazyblk_bin())
            .envs(cluster.env())
            .args(["gc", "--store", &store, "--grace", "1s", "--json"])
            .args(extra));
        serde_json::from_slice(&out.stdout).expect("gc --json prints JSON")
    };
    let dry = gc(&["--dry-run"]);
    assert_eq!(dry["chunks_deleted"].as_u64(), Some(2), "{dry}");
    let report = gc(&[]);
    assert_eq!(report["chunks_deleted"].as_u64(), Some(2), "{report}");
    assert_eq!(report["chunks_referenced"].as_u64(), Some(13), "{report}");
    let strays_left = runtime.block_on(s3.missing(&strays.map(ChunkId::of_envelope)));
    assert_eq!(strays_left.unwrap().len(), 2, "the strays are gone");

    let verify = run(Command::new(lazyblk_bin())
        .envs(cluster.env())
        .args(["verify", "--store", &store, "--json", "--repair-from"])
        .arg(&dir_store));
    let verify: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(
        verify["missing"],
        serde_json::json!([lost.to_hex()]),
        "{verify}"
    );
    assert_eq!(
        verify["repaired"],
        serde_json::json!([lost.to_hex()]),
        "{verify}"
    );

    let out = dir.path().join("exported");
    run(lazyblk(&cluster, "export", &store, &key)
        .args(["--name", "app", "--out"])
        .arg(&out));
    assert!(fs::read(&out).unwrap() == image, "exported image differs");
}
