//! Trace record and prefetch through the real kernel: record a start with
//! `add --record-trace`, remove the device, and check that the next `add`
//! prefetches exactly the recorded chunks and that readers see the same
//! bytes; a trace of another image is refused.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn stat(device: &serde_json::Value, key: &str) -> u64 {
    device["stats"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {device}"))
}

/// What a start reads: a few files, as a workload's imports would, and
/// one large one.
const READ: [&str; 5] = [
    "dir03/sub0/file001.bin",
    "dir07/sub1/file006.bin",
    "dir10/sub1/file014.bin",
    "marker.txt",
    "large.bin",
];

fn read_files(root: &Path) -> Vec<Vec<u8>> {
    READ.iter()
        .map(|f| fs::read(root.join(f)).unwrap())
        .collect()
}

/// `lazyblk trace SUB --store STORE --key KEY`.
fn trace(world: &World, sub: &str) -> std::process::Command {
    let mut cmd = world.lazyblk();
    cmd.args(["trace", sub, "--store"])
        .arg(world.store())
        .arg("--key")
        .arg(world.key());
    cmd
}

fn trace_show(world: &World, name: &str) -> serde_json::Value {
    let out = run(trace(world, "show").args(["--name", name, "--json"]));
    serde_json::from_slice(&out.stdout).expect("trace show --json prints JSON")
}

/// Waits (up to 30 s) until the device's prefetch is done.
fn prefetched(world: &World, mnt: &Path) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let device = world.device(mnt);
        if stat(&device, "prefetch_remaining") == 0 {
            return device;
        }
        assert!(Instant::now() < deadline, "prefetch never ended: {device}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_recorded_start_is_prefetched_by_the_next_add_and_reads_the_same() {
    let world = World::new();
    let tree = world.path("tree");
    make_tree(&tree);
    let image = world.path("image.ext4");
    make_ext4(&tree, &image, 96);
    world.push(&image, "app");
    let no_readahead = ["--readahead-chunks", "0"];

    // Record one start.
    let extra = [&no_readahead[..], &["--record-trace"]].concat();
    let fuse = world.add_with("app", "cache1", "fuse1", true, &extra);
    let root = world.mount_loop(&fuse, "root1", true);
    let first = read_files(&root);
    let recorded_fetches = stat(&world.device(&fuse), "demand_fetches");
    assert!(recorded_fetches > 0);
    world.umount(&root);
    world.del(&fuse);
    let shown = trace_show(&world, "app");
    assert_eq!(shown["runs"].as_array().unwrap().len(), 1, "{shown}");
    let recorded = shown["runs"][0]["chunks"].as_u64().unwrap();
    assert_eq!(shown["prefetch"].as_array().unwrap().len() as u64, recorded);
    assert!(recorded > 0 && recorded <= recorded_fetches, "{shown}");

    // The next add prefetches those chunks, and only those, before anyone
    // reads: nothing is mounted yet.
    let fuse = world.add_with("app", "cache2", "fuse2", true, &no_readahead);
    let device = prefetched(&world, &fuse);
    let planned = stat(&device, "prefetch_planned");
    assert!(planned >= recorded, "{device}");
    assert_eq!(stat(&device, "chunks_prefetched"), planned, "{device}");
    assert_eq!(stat(&device, "chunks_fetched"), planned, "{device}");
    assert_eq!(stat(&device, "demand_fetches"), 0, "{device}");

    // Readers see the same bytes, and the start now misses little: the
    // same reads of the same files (a kernel may read a little
    // differently from one mount to the next).
    let root = world.mount_loop(&fuse, "root2", true);
    let second = read_files(&root);
    assert!(first == second, "prefetch changed what a reader sees");
    for (file, bytes) in READ.iter().zip(&second) {
        assert!(fs::read(tree.join(file)).unwrap() == *bytes, "{file}");
    }
    let device = world.device(&fuse);
    assert!(stat(&device, "prefetched_chunks_read") > 0, "{device}");
    assert!(
        stat(&device, "demand_fetches") * 4 <= recorded_fetches,
        "{device}"
    );
    assert!(
        stat(&device, "prefetched_chunks_read") * 4 >= planned * 3,
        "{device}"
    );
    world.umount(&root);
    world.del(&fuse);

    // --no-prefetch fetches nothing up front.
    let fuse = world.add_with(
        "app",
        "cache3",
        "fuse3",
        true,
        &[&no_readahead[..], &["--no-prefetch"]].concat(),
    );
    let device = world.device(&fuse);
    assert_eq!(stat(&device, "prefetch_planned"), 0, "{device}");
    assert_eq!(stat(&device, "chunks_fetched"), 0, "{device}");
    world.del(&fuse);

    // A trace that belongs to another image is refused, naming both.
    let other_tree = world.path("other-tree");
    fs::create_dir_all(&other_tree).unwrap();
    fs::write(other_tree.join("hello.txt"), b"another image").unwrap();
    let other = world.path("other.ext4");
    make_ext4(&other_tree, &other, 16);
    world.push(&other, "other");
    let manifests = world.store().join("manifests");
    // Each recorded run is an object of its own beside the trace.
    let app_run = fs::read_dir(&manifests)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| {
            let name = path.file_name().unwrap().to_string_lossy();
            name.starts_with("app.trace.") && name.ends_with(".trace")
        })
        .expect("the recorded run is stored");
    fs::copy(app_run, manifests.join("other.trace")).unwrap();
    let mnt = world.path("fuse4");
    fs::create_dir_all(&mnt).unwrap();
    run_failing(
        world
            .with_store("add")
            .args(["--name", "other", "--cache-dir"])
            .arg(world.path("cache4"))
            .arg("--fuse")
            .arg(&mnt),
        "was recorded for image \"app\", not \"other\"",
    );
    let fuse = world.add_with("other", "cache4", "fuse4", true, &["--no-prefetch"]);
    world.del(&fuse);

    // Push refuses a name that would pass for a trace.
    run_failing(
        world
            .with_store("push")
            .arg(&other)
            .args(["--name", "x.trace"]),
        "must not end with \".trace\"",
    );
}

