//! The chunk server's protocol, shared by [`crate::server`] and
//! [`crate::store::http`]: the JSON bodies of its batch and listing routes.
//!
//! | route | body | answer |
//! |---|---|---|
//! | `GET`/`HEAD /v1/chunks/{id}` | | the envelope (single `Range` honoured) |
//! | `PUT /v1/chunks/{id}` (write) | the envelope; SHA-256 must equal `id` | 204 |
//! | `DELETE /v1/chunks/{id}` (write) | | 204 |
//! | `DELETE /v1/chunks/{id}?older_than_unix_ns=T` (write) | | [`Deleted`] |
//! | `POST /v1/chunks/missing` (write) | [`MissingRequest`] | [`MissingResponse`] |
//! | `GET /v1/chunks?after=ID&limit=N` | | [`ChunkPage`] |
//! | `GET`/`HEAD /v1/manifests/{name}` | | the sealed manifest |
//! | `PUT /v1/manifests/{name}` (write) | the sealed manifest | 204 |
//! | `DELETE /v1/manifests/{name}` (write), traces and trace runs only | | 204, also when absent; 403 for any other name |
//! | `GET /v1/manifests` | | [`ManifestList`] |
//! | `GET /v1/shards/{id}/{index}` | | a shard object (docs/FORMAT.md); 404 when not held |
//! | `PUT /v1/shards/{id}/{index}` (write) | a shard object, checked against `id` and `index` | 204 |
//!
//! Chunk ids are 64 lowercase hex digits. Writes present the write token as
//! `Authorization: Bearer TOKEN`; reads present the read token when the
//! server has one. Refusals are 4xx with a one-line plain-text reason.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Most ids the server accepts in one `missing` request.
pub const MAX_MISSING_IDS: usize = 10_000;
/// Most entries one page of the chunk listing holds.
pub const MAX_LIST_PAGE: usize = 10_000;
/// A JSON answer (missing ids, a listing page) is at most this long.
pub const MAX_JSON_BODY: usize = 4 << 20;

/// The body of `POST /v1/chunks/missing`.
#[derive(Debug, Serialize, Deserialize)]
pub struct MissingRequest {
    pub ids: Vec<String>,
}

/// The answer to `POST /v1/chunks/missing`: the absent ids, in the order asked.
#[derive(Debug, Serialize, Deserialize)]
pub struct MissingResponse {
    pub missing: Vec<String>,
}

/// One page of `GET /v1/chunks?after=ID&limit=N`, in id order; `next` is
/// the `after` of the following page, absent on the last.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChunkPage {
    pub chunks: Vec<ChunkEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// One chunk in a listing page.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChunkEntry {
    pub id: String,
    /// The modification time, in nanoseconds since the Unix epoch.
    pub modified_unix_ns: u64,
    /// The envelope's length in bytes.
    pub size: u64,
}

/// The answer to `GET /v1/manifests`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ManifestList {
    pub manifests: Vec<String>,
}

/// The answer to `DELETE /v1/chunks/{id}?older_than_unix_ns=T`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Deleted {
    pub deleted: bool,
}

/// `time` in nanoseconds since the Unix epoch (0 before it).
pub fn unix_ns(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The time `ns` nanoseconds after the Unix epoch.
pub fn from_unix_ns(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}
