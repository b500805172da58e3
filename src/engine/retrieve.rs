//! Getting one chunk's verified plaintext from a store: the part of a fetch
//! that the engine's fetcher and `export` share.
//!
//! [`get_envelope`] asks the store, retrying only what the store calls
//! [`ErrorKind::Transient`] on the shared schedule of [`crate::retry`], and
//! gives up when the chunk's deadline passes, so a store that hangs fails a
//! request with EIO long before the kernel's 30 s I/O timeout would.
//! [`open_envelope`] checks the envelope against its name, decrypts it and
//! checks its length; it is CPU work for a blocking thread.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::stats::add;
use super::EngineError;
use crate::chunk::{open_chunk_in_place, ChunkId, ChunkKey};
use crate::error::ErrorKind;
use crate::retry::{GaveUp, RetryPolicy};
use crate::store::ChunkStore;

/// The default of [`FetchPolicy::deadline`].
pub const DEFAULT_FETCH_TIMEOUT: Duration = crate::retry::DEFAULT_DEADLINE;

/// How one chunk is fetched: the shared retry schedule, whose default
/// deadline is [`DEFAULT_FETCH_TIMEOUT`].
pub type FetchPolicy = RetryPolicy;

/// The envelope of chunk `index` (named `id`), unverified.
///
/// Retries transient failures within the deadline, unless the store
/// retried them already (then only the deadline applies); `retries` counts
/// each retry. A deadline that passes is [`EngineError::FetchTimeout`].
///
/// # Cancel safety
/// Dropping the future abandons the request to the store; nothing is kept.
pub async fn get_envelope(
    store: &dyn ChunkStore,
    policy: &FetchPolicy,
    index: u64,
    id: &ChunkId,
    retries: &AtomicU64,
) -> Result<Bytes, EngineError> {
    let single = FetchPolicy {
        max_attempts: 1,
        ..*policy
    };
    let policy_here = match store.retries_transient_failures() {
        true => &single,
        false => policy,
    };
    let result = policy_here
        .run(
            || store.get(id),
            |error| error.kind() == ErrorKind::Transient,
            |error, attempt| {
                tracing::debug!(chunk = index, id = %id, attempt, error = %error, "transient store failure, retrying");
                add(retries, 1);
            },
        )
        .await;
    result.map_err(|gave_up| match gave_up {
        GaveUp::TimedOut { attempts } => EngineError::FetchTimeout {
            index,
            id: *id,
            after: policy.deadline,
            attempts,
        },
        GaveUp::Failed { error, attempts } => EngineError::FetchChunk {
            index,
            id: *id,
            attempts,
            source: Arc::new(error),
        },
    })
}

/// Checks an envelope fetched for chunk `index` against its name, decrypts
/// it and checks that it holds `expected_len` bytes. Decrypts in the
/// envelope's own buffer when nothing else holds it (the directory store
/// hands out unshared buffers).
pub fn open_envelope(
    index: u64,
    id: &ChunkId,
    key: &ChunkKey,
    envelope: Bytes,
    expected_len: usize,
) -> Result<Bytes, EngineError> {
    let mut buffer = envelope
        .try_into_mut()
        .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
    let len = open_chunk_in_place(id, key, &mut buffer)
        .map_err(|source| EngineError::VerifyChunk {
            index,
            source: Arc::new(source),
        })?
        .len();
    if len != expected_len {
        return Err(EngineError::ChunkLength {
            index,
            id: *id,
            expected: expected_len,
            actual: len,
        });
    }
    buffer.truncate(len);
    Ok(buffer.freeze())
}
