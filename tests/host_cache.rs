//! The host cache shared by real processes: `lazyblk export` runs of two
//! images with the same base, through one `--host-cache` in front of a
//! directory store.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{lazyblk_bin, pseudo_random, run};

const CHUNK: usize = 64 * 1024;
const BASE_CHUNKS: usize = 16;
const OWN_CHUNKS: usize = 4;

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    /// A store holding images `a` and `b`: the same 16 base chunks, then
    /// 4 chunks of their own.
    fn new() -> Setup {
        let setup = Setup {
            dir: tempfile::tempdir().unwrap(),
        };
        run(lazyblk().args(["keygen", "--out"]).arg(setup.path("key")));
        let base = pseudo_random(1, BASE_CHUNKS * CHUNK);
        for (name, seed) in [("a", 2), ("b", 3)] {
            let mut image = base.clone();
            image.extend(pseudo_random(seed, OWN_CHUNKS * CHUNK));
            let file = setup.path(&format!("{name}.img"));
            fs::write(&file, image).unwrap();
            run(lazyblk()
                .arg("push")
                .arg(&file)
                .args(["--name", name, "--chunk-size", "64K", "--store"])
                .arg(setup.path("origin"))
                .arg("--key")
                .arg(setup.path("key")));
        }
        setup
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `export` of `name` through the host cache `cache` of `size` bytes.
    fn export(&self, name: &str, cache: &str, size: &str) -> Command {
        let mut cmd = lazyblk();
        cmd.args(["export", "--name", name, "--store"])
            .arg(self.path("origin"))
            .arg("--key")
            .arg(self.path("key"))
            .arg("--host-cache")
            .arg(self.path(cache))
            .args(["--host-cache-size", size, "--out"])
            .arg(self.path(&format!("{name}-{cache}.out")));
        cmd
    }

    fn check_output(&self, name: &str, cache: &str) {
        let exported = fs::read(self.path(&format!("{name}-{cache}.out"))).unwrap();
        assert!(exported == fs::read(self.path(&format!("{name}.img"))).unwrap());
    }
}

fn lazyblk() -> Command {
    Command::new(lazyblk_bin())
}

/// Chunk files under a store or cache directory, with their sizes.
fn chunk_files(root: &Path) -> Vec<(String, u64)> {
    let mut files = Vec::new();
    for prefix in fs::read_dir(root.join("chunks")).unwrap() {
        for entry in fs::read_dir(prefix.unwrap().path()).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            if !name.starts_with('.') {
                files.push((name, entry.metadata().unwrap().len()));
            }
        }
    }
    files
}

/// The hits of each tier an `export` reports.
fn tier_hits(stdout: &[u8]) -> Vec<u64> {
    let text = String::from_utf8_lossy(stdout);
    let json = text.split_once(": ").expect("export prints a report").1;
    let report: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    report["tiers"]
        .as_array()
        .expect("tier counters")
        .iter()
        .map(|t| t["hits"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_second_image_with_the_same_base_fetches_only_its_own_chunks() {
    let setup = Setup::new();
    let out = run(&mut setup.export("a", "cache", "1G"));
    assert_eq!(
        tier_hits(&out.stdout),
        [0, (BASE_CHUNKS + OWN_CHUNKS) as u64]
    );
    setup.check_output("a", "cache");
    let cached = chunk_files(&setup.path("cache"));
    assert_eq!(cached.len(), BASE_CHUNKS + OWN_CHUNKS);

    // What the first process cached is gone from the origin: the second
    // process can only have it from the host cache.
    for (id, _) in &cached {
        fs::remove_file(setup.path("origin/chunks").join(&id[..2]).join(id)).unwrap();
    }
    let out = run(&mut setup.export("b", "cache", "1G"));
    assert_eq!(
        tier_hits(&out.stdout),
        [BASE_CHUNKS as u64, OWN_CHUNKS as u64]
    );
    setup.check_output("b", "cache");

    // Private: the directory 0700, the chunk files 0600.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&setup.path("cache")), 0o700);
    let (id, _) = &cached[0];
    assert_eq!(
        mode(&setup.path("cache/chunks").join(&id[..2]).join(id)),
        0o600
    );
}

#[test]
fn processes_exporting_at_once_share_one_bounded_cache() {
    let setup = Setup::new();
    // Room for 10 of the 24 distinct chunks.
    let size = (10 * (CHUNK + 64)).to_string();
    let mut first = setup.export("a", "small", &size).spawn().unwrap();
    let mut second = setup.export("b", "small", &size).spawn().unwrap();
    assert!(first.wait().unwrap().success());
    assert!(second.wait().unwrap().success());
    setup.check_output("a", "small");
    setup.check_output("b", "small");
    let cached = chunk_files(&setup.path("small"));
    let bytes: u64 = cached.iter().map(|f| f.1).sum();
    assert!(bytes <= 10 * (CHUNK as u64 + 64), "{bytes} bytes cached");
    assert!(!cached.is_empty());

    // Survives a restart: a later process still reads what is there.
    let out = run(&mut setup.export("a", "small", &size));
    assert!(
        tier_hits(&out.stdout)[0] > 0,
        "{:?}",
        tier_hits(&out.stdout)
    );
    setup.check_output("a", "small");
}

#[test]
fn the_host_cache_size_needs_a_host_cache_and_a_foreign_directory_is_refused() {
    let setup = Setup::new();
    let out = lazyblk()
        .args([
            "export",
            "--name",
            "a",
            "--host-cache-size",
            "1G",
            "--store",
        ])
        .arg(setup.path("origin"))
        .arg("--key")
        .arg(setup.path("key"))
        .arg("--out")
        .arg(setup.path("x"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--host-cache"));

    fs::create_dir(setup.path("home")).unwrap();
    fs::write(setup.path("home/notes"), b"mine").unwrap();
    let out = setup.export("a", "home", "1G").output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a host cache"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
