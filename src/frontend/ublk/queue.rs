//! One ublk queue: one thread, one io_uring, one task per tag.
//!
//! Each tag's task owns its I/O buffer, fetches a request from the kernel,
//! translates it into an engine [`Request`] over that buffer, awaits the
//! engine and commits the result, which also fetches the next request. In
//! zero-copy mode (`UBLK_F_AUTO_BUF_REG`) a tag has no buffer: before the
//! driver hands over a request with data, it registers the request's pages
//! in this ring's buffer table at index = tag, and unregisters them when the
//! tag commits; the engine reaches them only through [`RingIo`]'s
//! fixed-buffer ops ([`FixedBuf`]). The
//! tasks run on a single-threaded executor driven by the queue's ring: the
//! thread sleeps in `io_uring_enter` until a completion arrives.
//!
//! The engine does its cache I/O on this ring ([`RingIo`]), so a request
//! whose chunks are present completes here without leaving the thread.
//! What the engine waits for elsewhere (a fetch on the runtime, a flush on
//! its blocking pool) wakes the tag through a waker that also writes an
//! eventfd the queue polls on its own ring ([`Kicked`]), so other tags keep
//! completing meanwhile and nothing spins.
//!
//! Invariant: every request a tag fetches is committed with the byte count
//! or a negative errno from [`crate::error::ErrorKind::errno`]; no path
//! through [`Tag::serve`] panics.
//!
//! Teardown order: a tag's buffer lives in its task's future (in zero-copy
//! mode the pages are the request's, and the driver holds a reference on
//! the request while they are registered). The queue
//! drops the tasks (and with them the buffers) only once every tag has seen
//! the queue go down, i.e. the kernel aborted its last command and none of
//! its ring operations is in flight; then the executor, then the ring. If
//! the event loop fails with tags still running, the tasks and the executor
//! are leaked instead: the kernel or the ring may still write into their
//! buffers, and the process is about to exit anyway.

use std::fs::File;
use std::future::Future;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::ThreadId;

use io_uring::{opcode, types};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::sys;
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkError, UblkUringData};
use rustix::event::{eventfd, EventfdFlags};
use tokio::runtime::Handle;

use super::ring_io::RingIo;
use crate::engine::{Engine, EngineError, FixedBuf, ReadBuf, Request, WriteBuf};
use crate::error::ErrorKind;

/// Idle time after which libublk lets a queue release its buffers' pages.
const IDLE_SECS: u64 = 20;

/// Wakes a queue thread from another thread.
#[derive(Debug, Clone)]
struct Kicker(Arc<OwnedFd>);

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

/// A waker for a tag's task that, woken from another thread, also kicks
/// the queue out of `io_uring_enter`. Woken on the queue's own thread (a
/// ring completion) it only schedules the task: no eventfd write.
struct KickWaker {
    task: Waker,
    kicker: Kicker,
    home: ThreadId,
}

impl Wake for KickWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Scheduled before the kick: a queue that wakes finds it ready.
        self.task.wake_by_ref();
        if std::thread::current().id() != self.home {
            self.kicker.kick();
        }
    }
}

/// Awaits `future` with a [`KickWaker`], so wakes from the runtime reach
/// this queue's sleeping thread.
async fn kicked<F: Future>(future: F, kicker: &Kicker) -> F::Output {
    let mut future = pin!(future);
    let home = std::thread::current().id();
    let mut cached: Option<(Waker, Waker)> = None;
    std::future::poll_fn(move |cx: &mut Context<'_>| {
        let waker = match &cached {
            Some((task, waker)) if task.will_wake(cx.waker()) => waker.clone(),
            _ => {
                let waker = Waker::from(Arc::new(KickWaker {
                    task: cx.waker().clone(),
                    kicker: kicker.clone(),
                    home,
                }));
                cached = Some((cx.waker().clone(), waker.clone()));
                waker
            }
        };
        let poll: Poll<F::Output> = future.as_mut().poll(&mut Context::from_waker(&waker));
        poll
    })
    .await
}

