//! The chunk routes. A chunk never changes once written (its name is the
//! SHA-256 of its bytes), so its id is its ETag and any cache may keep it
//! for good; the server checks that name on every write.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, StatusCode};

use super::auth::Access;
use super::reply::{
    check_length, json, read_body, refuse, reply, store_failure, wanted_range, Handled, Reply,
    RequestBody, Wanted,
};
use super::upload::read_envelope;
use super::State;
use crate::chunk::ChunkId;
use crate::net::protocol::{
    from_unix_ns, unix_ns, ChunkEntry, ChunkPage, Deleted, MissingRequest, MissingResponse,
    MAX_LIST_PAGE, MAX_MISSING_IDS,
};
use crate::store::{ChunkStore, ListedChunk, StoreError, MAX_ENVELOPE_SIZE};
use tokio::time::Instant;

const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// A `missing` request of the most ids, each 64 hex digits in quotes.
const MAX_MISSING_BODY: usize = MAX_MISSING_IDS * 70 + 1024;
/// Entries on a listing page when the client names no limit.
const DEFAULT_LIST_PAGE: usize = 1000;

fn parse_id(text: &str) -> Result<ChunkId, Reply> {
    text.parse::<ChunkId>().map_err(|_| {
        refuse(
            StatusCode::BAD_REQUEST,
            "malformed chunk id: a chunk id is 64 lowercase hex digits",
        )
    })
}

fn etag(id: &ChunkId) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{id}\"")).expect("hex is a valid header value")
}

/// Whether `If-None-Match` names this chunk (or any).
fn not_modified(headers: &HeaderMap, id: &ChunkId) -> bool {
    let hex = id.to_hex();
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/").trim_matches('"'))
        .any(|tag| tag == "*" || tag == hex)
}

pub(super) async fn get(state: &State, id: &str, parts: &Parts, head: bool) -> Handled {
    let id = parse_id(id)?;
    state.allow(&parts.headers, Access::Read)?;
    let cache_headers = |reply: &mut Reply| {
        let headers = reply.headers_mut();
        headers.insert(header::ETAG, etag(&id));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE));
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    };
    if not_modified(&parts.headers, &id) {
        let mut reply = reply(StatusCode::NOT_MODIFIED, Bytes::new());
        cache_headers(&mut reply);
        return Ok(reply);
    }
    if !head && !state.options.chunk_delay.is_zero() {
        tokio::time::sleep(state.options.chunk_delay).await;
    }
    let envelope = state.store.get(&id).await.map_err(store_failure)?;
    let len = envelope.len() as u64;
    let (status, body, content_range) = match wanted_range(parts.headers.get(header::RANGE), len) {
        Wanted::Whole => (StatusCode::OK, envelope, None),
        Wanted::Part { start, end } => (
            StatusCode::PARTIAL_CONTENT,
            envelope.slice(start as usize..end as usize),
            Some(format!("bytes {start}-{}/{len}", end - 1)),
        ),
        Wanted::Unsatisfiable => {
            let mut reply = refuse(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("the chunk is {len} bytes long"),
            );
            let range = HeaderValue::from_str(&format!("bytes */{len}")).expect("digits");
            reply.headers_mut().insert(header::CONTENT_RANGE, range);
            return Err(reply);
        }
    };
    let body_len = body.len();
    if let (Some(link), false) = (&state.link, head) {
        link.carry(body_len).await;
    }
    let mut reply = reply(status, if head { Bytes::new() } else { body });
    cache_headers(&mut reply);
    let headers = reply.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    // A HEAD answer has no body, so its length must be said outright.
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
    if let Some(range) = content_range {
        headers.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&range).expect("digits"),
        );
    }
    Ok(reply)
}

