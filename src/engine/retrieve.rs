//! Getting one chunk's verified plaintext from a store: the part of a fetch
//! that the engine's fetcher and `export` share.
//!
//! [`get_envelope`] asks the store, retrying only what the store calls
//! [`ErrorKind::Transient`], with jittered exponential back-off, and gives
//! up when the chunk's deadline passes, so a store that hangs fails a
//! request with EIO long before the kernel's 30 s I/O timeout would.
//! [`open_envelope`] checks the envelope against its name, decrypts it and
//! checks its length; it is CPU work for a blocking thread.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rand::Rng;

use super::stats::add;
use super::EngineError;
use crate::chunk::{open_chunk_in_place, ChunkId, ChunkKey};
use crate::error::ErrorKind;
use crate::store::ChunkStore;

/// The default of [`FetchPolicy::deadline`]: a third of the kernel's
/// default block I/O timeout, so a request that waited behind other fetches
/// still fails cleanly before the kernel gives up on it.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// How one chunk is fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchPolicy {
    /// From the first request to the store to the last answer accepted.
    pub deadline: Duration,
    /// Most requests to the store for one chunk, the first included.
    pub max_attempts: u32,
    /// Back-off before the first retry; it doubles for each one after.
    pub first_backoff: Duration,
}

impl Default for FetchPolicy {
    fn default() -> FetchPolicy {
        FetchPolicy {
            deadline: DEFAULT_FETCH_TIMEOUT,
            max_attempts: 6,
            first_backoff: Duration::from_millis(20),
        }
    }
}

impl FetchPolicy {
    /// The pause before retry number `retry` (1 for the first): the
    /// exponential step, scaled by a random factor in [0.5, 1.5) so that
    /// many readers failed by one outage do not come back in step.
    fn backoff(&self, retry: u32) -> Duration {
        let step = self
            .first_backoff
            .saturating_mul(1 << retry.saturating_sub(1).min(16));
        step.mul_f64(rand::thread_rng().gen_range(0.5..1.5))
    }
}

/// The envelope of chunk `index` (named `id`), unverified.
///
/// Retries transient failures within the deadline; `retries` counts each
/// retry. A deadline that passes is [`EngineError::FetchTimeout`].
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
    let deadline = Instant::now() + policy.deadline;
    let mut attempt = 1;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let error = match tokio::time::timeout(remaining, store.get(id)).await {
            Ok(Ok(envelope)) => return Ok(envelope),
            Ok(Err(error)) => error,
            Err(_) => {
                return Err(EngineError::FetchTimeout {
                    index,
                    id: *id,
                    after: policy.deadline,
                    attempts: attempt,
                })
            }
        };
        let pause = policy.backoff(attempt);
        if error.kind() != ErrorKind::Transient
            || attempt >= policy.max_attempts
            || Instant::now() + pause >= deadline
        {
            return Err(EngineError::FetchChunk {
                index,
                id: *id,
                attempts: attempt,
                source: Arc::new(error),
            });
        }
        tracing::debug!(chunk = index, id = %id, attempt, error = %error, "transient store failure, retrying");
        add(retries, 1);
        tokio::time::sleep(pause).await;
        attempt += 1;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_never_overflows() {
        let policy = FetchPolicy::default();
        for retry in 1..5 {
            let step = policy.first_backoff * (1 << (retry - 1));
            let pause = policy.backoff(retry);
            assert!(pause >= step / 2 && pause < step * 3 / 2, "{pause:?}");
        }
        let _ = policy.backoff(u32::MAX);
    }
}
