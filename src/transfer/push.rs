//! Push: an image file or block device → sealed chunks and a sealed
//! manifest in a store.
//!
//! The image is cut in windows of whole chunks. While window k is read and
//! sealed on rayon (each chunk read by the thread that seals it, into a
//! pooled buffer, sealed in place), the chunks window k−1 added are checked
//! against the store with one `missing` call and the missing ones uploaded,
//! a bounded number at a time. The manifest is sealed and stored after the
//! last upload.
//!
//! Holes are neither read nor sealed (see [`super::holes`]): a chunk with no
//! data is a zero chunk, and the windows jump over runs of holes, so a
//! push's cost follows the image's data rather than its size.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use rayon::prelude::*;

use super::buffer::{BufferPool, ChunkBuffer};
use super::holes::{data_ranges, next_data, overlaps};
use super::{blocking, on_rayon, Progress, PushOptions, PushReport, TransferError, CONCURRENCY};
use crate::chunk::{
    is_zero, seal_chunk_in_place, validate_chunk_size, validate_salt_domain, ChunkId, ChunkKey,
    Manifest, ManifestEntry, Salt, TenantKey,
};
use crate::store::{
    is_reserved_for_traces, validate_manifest_name, ChunkStore, StoreError, TRACE_SUFFIX,
};

/// Bytes read and sealed per window: enough chunks to keep every core
/// busy and to batch the store's `missing` query, few enough to bound memory
/// (two windows of buffers are alive: one sealing, one uploading).
pub(super) const WINDOW_BYTES: u64 = 32 << 20;

/// Seals `image` into `store` under `opts.name`, uploading only the chunks the
/// store lacks, and stores the manifest last.
///
/// `salt` is the convergent-encryption salt the caller derived for
/// `opts.salt_domain`; `tenant` seals the manifest.
pub async fn push(
    image: &Path,
    store: Arc<dyn ChunkStore>,
    tenant: &TenantKey,
    salt: &Salt,
    opts: PushOptions,
    progress: Progress<'_>,
) -> Result<PushReport, TransferError> {
    push_windowed(image, store, tenant, salt, opts, progress, WINDOW_BYTES).await
}