pub(super) async fn put(state: &State, id: &str, parts: &Parts, body: RequestBody) -> Handled {
    let id = parse_id(id)?;
    state.allow(&parts.headers, Access::Write)?;
    let declared = check_length(&parts.headers, MAX_ENVELOPE_SIZE)?;
    let envelope = read_envelope(
        body,
        &id,
        declared,
        MAX_ENVELOPE_SIZE,
        state.options.body_timeout,
    )
    .await?;
    state
        .store
        .put(&id, envelope)
        .await
        .map_err(store_failure)?;
    Ok(reply(StatusCode::NO_CONTENT, Bytes::new()))
}

pub(super) async fn delete(state: &State, id: &str, parts: &Parts) -> Handled {
    let id = parse_id(id)?;
    state.allow(&parts.headers, Access::Write)?;
    let cutoff = query(parts, "older_than_unix_ns")
        .map(|value| {
            value.parse::<u64>().map_err(|_| {
                refuse(
                    StatusCode::BAD_REQUEST,
                    "older_than_unix_ns is nanoseconds since 1970 as a whole number",
                )
            })
        })
        .transpose()?;
    match cutoff {
        Some(ns) => {
            let deleted = state
                .store
                .delete_if_older(&id, from_unix_ns(ns))
                .await
                .map_err(store_failure)?;
            Ok(json(&Deleted { deleted }))
        }
        None => {
            state.store.delete(&id).await.map_err(store_failure)?;
            Ok(reply(StatusCode::NO_CONTENT, Bytes::new()))
        }
    }
}

pub(super) async fn missing(state: &State, parts: &Parts, body: RequestBody) -> Handled {
    // A push asks this: it refreshes the chunks it finds, so it is a write.
    state.allow(&parts.headers, Access::Write)?;
    check_length(&parts.headers, MAX_MISSING_BODY)?;
    let body = read_body(body, MAX_MISSING_BODY, state.options.body_timeout).await?;
    let request: MissingRequest = serde_json::from_slice(&body).map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            format!("the body is not {{\"ids\": [HEX, …]}}: {e}"),
        )
    })?;
    if request.ids.len() > MAX_MISSING_IDS {
        return Err(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("at most {MAX_MISSING_IDS} ids per request"),
        ));
    }
    let ids = request
        .ids
        .iter()
        .map(|hex| parse_id(hex))
        .collect::<Result<Vec<_>, _>>()?;
    let missing = state.store.missing(&ids).await.map_err(store_failure)?;
    Ok(json(&MissingResponse {
        missing: missing.iter().map(ChunkId::to_hex).collect(),
    }))
}

/// One page of the listing, in id order, after the id `after` if given.
pub(super) async fn list(state: &State, parts: &Parts) -> Handled {
    let asked = Instant::now();
    state.allow(&parts.headers, Access::Read)?;
    let after = query(parts, "after")
        .map(|hex| parse_id(&hex))
        .transpose()?;
    let limit = match query(parts, "limit") {
        None => DEFAULT_LIST_PAGE,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_LIST_PAGE).contains(&n) => n,
            _ => {
                return Err(refuse(
                    StatusCode::BAD_REQUEST,
                    format!("limit is a whole number from 1 to {MAX_LIST_PAGE}"),
                ))
            }
        },
    };
    let recency = match after {
        Some(_) => Recency::FinishedWithin(LISTING_TTL),
        // Whoever may write sees the store as it was when they asked (a
        // walk after a push or a gc shows it); a reader gets a listing just
        // as recent, or one finished at most a little before that.
        None if (state.options.tokens)
            .check(&parts.headers, Access::Write)
            .is_ok() =>
        {
            Recency::BegunAfterAsked
        }
        None => Recency::FinishedWithin(state.options.listing_reuse),
    };
    let all = state.listing.get(&state.store, asked, recency).await?;
    let from = after.map_or(0, |after| all.partition_point(|chunk| chunk.id <= after));
    let chunks = &all[from..];
    let next = (chunks.len() > limit).then(|| chunks[limit - 1].id.to_hex());
    let chunks = &chunks[..chunks.len().min(limit)];
    Ok(json(&ChunkPage {
        chunks: chunks
            .iter()
            .map(|chunk| ChunkEntry {
                id: chunk.id.to_hex(),
                modified_unix_ns: unix_ns(chunk.modified),
                size: chunk.size,
            })
            .collect(),
        next,
    }))
}

