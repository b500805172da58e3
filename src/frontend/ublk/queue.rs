//! One ublk queue: one thread, one io_uring, one task per tag.
//!
//! Each tag's task owns its I/O buffer, fetches a request from the kernel,
//! serves it and commits the result, which also fetches the next request.
//! The tasks run on a single-threaded executor driven by the queue's ring:
//! the thread sleeps in `io_uring_enter` until a completion arrives.
//!
//! A read whose chunks are all present (or zero) is answered from the
//! cache's data file by reads on the queue's own ring
//! ([`Engine::try_plan_read`]), never waiting on a fetch. Anything that may wait
//! (a fetch, a write, a flush) runs on the tokio runtime; its task's result
//! comes back through a oneshot channel, and an eventfd the queue polls on
//! its own ring wakes the thread, so other tags keep completing meanwhile and
//! nothing spins.
//!
//! Invariant: every request a tag fetches is committed with the byte count
//! or a negative errno from [`crate::error::ErrorKind::errno`]; no path
//! through [`Tag::serve`] panics.

use std::future::Future;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;

use futures::channel::oneshot;
use io_uring::{opcode, types};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::sys;
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkError, UblkUringData};
use rustix::event::{eventfd, EventfdFlags};
use tokio::runtime::Handle;

use crate::engine::{CachedRange, Engine, EngineError};
use crate::error::ErrorKind;

/// Idle time after which libublk lets a queue release its buffers' pages.
const IDLE_SECS: u64 = 20;
/// Largest zero buffer a discard writes at once.
const ZERO_PIECE: usize = 1 << 20;

/// Wakes a queue thread from another thread. Cloned into every task the
/// queue hands to the runtime.
#[derive(Debug, Clone)]
pub(super) struct Kicker(Arc<OwnedFd>);

impl Kicker {
    fn new() -> std::io::Result<Kicker> {
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Kicker(Arc::new(fd)))
    }

    fn kick(&self) {
        // EAGAIN means the counter is already non-zero: the queue wakes anyway.
        let _ = rustix::io::write(self.0.as_fd(), &1u64.to_ne_bytes());
    }

    /// Resets the counter, so the next poll waits for the next kick.
    fn drain(&self) {
        let mut count = [0u8; 8];
        let _ = rustix::io::read(self.0.as_fd(), &mut count);
    }
}

/// Sends a task's result to its tag, then kicks the queue; kicks it also
/// when the task is dropped unfinished (runtime shut down), so the tag
/// wakes to a cancelled channel rather than sleeping forever.
struct Reply<T> {
    tx: Option<oneshot::Sender<T>>,
    kicker: Kicker,
}

impl<T> Reply<T> {
    fn send(mut self, value: T) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(value);
        }
    }
}

impl<T> Drop for Reply<T> {
    fn drop(&mut self) {
        // The value (if any) is in the channel before the kick: a queue that
        // wakes finds its tag ready to run.
        self.tx.take();
        self.kicker.kick();
    }
}

/// What every tag of one queue shares.
struct Shared {
    engine: Arc<Engine>,
    runtime: Handle,
    kicker: Kicker,
}

impl Shared {
    /// Runs `work` on the runtime and waits for it without blocking the queue.
    async fn offload<T, F>(&self, work: F) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, EngineError>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let reply = Reply {
            tx: Some(tx),
            kicker: self.kicker.clone(),
        };
        self.runtime.spawn(async move { reply.send(work.await) });
        rx.await.unwrap_or_else(|_| {
            Err(EngineError::TaskFailed {
                task: "ublk request".into(),
                reason: "the runtime dropped the task".into(),
            })
        })
    }
}

/// Serves queue `qid` of `dev` until the device stops. Runs on the queue's
/// own thread (libublk's `run_target` makes one per queue).
pub(super) fn run_queue(qid: u16, dev: &UblkDev, engine: Arc<Engine>, runtime: Handle) {
    let kicker = match Kicker::new() {
        Ok(kicker) => kicker,
        Err(e) => {
            tracing::error!(queue = qid, "create the queue's eventfd: {e}");
            return;
        }
    };
    let queue = match UblkQueue::new(qid, dev) {
        Ok(queue) => Rc::new(queue),
        Err(e) => {
            tracing::error!(queue = qid, "set up the queue: {e}");
            return;
        }
    };
    let shared = Rc::new(Shared {
        engine,
        runtime,
        kicker: kicker.clone(),
    });
    // Readahead noted by reads served here spawns its fetches on the runtime.
    let _entered = shared.runtime.enter();
    let executor = Rc::new(smol::LocalExecutor::new());
    let tags: Vec<_> = queue
        .tags()
        .map(|tag| {
            let tag = Tag {
                queue: queue.clone(),
                shared: shared.clone(),
                tag,
            };
            executor.spawn(async move {
                match tag.run().await {
                    Ok(()) | Err(UblkError::QueueIsDown) => {}
                    Err(e) => tracing::error!(queue = qid, tag = tag.tag, "tag stopped: {e}"),
                }
            })
        })
        .collect();
    // Never awaited to its end: it is dropped with the executor once every
    // tag has seen the queue go down. Its poll has no buffer, so an
    // unfinished one leaves nothing for the kernel to write to.
    let _kicks = executor.spawn(watch_kicks(kicker));
    let driver = executor.clone();
    smol::block_on(executor.run(async {
        let run_ops = || while driver.try_tick() {};
        let done = || tags.iter().all(|t| t.is_finished());
        if let Err(e) =
            libublk::wait_and_handle_io_events(&queue, Some(IDLE_SECS), run_ops, done).await
        {
            tracing::error!(queue = qid, "queue event loop: {e}");
        }
    }));
}