pub(super) async fn push_windowed(
    image: &Path,
    store: Arc<dyn ChunkStore>,
    tenant: &TenantKey,
    salt: &Salt,
    opts: PushOptions,
    progress: Progress<'_>,
    window_bytes: u64,
) -> Result<PushReport, TransferError> {
    let started = Instant::now();
    validate(&opts)?;
    let (file, image_size) = open_image(image).await?;
    let file = Arc::new(file);
    let chunk_size = u64::from(opts.chunk_size);
    let window = (window_bytes / chunk_size).max(1) * chunk_size;
    let salt = Arc::new(salt.clone());

    let mut report = PushReport::new(&opts, image_size);
    let mut collected = Collected::default();
    let pool = BufferPool::new(chunk_size as usize);
    let mut offset = 0;
    progress(0, image_size);

    while offset < image_size {
        let len = window.min(image_size - offset);
        let (file, path, pool_ref, salt) = (
            Arc::clone(&file),
            image.to_owned(),
            pool.clone(),
            Arc::clone(&salt),
        );
        let window = Window {
            offset,
            len,
            chunk_size,
        };
        let (sealed, uploaded) = tokio::join!(
            on_rayon("sealing chunks", move || {
                read_and_seal(&file, &path, &pool_ref, window, &salt)
            }),
            upload(&*store, collected.take_upload()),
        );
        uploaded?.add_to(&mut report);
        // Every chunk before this window is stored now.
        progress(offset, image_size);

        let first = offset / chunk_size;
        let sealed = sealed??;
        report.bytes_read += sealed.bytes_read;
        for (i, chunk) in sealed.chunks.into_iter().enumerate() {
            collected.record(first + i as u64, chunk);
        }
        // Chunks between here and the next data are zero chunks, which the
        // manifest records without being told.
        let next_chunk = sealed.next_data.unwrap_or(image_size) / chunk_size * chunk_size;
        offset = next_chunk.max(offset + len);
    }
    upload(&*store, collected.take_upload())
        .await?
        .add_to(&mut report);
    collected
        .store_manifest(&*store, tenant, opts, &mut report)
        .await?;
    progress(image_size, image_size);
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

impl PushReport {
    pub(super) fn new(opts: &PushOptions, image_size: u64) -> PushReport {
        PushReport {
            image_bytes: image_size,
            chunk_size: opts.chunk_size,
            chunks_total: image_size.div_ceil(u64::from(opts.chunk_size)),
            chunks_zero: 0,
            bytes_read: 0,
            chunks_distinct: 0,
            chunks_existing: 0,
            chunks_uploaded: 0,
            bytes_uploaded: 0,
            name: opts.name.clone(),
            elapsed_secs: 0.0,
        }
    }
}

/// The sealed chunks of one push so far: the manifest's entries and the
/// envelopes new to this push that still wait for their upload.
#[derive(Default)]
pub(super) struct Collected {
    /// By chunk index; indices not recorded yet are zeros.
    entries: Vec<ManifestEntry>,
    seen: HashSet<ChunkId>,
    to_upload: Vec<(ChunkId, Bytes)>,
}

impl Collected {
    pub(super) fn record(&mut self, index: u64, chunk: Sealed) {
        let index = index as usize;
        if index >= self.entries.len() {
            self.entries.resize(index + 1, ManifestEntry::Zero);
        }
        self.entries[index] = match chunk {
            Sealed::Zero => ManifestEntry::Zero,
            Sealed::Chunk { id, key, envelope } => {
                // A repeat's buffer goes back to the pool as it drops.
                if self.seen.insert(id) {
                    self.to_upload.push((id, Bytes::from_owner(envelope)));
                }
                ManifestEntry::Chunk { id, key }
            }
        };
    }

    /// Entries recorded so far: one past the highest index.
    pub(super) fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    pub(super) fn take_upload(&mut self) -> Vec<(ChunkId, Bytes)> {
        std::mem::take(&mut self.to_upload)
    }

    /// Seals the manifest of an image of `report.image_bytes` and stores it:
    /// call only once every chunk it names is stored.
    pub(super) async fn store_manifest(
        self,
        store: &dyn ChunkStore,
        tenant: &TenantKey,
        opts: PushOptions,
        report: &mut PushReport,
    ) -> Result<(), TransferError> {
        let mut entries = self.entries;
        entries.resize(report.chunks_total as usize, ManifestEntry::Zero);
        report.chunks_zero = entries
            .iter()
            .filter(|e| **e == ManifestEntry::Zero)
            .count() as u64;
        report.chunks_distinct = self.seen.len() as u64;
        let manifest = Manifest {
            image_size: report.image_bytes,
            chunk_size: opts.chunk_size,
            salt_domain: opts.salt_domain,
            source_digest: opts.source_digest,
            entries,
        };
        let tenant = tenant.clone();
        let sealed = on_rayon("sealing the manifest", move || manifest.seal(&tenant)).await?;
        store
            .put_manifest(&opts.name, Bytes::from(sealed))
            .await
            .map_err(|source| TransferError::PutManifest {
                name: opts.name,
                source,
            })
    }
}

/// Refuses bad options before any work, so a typo does not cost a whole
/// upload.
pub(super) fn validate(opts: &PushOptions) -> Result<(), TransferError> {
    let invalid = |reason| TransferError::InvalidOptions { reason };
    validate_chunk_size(opts.chunk_size).map_err(invalid)?;
    validate_salt_domain(&opts.salt_domain).map_err(invalid)?;
    validate_manifest_name(&opts.name).map_err(|e| match e {
        StoreError::InvalidName { name, reason } => {
            invalid(format!("manifest name {name:?} {reason}"))
        }
        other => invalid(other.to_string()),
    })?;
    if is_reserved_for_traces(&opts.name) {
        return Err(invalid(format!(
            "manifest name {:?} must not end with {TRACE_SUFFIX:?} nor hold \".trace.\": \
             such names hold access traces",
            opts.name
        )));
    }
    Ok(())
}

/// Opens a regular file or block device and finds its size.
async fn open_image(path: &Path) -> Result<(File, u64), TransferError> {
    let path = path.to_owned();
    blocking("opening the image", move || {
        let read_err = |source| TransferError::ReadImage {
            path: path.clone(),
            source,
        };
        // Checked before opening: opening a FIFO would wait for a writer.
        let file_type = std::fs::metadata(&path).map_err(read_err)?.file_type();
        let found = if file_type.is_dir() {
            "directory"
        } else if file_type.is_char_device() {
            "character device"
        } else if file_type.is_fifo() {
            "FIFO"
        } else if file_type.is_socket() {
            "socket"
        } else {
            ""
        };
        if !found.is_empty() {
            return Err(TransferError::NotAnImage { path, found });
        }
        let mut file = File::open(&path).map_err(read_err)?;
        // A block device's metadata says 0 bytes; its end says its size.
        let size = file.seek(SeekFrom::End(0)).map_err(read_err)?;
        if size == 0 {
            return Err(TransferError::EmptyImage { path });
        }
        Ok((file, size))
    })
    .await
}

/// A run of whole chunks of the image (the last may be short).
#[derive(Clone, Copy)]
struct Window {
    offset: u64,
    len: u64,
    chunk_size: u64,
}

/// One chunk after sealing.
pub(super) enum Sealed {
    /// All zeros: not sealed, not stored.
    Zero,
    Chunk {
        id: ChunkId,
        key: ChunkKey,
        envelope: ChunkBuffer,
    },
}

/// One window's chunks, sealed.
struct SealedWindow {
    chunks: Vec<Sealed>,
    /// Image bytes read: the window less its holes.
    bytes_read: u64,
    /// Where the image's next data after the window starts, if anywhere.
    next_data: Option<u64>,
}

/// Reads and seals one window's chunks in parallel.
///
/// Each chunk is read by the thread that seals it, just before: the read's
/// copy leaves it in that core's cache for the three crypto passes. For an
/// image not in the page cache, the kernel's readahead keeps these reads
/// short. Chunks that lie wholly in holes are not read.
fn read_and_seal(
    file: &File,
    path: &Path,
    pool: &BufferPool,
    window: Window,
    salt: &Salt,
) -> Result<SealedWindow, TransferError> {
    let Window {
        offset,
        len,
        chunk_size,
    } = window;
    let end = offset + len;
    let data = data_ranges(file, offset..end);
    let read: Vec<(Sealed, u64)> = (0..len.div_ceil(chunk_size))
        .into_par_iter()
        .map(|i| {
            let at = offset + i * chunk_size;
            let chunk = at..(at + chunk_size).min(end);
            if !overlaps(&data, &chunk) {
                return Ok((Sealed::Zero, 0));
            }
            let mut buffer = pool.take((chunk.end - chunk.start) as usize);
            read_chunk(file, path, at, buffer.as_mut())?;
            Ok((seal(buffer, salt), chunk.end - chunk.start))
        })
        .collect::<Result<_, TransferError>>()?;
    let bytes_read = read.iter().map(|(_, len)| len).sum();
    let chunks = read.into_iter().map(|(sealed, _)| sealed).collect();
    Ok(SealedWindow {
        chunks,
        bytes_read,
        next_data: next_data(file, end),
    })
}

/// Seals one chunk's plaintext in its buffer, unless it is all zeros.
pub(super) fn seal(mut buffer: ChunkBuffer, salt: &Salt) -> Sealed {
    if is_zero(buffer.as_ref()) {
        return Sealed::Zero;
    }
    let (plaintext, tag) = buffer.seal_parts();
    let (id, key) = seal_chunk_in_place(salt, plaintext, tag);
    Sealed::Chunk {
        id,
        key,
        envelope: buffer,
    }
}

fn read_chunk(file: &File, path: &Path, at: u64, buffer: &mut [u8]) -> Result<(), TransferError> {
    file.read_exact_at(buffer, at).map_err(|source| {
        let source = if source.kind() == io::ErrorKind::UnexpectedEof {
            shrunk(at, buffer.len())
        } else {
            source
        };
        TransferError::ReadImage {
            path: path.to_owned(),
            source,
        }
    })
}

fn shrunk(offset: u64, len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!(
            "the image ended before byte {}: it shrank while being pushed",
            offset + len as u64
        ),
    )
}

