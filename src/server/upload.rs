//! A chunk upload's body, checked against its name as it arrives.
//!
//! Each piece the connection delivers is hashed at once, while it is still
//! in the cache the socket read left it in, and copied once into a buffer
//! the size the request declared (aligned like a chunk read from disk, so
//! the store's write copies it at full speed). Collecting the pieces first
//! and hashing after would read the whole body from memory a second time
//! and copy it twice.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

use super::reply::{refuse, Reply, RequestBody};
use crate::chunk::ChunkId;
use crate::store::dir::aligned_buffer;

/// The body of `PUT /v1/chunks/{id}`, refused unless it is whole, at most
/// `limit` bytes, as long as `declared` (its Content-Length, if given),
/// here within `timeout`, and its SHA-256 is `id`.
pub(super) async fn read_envelope(
    body: RequestBody,
    id: &ChunkId,
    declared: Option<u64>,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, Reply> {
    let reading = tokio::time::timeout(timeout, hash_while_reading(body, declared, limit));
    let Ok(read) = reading.await else {
        return Err(refuse(
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not arrive within {timeout:?}"),
        ));
    };
    let (envelope, actual) = read?;
    if let Some(declared) = declared.filter(|&len| len != envelope.len() as u64) {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "the body is {} bytes, its Content-Length says {declared}",
                envelope.len()
            ),
        ));
    }
    if actual != *id {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!("the body's SHA-256 is {actual}, not the chunk id"),
        ));
    }
    Ok(envelope)
}

async fn hash_while_reading(
    mut body: RequestBody,
    declared: Option<u64>,
    limit: usize,
) -> Result<(Bytes, ChunkId), Reply> {
    let too_large = || {
        refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {limit} bytes"),
        )
    };
    let mut hasher = Sha256::new();
    // Taken when the first byte arrives, so an idle request holds nothing.
    let mut gathered: Option<(Vec<u8>, usize)> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| refuse(StatusCode::BAD_REQUEST, "the body broke off"))?;
        let Ok(piece) = frame.into_data() else {
            continue;
        };
        let (buffer, start) = gathered.get_or_insert_with(|| {
            // A declared length over the limit was refused before the body;
            // a missing one grows the buffer as pieces come.
            let expected = declared.map_or(0, |len| len.min(limit as u64) as usize);
            aligned_buffer(expected)
        });
        if buffer.len() - *start + piece.len() > limit {
            return Err(too_large());
        }
        hasher.update(&piece);
        buffer.extend_from_slice(&piece);
    }
    let envelope = match gathered {
        Some((buffer, start)) => Bytes::from(buffer).slice(start..),
        None => Bytes::new(),
    };
    Ok((envelope, ChunkId(hasher.finalize().into())))
}
