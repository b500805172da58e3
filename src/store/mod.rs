//! Chunk stores: where sealed chunks and manifests live.
//!
//! A store only ever sees ciphertext and names. It is untrusted for
//! integrity: whoever reads a chunk checks it against its name (see
//! [`crate::chunk::open_chunk`]).
//!
//! Engines sit side by side behind [`ChunkStore`]: [`dir`] (a local
//! directory) and [`http`] (a chunk server); [`open_store`] picks one from
//! the URL a user gives.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use crate::chunk::{ChunkError, ChunkId, RunStamp, ENVELOPE_OVERHEAD, MAX_CHUNK_SIZE};
use crate::error::ErrorKind;
use crate::net::HttpClient;

pub mod bounded;
#[cfg(test)]
pub(crate) mod contract;
pub mod dir;
pub mod ec;
pub mod host_cache;
pub mod http;
pub mod metrics;
pub mod policy;
pub mod read_through;
pub mod s3;
pub mod tiered;
#[cfg(test)]
mod tiered_tests;

pub use host_cache::HostCache;
pub use read_through::ReadThrough;
pub use tiered::{TierSnapshot, TieredStore};

/// The largest envelope any store holds: a chunk of the largest size, sealed.
pub const MAX_ENVELOPE_SIZE: usize = MAX_CHUNK_SIZE as usize + ENVELOPE_OVERHEAD;
/// The largest manifest a network store accepts or returns (about 64 bytes
/// per chunk: a 2 TiB image of 512 KiB chunks).
pub const MAX_MANIFEST_SIZE: usize = 256 << 20;

/// A failed store operation, with what it was doing and on which object.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("chunk {id} not found in {store}")]
    ChunkNotFound { store: String, id: ChunkId },
    #[error("manifest {name:?} not found in {store}")]
    ManifestNotFound { store: String, name: String },
    #[error("{op} {object} in {store}")]
    Io {
        op: &'static str,
        store: String,
        object: String,
        #[source]
        source: std::io::Error,
    },
    /// A passing failure (a timeout, a reset connection, a busy server):
    /// the same request may succeed if retried after a pause.
    #[error("{op} {object} in {store}: temporarily unavailable")]
    Unavailable {
        op: &'static str,
        store: String,
        object: String,
        #[source]
        source: std::io::Error,
    },
    /// The bytes a store returned for a chunk do not hash to its id.
    #[error("chunk {id} in {store} is corrupt")]
    CorruptChunk {
        store: String,
        id: ChunkId,
        #[source]
        source: Box<ChunkError>,
    },
    #[error("invalid store {spec:?}: {reason}")]
    InvalidSpec { spec: String, reason: String },
    #[error("invalid manifest name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
}

impl StoreError {
    /// A failed exchange with a network store: [`StoreError::Unavailable`]
    /// when `transient` (worth retrying), else [`StoreError::Io`].
    pub fn exchange(
        op: &'static str,
        store: &str,
        object: String,
        source: std::io::Error,
        transient: bool,
    ) -> StoreError {
        let store = store.to_owned();
        if transient {
            StoreError::Unavailable {
                op,
                store,
                object,
                source,
            }
        } else {
            StoreError::Io {
                op,
                store,
                object,
                source,
            }
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::ChunkNotFound { .. } | StoreError::ManifestNotFound { .. } => {
                ErrorKind::NotFound
            }
            StoreError::Io { .. } => ErrorKind::Io,
            StoreError::Unavailable { .. } => ErrorKind::Transient,
            StoreError::CorruptChunk { .. } => ErrorKind::Integrity,
            StoreError::InvalidSpec { .. } | StoreError::InvalidName { .. } => ErrorKind::Invalid,
        }
    }
}

/// One chunk as a store lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedChunk {
    pub id: ChunkId,
    /// When the chunk was last written or refreshed (see [`ChunkStore`]),
    /// by the store's clock.
    pub modified: SystemTime,
    /// The envelope's length in bytes.
    pub size: u64,
}

