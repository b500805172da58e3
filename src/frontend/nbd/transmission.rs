//! The transmission phase: requests in, replies out, many in flight.
//!
//! One task reads requests. A read whose chunks the cache holds, in pages
//! the page cache holds, completes on that task ([`NowaitReadIo`] reads
//! without waiting for a disk and finishes such a request in its first
//! poll, so the runtime's worker never blocks on one); every other valid
//! request runs on the blocking pool, within the process's cap on
//! requests that wait ([`crate::frontend::MAX_WAITING_REQUESTS`]). Each
//! hands its reply to the connection's one writer task, so replies leave
//! in the order requests complete. What requests in flight may hold is
//! bounded by a byte budget: the reader waits for room before it reads a
//! write's payload or starts a read, which pushes back on a client that
//! sends faster than the engine serves.
//!
//! A request the protocol forbids gets its error reply and the connection
//! goes on, except where the stream cannot be trusted afterwards (a bad
//! magic) or a write's payload is too large to skip; then it ends. When
//! the client leaves, requests already running finish (a dropped engine
//! request would be safe too) and their replies are discarded.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::protocol::*;
use super::{ConnectionError, Export, MAX_REQUEST_BYTES};
use crate::engine::{Engine, NowaitReadIo, Request};

/// Bytes of read data and write payloads one connection may hold at once.
const IN_FLIGHT_BYTES: usize = 64 << 20;
/// The budget's unit; a request without data takes one.
const BUDGET_UNIT: usize = 4096;
/// How much reply data the writer gathers before it writes to the socket.
const WRITE_BUFFER: usize = 256 << 10;

/// A reply on its way to the writer; the budget it held is returned once
/// it is written.
struct Reply {
    handle: u64,
    error: u32,
    data: Option<Vec<u8>>,
    _budget: Option<OwnedSemaphorePermit>,
}

/// Serves requests on `stream` until the client disconnects.
pub(super) async fn serve<S>(stream: S, export: Arc<Export>) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, writer) = tokio::io::split(stream);
    let (replies, queue) = mpsc::unbounded_channel();
    let mut writer = AbortOnDrop(tokio::spawn(write_replies(writer, queue)));
    let read = read_requests(&mut reader, &export, &replies).await;
    // The writer ends once every reply, from requests still running too,
    // has gone out.
    drop(replies);
    let written = match (&mut writer.0).await {
        Ok(written) => written,
        Err(e) => Err(std::io::Error::other(e)),
    };
    read?;
    Ok(written?)
}

