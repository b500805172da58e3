//! Response bodies a client must take within a deadline.
//!
//! A client can ask for many chunks and then not read them: over HTTP/2 it
//! opens streams and never opens its flow-control window, over HTTP/1.1 it
//! stops reading the socket. Each such response would hold its chunk in the
//! server's memory for as long as the client likes. So a body is handed to
//! hyper in frames of [`FRAME`] bytes, pulled only as the connection drains
//! (with hyper's per-stream send buffer capped, see `mod.rs`), and a
//! connection with bodies to send that takes no frame of any of them for
//! the send deadline is abandoned: it is closed, which frees every response
//! parked on it. The deadline counts from the last progress, not from when
//! a response was built: on a slow link a response queued behind others
//! waits its turn while bytes flow, and must not time out for that; only a
//! stall fails. Together with the cap on streams per connection, an unread
//! response costs at most one body per stream, for as long as the
//! connection's other responses keep moving plus the deadline.
//!
//! `lazyblk_http_unsent_bytes` counts the bytes of bodies not yet handed
//! to hyper; `lazyblk_http_abandoned_connections_total` the connections
//! closed for a response left unread.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::Notify;

use crate::metrics::{Counter, Gauge, Registry};

/// The most bytes handed to hyper at once.
pub(super) const FRAME: usize = 64 * 1024;

/// A response body (see the module docs).
#[derive(Debug)]
pub(super) struct Outgoing {
    rest: Bytes,
    /// Set once the body is larger than a frame and served on a
    /// connection: its deadline, and what it counts in.
    watch: Option<Watch>,
}

#[derive(Debug)]
struct Watch {
    unsent: Arc<Gauge>,
    progress: Arc<Progress>,
}

/// One connection's progress: when it last took a frame of a watched
/// body, and how many watched bodies it still has to send.
#[derive(Debug)]
struct Progress {
    since: Instant,
    /// Milliseconds from `since` to the last frame taken.
    last_frame_ms: AtomicU64,
    pending: AtomicUsize,
    /// Notified when a body is watched, so the watchdog resumes.
    resumed: Notify,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            since: Instant::now(),
            last_frame_ms: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            resumed: Notify::new(),
        }
    }

    fn moved(&self) {
        let now = self.since.elapsed().as_millis() as u64;
        self.last_frame_ms.fetch_max(now, Ordering::Relaxed);
    }

    fn last_frame(&self) -> Instant {
        self.since + Duration::from_millis(self.last_frame_ms.load(Ordering::Relaxed))
    }
}

impl Outgoing {
    pub(super) fn new(bytes: Bytes) -> Outgoing {
        Outgoing {
            rest: bytes,
            watch: None,
        }
    }
}

impl Outgoing {
    /// The bytes not yet sent: all of them, for a body never served.
    pub(super) fn into_bytes(mut self) -> Bytes {
        let rest = std::mem::take(&mut self.rest);
        if let Some(watch) = &self.watch {
            watch.unsent.add(-(rest.len() as i64));
        }
        rest
    }
}

impl Body for Outgoing {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.rest.is_empty() {
            return Poll::Ready(None);
        }
        let n = self.rest.len().min(FRAME);
        let frame = self.rest.split_to(n);
        if let Some(watch) = &self.watch {
            watch.unsent.add(-(n as i64));
            watch.progress.moved();
        }
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        if let Some(watch) = &self.watch {
            watch.progress.pending.fetch_sub(1, Ordering::Relaxed);
            watch.unsent.add(-(self.rest.len() as i64));
        }
    }
}

/// One connection's side of the deadline: what its bodies count in, and
/// how they say the connection is abandoned.
#[derive(Debug, Clone)]
pub(super) struct SendDeadline {
    limit: Duration,
    unsent: Arc<Gauge>,
    abandoned: Arc<Counter>,
    progress: Arc<Progress>,
}

impl SendDeadline {
    pub(super) fn new(limit: Duration, registry: &Registry) -> SendDeadline {
        SendDeadline {
            limit,
            unsent: registry.gauge(
                "lazyblk_http_unsent_bytes",
                "Bytes of response bodies that clients have not taken yet.",
                &[],
            ),
            abandoned: registry.counter(
                "lazyblk_http_abandoned_connections_total",
                "Connections closed because a response was left unread past the send deadline.",
                &[],
            ),
            progress: Arc::new(Progress::new()),
        }
    }

    /// The same limits for another connection.
    pub(super) fn for_connection(&self) -> SendDeadline {
        SendDeadline {
            progress: Arc::new(Progress::new()),
            ..self.clone()
        }
    }

    /// Puts `body` under this connection's deadline. Call from the runtime.
    pub(super) fn watch(&self, body: &mut Outgoing) {
        if body.rest.len() <= FRAME || body.watch.is_some() {
            // One frame goes to hyper whole at the first poll, into the
            // send buffer every stream already has.
            return;
        }
        self.unsent.add(body.rest.len() as i64);
        let progress = &self.progress;
        if progress.pending.fetch_add(1, Ordering::Relaxed) == 0 {
            // An idle connection's clock starts with its first body; one
            // already sending keeps its own, so a queued body waits its
            // turn without a clock of its own.
            progress.moved();
        }
        progress.resumed.notify_one();
        body.watch = Some(Watch {
            unsent: Arc::clone(&self.unsent),
            progress: Arc::clone(progress),
        });
    }

    /// Completes when this connection had bodies to send and took no frame
    /// of them for the deadline, counting the abandonment.
    pub(super) async fn abandoned(&self) {
        let progress = &self.progress;
        loop {
            if progress.pending.load(Ordering::Relaxed) == 0 {
                // A body watched after the check leaves a permit, so this
                // wakes at once.
                progress.resumed.notified().await;
                continue;
            }
            let stalled_at = progress.last_frame() + self.limit;
            if Instant::now() >= stalled_at {
                self.abandoned.inc();
                return;
            }
            tokio::time::sleep_until(stalled_at).await;
        }
    }
}
