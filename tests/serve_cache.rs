//! `lazyblk serve` in cache mode, through the real binary: a cache server
//! (`--origin URL --cache-dir DIR`) in front of an origin chunk server,
//! both on 127.0.0.1, read by `export` processes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::serve::Served;
use common::{lazyblk_bin, pseudo_random, run};

const CHUNKS: usize = 24;
const CHUNK: usize = 64 * 1024;

fn export(dir: &Path, store: &str, out: &str) -> Command {
    let mut cmd = Command::new(lazyblk_bin());
    cmd.args(["export", "--name", "app", "--store", store, "--key"])
        .arg(dir.join("key"))
        .arg("--out")
        .arg(dir.join(out));
    cmd
}

fn path_arg(path: PathBuf) -> std::ffi::OsString {
    path.into_os_string()
}

#[test]
fn a_cache_server_fetches_each_chunk_from_its_origin_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    run(Command::new(lazyblk_bin())
        .args(["keygen", "--out"])
        .arg(root.join("key")));
    let image = pseudo_random(9, CHUNKS * CHUNK);
    std::fs::write(root.join("app.img"), &image).unwrap();
    run(Command::new(lazyblk_bin())
        .arg("push")
        .arg(root.join("app.img"))
        .args(["--name", "app", "--chunk-size", "64K", "--store"])
        .arg(root.join("origin"))
        .arg("--key")
        .arg(root.join("key")));

    let origin = Served::start(["--store".as_ref(), root.join("origin").as_os_str()]);
    let cache_args = [
        "--origin".into(),
        origin.url.clone().into(),
        "--cache-dir".into(),
        path_arg(root.join("cache")),
        "--cache-size".into(),
        "64M".into(),
    ];
    let cache_refs: Vec<&std::ffi::OsStr> = cache_args.iter().map(|a| a.as_os_str()).collect();
    let cache = Served::start(&cache_refs);

    // Four readers at once: each chunk still leaves the origin once.
    let mut readers: Vec<Child> = (0..4)
        .map(|n| {
            export(root, &cache.url, &format!("out{n}"))
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for reader in &mut readers {
        assert!(reader.wait().unwrap().success());
    }
    for n in 0..4 {
        assert!(std::fs::read(root.join(format!("out{n}"))).unwrap() == image);
    }
    assert_eq!(origin.chunk_gets(), CHUNKS as u64);
    assert_eq!(cache.chunk_gets(), 4 * CHUNKS as u64);
    // Its /metrics tells which layer answered: the origin once per chunk
    // (the other readers waited on those fetches).
    let text = cache.metrics();
    assert_eq!(layer_hits(&text, &origin.url), CHUNKS as u64, "{text}");

    // A restarted cache server serves from its disk: the origin sees nothing.
    drop(cache);
    let cache = Served::start(&cache_refs);
    run(&mut export(root, &cache.url, "again"));
    assert!(std::fs::read(root.join("again")).unwrap() == image);
    assert_eq!(origin.chunk_gets(), CHUNKS as u64);
    let text = cache.metrics();
    assert_eq!(layer_hits(&text, &origin.url), 0, "{text}");
    let disk = format!("host cache {}", root.join("cache").display());
    assert_eq!(layer_hits(&text, &disk), CHUNKS as u64, "{text}");
    assert_eq!(layer_hits(&text, "memory"), 0, "{text}");
}

/// Hits of the cache server's layer `tier`, from its /metrics text.
fn layer_hits(text: &str, tier: &str) -> u64 {
    let series = format!("lazyblk_store_tier_hits_total{{tier=\"{tier}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .parse()
        .unwrap()
}
