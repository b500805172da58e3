//! The shard routes of a cache-fleet node: `GET`/`PUT /v1/shards/{id}/{index}`.
//!
//! A shard is one erasure-coded piece of a chunk (see
//! [`crate::store::ec`]); it is filed under its chunk's id and its index,
//! not under a hash of its own bytes, so the server checks its header
//! instead: a truncated, corrupt or misfiled upload is refused with 400.
//! Shards are kept in memory, bounded, and evicted like any cache; they
//! never reach the server's store.

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderValue, StatusCode};

use super::auth::Access;
use super::reply::{check_length, read_body, refuse, reply, Handled, Reply, RequestBody};
use super::State;
use crate::chunk::ChunkId;
use crate::store::ec::{ShardCache, MAX_SHARDS, MAX_SHARD_OBJECT};

fn parse<'a>(
    state: &'a State,
    id: &str,
    index: &str,
) -> Result<(&'a ShardCache, ChunkId, u8), Reply> {
    let shards = state.shards.as_ref().ok_or_else(|| {
        refuse(
            StatusCode::NOT_FOUND,
            "this server keeps no shards: start it with --shard-cache-size",
        )
    })?;
    let id = id.parse::<ChunkId>().map_err(|_| {
        refuse(
            StatusCode::BAD_REQUEST,
            "malformed chunk id: a chunk id is 64 lowercase hex digits",
        )
    })?;
    let index = index
        .parse::<u8>()
        .ok()
        .filter(|i| (*i as usize) < MAX_SHARDS)
        .ok_or_else(|| {
            refuse(
                StatusCode::BAD_REQUEST,
                format!("malformed shard index: a whole number below {MAX_SHARDS}"),
            )
        })?;
    Ok((shards, id, index))
}

pub(super) async fn get(state: &State, id: &str, index: &str, parts: &Parts) -> Handled {
    let (shards, id, index) = parse(state, id, index)?;
    state.allow(&parts.headers, Access::Read)?;
    if !state.options.chunk_delay.is_zero() {
        tokio::time::sleep(state.options.chunk_delay).await;
    }
    let object = shards
        .get(&id, index)
        .ok_or_else(|| refuse(StatusCode::NOT_FOUND, "no such shard here"))?;
    let mut reply = reply(StatusCode::OK, object);
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(reply)
}

pub(super) async fn put(
    state: &State,
    id: &str,
    index: &str,
    parts: &Parts,
    body: RequestBody,
) -> Handled {
    let (shards, id, index) = parse(state, id, index)?;
    state.allow(&parts.headers, Access::Write)?;
    check_length(&parts.headers, MAX_SHARD_OBJECT)?;
    let object = read_body(body, MAX_SHARD_OBJECT, state.options.body_timeout).await?;
    shards
        .put(&id, index, object)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("bad shard: {e}")))?;
    Ok(reply(StatusCode::NO_CONTENT, Bytes::new()))
}
