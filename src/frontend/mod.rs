//! Frontends: how the engine is presented to the kernel.
//!
//! A frontend turns kernel requests into [`crate::engine::Engine`] calls and
//! completes each with data or an errno from [`crate::error::ErrorKind::errno`],
//! the one errno mapping. It holds no state of its own about the image.
//!
//! # Unsafe
//!
//! The crate denies `unsafe`. One module allows it: `ublk/control.rs`,
//! which submits the control commands libublk cannot send (a kernel buffer
//! named in an io_uring SQE). Each `unsafe` block carries a `// SAFETY:`
//! comment naming who keeps the memory alive until the kernel is done with
//! it (clippy's `undocumented_unsafe_blocks` refuses a block without one).

pub mod fuse;
pub mod nbd;
pub mod ublk;
pub mod vhost_user;

use std::future::Future;

use futures::FutureExt;
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, SemaphorePermit};

/// Most requests of this process that wait on the runtime's blocking pool
/// at once: half of tokio's default pool of 512 threads. A waiting request
/// holds its thread until its chunk arrives, and the fetch that brings the
/// chunk needs a blocking thread of its own to verify, decrypt and fill;
/// were every thread held by waiting requests, no fetch could finish and
/// the device would hang for good. Past the cap, requests queue for a slot
/// (NBD's reader and vhost's queues then stop taking new ones).
pub(crate) const MAX_WAITING_REQUESTS: usize = 256;

static WAITING_REQUESTS: Semaphore = Semaphore::const_new(MAX_WAITING_REQUESTS);

/// A slot for one request on the blocking pool, held until the request is
/// done (see [`MAX_WAITING_REQUESTS`]).
async fn waiting_request_slot() -> SemaphorePermit<'static> {
    WAITING_REQUESTS
        .acquire()
        .await
        .expect("the slots' semaphore is never closed")
}

use crate::engine::EngineError;
use crate::error::ErrorKind;

/// Runs `request` on the calling thread if it completes without waiting
/// (with [`crate::engine::SyncIo`], a request whose chunks are all present
/// or zero), else finishes it on `runtime`'s blocking pool, which also does
/// its remaining cache I/O: a cold chunk never holds up the requests behind
/// it, and no file I/O runs on an async worker. A request that must wait
/// first takes one of the [`MAX_WAITING_REQUESTS`] slots.
pub(crate) fn run_inline_or_blocking(
    runtime: &Handle,
    request: impl Future<Output = ()> + Send + 'static,
) {
    let mut request = Box::pin(request);
    if request.as_mut().now_or_never().is_none() {
        runtime.spawn(finish_on_blocking_pool(request));
    }
}

/// As [`run_inline_or_blocking`], from an async task that reads requests:
/// a request that completes at once does so on that task, and one that
/// must wait makes the task wait for its slot, so the reader stops taking
/// requests while every slot is held.
pub(crate) async fn run_inline_or_wait_for_slot(
    request: impl Future<Output = ()> + Send + 'static,
) {
    let mut request = Box::pin(request);
    if request.as_mut().now_or_never().is_none() {
        finish_on_blocking_pool(request).await;
    }
}

/// Waits for one of the [`MAX_WAITING_REQUESTS`] slots, then finishes
/// `request` on the blocking pool, which holds the slot until it is done.
pub(crate) async fn finish_on_blocking_pool(request: impl Future<Output = ()> + Send + 'static) {
    let slot = waiting_request_slot().await;
    tokio::task::spawn_blocking(move || {
        futures::executor::block_on(request);
        drop(slot);
    });
}

/// The errno a failed request is answered with, after logging the failure
/// (see [`log_failed`]), since the client sees only the errno.
pub(crate) fn errno(error: &EngineError) -> i32 {
    log_failed("request", error);
    error.kind().errno()
}

/// Whether a failed request was the client's own doing: a write to a
/// read-only disk, a range past its end.
pub(crate) fn clients_mistake(error: &EngineError) -> bool {
    matches!(error.kind(), ErrorKind::ReadOnly | ErrorKind::Invalid)
}

/// Logs a failed request: our failures at warn, for the operator; the
/// client's mistakes at debug, since a guest may make as many as it likes
/// and the operator can do nothing about them (its own errno tells it).
pub(crate) fn log_failed(what: &str, error: &EngineError) {
    if clients_mistake(error) {
        tracing::debug!("{what} refused: {}", crate::error::chain(error));
    } else {
        tracing::warn!("{what} failed: {}", crate::error::chain(error));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    use super::*;

    /// What `log` logs at warn or above.
    fn warnings(log: impl FnOnce()) -> String {
        let lines = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let sink = Arc::clone(&lines);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || Sink(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let text = lines.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }

    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_clients_mistakes_are_not_warned_about_our_failures_are() {
        let past_the_end = EngineError::OutOfRange {
            offset: 1 << 40,
            len: 4096,
            size: 1 << 20,
        };
        let mut errnos = Vec::new();
        let said = warnings(|| {
            errnos.push(errno(&past_the_end));
            errnos.push(errno(&EngineError::ReadOnly));
        });
        assert_eq!(errnos, [libc::EINVAL, libc::EROFS]);
        assert_eq!(said, "");
        let ours = EngineError::FetchTimeout {
            index: 7,
            id: crate::chunk::ChunkId::of_envelope(b"x"),
            after: Duration::from_secs(1),
            attempts: 3,
        };
        let said = warnings(|| {
            assert_eq!(errno(&ours), libc::EIO);
        });
        assert!(
            said.contains("WARN") && said.contains("request failed"),
            "{said}"
        );
    }

    /// More requests wait than the blocking pool has threads, and what they
    /// wait for is done on the blocking pool too, as a fetch's fill is: all
    /// complete.
    #[test]
    fn waiting_requests_never_take_every_blocking_thread() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let requests = 600;
        let (done_tx, done_rx) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let mut fills = Vec::new();
        for _ in 0..requests {
            let (fill_tx, fill_rx) = tokio::sync::oneshot::channel::<()>();
            fills.push(fill_tx);
            let (done, waiting) = (done_tx.clone(), Arc::clone(&waiting));
            run_inline_or_blocking(runtime.handle(), async move {
                waiting.fetch_add(1, Ordering::SeqCst);
                fill_rx.await.unwrap();
                done.send(()).unwrap();
            });
        }
        // The fills start once the requests wait, each on its own blocking
        // thread (as many as may, and a moment for any more to pile up).
        while waiting.load(Ordering::SeqCst) < MAX_WAITING_REQUESTS {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(200));
        for fill in fills {
            runtime.spawn_blocking(move || fill.send(()).unwrap());
        }
        let completed = (0..requests)
            .take_while(|_| done_rx.recv_timeout(Duration::from_secs(60)).is_ok())
            .count();
        // Threads still waiting must not hold up the test's end.
        runtime.shutdown_background();
        assert_eq!(completed, requests, "requests hung waiting for fills");
    }
}