/// Counts from uploading one batch of chunks new to this push.
#[derive(Default)]
pub(super) struct Uploaded {
    distinct: u64,
    uploaded: u64,
    bytes: u64,
}

impl Uploaded {
    pub(super) fn add_to(self, report: &mut PushReport) {
        report.chunks_existing += self.distinct - self.uploaded;
        report.chunks_uploaded += self.uploaded;
        report.bytes_uploaded += self.bytes;
    }
}

/// Asks the store once which of `batch` it lacks and uploads those.
pub(super) async fn upload(
    store: &dyn ChunkStore,
    batch: Vec<(ChunkId, Bytes)>,
) -> Result<Uploaded, TransferError> {
    let mut counts = Uploaded {
        distinct: batch.len() as u64,
        ..Uploaded::default()
    };
    if batch.is_empty() {
        return Ok(counts);
    }
    let ids: Vec<ChunkId> = batch.iter().map(|(id, _)| *id).collect();
    let missing: HashSet<ChunkId> = store
        .missing(&ids)
        .await
        .map_err(TransferError::QueryMissing)?
        .into_iter()
        .collect();
    futures::stream::iter(batch.into_iter().filter(|(id, _)| missing.contains(id)))
        .map(|(id, envelope)| async move {
            let len = envelope.len() as u64;
            store.put(&id, envelope).await.map(|()| len)
        })
        .buffer_unordered(CONCURRENCY)
        .try_for_each(|len| {
            counts.uploaded += 1;
            counts.bytes += len;
            futures::future::ready(Ok(()))
        })
        .await
        .map_err(TransferError::UploadChunk)?;
    Ok(counts)
}
