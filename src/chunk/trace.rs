//! Access traces: which chunks a device's readers asked for first, in order,
//! sealed with the tenant key so the store learns nothing of an image's
//! access pattern.
//!
//! A trace keeps several recorded *runs* (one per device that recorded) so
//! that [`merge`] can keep what most starts read rather than what one start
//! happened to touch. Runs are keyed by [`ChunkId`], not chunk index: a
//! rebuild that shifts unrelated data moves indices but keeps the ids of
//! unchanged chunks, so the trace of the previous version still helps.
//! A merged trace also names the stored runs it folded ([`RunStamp`]), so
//! that a reader skips those runs even where their objects are still
//! there. The byte layout is specified in docs/FORMAT.md.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use std::collections::HashMap;

use super::keys::hmac_sha256;
use super::{ChunkId, TenantKey};

const MAGIC: &[u8; 4] = b"LZBT";
/// Traces without a list of folded runs (every recorded run) are written
/// in version 1, which readers of before the list still take; a merged
/// trace, with the list, in version 2.
const VERSION_RUNS: u8 = 1;
const VERSION_FOLDED: u8 = 2;
const HEADER_LEN: usize = 8;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const TRACE_KEY_LABEL: &str = "lazyblk trace key v1";
/// Runs a trace keeps; recording one more forgets the oldest.
pub const MAX_TRACE_RUNS: usize = 16;
/// The default of [`merge`]'s threshold: a chunk is kept when more than half
/// of the runs read it.
pub const DEFAULT_MERGE_THRESHOLD: f64 = 0.5;

/// One recorded start: the chunks its readers asked for, first access
/// first, each once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceRun {
    /// [`crate::chunk::manifest_digest`] of the manifest the run was
    /// recorded on.
    pub manifest_digest: [u8; 32],
    /// When the run ended, in seconds since the Unix epoch.
    pub recorded_at: u64,
    pub ids: Vec<ChunkId>,
}

/// Names one stored run object among an image's runs: when it was stored
/// (nanoseconds since the Unix epoch, big-endian) and a random tag, so
/// stamps sort by time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunStamp(pub [u8; 12]);

impl RunStamp {
    pub fn new(unix_nanos: u64, tag: u32) -> RunStamp {
        let mut stamp = [0; 12];
        stamp[..8].copy_from_slice(&unix_nanos.to_be_bytes());
        stamp[8..].copy_from_slice(&tag.to_be_bytes());
        RunStamp(stamp)
    }

    /// When the run was stored, in nanoseconds since the Unix epoch.
    pub fn unix_nanos(&self) -> u64 {
        u64::from_be_bytes(self.0[..8].try_into().expect("8 bytes"))
    }
}

/// The runs recorded for one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// The manifest name the trace belongs to: a trace is refused for any
    /// other image unless one of its runs was recorded on that very
    /// manifest.
    pub image: String,
    /// Oldest first.
    pub runs: Vec<TraceRun>,
    /// The stored runs a merge folded into this trace (and those it dropped
    /// as older than the runs it kept): a reader skips them. `None` in a
    /// recorded run, and in a merged trace written before the list
    /// existed.
    pub folded: Option<Vec<RunStamp>>,
}

/// Why a trace could not be read. Every message names the trace.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("trace {name:?}: not a lazyblk trace (bad magic)")]
    BadMagic { name: String },
    #[error("trace {name:?}: format version {version} is not supported (this build reads versions {VERSION_RUNS} and {VERSION_FOLDED})")]
    UnsupportedVersion { name: String, version: u8 },
    #[error("trace {name:?}: authentication failed: wrong tenant key, or the trace was altered")]
    Authentication { name: String },
    #[error("trace {name:?}: malformed: {reason}")]
    Malformed { name: String, reason: String },
    #[error("trace {name:?} was recorded for image {recorded_for:?}, not {image:?}, and none of its runs on this manifest: refused")]
    OtherImage {
        name: String,
        recorded_for: String,
        image: String,
    },
}

impl Trace {
    /// Adds `run`, forgetting the oldest runs beyond [`MAX_TRACE_RUNS`].
    pub fn push_run(&mut self, run: TraceRun) {
        self.runs.push(run);
        let excess = self.runs.len().saturating_sub(MAX_TRACE_RUNS);
        self.runs.drain(..excess);
    }

