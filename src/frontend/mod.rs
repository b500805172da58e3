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
pub(crate) async fn waiting_request_slot() -> SemaphorePermit<'static> {
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
        let blocking = runtime.clone();
        runtime.spawn(async move {
            let slot = waiting_request_slot().await;
            blocking.spawn_blocking(move || {
                futures::executor::block_on(request);
                drop(slot);
            });
        });
    }
}

/// The errno a failed request is answered with; failures other than a
/// refused write are logged, since the client sees only the errno.
pub(crate) fn errno(error: &EngineError) -> i32 {
    if error.kind() != ErrorKind::ReadOnly {
        tracing::warn!("request failed: {}", crate::error::chain(error));
    }
    error.kind().errno()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    use super::*;

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
