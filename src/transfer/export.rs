//! Export: a manifest and its chunks in a store → the image, byte for byte.
//!
//! Each distinct chunk is fetched once (a bounded number at a time),
//! checked against its name and opened on rayon, and written at every index
//! that names it. Zero chunks are never written, so they stay holes in the
//! sparse output. The output is built in a temp file beside `out` and
//! renamed over it only when whole and synced.

use std::collections::hash_map::{Entry, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};

use super::{blocking, on_rayon, ExportReport, Progress, TransferError, CONCURRENCY};
use crate::chunk::{ChunkId, ChunkKey, Manifest, ManifestEntry, TenantKey};
use crate::durable::TempFile;
use crate::engine::{get_envelope, open_envelope, EngineError, FetchPolicy};
use crate::store::ChunkStore;

/// One distinct chunk and every index it fills.
struct Group {
    id: ChunkId,
    key: ChunkKey,
    indices: Vec<u64>,
}

/// Rebuilds the image pushed under `name` into `out`, verifying every chunk.
/// An existing `out` is replaced only once the new image is complete.
pub async fn export(
    store: Arc<dyn ChunkStore>,
    tenant: &TenantKey,
    name: &str,
    out: &Path,
    progress: Progress<'_>,
) -> Result<ExportReport, TransferError> {
    let started = Instant::now();
    let sealed = store
        .get_manifest(name)
        .await
        .map_err(|source| TransferError::GetManifest {
            name: name.to_owned(),
            source,
        })?;
    let (tenant, owned_name) = (tenant.clone(), name.to_owned());
    let manifest = on_rayon("opening the manifest", move || {
        Manifest::open(&owned_name, &sealed, &tenant)
    })
    .await?
    .map_err(TransferError::OpenManifest)?;

    let mut groups: Vec<Group> = Vec::new();
    let mut group_of: HashMap<ChunkId, usize> = HashMap::new();
    let mut zero_bytes = 0;
    for (index, entry) in (0u64..).zip(&manifest.entries) {
        match entry {
            ManifestEntry::Zero => zero_bytes += manifest.chunk_len(index) as u64,
            ManifestEntry::Chunk { id, key } => match group_of.entry(*id) {
                Entry::Occupied(group) => groups[*group.get()].indices.push(index),
                Entry::Vacant(slot) => {
                    slot.insert(groups.len());
                    groups.push(Group {
                        id: *id,
                        key: key.clone(),
                        indices: vec![index],
                    });
                }
            },
        }
    }

    let mut report = ExportReport {
        image_bytes: manifest.image_size,
        chunk_size: manifest.chunk_size,
        chunks_total: manifest.chunk_count(),
        chunks_zero: manifest
            .entries
            .iter()
            .filter(|e| matches!(e, ManifestEntry::Zero))
            .count() as u64,
        chunks_fetched: 0,
        bytes_fetched: 0,
        name: name.to_owned(),
        elapsed_secs: 0.0,
    };
    let output = Output::create(out, manifest.image_size).await?;
    let mut done = zero_bytes;
    progress(done, manifest.image_size);

    let (store, manifest_ref, output_ref) = (&*store, &manifest, &output);
    let retries = AtomicU64::new(0);
    futures::stream::iter(groups)
        .map(|group| fetch_and_write(store, manifest_ref, output_ref, group, &retries))
        .buffer_unordered(CONCURRENCY)
        .try_for_each(|(fetched, written)| {
            report.chunks_fetched += 1;
            report.bytes_fetched += fetched;
            done += written;
            progress(done, manifest.image_size);
            futures::future::ready(Ok(()))
        })
        .await?;

    let retried = retries.load(Ordering::Relaxed);
    if retried > 0 {
        tracing::info!(retried, "store requests retried after transient failures");
    }
    output.commit().await?;
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Fetches, verifies and writes one distinct chunk. Returns the envelope
/// bytes fetched and the image bytes written.
async fn fetch_and_write(
    store: &dyn ChunkStore,
    manifest: &Manifest,
    output: &Output,
    group: Group,
    retries: &AtomicU64,
) -> Result<(u64, u64), TransferError> {
    let chunk_size = u64::from(manifest.chunk_size);
    let first = group.indices[0];
    let offset = first * chunk_size;
    let read_error = |source| TransferError::ReadChunk {
        index: first,
        offset,
        source,
    };
    let envelope = get_envelope(store, &FetchPolicy::default(), first, &group.id, retries)
        .await
        .map_err(read_error)?;
    let fetched = envelope.len() as u64;
    let Group { id, key, indices } = group;
    let expected = manifest.chunk_len(first);
    let plain = on_rayon("verifying chunks", move || {
        open_envelope(first, &id, &key, envelope, expected)
    })
    .await?
    .map_err(read_error)?;
    for &index in &indices {
        let expected = manifest.chunk_len(index);
        if plain.len() != expected {
            return Err(TransferError::ReadChunk {
                index,
                offset: index * chunk_size,
                source: EngineError::ChunkLength {
                    index,
                    id,
                    expected,
                    actual: plain.len(),
                },
            });
        }
    }

    let (file, path) = (Arc::clone(&output.file), output.temp.path().to_owned());
    // Buffered writes to one file serialise on its inode lock anyway;
    // queueing here keeps blocked threads from spinning on it.
    let _turn = output.write_turn.lock().await;
    blocking("writing the output", move || {
        for &index in &indices {
            file.write_all_at(&plain, index * chunk_size)
                .map_err(|source| TransferError::WriteOutput {
                    path: path.clone(),
                    source,
                })?;
        }
        Ok((fetched, (plain.len() * indices.len()) as u64))
    })
    .await
}

/// The output under construction: a sparse temp file beside its final name.
struct Output {
    file: Arc<File>,
    write_turn: tokio::sync::Mutex<()>,
    out: PathBuf,
    /// Declared last: dropping an unfinished output removes the temp file.
    temp: TempFile,
}

impl Output {
    async fn create(out: &Path, size: u64) -> Result<Output, TransferError> {
        let out = out.to_owned();
        blocking("creating the output", move || {
            let write_err = |path: &Path, source| TransferError::WriteOutput {
                path: path.to_owned(),
                source,
            };
            // The image in plaintext: its owner's alone until they say otherwise.
            let (temp, file) = TempFile::create_with_mode(&out, crate::private::FILE_MODE)
                .map_err(|source| write_err(&out, source))?;
            // Sized first, so every zero chunk is a hole never written.
            file.set_len(size)
                .map_err(|source| write_err(temp.path(), source))?;
            Ok(Output {
                file: Arc::new(file),
                write_turn: tokio::sync::Mutex::new(()),
                out,
                temp,
            })
        })
        .await
    }

    /// Makes the output durable under its final name.
    async fn commit(self) -> Result<(), TransferError> {
        blocking("finishing the output", move || {
            let Output {
                file, out, temp, ..
            } = self;
            temp.commit(&file)
                .map_err(|source| TransferError::WriteOutput { path: out, source })
        })
        .await
    }
}