/// The store's whole listing, sorted by id, shared between the pages of
/// one walk and between callers: a store lists all its chunks at once, and
/// listing them again for every page would make a walk cost the square of
/// the store's size, or let any reader make the server list its whole store
/// with every request. A caller is given the last listing if it is recent
/// enough (see [`Recency`]), else a new one: pages after the first reuse a
/// listing finished less than [`LISTING_TTL`] before, a reader's first page
/// one finished less than `ServerOptions::listing_reuse` before, and a first
/// page asked with the write token only one begun after it was asked (one
/// listing in flight serves every caller waiting for it). Ages count from
/// when a listing finished, so a store that takes longer than those ages to
/// list is still listed once per walk, not once per page. Chunks written
/// since that listing began are missed by the walk and chunks deleted since
/// still appear, which garbage collection tolerates: it lists chunks before
/// it reads the manifests, so a chunk it missed is not a candidate, and it
/// re-checks each chunk's time when it deletes it.
#[derive(Debug, Default)]
pub(super) struct ListingSnapshot {
    /// The last listing. Held while a listing is in flight, so that callers
    /// waiting for it share it.
    last: Arc<tokio::sync::Mutex<Option<Listing>>>,
}

#[derive(Debug)]
struct Listing {
    began: Instant,
    finished: Instant,
    chunks: Arc<Vec<ListedChunk>>,
}

/// How recent a listing a caller takes.
#[derive(Clone, Copy, Debug)]
pub(super) enum Recency {
    /// One begun after the caller asked, so it holds every chunk whose
    /// write finished before the caller asked.
    BegunAfterAsked,
    /// One finished at most this long before the caller asked.
    FinishedWithin(Duration),
}

impl Listing {
    fn serves(&self, asked: Instant, recency: Recency) -> bool {
        match recency {
            Recency::BegunAfterAsked => self.began >= asked,
            Recency::FinishedWithin(age) => asked.saturating_duration_since(self.finished) <= age,
        }
    }
}

const LISTING_TTL: Duration = Duration::from_secs(60);

impl ListingSnapshot {
    /// A listing of `store` as recent as `recency` asks of a caller that
    /// asked at `asked`.
    pub(super) async fn get(
        &self,
        store: &Arc<dyn ChunkStore>,
        asked: Instant,
        recency: Recency,
    ) -> Result<Arc<Vec<ListedChunk>>, Reply> {
        // One listing at a time: callers waiting here share the one in flight.
        let mut last = Arc::clone(&self.last).lock_owned().await;
        if let Some(listing) = &*last {
            if listing.serves(asked, recency) {
                return Ok(Arc::clone(&listing.chunks));
            }
        }
        // The listing runs as a task of its own, holding the lock, so a
        // caller that hangs up does not abandon it: the callers waiting
        // behind it take it when it finishes.
        let store = Arc::clone(store);
        let listing = tokio::spawn(async move {
            let began = Instant::now();
            let mut chunks = store.list().await?;
            chunks.sort_unstable_by_key(|chunk| chunk.id);
            let chunks = Arc::new(chunks);
            *last = Some(Listing {
                began,
                finished: Instant::now(),
                chunks: Arc::clone(&chunks),
            });
            Ok::<_, StoreError>(chunks)
        });
        match listing.await {
            Ok(listed) => listed.map_err(store_failure),
            Err(failed) => Err(refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("listing the store failed: {failed}"),
            )),
        }
    }
}

/// The value of query parameter `name`, if given.
pub(super) fn query(parts: &Parts, name: &str) -> Option<String> {
    let query = parts.uri.query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}
