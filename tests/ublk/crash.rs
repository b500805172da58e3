//! A recoverable device whose process is SIGKILLed at random moments of a
//! write and flush workload, and recovered each time: every flushed write
//! reads back, and the cache the dead process left checks clean.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};

use super::*;

const ROUNDS: usize = 20;
const IMAGE_MIB: usize = 16;
const BLOCK: usize = 4096;

/// What the writer knows: the device's bytes as of its last completed
/// flush, and the writes since (recorded before each is issued).
struct Written {
    flushed: Vec<u8>,
    unflushed: Vec<(usize, Vec<u8>)>,
    writes: u64,
    flushes: u64,
}

impl Written {
    fn fold_flushed(&mut self) {
        for (at, data) in self.unflushed.drain(..) {
            self.flushed[at..at + data.len()].copy_from_slice(&data);
        }
        self.flushes += 1;
    }
}

/// Random O_DIRECT writes of 4-128 KiB to `dev`, an `fdatasync` (a flush
/// request) after every 1-7 of them, until `stop` is set; then one last
/// flush. A recoverable device holds the requests of a dead process for
/// the next one, so every write and flush must succeed, however long the
/// device spent orphaned.
fn write_and_flush(
    dev: &Path,
    seed: u64,
    state: &Mutex<Written>,
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let file = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .map_err(|e| format!("open {}: {e}", dev.display()))?;
    let size = state.lock().unwrap().flushed.len();
    let mut raw = vec![0u8; 32 * BLOCK + BLOCK];
    let aligned = raw.as_ptr().align_offset(BLOCK);
    let mut until_flush = rng.gen_range(1..8);
    while !stop.load(Ordering::Relaxed) {
        let len = BLOCK * rng.gen_range(1..=32);
        let at = BLOCK * rng.gen_range(0..=(size - len) / BLOCK);
        let buf = &mut raw[aligned..][..len];
        buf.copy_from_slice(&pseudo_random(rng.gen(), len));
        // Recorded first: a write the kill interrupts may land or not.
        state.lock().unwrap().unflushed.push((at, buf.to_vec()));
        file.write_all_at(buf, at as u64)
            .map_err(|e| format!("write {len} bytes at {at}: {e}"))?;
        state.lock().unwrap().writes += 1;
        until_flush -= 1;
        if until_flush == 0 {
            until_flush = rng.gen_range(1..8);
            let mut state = state.lock().unwrap();
            file.sync_data().map_err(|e| format!("flush: {e}"))?;
            state.fold_flushed();
        }
    }
    let mut state = state.lock().unwrap();
    file.sync_data().map_err(|e| format!("last flush: {e}"))?;
    state.fold_flushed();
    Ok(())
}

/// `verify-cache --json` on `cache`, which must pass and find no chunk
/// whose bytes are not the manifest's and nothing to repair.
fn verify_cache(w: &UblkWorld, name: &str, cache: &Path, when: &str) -> serde_json::Value {
    let out = run(w
        .world
        .with_store("verify-cache")
        .args(["--name", name, "--json"])
        .arg("--cache-dir")
        .arg(cache));
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("verify-cache --json prints JSON");
    assert_eq!(
        report["mismatched"],
        serde_json::json!([]),
        "{when}: {report}"
    );
    assert_eq!(
        report["repaired_on_open"],
        serde_json::json!([]),
        "{when}: {report}"
    );
    report
}

/// The first byte at which `got` differs from `expected`, for a message.
fn first_difference(got: &[u8], expected: &[u8]) -> Option<usize> {
    got.iter().zip(expected).position(|(a, b)| a != b)
}