async fn read_requests<R: AsyncRead + Unpin>(
    reader: &mut R,
    export: &Arc<Export>,
    replies: &mpsc::UnboundedSender<Reply>,
) -> Result<(), ConnectionError> {
    let budget = Arc::new(Semaphore::new(IN_FLIGHT_BYTES / BUDGET_UNIT));
    let mut header = [0u8; REQUEST_LEN];
    loop {
        match reader.read_exact(&mut header).await {
            Ok(_) => {}
            // Leaving without NBD_CMD_DISC is rude but not an error.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let request = RequestHeader::parse(&header)?;
        if request.command == Command::Disconnect {
            return Ok(());
        }
        let payload = match request.command {
            Command::Write => request.length,
            _ => 0,
        };
        if let Some(error) = refusal(&export.engine, &request) {
            if payload > MAX_REQUEST_BYTES {
                let _ = replies.send(error_reply(request.handle, error));
                return Err(ConnectionError::OversizedWrite(payload));
            }
            tokio::io::copy(
                &mut (&mut *reader).take(payload.into()),
                &mut tokio::io::sink(),
            )
            .await?;
            let _ = replies.send(error_reply(request.handle, error));
            continue;
        }
        let data_bytes = match request.command {
            Command::Read | Command::Write => request.length as usize,
            _ => 0,
        };
        let units = data_bytes.div_ceil(BUDGET_UNIT).max(1) as u32;
        // The budget is never closed, so this waits for room and never fails.
        let permit = budget
            .clone()
            .acquire_many_owned(units)
            .await
            .map_err(std::io::Error::other)?;
        let mut data = vec![0u8; payload as usize];
        reader.read_exact(&mut data).await?;
        let (engine, replies) = (export.engine.clone(), replies.clone());
        let is_read = request.command == Command::Read;
        let serve = async move {
            let (error, data) = execute(&engine, &request, data).await;
            let _ = replies.send(Reply {
                handle: request.handle,
                error,
                data,
                _budget: Some(permit),
            });
        };
        // A read the cache holds is a copy out of the page cache: done here
        // at once, it saves two thread hand-offs. Writes and flushes may
        // sync, so they always leave this task.
        if is_read {
            crate::frontend::run_inline_or_wait_for_slot(serve).await;
        } else {
            crate::frontend::finish_on_blocking_pool(serve).await;
        }
    }
}

fn error_reply(handle: u64, error: u32) -> Reply {
    Reply {
        handle,
        error,
        data: None,
        _budget: None,
    }
}

/// The error a request gets without reaching the engine, per the spec:
/// unknown commands and flags EINVAL, changes to a read-only export EPERM,
/// writes past the end ENOSPC, other requests past the end EINVAL.
fn refusal(engine: &Engine, request: &RequestHeader) -> Option<u32> {
    let command = request.command;
    if matches!(command, Command::Unknown(_)) || request.flags & !command.allowed_flags() != 0 {
        return Some(EINVAL);
    }
    let changes = matches!(
        command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if changes && engine.read_only() {
        return Some(EPERM);
    }
    if matches!(command, Command::Read | Command::Write) && request.length > MAX_REQUEST_BYTES {
        return Some(EINVAL);
    }
    let past_end = request
        .offset
        .checked_add(request.length.into())
        .is_none_or(|end| end > engine.size());
    match command {
        Command::Flush => None,
        Command::Write if past_end => Some(ENOSPC),
        _ if past_end => Some(EINVAL),
        _ => None,
    }
}

/// Runs one request; a FUA write is flushed before it is answered.
async fn execute(
    engine: &Engine,
    request: &RequestHeader,
    payload: Vec<u8>,
) -> (u32, Option<Vec<u8>>) {
    let (offset, len) = (request.offset, u64::from(request.length));
    let fua = request.flags & CMD_FLAG_FUA != 0;
    let mut read = Vec::new();
    let block_request = match request.command {
        Command::Read => {
            read = vec![0u8; len as usize];
            Request::Read {
                offset,
                buf: (&mut read).into(),
            }
        }
        Command::Write => Request::Write {
            offset,
            data: payload.as_slice().into(),
        },
        Command::Flush => Request::Flush,
        Command::Trim => Request::Discard { offset, len },
        // Zeros are holes in the cache either way, so NBD_CMD_FLAG_NO_HOLE
        // changes nothing.
        Command::WriteZeroes => Request::WriteZeroes { offset, len },
        Command::Disconnect | Command::Unknown(_) => return (EINVAL, None),
    };
    let is_read = request.command == Command::Read;
    // A read or a flush with FUA needs nothing more than it already does.
    let flush_after = fua
        && matches!(
            block_request,
            Request::Write { .. } | Request::Discard { .. } | Request::WriteZeroes { .. }
        );
    let mut result = engine.submit(&NowaitReadIo, block_request).await;
    if result.is_ok() && flush_after {
        result = engine.submit(&NowaitReadIo, Request::Flush).await;
    }
    match result {
        Ok(()) if is_read => (0, Some(read)),
        Ok(()) => (0, None),
        Err(e) => (error_value(super::super::errno(&e)), None),
    }
}

/// Writes replies as they come; after a failed write it keeps draining the
/// queue, so requests still running can finish, and reports the failure.
async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut queue: mpsc::UnboundedReceiver<Reply>,
) -> std::io::Result<()> {
    let mut writer = BufWriter::with_capacity(WRITE_BUFFER, writer);
    let mut failed = None;
    while let Some(reply) = queue.recv().await {
        if failed.is_some() {
            continue;
        }
        let sent = async {
            writer
                .write_all(&simple_reply(reply.handle, reply.error))
                .await?;
            if let Some(data) = &reply.data {
                writer.write_all(data).await?;
            }
            // Gather replies that are ready; flush when none is waiting.
            if queue.is_empty() {
                writer.flush().await?;
            }
            Ok::<_, std::io::Error>(())
        }
        .await;
        if let Err(e) = sent {
            failed = Some(e);
        }
    }
    match failed {
        Some(e) => Err(e),
        None => {
            writer.flush().await?;
            writer.shutdown().await
        }
    }
}

/// Stops the writer when the connection's task is dropped (a forced stop),
/// so the socket closes then and not when the last request finishes.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
