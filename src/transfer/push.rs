//! Push: an image file or block device → sealed chunks and a sealed
//! manifest in a store.
//!
//! The image is read in windows of whole chunks. While window k+1 is read
//! (blocking pool), window k is sealed (rayon, one chunk per task) and the
//! chunks window k−1 added are checked against the store with one `missing`
//! call and the missing ones uploaded, a bounded number at a time. The
//! manifest is sealed and stored after the last upload.

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
use tokio::task::JoinHandle;

use super::{
    blocking, join_blocking, on_rayon, Progress, PushOptions, PushReport, TransferError,
    CONCURRENCY,
};
use crate::chunk::{
    is_zero, seal_chunk, validate_chunk_size, validate_salt_domain, ChunkId, Manifest,
    ManifestEntry, Salt, SealedChunk, TenantKey,
};
use crate::store::{validate_manifest_name, ChunkStore, StoreError};

/// Bytes read and sealed per window: enough chunks to keep every core
/// busy and to batch the store's `missing` query, few enough to bound memory
/// (about four windows are alive at once).
const WINDOW_BYTES: u64 = 32 << 20;

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

    let mut report = PushReport {
        image_bytes: image_size,
        chunk_size: opts.chunk_size,
        chunks_total: image_size.div_ceil(chunk_size),
        chunks_zero: 0,
        chunks_distinct: 0,
        chunks_existing: 0,
        chunks_uploaded: 0,
        bytes_uploaded: 0,
        name: opts.name.clone(),
        elapsed_secs: 0.0,
    };
    let mut entries = Vec::with_capacity(usize::try_from(report.chunks_total).unwrap_or(0));
    let mut seen = HashSet::new();
    let mut to_upload: Vec<(ChunkId, Bytes)> = Vec::new();
    let mut spare = None;
    let mut offset = 0;
    let mut next = Some(start_read(&file, image, 0, window.min(image_size), None));
    progress(0, image_size);

    while let Some(reading) = next.take() {
        let buf = join_blocking("reading the image", reading).await?;
        let end = offset + buf.len() as u64;
        if end < image_size {
            let len = window.min(image_size - end);
            next = Some(start_read(&file, image, end, len, spare.take()));
        }
        let salt = Arc::clone(&salt);
        let (sealed, uploaded) = tokio::join!(
            on_rayon("sealing chunks", move || seal_window(
                buf, chunk_size, &salt
            )),
            upload(&*store, std::mem::take(&mut to_upload)),
        );
        uploaded?.add_to(&mut report);
        // Every chunk before this window is stored now.
        progress(offset, image_size);

        let (buf, sealed) = sealed?;
        spare = Some(buf);
        for chunk in sealed {
            match chunk {
                None => {
                    report.chunks_zero += 1;
                    entries.push(ManifestEntry::Zero);
                }
                Some(SealedChunk { id, key, envelope }) => {
                    if seen.insert(id) {
                        to_upload.push((id, Bytes::from(envelope)));
                    }
                    entries.push(ManifestEntry::Chunk { id, key });
                }
            }
        }
        offset = end;
    }
    upload(&*store, to_upload).await?.add_to(&mut report);
    report.chunks_distinct = seen.len() as u64;

    let manifest = Manifest {
        image_size,
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
        })?;
    progress(image_size, image_size);
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Refuses bad options before any work, so a typo does not cost a whole
/// upload.
fn validate(opts: &PushOptions) -> Result<(), TransferError> {
    let invalid = |reason| TransferError::InvalidOptions { reason };
    validate_chunk_size(opts.chunk_size).map_err(invalid)?;
    validate_salt_domain(&opts.salt_domain).map_err(invalid)?;
    validate_manifest_name(&opts.name).map_err(|e| match e {
        StoreError::InvalidName { name, reason } => {
            invalid(format!("manifest name {name:?} {reason}"))
        }
        other => invalid(other.to_string()),
    })
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

/// Starts reading `len` bytes at `offset` into `spare` (or a new buffer).
fn start_read(
    file: &Arc<File>,
    path: &Path,
    offset: u64,
    len: u64,
    spare: Option<Vec<u8>>,
) -> JoinHandle<Result<Vec<u8>, TransferError>> {
    let file = Arc::clone(file);
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let len = len as usize; // at most one window
        let mut buf = match spare {
            Some(mut buf) => {
                buf.resize(len, 0);
                buf
            }
            None => vec![0; len],
        };
        file.read_exact_at(&mut buf, offset).map_err(|source| {
            let source = if source.kind() == io::ErrorKind::UnexpectedEof {
                shrunk(offset, len)
            } else {
                source
            };
            TransferError::ReadImage { path, source }
        })?;
        Ok(buf)
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

/// Seals one window's chunks in parallel; `None` marks an all-zero chunk.
/// Hands the buffer back for the next read.
fn seal_window(buf: Vec<u8>, chunk_size: u64, salt: &Salt) -> (Vec<u8>, Vec<Option<SealedChunk>>) {
    let sealed = buf
        .par_chunks(chunk_size as usize)
        .map(|plain| (!is_zero(plain)).then(|| seal_chunk(salt, plain)))
        .collect();
    (buf, sealed)
}

/// Counts from uploading one batch of chunks new to this push.
#[derive(Default)]
struct Uploaded {
    distinct: u64,
    uploaded: u64,
    bytes: u64,
}

impl Uploaded {
    fn add_to(self, report: &mut PushReport) {
        report.chunks_existing += self.distinct - self.uploaded;
        report.chunks_uploaded += self.uploaded;
        report.bytes_uploaded += self.bytes;
    }
}

/// Asks the store once which of `batch` it lacks and uploads those.
async fn upload(
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
