//! Crypto throughput of the push and fetch paths, single-threaded.
//!
//! `cargo bench --bench crypto` seals and opens 1 GiB of random data in
//! 512 KiB chunks (`LAZYBLK_BENCH_BYTES` shrinks it, `LAZYBLK_BENCH_ROUNDS`
//! sets how many passes; the best pass counts) and prints one `name=value`
//! line per figure, in MB/s (10^6 bytes per second, as `openssl speed`):
//!
//! * `push_mbps`: [`seal_chunk`] (SHA-256 key, AES-256-GCM, SHA-256 id);
//! * `fetch_mbps`: [`open_chunk`] (SHA-256 id check, AES-256-GCM open);
//! * the components: SHA-256 from `sha2` and from `ring`, and AES-256-GCM
//!   seal from `ring` and from RustCrypto's `aes-gcm`, side by side.
//!
//! `scripts/bench-crypto.sh` sets these against the bound `openssl speed`
//! measures on the same machine. Under `cargo test` (no `--bench` argument)
//! the same code runs once over a few chunks, so the benchmark stays working.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit};
use lazyblk::chunk::{open_chunk, seal_chunk, Salt, SealedChunk, DEFAULT_CHUNK_SIZE};
use rand::RngCore;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use sha2::{Digest, Sha256};

const CHUNK: usize = DEFAULT_CHUNK_SIZE as usize;
const AAD: &[u8] = b"bench";

struct Config {
    smoke: bool,
    bytes: usize,
    rounds: usize,
}

fn env_number(name: &str) -> Option<usize> {
    let text = std::env::var(name).ok()?;
    match parse_size(&text) {
        Some(n) => Some(n),
        None => {
            eprintln!("{name}={text:?} is not a number (suffixes K, M, G allowed)");
            std::process::exit(2);
        }
    }
}

fn parse_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let shift = match unit.to_ascii_uppercase().trim_end_matches("IB") {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => return None,
    };
    digits.parse::<usize>().ok()?.checked_mul(1 << shift)
}

fn config() -> Config {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not.
    let benchmarking = std::env::args().any(|a| a == "--bench");
    if !benchmarking {
        return Config {
            smoke: true,
            bytes: 4 * CHUNK,
            rounds: 1,
        };
    }
    let bytes = env_number("LAZYBLK_BENCH_BYTES").unwrap_or(1 << 30);
    let rounds = env_number("LAZYBLK_BENCH_ROUNDS").unwrap_or(3).max(1);
    // Whole chunks only, and at least one.
    let bytes = (bytes / CHUNK).max(1) * CHUNK;
    Config {
        smoke: false,
        bytes,
        rounds,
    }
}

fn mbps(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e6
}

/// Runs `pass` `rounds` times and returns the shortest time: on a shared
/// machine the fastest pass is the one least disturbed by others.
fn best_of(rounds: usize, mut pass: impl FnMut() -> Duration) -> Duration {
    (0..rounds).map(|_| pass()).min().expect("rounds >= 1")
}

fn timed(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

fn report(name: &str, bytes: usize, elapsed: Duration) {
    println!("{name}={:.1}", mbps(bytes, elapsed));
}

fn main() {
    let cfg = config();
    if cfg.smoke {
        println!("# smoke run (cargo test, no --bench): these figures are not measurements");
    }
    let mut data = vec![0u8; cfg.bytes];
    rand::thread_rng().fill_bytes(&mut data);
    let salt = Salt([7; 32]);
    println!(
        "# {} MiB of random data in {} KiB chunks, best of {} single-threaded passes, MB = 10^6 bytes",
        cfg.bytes >> 20,
        CHUNK >> 10,
        cfg.rounds
    );
    println!("bytes={}", cfg.bytes);
    println!("chunk_size={CHUNK}");

    // A push seals a chunk, writes it out and drops it, so the allocator
    // hands the next chunk the same memory: the timed pass does the same.
    // The fetch pass then consumes envelopes sealed outside the timing, as a
    // real fetch owns the buffer it receives.
    let mut push = Duration::MAX;
    let mut fetch = Duration::MAX;
    for _ in 0..cfg.rounds {
        push = push.min(timed(|| {
            for c in data.chunks(CHUNK) {
                black_box(seal_chunk(&salt, c));
            }
        }));
        let sealed: Vec<SealedChunk> = data.chunks(CHUNK).map(|c| seal_chunk(&salt, c)).collect();
        let mut opened = Vec::with_capacity(sealed.len());
        fetch = fetch.min(timed(|| {
            for s in sealed {
                let plain = open_chunk(&s.id, &s.key, s.envelope).expect("own chunk opens");
                opened.push(plain);
            }
        }));
        // Outside the timing: a benchmark of code that returns wrong bytes
        // would be meaningless.
        assert!(
            opened.len() == cfg.bytes / CHUNK
                && opened.iter().zip(data.chunks(CHUNK)).all(|(o, d)| o == d),
            "open_chunk did not return the sealed plaintext"
        );
    }
    report("push_mbps", cfg.bytes, push);
    report("fetch_mbps", cfg.bytes, fetch);

    let sha2 = best_of(cfg.rounds, || {
        timed(|| {
            for c in data.chunks(CHUNK) {
                black_box(Sha256::digest(c));
            }
        })
    });
    report("sha256_sha2_mbps", cfg.bytes, sha2);

    let ring_sha = best_of(cfg.rounds, || {
        timed(|| {
            for c in data.chunks(CHUNK) {
                black_box(ring::digest::digest(&ring::digest::SHA256, c));
            }
        })
    });
    report("sha256_ring_mbps", cfg.bytes, ring_sha);

    // The AEADs encrypt the data in place: random bytes stay random, so each
    // pass sees input of the same kind without a copy inside the timing.
    let ring_key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[3; 32]).expect("32-byte key"));
    let ring_seal = best_of(cfg.rounds, || {
        timed(|| {
            for c in data.chunks_mut(CHUNK) {
                let tag = ring_key
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key([0; 12]),
                        Aad::from(AAD),
                        c,
                    )
                    .expect("chunk below the GCM length limit");
                let _ = black_box(tag);
            }
        })
    });
    report("aes256gcm_ring_seal_mbps", cfg.bytes, ring_seal);

    let rc_key = Aes256Gcm::new_from_slice(&[3; 32]).expect("32-byte key");
    let rc_seal = best_of(cfg.rounds, || {
        timed(|| {
            for c in data.chunks_mut(CHUNK) {
                let tag = rc_key
                    .encrypt_in_place_detached(&[0; 12].into(), AAD, c)
                    .expect("chunk below the GCM length limit");
                let _ = black_box(tag);
            }
        })
    });
    report("aes256gcm_rustcrypto_seal_mbps", cfg.bytes, rc_seal);
}
