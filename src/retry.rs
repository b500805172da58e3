//! When to try a failed request again: the one back-off schedule shared by
//! the engine's fetcher and the network stores.
//!
//! Only failures a caller classed as transient are retried, each after a
//! pause that doubles per retry and is scaled by a random factor, and never
//! past an overall deadline, so that a store that hangs fails a read long
//! before the kernel's 30 s I/O timeout would.

use std::future::Future;
use std::time::{Duration, Instant};

use rand::Rng;

/// How often, and for how long, one operation is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// From the first attempt to the last answer accepted.
    pub deadline: Duration,
    /// Most attempts, the first included.
    pub max_attempts: u32,
    /// Back-off before the first retry; it doubles for each one after.
    pub first_backoff: Duration,
}

/// The default deadline: a third of the kernel's default block I/O timeout,
/// so a request that waited behind other fetches still fails cleanly before
/// the kernel gives up on it.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            deadline: DEFAULT_DEADLINE,
            max_attempts: 6,
            first_backoff: Duration::from_millis(20),
        }
    }
}

/// Why [`RetryPolicy::run`] gave up.
#[derive(Debug)]
pub enum GaveUp<E> {
    /// The last attempt failed with `error`: it was not transient, or no
    /// attempt or time was left for another.
    Failed { error: E, attempts: u32 },
    /// The deadline passed while an attempt was in flight.
    TimedOut { attempts: u32 },
}

impl RetryPolicy {
    /// The pause before retry number `retry` (1 for the first): the
    /// exponential step, scaled by a random factor in [0.5, 1.5) so that
    /// many clients failed by one outage do not come back in step.
    pub fn backoff(&self, retry: u32) -> Duration {
        let step = self
            .first_backoff
            .saturating_mul(1 << retry.saturating_sub(1).min(16));
        step.mul_f64(rand::thread_rng().gen_range(0.5..1.5))
    }

    /// Runs `attempt` until it succeeds, fails with an error that
    /// `is_transient` rejects, runs out of attempts, or the deadline leaves
    /// no room for the next pause. `on_retry` sees each error retried.
    ///
    /// # Cancel safety
    /// Dropping the future abandons the attempt in flight; nothing is kept.
    pub async fn run<T, E, Fut>(
        &self,
        mut attempt: impl FnMut() -> Fut,
        is_transient: impl Fn(&E) -> bool,
        mut on_retry: impl FnMut(&E, u32),
    ) -> Result<T, GaveUp<E>>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        let deadline = Instant::now() + self.deadline;
        let mut attempts = 1;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let error = match tokio::time::timeout(remaining, attempt()).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(error)) => error,
                Err(_) => return Err(GaveUp::TimedOut { attempts }),
            };
            let pause = self.backoff(attempts);
            if !is_transient(&error)
                || attempts >= self.max_attempts
                || Instant::now() + pause >= deadline
            {
                return Err(GaveUp::Failed { error, attempts });
            }
            on_retry(&error, attempts);
            tokio::time::sleep(pause).await;
            attempts += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_doubles_with_jitter_and_never_overflows() {
        let policy = RetryPolicy::default();
        for retry in 1..5 {
            let step = policy.first_backoff * (1 << (retry - 1));
            let pause = policy.backoff(retry);
            assert!(pause >= step / 2 && pause < step * 3 / 2, "{pause:?}");
        }
        let _ = policy.backoff(u32::MAX);
    }

    fn quick() -> RetryPolicy {
        RetryPolicy {
            deadline: Duration::from_secs(5),
            max_attempts: 4,
            first_backoff: Duration::from_millis(1),
        }
    }

    #[tokio::test]
    async fn retries_transient_errors_until_success() {
        let calls = AtomicU32::new(0);
        let result = quick()
            .run(
                || async {
                    match calls.fetch_add(1, Ordering::SeqCst) {
                        0 | 1 => Err("busy"),
                        n => Ok(n),
                    }
                },
                |_| true,
                |_, _| {},
            )
            .await;
        assert!(matches!(result, Ok(2)));
    }

    #[tokio::test]
    async fn permanent_errors_and_exhausted_attempts_stop() {
        let calls = AtomicU32::new(0);
        let permanent = quick()
            .run(
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err::<(), _>("gone")
                },
                |_| false,
                |_, _| {},
            )
            .await;
        assert!(matches!(permanent, Err(GaveUp::Failed { attempts: 1, .. })));
        let transient = quick()
            .run(|| async { Err::<(), _>("busy") }, |_| true, |_, _| {})
            .await;
        assert!(matches!(transient, Err(GaveUp::Failed { attempts: 4, .. })));
    }

    #[tokio::test]
    async fn a_hanging_attempt_times_out_at_the_deadline() {
        let policy = RetryPolicy {
            deadline: Duration::from_millis(50),
            ..quick()
        };
        let started = Instant::now();
        let result = policy
            .run(std::future::pending::<Result<(), ()>>, |_| true, |_, _| {})
            .await;
        assert!(matches!(result, Err(GaveUp::TimedOut { attempts: 1 })));
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