    /// The runs to prefetch `image` (whose sealed manifest has digest
    /// `digest`) from: all of them if the trace belongs to that image (runs
    /// on an earlier version still help: their ids are mapped onto the new
    /// manifest), else refused, unless a run was recorded on this very
    /// manifest (a trace copied along with an image renamed).
    pub fn runs_for(
        &self,
        trace_name: &str,
        image: &str,
        digest: &[u8; 32],
    ) -> Result<Vec<&[ChunkId]>, TraceError> {
        let own = self.image == image || self.runs.iter().any(|r| r.manifest_digest == *digest);
        if !own {
            return Err(TraceError::OtherImage {
                name: trace_name.to_owned(),
                recorded_for: self.image.clone(),
                image: image.to_owned(),
            });
        }
        Ok(self.runs.iter().map(|r| &r.ids[..]).collect())
    }

    /// Serialises and seals the trace with `tenant`'s trace subkey. The
    /// nonce is derived from the content, as for manifests.
    pub fn seal(&self, tenant: &TenantKey) -> Vec<u8> {
        let mut body = Vec::new();
        body.push(self.image.len() as u8);
        body.extend_from_slice(self.image.as_bytes());
        body.extend_from_slice(&(self.runs.len() as u16).to_le_bytes());
        for run in &self.runs {
            body.extend_from_slice(&run.manifest_digest);
            body.extend_from_slice(&run.recorded_at.to_le_bytes());
            body.extend_from_slice(&(run.ids.len() as u32).to_le_bytes());
            for id in &run.ids {
                body.extend_from_slice(&id.0);
            }
        }
        if let Some(folded) = &self.folded {
            body.extend_from_slice(&(folded.len() as u32).to_le_bytes());
            for stamp in folded {
                body.extend_from_slice(&stamp.0);
            }
        }
        let key = tenant.subkey(TRACE_KEY_LABEL);
        let header = header(if self.folded.is_some() {
            VERSION_FOLDED
        } else {
            VERSION_RUNS
        });
        let nonce: [u8; NONCE_LEN] = hmac_sha256(&key, &body)[..NONCE_LEN]
            .try_into()
            .expect("HMAC output is longer than a nonce");
        let tag = aead(&key)
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&header),
                &mut body,
            )
            .expect("a trace is far below the AES-GCM length limit");
        let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + body.len() + TAG_LEN);
        out.extend_from_slice(&header);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// Authenticates and opens a sealed trace stored under `name`.
    pub fn open(name: &str, sealed: &[u8], tenant: &TenantKey) -> Result<Trace, TraceError> {
        let malformed = |reason: &str| TraceError::Malformed {
            name: name.to_owned(),
            reason: reason.to_owned(),
        };
        if sealed.len() < 4 || &sealed[..4] != MAGIC {
            return Err(TraceError::BadMagic {
                name: name.to_owned(),
            });
        }
        if sealed.len() < HEADER_LEN + NONCE_LEN + TAG_LEN {
            return Err(malformed("shorter than its header"));
        }
        let version = sealed[4];
        if version != VERSION_RUNS && version != VERSION_FOLDED {
            return Err(TraceError::UnsupportedVersion {
                name: name.to_owned(),
                version,
            });
        }
        if sealed[5..HEADER_LEN] != [0; 3] {
            return Err(malformed("reserved bytes are not zero"));
        }
        let nonce: [u8; NONCE_LEN] = sealed[HEADER_LEN..HEADER_LEN + NONCE_LEN]
            .try_into()
            .expect("length checked above");
        let mut body = sealed[HEADER_LEN + NONCE_LEN..].to_vec();
        let plain_len = aead(&tenant.subkey(TRACE_KEY_LABEL))
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&sealed[..HEADER_LEN]),
                &mut body,
            )
            .map_err(|_| TraceError::Authentication {
                name: name.to_owned(),
            })?
            .len();
        body.truncate(plain_len);
        parse_body(&body, version == VERSION_FOLDED)
            .ok_or_else(|| malformed("its tables do not match its length"))
    }
}