/// Where sealed chunks (by [`ChunkId`]) and sealed manifests (by name) are kept.
///
/// Every method may be called concurrently. `put` of a chunk that exists is
/// cheap: chunks are content-addressed, so the bytes are the same.
///
/// # Garbage collection contract
///
/// Garbage collection deletes chunks that no manifest references and that
/// have not been written or refreshed within a grace period. A push checks
/// which chunks exist (`missing`), uploads the others and writes its
/// manifest last, so until then the chunks it relies on are referenced by
/// nothing. Every engine therefore keeps these promises:
///
/// * `put` of a chunk that already exists refreshes its modification time;
/// * `missing` refreshes the modification time of every chunk it reports
///   present, before it answers;
/// * [`delete_if_older`](ChunkStore::delete_if_older) re-checks the time at
///   the moment of deletion, so a chunk refreshed after it was listed
///   survives.
///
/// A chunk a push relies on is then safe as long as the push writes its
/// manifest within the grace period of its `missing` call. Times come from
/// the store's clock; a grace period must exceed any skew between the store
/// and the host that runs the collection.
#[async_trait]
pub trait ChunkStore: Send + Sync + std::fmt::Debug {
    /// The sealed envelope stored under `id`, unverified.
    async fn get(&self, id: &ChunkId) -> Result<Bytes, StoreError>;
    /// Stores `envelope` under `id`. When this returns the chunk is durable
    /// and whole; a reader never sees part of it. An existing chunk keeps
    /// its bytes and has its modification time refreshed.
    async fn put(&self, id: &ChunkId, envelope: Bytes) -> Result<(), StoreError>;
    /// Which of `ids` the store lacks, in the order given: one round trip
    /// for a whole batch. Present chunks have their modification time
    /// refreshed (see the garbage collection contract above).
    async fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError>;
    /// Every chunk in the store with its modification time and size, in no
    /// particular order.
    async fn list(&self) -> Result<Vec<ListedChunk>, StoreError>;
    /// Removes a chunk; removing an absent chunk is not an error.
    async fn delete(&self, id: &ChunkId) -> Result<(), StoreError>;
    /// Removes chunk `id` only if it was last modified before `cutoff`, and
    /// says whether it did. A chunk refreshed by `put` or `missing` after
    /// `cutoff`, even while this call runs, is kept; an absent chunk gives
    /// `false`.
    async fn delete_if_older(&self, id: &ChunkId, cutoff: SystemTime) -> Result<bool, StoreError>;
    /// Stores a sealed manifest under `name`, replacing any previous one atomically.
    async fn put_manifest(&self, name: &str, manifest: Bytes) -> Result<(), StoreError>;
    /// The sealed manifest stored under `name`.
    async fn get_manifest(&self, name: &str) -> Result<Bytes, StoreError>;
    /// The name of every manifest in the store, in no particular order.
    async fn list_manifests(&self) -> Result<Vec<String>, StoreError>;
    /// Removes the manifest stored under `name`; removing an absent one is
    /// not an error. (`trace merge` removes the trace runs it folded.)
    async fn delete_manifest(&self, name: &str) -> Result<(), StoreError>;
    /// How the store was named by the user, for messages.
    fn describe(&self) -> String;
    /// Whether the store retries its own transient failures (on the
    /// schedule of [`crate::retry`]) before it reports one: a caller then
    /// must not retry again, or the attempts multiply into a storm against
    /// a failing server.
    fn retries_transient_failures(&self) -> bool {
        false
    }
    /// Per-tier read counters of a store made of tiers; none for a plain store.
    fn tier_stats(&self) -> Vec<TierSnapshot> {
        Vec::new()
    }
    /// The counters of the erasure-coded cache fleet this store is or has
    /// as a tier; none for a store without one.
    fn fleet_stats(&self) -> Option<ec::FleetStatsSnapshot> {
        None
    }
}

/// How to reach a store, beyond its URL.
#[derive(Clone, Default)]
pub struct StoreOptions {
    /// The bearer token presented to a chunk server.
    pub token: Option<String>,
    /// Speak HTTP/2 to `http://` servers from the first byte (h2c), instead
    /// of HTTP/1.1.
    pub http2_prior_knowledge: bool,
    /// Where an `s3://` store's API is and how it addresses buckets.
    pub s3: s3::S3Options,
    /// A PEM file of the CA certificates `https://` servers (chunk servers,
    /// fleet nodes, an S3 endpoint) must chain to, instead of webpki's roots.
    pub tls_ca: Option<PathBuf>,
}

impl StoreOptions {
    /// The process's shared HTTP client for these options.
    pub fn http_client(&self, spec: &str, h2c: bool) -> Result<HttpClient, StoreError> {
        HttpClient::shared_trusting(h2c, self.tls_ca.as_deref()).map_err(|e| {
            StoreError::InvalidSpec {
                spec: spec.to_owned(),
                reason: crate::error::chain(&e),
            }
        })
    }
}

impl fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreOptions")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("http2_prior_knowledge", &self.http2_prior_knowledge)
            .field("s3", &self.s3)
            .field("tls_ca", &self.tls_ca)
            .finish()
    }
}