/// Each round: a writer runs random O_DIRECT writes with an `fdatasync`
/// every few, the device process is SIGKILLed after a random delay,
/// `verify-cache` checks the cache while the device is orphaned, `recover`
/// serves it again, the writer's held requests complete, it flushes once
/// more and stops, and the whole device must read back as the writer's
/// flushed writes, byte for byte.
///
/// Why these checks hold, and why they are the right ones:
/// * The kernel hides the death from the writer: its requests wait for the
///   next process and none fails. So a flush after the recovery covers the
///   writes acknowledged before the death, and the device must still hold
///   every one of them (a device that fetched a changed chunk again from the
///   store, over a write the dead process acknowledged, fails here).
/// * `verify-cache` refuses a cache in use; the dead process's lock died
///   with it, and the recovering process has not taken it yet, so the check
///   sees the cache exactly as the kill left it: no present chunk the device
///   never wrote to may hold bytes other than the manifest's, and nothing
///   may need repair (a bitmap marking a chunk whose bytes are not in the
///   data file would show as one or the other).
///
/// The seed of the writes and kill delays is printed (set
/// `LAZYBLK_CRASH_SEED` to repeat them; the kills still land where the
/// timing puts them).
#[test]
#[ignore = "needs /dev/ublk-control: run in the VM by scripts/vm-test.sh"]
fn flushed_writes_survive_sigkill_and_recover_and_the_cache_checks_clean() {
    let seed = std::env::var("LAZYBLK_CRASH_SEED")
        .ok()
        .map(|s| s.parse().expect("LAZYBLK_CRASH_SEED is a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("seed {seed} (LAZYBLK_CRASH_SEED)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let w = UblkWorld::new();
    let image = w.raw_image("crash", 12, IMAGE_MIB);
    let cache = w.world.path("cache");
    let dev = w.add("crash", "cache", &["--recoverable"]);
    let mut written = Written {
        flushed: fs::read(&image).unwrap(),
        unflushed: Vec::new(),
        writes: 0,
        flushes: 0,
    };
    let mut chunks_written = 0;
    for round in 0..ROUNDS {
        let pid = w.device(dev.id)["pid"].as_u64().unwrap();
        let state = Arc::new(Mutex::new(written));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (path, state, stop, seed) =
                (dev.path.clone(), state.clone(), stop.clone(), rng.gen());
            std::thread::spawn(move || write_and_flush(&path, seed, &state, &stop))
        };
        let delay = Duration::from_millis(rng.gen_range(100..1000));
        std::thread::sleep(delay);
        run(Command::new("kill").args(["-KILL", &pid.to_string()]));
        stop.store(true, Ordering::Relaxed);
        wait_for("the device process to die", Duration::from_secs(30), || {
            !Path::new(&format!("/proc/{pid}")).exists()
        });
        let orphan = w.device(dev.id);
        assert_eq!(orphan["state"], "orphaned", "round {round}: {orphan}");

        let report = verify_cache(&w, "crash", &cache, &format!("round {round}, seed {seed}"));
        chunks_written += report["chunks_written"].as_u64().unwrap();
        let out = run(w
            .world
            .lazyblk()
            .args(["recover", "-n", &dev.id.to_string()]));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&dev.path.display().to_string()),
            "{out:?}"
        );
        let finished = writer.join().expect("the writer panicked");
        written = Arc::try_unwrap(state)
            .ok()
            .expect("the writer is done")
            .into_inner()
            .unwrap();
        if let Err(e) = finished {
            panic!("round {round}, seed {seed}: the writer failed across the kill: {e}");
        }
        let got = read_direct(&dev.path, 0, written.flushed.len());
        if let Some(at) = first_difference(&got, &written.flushed) {
            panic!(
                "round {round}, seed {seed}: byte {at} reads {:#x}, flushed {:#x}",
                got[at], written.flushed[at]
            );
        }
        println!(
            "round {round}: killed after {} ms; {} writes and {} flushes so far; \
             verify-cache checked {} chunks, {} written",
            delay.as_millis(),
            written.writes,
            written.flushes,
            report["chunks_checked"],
            report["chunks_written"]
        );
    }
    assert!(written.writes > 0 && written.flushes > 0);
    assert!(chunks_written > 0, "no crash left a written chunk to check");

    // Stopped cleanly and added again, not recoverable: the same bytes.
    w.del(&dev);
    verify_cache(&w, "crash", &cache, "after del");
    let dev = w.add("crash", "cache", &[]);
    let got = read_direct(&dev.path, 0, written.flushed.len());
    assert_eq!(
        first_difference(&got, &written.flushed),
        None,
        "after re-add"
    );
    w.del(&dev);
}