fn header(version: u8) -> [u8; HEADER_LEN] {
    let mut header = [0; HEADER_LEN];
    header[..4].copy_from_slice(MAGIC);
    header[4] = version;
    header
}

fn aead(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("AES-256 key is 32 bytes"))
}

/// Parses an authenticated body (with its list of folded runs if
/// `has_folded`); `None` if any count overruns it or bytes are left over.
fn parse_body(body: &[u8], has_folded: bool) -> Option<Trace> {
    let mut rest = body;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        rest = tail;
        Some(head)
    };
    let name_len = take(1)?[0] as usize;
    let image = String::from_utf8(take(name_len)?.to_vec()).ok()?;
    let run_count = u16::from_le_bytes(take(2)?.try_into().ok()?);
    let mut runs = Vec::new();
    for _ in 0..run_count {
        let manifest_digest = take(32)?.try_into().ok()?;
        let recorded_at = u64::from_le_bytes(take(8)?.try_into().ok()?);
        let count = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let ids = take(count.checked_mul(32)?)?
            .chunks_exact(32)
            .map(|id| ChunkId(id.try_into().expect("chunks_exact yields 32")))
            .collect();
        runs.push(TraceRun {
            manifest_digest,
            recorded_at,
            ids,
        });
    }
    let folded = if has_folded {
        let count = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let stamps = take(count.checked_mul(12)?)?
            .chunks_exact(12)
            .map(|stamp| RunStamp(stamp.try_into().expect("chunks_exact yields 12")))
            .collect();
        Some(stamps)
    } else {
        None
    };
    rest.is_empty().then_some(Trace {
        image,
        runs,
        folded,
    })
}