/// Opens the store a user named on the command line:
///
/// * a plain path or `file:///PATH`: a directory store (created if absent);
/// * `http://HOST[:PORT][/PREFIX]` or `https://…`: a chunk server
///   (`lazyblk serve`);
/// * `s3://BUCKET[/PREFIX]`: an S3 bucket.
pub fn open_store(spec: &str, options: &StoreOptions) -> Result<Arc<dyn ChunkStore>, StoreError> {
    let invalid = |reason: String| StoreError::InvalidSpec {
        spec: spec.to_owned(),
        reason,
    };
    let Some((scheme, _)) = spec.split_once("://") else {
        return Ok(Arc::new(dir::DirStore::open(spec.as_ref())?));
    };
    match scheme {
        "file" => {
            let path: PathBuf = url::Url::parse(spec)
                .ok()
                .and_then(|url| url.to_file_path().ok())
                .ok_or_else(|| invalid("a file URL is file:///ABSOLUTE/PATH".into()))?;
            Ok(Arc::new(dir::DirStore::open(&path)?))
        }
        "http" | "https" => Ok(Arc::new(http::HttpStore::new(
            spec,
            options.http_client(spec, options.http2_prior_knowledge)?,
            options.token.clone(),
            http::HttpStoreTiming::default(),
        )?)),
        "s3" => Ok(Arc::new(s3::S3Store::open(
            spec,
            &options.s3,
            options.http_client(spec, false)?,
        )?)),
        _ => Err(invalid(format!(
            "no store engine for scheme {scheme:?}; give a directory path, file://, http://, https:// or s3://"
        ))),
    }
}

/// What a manifest's access trace ([`crate::chunk::Trace`]) is stored
/// under, beside the manifest, through the manifest methods: the
/// manifest's name with this suffix. Push refuses manifest names that end
/// with it, and whatever lists manifests to read them skips such names.
pub const TRACE_SUFFIX: &str = ".trace";

/// The name the trace of manifest `manifest` is stored under.
pub fn trace_name(manifest: &str) -> String {
    format!("{manifest}{TRACE_SUFFIX}")
}

/// Whether a name from [`ChunkStore::list_manifests`] is a trace (or a
/// trace run), not a manifest.
pub fn is_trace_name(name: &str) -> bool {
    name.ends_with(TRACE_SUFFIX)
}

/// What the names of manifest `manifest`'s trace runs start with. Push
/// refuses manifest names holding it, so no manifest's trace looks like
/// another's run.
const TRACE_RUN_INFIX: &str = ".trace.";
/// Hex digits of a run's stamp: its time in nanoseconds, then a random tag.
const RUN_STAMP_LEN: usize = 24;

/// The name a single recorded run of manifest `manifest`'s trace is stored
/// under: each recorder writes its own object, so two devices recording at
/// once never overwrite each other's run (stores have no compare-and-swap).
/// Names of one manifest sort by `stamp`, by when the run was stored.
pub fn trace_run_name(manifest: &str, stamp: RunStamp) -> String {
    format!(
        "{manifest}{TRACE_RUN_INFIX}{}{TRACE_SUFFIX}",
        hex::encode(stamp.0)
    )
}

/// The stamp in a name [`trace_run_name`] made for `manifest`, or `None`
/// for any other name.
pub fn trace_run_stamp(manifest: &str, name: &str) -> Option<RunStamp> {
    let stamp = name
        .strip_prefix(manifest)?
        .strip_prefix(TRACE_RUN_INFIX)?
        .strip_suffix(TRACE_SUFFIX)?;
    if stamp.len() != RUN_STAMP_LEN {
        return None;
    }
    Some(RunStamp(hex::decode(stamp).ok()?.try_into().ok()?))
}

/// Whether `name` may not name a manifest because traces use it.
pub fn is_reserved_for_traces(name: &str) -> bool {
    is_trace_name(name) || name.contains(TRACE_RUN_INFIX)
}

/// Checks a manifest name: 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting
/// with `.` (a trace's name may be [`TRACE_SUFFIX`] longer). Every engine
/// takes the same names, so they are safe as file names, URL path segments
/// and object keys alike, and a manifest can move between stores.
pub fn validate_manifest_name(name: &str) -> Result<(), StoreError> {
    let longest = if is_trace_name(name) {
        128 + TRACE_RUN_INFIX.len() + RUN_STAMP_LEN + TRACE_SUFFIX.len()
    } else {
        128
    };
    let reason = if name.is_empty() || name.len() > longest {
        "must be 1 to 128 characters long"
    } else if name.starts_with('.') {
        "must not start with '.'"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        "may hold only A-Z a-z 0-9 . _ -"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidName {
        name: name.to_owned(),
        reason: reason.to_owned(),
    })
}
