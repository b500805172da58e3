//! Response bodies a client must take within a deadline.
//!
//! A client can ask for many chunks and then not read them: over HTTP/2 it
//! opens streams and never opens its flow-control window, over HTTP/1.1 it
//! stops reading the socket. Each such response would hold its chunk in the
//! server's memory for as long as the client likes. So a body is handed to
//! hyper in frames of [`FRAME`] bytes, pulled only as the connection drains
//! (with hyper's per-stream send buffer capped, see `mod.rs`), and a body
//! not taken whole within the send deadline abandons its connection: the
//! connection is closed, which frees every response parked on it. Together
//! with the cap on streams per connection, an unread response costs at most
//! one body per stream, for at most the deadline.
//!
//! `lazyblk_http_unsent_bytes` counts the bytes of bodies not yet handed
//! to hyper; `lazyblk_http_abandoned_connections_total` the connections
//! closed for a response left unread.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

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
    /// Fires the connection's abandonment unless aborted first (when the
    /// body is dropped, sent or not).
    deadline: tokio::task::AbortHandle,
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
            watch.deadline.abort();
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
    /// Notified (once is enough) when a body outlived the deadline.
    abandon: Arc<Notify>,
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
            abandon: Arc::new(Notify::new()),
        }
    }

    /// The same limits for another connection.
    pub(super) fn for_connection(&self) -> SendDeadline {
        SendDeadline {
            abandon: Arc::new(Notify::new()),
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
        let (limit, abandon) = (self.limit, Arc::clone(&self.abandon));
        let deadline = tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            abandon.notify_one();
        })
        .abort_handle();
        body.watch = Some(Watch {
            unsent: Arc::clone(&self.unsent),
            deadline,
        });
    }

    /// Completes when a body on this connection outlived the deadline,
    /// counting the abandonment.
    pub(super) async fn abandoned(&self) {
        self.abandon.notified().await;
        self.abandoned.inc();
    }
}