#[test]
fn trace_merge_keeps_what_most_runs_read() {
    let world = World::new();
    let tree = world.path("tree");
    make_tree(&tree);
    let image = world.path("image.ext4");
    make_ext4(&tree, &image, 96);
    world.push(&image, "app");
    // Three recorded starts: every one reads the common file, one reads
    // another file besides.
    for (run, extra_file) in [(1, None), (2, Some("large.bin")), (3, None)] {
        let fuse = world.add_with(
            "app",
            &format!("cache{run}"),
            &format!("fuse{run}"),
            true,
            &["--record-trace", "--no-prefetch", "--readahead-chunks", "0"],
        );
        let root = world.mount_loop(&fuse, &format!("root{run}"), true);
        fs::read(root.join("dir05/sub2/file006.bin")).unwrap();
        if let Some(file) = extra_file {
            fs::read(root.join(file)).unwrap();
        }
        world.umount(&root);
        world.del(&fuse);
    }
    let shown = trace_show(&world, "app");
    let runs: Vec<u64> = shown["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["chunks"].as_u64().unwrap())
        .collect();
    assert_eq!(runs.len(), 3, "{shown}");
    // large.bin is 24 MiB: its run read far more than the others.
    assert!(runs[1] > runs[0] + 40, "{shown}");
    let majority = shown["prefetch"].as_array().unwrap().len() as u64;
    assert!(majority <= runs[0].max(runs[2]), "{shown}");

    // Union instead of majority: large.bin's chunks come back.
    run(trace(&world, "merge").args(["--name", "app", "--threshold", "0"]));
    let merged = trace_show(&world, "app");
    assert_eq!(merged["runs"].as_array().unwrap().len(), 1, "{merged}");
    let union = merged["runs"][0]["chunks"].as_u64().unwrap();
    assert!(union >= runs[1], "{merged}");

    // A new version with no trace of its own takes the old one's runs.
    world.push(&image, "app-v2");
    run(trace(&world, "merge").args(["--name", "app-v2", "app"]));
    let v2 = trace_show(&world, "app-v2");
    assert_eq!(v2["image"], "app-v2", "{v2}");
    assert_eq!(v2["prefetch"], merged["prefetch"], "{v2}");
    // Naming an image without a trace is an error, not an empty merge.
    run_failing(
        trace(&world, "merge").args(["--name", "app-v2", "nothing"]),
        "image \"nothing\" has no trace",
    );
}

/// `lazyblk trace SUB --store URL --token-file TOKEN --key KEY --name app`.
fn trace_on(world: &World, sub: &str, url: &str, token: &Path) -> std::process::Command {
    let mut cmd = world.lazyblk();
    cmd.args(["trace", sub, "--store", url, "--token-file"])
        .arg(token)
        .arg("--key")
        .arg(world.key())
        .args(["--name", "app"]);
    cmd
}

/// The names in the directory store's manifest folder, sorted.
fn manifest_files(world: &World) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(world.store().join("manifests"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with('.'))
        .collect();
    names.sort();
    names
}

#[test]
fn a_merge_through_a_chunk_server_folds_twenty_runs_and_removes_their_objects() {
    use lazyblk::chunk::{ChunkId, RunStamp, TenantKey, Trace, TraceRun};

    let world = World::new();
    let image = world.path("image");
    fs::write(&image, pseudo_random(3, 1 << 20)).unwrap();
    world.push(&image, "app");
    // Twenty recorded starts, stored as devices store them: all read
    // chunks 1 to 4 (in one of two orders), each one of its own besides.
    let tenant = TenantKey::parse(&fs::read(world.key()).unwrap()).unwrap();
    let id = |n: u8| ChunkId([n; 32]);
    for n in 0..20u8 {
        let ids = if n % 2 == 0 {
            vec![id(1), id(2), id(3), id(100 + n), id(4)]
        } else {
            vec![id(2), id(1), id(3), id(4), id(100 + n)]
        };
        let run = Trace {
            image: "app".into(),
            runs: vec![TraceRun {
                manifest_digest: [0; 32],
                recorded_at: 1_700_000_000 + u64::from(n),
                ids,
            }],
            folded: None,
        };
        let stamp = RunStamp::new(1_700_000_000_000_000_000 + u64::from(n), 7);
        let name = lazyblk::store::trace_run_name("app", stamp);
        fs::write(
            world.store().join("manifests").join(name),
            run.seal(&tenant),
        )
        .unwrap();
    }
    let token = world.path("token");
    fs::write(&token, "trace-writer").unwrap();
    let server = serve::Served::start([
        "--store".as_ref(),
        world.store().as_os_str(),
        "--write-token-file".as_ref(),
        token.as_os_str(),
    ]);

    let show = |world: &World| -> serde_json::Value {
        let out = run(trace_on(world, "show", &server.url, &token).arg("--json"));
        serde_json::from_slice(&out.stdout).expect("trace show --json prints JSON")
    };
    let before = show(&world);
    assert_eq!(before["runs"].as_array().unwrap().len(), 16, "{before}");
    assert_eq!(before["run_objects"], 16, "{before}");
    assert_eq!(before["stale_run_objects"], 4, "{before}");
    let hex = |n: u8| serde_json::Value::from(id(n).to_hex());
    assert_eq!(
        before["prefetch"],
        serde_json::Value::Array(vec![hex(1), hex(2), hex(3), hex(4)])
    );

    let out = run(&mut trace_on(&world, "merge", &server.url, &token));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("removed 20 of 20 run objects folded"),
        "{said}"
    );
    assert_eq!(manifest_files(&world), ["app", "app.trace"]);
    let after = show(&world);
    assert_eq!(after["runs"].as_array().unwrap().len(), 1, "{after}");
    assert_eq!(after["prefetch"], before["prefetch"], "the plan changed");
    assert_eq!(after["stale_run_objects"], 0, "{after}");

    // Gc and verify take the merged trace for no manifest.
    let gc = run(world
        .lazyblk()
        .args(["gc", "--json", "--store"])
        .arg(world.store()));
    let gc: serde_json::Value = serde_json::from_slice(&gc.stdout).unwrap();
    assert_eq!(gc["manifests"], 1, "{gc}");
    let verified = run(world
        .lazyblk()
        .args(["verify", "--json", "--store"])
        .arg(world.store()));
    let verified: serde_json::Value = serde_json::from_slice(&verified.stdout).unwrap();
    assert_eq!(verified["chunks_checked"], 2, "{verified}");
}