/// What every tag of one queue shares.
struct Shared {
    engine: Arc<Engine>,
    kicker: Kicker,
    /// `/dev/zero` in zero-copy mode: zero pieces are read from it into the
    /// request's registered pages.
    zeros: Option<File>,
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
    let zeros = if queue.support_auto_buf_zc() {
        match File::open("/dev/zero") {
            Ok(file) => Some(file),
            Err(e) => {
                tracing::error!(queue = qid, "open /dev/zero for zero-copy reads: {e}");
                return;
            }
        }
    } else {
        None
    };
    let shared = Rc::new(Shared {
        engine,
        kicker: kicker.clone(),
        zeros,
    });
    // Fetches the engine starts from here are spawned on its runtime; the
    // stores' futures may also want its context.
    let _entered = runtime.enter();
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
    if !tags.iter().all(|t| t.is_finished()) {
        tracing::error!(
            queue = qid,
            "queue stopped with requests in flight: leaking its buffers rather than free memory the kernel may still use"
        );
        std::mem::forget(tags);
        std::mem::forget(driver);
    }
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
        if self.queue.support_auto_buf_zc() {
            return self.run_registered().await;
        }
        let q = &self.queue;
        // Teardown: the buffer lives in this future, which the queue keeps
        // until the kernel has aborted the tag's last command (QueueIsDown),
        // so the kernel never copies into freed memory.
        let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
        q.submit_io_prep_cmd(self.tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
            .await?;
        loop {
            let result = self.serve(TagBuf::Memory(buf.as_mut_slice())).await;
            q.submit_io_commit_cmd(self.tag, BufDesc::Slice(buf.as_slice()), result)
                .await?;
        }
    }

    /// The zero-copy loop: the driver registers each request's pages at
    /// index = tag (libublk sized the ring's sparse buffer table to the
    /// queue depth), so the index is the tag's own and no other op uses
    /// it. No `UBLK_AUTO_BUF_REG_FALLBACK`: the registration can only fail
    /// for want of memory, and then the driver fails that request with an
    /// I/O error, as we would (the fallback's manual registration needs
    /// `UBLK_F_SUPPORT_ZERO_COPY` and the same memory).
    async fn run_registered(&self) -> Result<(), UblkError> {
        let q = &self.queue;
        let reg = sys::ublk_auto_buf_reg {
            index: self.tag,
            ..Default::default()
        };
        q.submit_io_prep_cmd(self.tag, BufDesc::AutoReg(reg), 0, None)
            .await?;
        loop {
            let result = self.serve(TagBuf::Registered).await;
            q.submit_io_commit_cmd(self.tag, BufDesc::AutoReg(reg), result)
                .await?;
        }
    }

    /// Serves the tag's current request: bytes done, or a negative errno.
    async fn serve(&self, buf: TagBuf<'_>) -> i32 {
        let iod = self.queue.get_iod(self.tag);
        let op = iod.op_flags & 0xff;
        let offset = iod.start_sector << 9;
        let sectors = u64::from(iod.nr_sectors);
        let len = (sectors << 9) as usize;
        let max = match &buf {
            TagBuf::Memory(buf) => buf.len(),
            TagBuf::Registered => self.queue.dev.dev_info.max_io_buf_bytes as usize,
        };
        let fixed = FixedBuf {
            index: self.tag,
            at: 0,
            len,
        };
        let request = match (op, buf) {
            (sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE, _) if len > max => return -libc::EINVAL,
            (sys::UBLK_IO_OP_READ, TagBuf::Memory(buf)) => Request::Read {
                offset,
                buf: ReadBuf::Memory(&mut buf[..len]),
            },
            (sys::UBLK_IO_OP_READ, TagBuf::Registered) => Request::Read {
                offset,
                buf: ReadBuf::Fixed(fixed),
            },
            (sys::UBLK_IO_OP_WRITE, TagBuf::Memory(buf)) => Request::Write {
                offset,
                data: WriteBuf::Memory(&buf[..len]),
            },
            (sys::UBLK_IO_OP_WRITE, TagBuf::Registered) => Request::Write {
                offset,
                data: WriteBuf::Fixed(fixed),
            },
            (sys::UBLK_IO_OP_FLUSH, _) => Request::Flush,
            (sys::UBLK_IO_OP_DISCARD, _) => Request::Discard {
                offset,
                len: sectors << 9,
            },
            (sys::UBLK_IO_OP_WRITE_ZEROES, _) => Request::WriteZeroes {
                offset,
                len: sectors << 9,
            },
            _ => return -libc::EOPNOTSUPP,
        };
        let engine = &self.shared.engine;
        let io = RingIo {
            zeros: self.shared.zeros.as_ref(),
        };
        match kicked(engine.submit(&io, request), &self.shared.kicker).await {
            Ok(()) if op == sys::UBLK_IO_OP_READ || op == sys::UBLK_IO_OP_WRITE => len as i32,
            Ok(()) => 0,
            Err(e) => failed(op, offset, len, &e),
        }
    }
}

/// A tag's buffer for one request.
enum TagBuf<'a> {
    /// The tag's own memory, which the driver copies to or from.
    Memory(&'a mut [u8]),
    /// The request's pages, registered at index = tag.
    Registered,
}

/// The negative errno a failed request is committed with; failures other
/// than a refused write are logged, since the kernel reports only the errno.
fn failed(op: u32, offset: u64, len: usize, error: &EngineError) -> i32 {
    if error.kind() != ErrorKind::ReadOnly {
        tracing::warn!(
            op,
            offset,
            len,
            "request failed: {}",
            crate::error::chain(error)
        );
    }
    -error.kind().errno()
}