/// Combines runs into one order: a chunk is kept when more than `threshold`
/// (0 to 1) of the runs read it, and the kept chunks are ordered by the
/// median of their first-access ranks over the runs that read them (ties:
/// the mean rank, then the id), so the order is what a typical start does.
/// With one run this is that run.
pub fn merge(runs: &[&[ChunkId]], threshold: f64) -> Vec<ChunkId> {
    let mut ranks: HashMap<ChunkId, Vec<usize>> = HashMap::new();
    for run in runs {
        // A run lists each id once; should one repeat, its first rank counts.
        let mut in_run = std::collections::HashSet::new();
        for (rank, id) in run.iter().enumerate() {
            if in_run.insert(*id) {
                ranks.entry(*id).or_default().push(rank);
            }
        }
    }
    let needed = threshold.clamp(0.0, 1.0) * runs.len() as f64;
    let mut kept: Vec<(usize, u128, ChunkId)> = ranks
        .into_iter()
        .filter(|(_, ranks)| ranks.len() as f64 > needed)
        .map(|(id, mut ranks)| {
            ranks.sort_unstable();
            let median = ranks[(ranks.len() - 1) / 2];
            let mean_scaled =
                ranks.iter().map(|&r| r as u128).sum::<u128>() * 1_000_000 / ranks.len() as u128;
            (median, mean_scaled, id)
        })
        .collect();
    kept.sort_unstable();
    kept.into_iter().map(|(_, _, id)| id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    fn ids(ns: &[u8]) -> Vec<ChunkId> {
        ns.iter().map(|&n| id(n)).collect()
    }

    fn trace() -> Trace {
        Trace {
            image: "app".into(),
            runs: vec![
                TraceRun {
                    manifest_digest: [1; 32],
                    recorded_at: 1_700_000_000,
                    ids: ids(&[3, 1, 2]),
                },
                TraceRun {
                    manifest_digest: [2; 32],
                    recorded_at: 1_700_000_100,
                    ids: vec![],
                },
            ],
            folded: None,
        }
    }

    #[test]
    fn seal_open_round_trip() {
        let tenant = TenantKey([5; 32]);
        let sealed = trace().seal(&tenant);
        assert_eq!(sealed[4], 1, "a trace without a folded list is version 1");
        assert_eq!(Trace::open("app.trace", &sealed, &tenant).unwrap(), trace());
        assert_eq!(sealed, trace().seal(&tenant), "sealing is deterministic");
        for folded in [vec![], vec![RunStamp::new(7, 1), RunStamp::new(9, 2)]] {
            let merged = Trace {
                folded: Some(folded),
                ..trace()
            };
            let sealed = merged.seal(&tenant);
            assert_eq!(sealed[4], 2, "a merged trace is version 2");
            assert_eq!(Trace::open("app.trace", &sealed, &tenant).unwrap(), merged);
        }
    }

    #[test]
    fn stamps_sort_by_time_then_tag() {
        let stamps = [
            RunStamp::new(1, u32::MAX),
            RunStamp::new(2, 0),
            RunStamp::new(2, 1),
            RunStamp::new(u64::MAX - 1, 0),
        ];
        assert!(stamps.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(stamps[3].unix_nanos(), u64::MAX - 1);
    }

    #[test]
    fn wrong_key_any_flipped_bit_and_other_formats_are_refused() {
        let tenant = TenantKey([5; 32]);
        let sealed = trace().seal(&tenant);
        let err = Trace::open("t", &sealed, &TenantKey([6; 32])).unwrap_err();
        assert!(matches!(err, TraceError::Authentication { .. }), "{err}");
        for bit in 0..sealed.len() * 8 {
            let mut flipped = sealed.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(Trace::open("t", &flipped, &tenant).is_err(), "bit {bit}");
        }
        let err = Trace::open("t", b"LZBM\x01\0\0\0", &tenant).unwrap_err();
        assert!(matches!(err, TraceError::BadMagic { .. }), "{err}");
        let mut newer = sealed.clone();
        newer[4] = 3;
        let err = Trace::open("t", &newer, &tenant).unwrap_err();
        assert!(err.to_string().contains("version 3"), "{err}");
        // The version is authenticated: a version 1 trace relabelled 2 (so
        // read as having a folded list) does not open.
        let mut relabelled = sealed.clone();
        relabelled[4] = 2;
        assert!(Trace::open("t", &relabelled, &tenant).is_err());
        assert!(Trace::open("t", &sealed[..20], &tenant).is_err());
    }

    #[test]
    fn a_trace_of_another_image_is_refused() {
        let trace = trace();
        assert_eq!(
            trace.runs_for("app.trace", "app", &[9; 32]).unwrap().len(),
            2
        );
        // Another name, but a run on this very manifest: accepted.
        assert_eq!(
            trace.runs_for("x.trace", "copy", &[2; 32]).unwrap().len(),
            2
        );
        let err = trace.runs_for("db.trace", "db", &[9; 32]).unwrap_err();
        assert!(matches!(err, TraceError::OtherImage { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("\"app\"") && text.contains("\"db\""),
            "{text}"
        );
    }

    #[test]
    fn pushing_runs_keeps_the_newest() {
        let mut trace = Trace {
            image: "app".into(),
            runs: vec![],
            folded: None,
        };
        for n in 0..MAX_TRACE_RUNS as u64 + 3 {
            trace.push_run(TraceRun {
                manifest_digest: [0; 32],
                recorded_at: n,
                ids: vec![],
            });
        }
        assert_eq!(trace.runs.len(), MAX_TRACE_RUNS);
        assert_eq!(trace.runs[0].recorded_at, 3);
    }

    #[test]
    fn merge_keeps_the_majority_in_median_order() {
        let a = ids(&[1, 2, 3, 4, 9]);
        let b = ids(&[2, 1, 3, 5]);
        let c = ids(&[1, 3, 2, 4, 6]);
        let runs = [&a[..], &b[..], &c[..]];
        // 5 and 6 and 9 were read by one run in three: dropped. Ranks:
        // 1: 0,1,0 -> 0; 2: 1,0,2 -> 1; 3: 2,2,1 -> 2; 4: 3,3 (two runs) -> 3.
        assert_eq!(merge(&runs, DEFAULT_MERGE_THRESHOLD), ids(&[1, 2, 3, 4]));
        // Threshold 0 keeps everything any run read.
        assert_eq!(merge(&runs, 0.0), ids(&[1, 2, 3, 4, 5, 6, 9]));
        // Only what every run read.
        assert_eq!(merge(&runs, 0.9), ids(&[1, 2, 3]));
        // One run is itself; none is nothing.
        assert_eq!(merge(&[&a[..]], DEFAULT_MERGE_THRESHOLD), a);
        assert!(merge(&[], DEFAULT_MERGE_THRESHOLD).is_empty());
    }
}