#[test]
fn del_reports_a_trace_run_the_store_refused() {
    let world = World::new();
    let image = world.path("image");
    fs::write(&image, pseudo_random(4, 2 << 20)).unwrap();
    world.push(&image, "app");
    // The device reads with the read token; writes need the other one.
    let (read_token, write_token) = (world.path("read-token"), world.path("write-token"));
    fs::write(&read_token, "reader").unwrap();
    fs::write(&write_token, "writer").unwrap();
    let server = serve::Served::start([
        "--store".as_ref(),
        world.store().as_os_str(),
        "--read-token-file".as_ref(),
        read_token.as_os_str(),
        "--write-token-file".as_ref(),
        write_token.as_os_str(),
    ]);
    world.use_store(&server.url);
    let mnt = world.add_with(
        "app",
        "cache",
        "fuse",
        true,
        &[
            "--record-trace",
            "--token-file",
            read_token.to_str().unwrap(),
        ],
    );
    let mut first = vec![0; 4096];
    use std::io::Read;
    fs::File::open(mnt.join("disk"))
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    assert_eq!(first, pseudo_random(4, 4096));
    let pid = world.device(&mnt)["pid"].as_u64().unwrap();

    let out = world
        .lazyblk()
        .arg("del")
        .arg("--fuse")
        .arg(&mnt)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("stopped device {pid}")),
        "{stdout}"
    );
    for needle in [
        "the trace run it recorded for image \"app\" was not stored",
        "store trace run \"app.trace.",
        "401",
        "the token does not grant writes",
    ] {
        assert!(stderr.contains(needle), "no {needle:?} in: {stderr}");
    }
    // The device is gone all the same, and the report with it: nothing is
    // left in the run directory, and no run in the store.
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    let left: Vec<_> = fs::read_dir(world.run_dir()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(manifest_files(&world), ["app"]);
    // A second del finds no device; the report was told once.
    run_failing(
        world.lazyblk().arg("del").arg("--fuse").arg(&mnt),
        "no lazyblk device is mounted",
    );
}
