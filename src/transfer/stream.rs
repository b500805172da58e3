//! Push of an image while it is being made, with no image file between:
//! the producer (the flattener, on a thread of its own) hands each completed
//! chunk to a [`ChunkWriter`]; the future [`push_stream`] returns seals them
//! on rayon a batch at a time and uploads the ones the store lacks while the
//! producer goes on.
//!
//! Chunks may come in any order and each at most once; an index that never
//! comes is zeros. The manifest is stored only after the producer has
//! declared the image complete ([`ChunkConsumer::finish`]): a producer that
//! fails or is dropped midway leaves chunks in the store but no manifest.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use tokio::sync::mpsc;

use super::buffer::{BufferPool, ChunkBuffer};
use super::push::{seal, upload, validate, Collected, WINDOW_BYTES};
use super::{on_rayon, PushOptions, PushReport, TransferError};
use crate::chunk::{Salt, TenantKey};
use crate::flatten::ChunkConsumer;
use crate::store::ChunkStore;

/// More chunks than any image has (a 1 TiB image in 64 KiB chunks has
/// 2^24): an index past it is a producer's bug, refused before the
/// manifest's table grows to it.
const MAX_CHUNKS: u64 = 1 << 26;

/// The producer's end of a streamed push.
pub struct ChunkWriter {
    sender: mpsc::Sender<Message>,
    pool: BufferPool,
    chunk_size: u64,
}

enum Message {
    Chunk { index: u64, buffer: ChunkBuffer },
    End { image_size: u64 },
}

/// The push has stopped (it failed; its future says why).
fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the push stopped")
}

impl ChunkConsumer for ChunkWriter {
    type Chunk = ChunkBuffer;

    fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    fn take(&mut self) -> ChunkBuffer {
        self.pool.take(self.chunk_size as usize)
    }

    /// Blocks while the pusher is a window behind. Call it from a thread,
    /// not from async code.
    fn put(&mut self, index: u64, mut buffer: ChunkBuffer, len: usize) -> io::Result<()> {
        buffer.truncate(len);
        self.sender
            .blocking_send(Message::Chunk { index, buffer })
            .map_err(|_| stopped())
    }

    fn finish(self, image_size: u64) -> io::Result<()> {
        self.sender
            .blocking_send(Message::End { image_size })
            .map_err(|_| stopped())
    }
}

/// Starts a push whose image comes through the returned [`ChunkWriter`].
/// The future seals and uploads the chunks as they come and, once the
/// writer finishes, stores the manifest under `opts.name`.
pub fn push_stream(
    store: Arc<dyn ChunkStore>,
    tenant: TenantKey,
    salt: Salt,
    opts: PushOptions,
) -> Result<
    (
        ChunkWriter,
        impl Future<Output = Result<PushReport, TransferError>> + Send + 'static,
    ),
    TransferError,
> {
    validate(&opts)?;
    let chunk_size = u64::from(opts.chunk_size);
    let batch = (WINDOW_BYTES / chunk_size).max(1) as usize;
    // One batch queued while one seals and one uploads.
    let (sender, receiver) = mpsc::channel(batch);
    let writer = ChunkWriter {
        sender,
        pool: BufferPool::new(chunk_size as usize),
        chunk_size,
    };
    let pushing = consume(receiver, store, tenant, salt, opts, batch);
    Ok((writer, pushing))
}

async fn consume(
    mut receiver: mpsc::Receiver<Message>,
    store: Arc<dyn ChunkStore>,
    tenant: TenantKey,
    salt: Salt,
    opts: PushOptions,
    batch_chunks: usize,
) -> Result<PushReport, TransferError> {
    let started = Instant::now();
    let salt = Arc::new(salt);
    let mut report = PushReport::new(&opts, 0);
    let mut collected = Collected::default();
    let mut batch = Vec::with_capacity(batch_chunks);
    let image_size = loop {
        let end = match receiver.recv().await {
            Some(Message::Chunk { index, buffer }) => {
                report.bytes_read += buffer.as_ref().len() as u64;
                batch.push((index, buffer));
                if batch.len() < batch_chunks {
                    continue;
                }
                None
            }
            Some(Message::End { image_size }) => Some(image_size),
            None => return Err(TransferError::ImageIncomplete),
        };
        let chunks = std::mem::replace(&mut batch, Vec::with_capacity(batch_chunks));
        let salt = Arc::clone(&salt);
        let (sealed, uploaded) = tokio::join!(
            on_rayon("sealing chunks", move || {
                chunks
                    .into_par_iter()
                    .map(|(index, buffer)| (index, seal(buffer, &salt)))
                    .collect::<Vec<_>>()
            }),
            upload(&*store, collected.take_upload()),
        );
        uploaded?.add_to(&mut report);
        for (index, chunk) in sealed? {
            if index >= MAX_CHUNKS {
                return Err(TransferError::ChunkIndex { index });
            }
            collected.record(index, chunk);
        }
        if let Some(image_size) = end {
            break image_size;
        }
    };
    upload(&*store, collected.take_upload())
        .await?
        .add_to(&mut report);
    report.image_bytes = image_size;
    report.chunks_total = image_size.div_ceil(u64::from(opts.chunk_size));
    if let Some(index) = collected.len().checked_sub(1) {
        if index >= report.chunks_total {
            return Err(TransferError::ChunkPastEnd { index, image_size });
        }
    }
    collected
        .store_manifest(&*store, &tenant, opts, &mut report)
        .await?;
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}