/// Keeps a poll for the eventfd on the queue's ring: a kick completes it,
/// which wakes the thread, which then runs the tags the kick's sender made
/// ready.
async fn watch_kicks(kicker: Kicker) {
    let fd = types::Fd(kicker.0.as_raw_fd());
    loop {
        let poll = opcode::PollAdd::new(fd, libc::POLLIN as u32).build();
        if ublk_submit_sqe_async(poll, UblkUringData::Target as u64)
            .await
            .is_err()
        {
            return;
        }
        kicker.drain();
    }
}

/// One tag of one queue.
struct Tag<'a> {
    queue: Rc<UblkQueue<'a>>,
    shared: Rc<Shared>,
    tag: u16,
}

impl Tag<'_> {
    async fn run(&self) -> Result<(), UblkError> {
        let q = &self.queue;
        // Teardown: the buffer lives in this future, which the queue keeps
        // until the kernel has aborted the tag's last command (QueueIsDown),
        // so the kernel never copies into freed memory.
        let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
        q.submit_io_prep_cmd(self.tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
            .await?;
        loop {
            let result = self.serve(buf.as_mut_slice()).await;
            q.submit_io_commit_cmd(self.tag, BufDesc::Slice(buf.as_slice()), result)
                .await?;
        }
    }

    /// Serves the tag's current request: bytes done, or a negative errno.
    async fn serve(&self, buf: &mut [u8]) -> i32 {
        let iod = self.queue.get_iod(self.tag);
        let op = iod.op_flags & 0xff;
        let offset = iod.start_sector << 9;
        let len = (iod.nr_sectors as usize) << 9;
        let engine = &self.shared.engine;
        let outcome = match op {
            sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE if len > buf.len() => {
                return -libc::EINVAL
            }
            sys::UBLK_IO_OP_READ => self.read(offset, &mut buf[..len]).await,
            sys::UBLK_IO_OP_WRITE => {
                let data = buf[..len].to_vec();
                let engine = engine.clone();
                self.shared
                    .offload(async move { engine.write(offset, &data).await })
                    .await
            }
            sys::UBLK_IO_OP_FLUSH => {
                let engine = engine.clone();
                self.shared
                    .offload(async move { engine.flush().await })
                    .await
            }
            sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => {
                let engine = engine.clone();
                self.shared
                    .offload(async move { write_zeroes(&engine, offset, len).await })
                    .await
            }
            _ => return -libc::EOPNOTSUPP,
        };
        match outcome {
            Ok(()) if op == sys::UBLK_IO_OP_FLUSH => 0,
            Ok(()) => len as i32,
            Err(e) => {
                if e.kind() != ErrorKind::ReadOnly {
                    tracing::warn!(op, offset, len, "request failed: {e}");
                }
                -e.kind().errno()
            }
        }
    }

    async fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), EngineError> {
        let engine = &self.shared.engine;
        match engine.try_plan_read(offset, out.len()) {
            Some(Ok(plan)) => {
                read_cached(engine, &plan, out).await?;
                engine.planned_read_done(out.len());
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => {
                let len = out.len();
                let engine = engine.clone();
                let data = self
                    .shared
                    .offload(async move { engine.read(offset, len).await })
                    .await?;
                out.copy_from_slice(&data);
                Ok(())
            }
        }
    }
}

/// Serves a planned read with reads of the cache's data file on the queue's
/// ring: the thread never blocks in a syscall, and other tags run while the
/// file is read.
async fn read_cached(
    engine: &Engine,
    plan: &[CachedRange],
    out: &mut [u8],
) -> Result<(), EngineError> {
    let fd = types::Fd(engine.cache_file().as_raw_fd());
    for range in plan {
        let (offset, len, in_buf) = match *range {
            CachedRange::Zero { len, in_buf } => {
                out[in_buf..][..len].fill(0);
                continue;
            }
            CachedRange::File {
                offset,
                len,
                in_buf,
            } => (offset, len, in_buf),
        };
        let mut done = 0;
        while done < len {
            let dst = &mut out[in_buf + done..][..len - done];
            // The kernel writes into `dst` until the read completes. `dst`
            // is part of the tag's buffer, which the tag's task owns and
            // does not drop before this await returns (the queue drops a
            // task only once it has finished, see `run_queue`); and the
            // engine keeps the file open while it lives.
            let sqe = opcode::Read::new(fd, dst.as_mut_ptr(), dst.len() as u32)
                .offset(offset + done as u64)
                .build();
            let read = ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
                .await
                .unwrap_or(-libc::EBUSY);
            if read <= 0 {
                let source = if read == 0 {
                    std::io::Error::from(std::io::ErrorKind::UnexpectedEof)
                } else {
                    std::io::Error::from_raw_os_error(-read)
                };
                return Err(engine.cache_read_failed(offset + done as u64, len - done, source));
            }
            done += read as usize;
        }
    }
    Ok(())
}

/// Discard and write-zeroes: the engine has no way to drop a range, so the
/// range is written with zeros (a later read must not see the old bytes).
async fn write_zeroes(engine: &Arc<Engine>, offset: u64, len: usize) -> Result<(), EngineError> {
    let zeros = vec![0u8; len.min(ZERO_PIECE)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len());
        engine.write(offset + done as u64, &zeros[..n]).await?;
        done += n;
    }
    Ok(())
}
