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

use crate::engine::EngineError;
use crate::error::ErrorKind;

/// Runs `request` on the calling thread if it completes without waiting
/// (with [`crate::engine::SyncIo`], a request whose chunks are all present
/// or zero), else finishes it on `runtime`'s blocking pool, which also does
/// its remaining cache I/O: a cold chunk never holds up the requests behind
/// it, and no file I/O runs on an async worker.
pub(crate) fn run_inline_or_blocking(
    runtime: &Handle,
    request: impl Future<Output = ()> + Send + 'static,
) {
    let mut request = Box::pin(request);
    if request.as_mut().now_or_never().is_none() {
        runtime.spawn_blocking(move || futures::executor::block_on(request));
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
