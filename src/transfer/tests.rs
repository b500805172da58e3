use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use rand::{rngs::StdRng, RngCore, SeedableRng};

use super::push::push_windowed;
use super::*;
use crate::chunk::{derive_salt, ChunkId, Manifest, ManifestEntry, Salt, TenantKey};
use crate::store::dir::DirStore;
use crate::store::{ChunkStore, ListedChunk};

pub(super) const CS: usize = 64 * 1024;

pub(super) struct Fixture {
    pub(super) dir: tempfile::TempDir,
    pub(super) store: DirStore,
    pub(super) tenant: TenantKey,
    pub(super) salt: Salt,
}

impl Fixture {
    pub(super) fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::open(&dir.path().join("store")).unwrap();
        let tenant = TenantKey([5; 32]);
        let salt = derive_salt(&tenant.0, "default");
        Fixture {
            dir,
            store,
            tenant,
            salt,
        }
    }

    pub(super) fn shared(&self) -> Arc<dyn ChunkStore> {
        Arc::new(self.store.clone())
    }

    pub(super) fn write_image(&self, name: &str, data: &[u8]) -> std::path::PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, data).unwrap();
        path
    }

    pub(super) async fn push_with(
        &self,
        image: &Path,
        store: Arc<dyn ChunkStore>,
        window_chunks: u64,
    ) -> Result<PushReport, TransferError> {
        let opts = options("app");
        let window = window_chunks * CS as u64;
        push_windowed(
            image,
            store,
            &self.tenant,
            &self.salt,
            opts,
            &|_, _| {},
            window,
        )
        .await
    }

    pub(super) async fn export_to(&self, out: &Path) -> Result<ExportReport, TransferError> {
        export(self.shared(), &self.tenant, "app", out, &|_, _| {}).await
    }

    pub(super) async fn manifest(&self) -> Manifest {
        let sealed = self.store.get_manifest("app").await.unwrap();
        Manifest::open("app", &sealed, &self.tenant).unwrap()
    }
}

pub(super) fn options(name: &str) -> PushOptions {
    PushOptions {
        name: name.into(),
        salt_domain: "default".into(),
        chunk_size: CS as u32,
        source_digest: [7; 32],
    }
}

/// Chunks 0-2 and 5-6 random, 3-4 zero, 7 a copy of 0, 8 zero but for its
/// last byte, 9 short and random.
pub(super) fn sample_image() -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(1);
    let mut image = vec![0u8; CS * 9 + 1234];
    rng.fill_bytes(&mut image[..3 * CS]);
    rng.fill_bytes(&mut image[5 * CS..7 * CS]);
    image.copy_within(0..CS, 7 * CS);
    image[9 * CS - 1] = 1;
    rng.fill_bytes(&mut image[9 * CS..]);
    image
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_export_round_trip_across_windows() {
    let fx = Fixture::new();
    let image = sample_image();
    let path = fx.write_image("image", &image);
    let calls = Mutex::new(Vec::new());
    let record = |done, total| calls.lock().unwrap().push((done, total));
    let window = 3 * CS as u64;
    let report = push_windowed(
        &path,
        fx.shared(),
        &fx.tenant,
        &fx.salt,
        options("app"),
        &record,
        window,
    )
    .await
    .unwrap();
    let expected = PushReport {
        image_bytes: image.len() as u64,
        chunk_size: CS as u32,
        chunks_total: 10,
        chunks_zero: 2,
        bytes_read: image.len() as u64,
        chunks_distinct: 7,
        chunks_existing: 0,
        chunks_uploaded: 7,
        bytes_uploaded: (6 * (CS + 16) + 1234 + 16) as u64,
        name: "app".into(),
        elapsed_secs: report.elapsed_secs,
    };
    assert_eq!(report, expected);
    assert_eq!(fx.store.list().await.unwrap().len(), 7);
    let calls = calls.into_inner().unwrap();
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0), "{calls:?}");
    assert_eq!(
        calls.last(),
        Some(&(image.len() as u64, image.len() as u64))
    );

    let manifest = fx.manifest().await;
    assert_eq!(manifest.source_digest, [7; 32]);
    assert_eq!(manifest.entries[3], ManifestEntry::Zero);
    assert_eq!(manifest.entries[0], manifest.entries[7]);

    let out = fx.dir.path().join("out.img");
    let exported = fx.export_to(&out).await.unwrap();
    assert_eq!(fs::read(&out).unwrap(), image);
    assert_eq!(exported.chunks_total, 10);
    assert_eq!(exported.chunks_zero, 2);
    assert_eq!(exported.chunks_fetched, 7);
    assert_eq!(exported.bytes_fetched, expected.bytes_uploaded);
}

#[tokio::test]
async fn second_push_uploads_nothing() {
    let fx = Fixture::new();
    let path = fx.write_image("image", &sample_image());
    let first = fx.push_with(&path, fx.shared(), 64).await.unwrap();
    assert_eq!(first.chunks_uploaded, 7);
    let second = fx.push_with(&path, fx.shared(), 64).await.unwrap();
    assert_eq!(second.chunks_uploaded, 0);
    assert_eq!(second.bytes_uploaded, 0);
    assert_eq!(second.chunks_existing, 7);
    assert_eq!(second.chunks_distinct, 7);
    // The default window gives the same manifest as a small one.
    let sealed_first = fx.store.get_manifest("app").await.unwrap();
    fx.push_with(&path, fx.shared(), 2).await.unwrap();
    assert_eq!(fx.store.get_manifest("app").await.unwrap(), sealed_first);
}

#[tokio::test]
async fn store_holds_no_plaintext() {
    let fx = Fixture::new();
    let marker = b"LAZYBLK-PLAINTEXT-MARKER-7f3a91";
    let mut image = sample_image();
    for at in [100, 2 * CS + 5, 9 * CS + 10] {
        image[at..at + marker.len()].copy_from_slice(marker);
    }
    let path = fx.write_image("image", &image);
    fx.push_with(&path, fx.shared(), 64).await.unwrap();
    let contains = |data: &[u8]| data.windows(marker.len()).any(|w| w == marker);
    assert!(contains(&fs::read(&path).unwrap()));
    let files = crate::store::dir::all_files(fx.store.root());
    assert!(files.len() >= 8, "{files:?}");
    for file in files {
        let bytes = fs::read(fx.store.root().join(&file)).unwrap();
        assert!(!contains(&bytes), "{file}");
    }
}

#[tokio::test]
async fn corrupted_chunk_fails_export_naming_it() {
    let fx = Fixture::new();
    let path = fx.write_image("image", &sample_image());
    fx.push_with(&path, fx.shared(), 64).await.unwrap();
    let ManifestEntry::Chunk { id, .. } = fx.manifest().await.entries[5].clone() else {
        panic!("chunk 5 is random data");
    };
    let chunk_file = fx.store.chunk_path(&id);
    let mut envelope = fs::read(&chunk_file).unwrap();
    envelope[1000] ^= 0x40;
    fs::write(&chunk_file, envelope).unwrap();

    let out = fx.dir.path().join("out.img");
    let err = fx.export_to(&out).await.unwrap_err();
    assert!(
        matches!(err, TransferError::ReadChunk { index: 5, .. }),
        "{err:?}"
    );
    assert_eq!(err.kind(), crate::error::ErrorKind::Integrity);
    let chain = crate::error::chain(&err);
    assert!(chain.contains("chunk 5"), "{chain}");
    assert!(chain.contains(&id.to_hex()), "{chain}");
    // Neither the output nor its temp file is left behind.
    let mut names: Vec<_> = fs::read_dir(fx.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["image", "store"]);
}

#[tokio::test]
async fn missing_chunk_fails_export_as_not_found() {
    let fx = Fixture::new();
    let path = fx.write_image("image", &sample_image());
    fx.push_with(&path, fx.shared(), 64).await.unwrap();
    let ManifestEntry::Chunk { id, .. } = fx.manifest().await.entries[9].clone() else {
        panic!("chunk 9 is random data");
    };
    fx.store.delete(&id).await.unwrap();
    let err = fx.export_to(&fx.dir.path().join("out")).await.unwrap_err();
    assert!(
        matches!(err, TransferError::ReadChunk { index: 9, .. }),
        "{err:?}"
    );
    assert_eq!(err.kind(), crate::error::ErrorKind::NotFound);
}

#[tokio::test]
async fn export_is_sparse_and_replaces_existing_output() {
    let fx = Fixture::new();
    let mut image = vec![0u8; 64 * CS];
    let mut rng = StdRng::seed_from_u64(2);
    rng.fill_bytes(&mut image[..CS]);
    rng.fill_bytes(&mut image[63 * CS + 7..]);
    let path = fx.write_image("image", &image);
    let report = fx.push_with(&path, fx.shared(), 8).await.unwrap();
    assert_eq!((report.chunks_zero, report.chunks_uploaded), (62, 2));

    let out = fx.dir.path().join("out.img");
    fs::write(&out, b"previous contents").unwrap();
    fx.export_to(&out).await.unwrap();
    assert_eq!(fs::read(&out).unwrap(), image);
    let allocated = fs::metadata(&out).unwrap().blocks() * 512;
    assert!(
        allocated < image.len() as u64 / 4,
        "{allocated} bytes allocated for {}",
        image.len()
    );
}

#[tokio::test]
async fn wrong_tenant_key_cannot_export() {
    let fx = Fixture::new();
    let path = fx.write_image("image", &sample_image());
    fx.push_with(&path, fx.shared(), 64).await.unwrap();
    let out = fx.dir.path().join("out");
    let err = export(fx.shared(), &TenantKey([6; 32]), "app", &out, &|_, _| {})
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::OpenManifest(_)), "{err:?}");
    let err = export(fx.shared(), &fx.tenant, "nope", &out, &|_, _| {})
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::GetManifest { .. }), "{err:?}");
    assert!(!out.exists());
}

#[tokio::test]
async fn bad_images_and_options_are_refused_before_any_upload() {
    let fx = Fixture::new();
    let empty = fx.write_image("empty", b"");
    let err = fx.push_with(&empty, fx.shared(), 64).await.unwrap_err();
    assert!(matches!(err, TransferError::EmptyImage { .. }), "{err:?}");
    let err = fx
        .push_with(fx.dir.path(), fx.shared(), 64)
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::NotAnImage { .. }), "{err:?}");
    let absent = fx.dir.path().join("absent");
    let err = fx.push_with(&absent, fx.shared(), 64).await.unwrap_err();
    assert!(matches!(err, TransferError::ReadImage { .. }), "{err:?}");

    let image = fx.write_image("image", &sample_image());
    let bad = [
        PushOptions {
            chunk_size: 1000,
            ..options("app")
        },
        PushOptions {
            salt_domain: "a b".into(),
            ..options("app")
        },
        options("../escape"),
    ];
    for opts in bad {
        let err = push(&image, fx.shared(), &fx.tenant, &fx.salt, opts, &|_, _| {})
            .await
            .unwrap_err();
        assert!(matches!(err, TransferError::InvalidOptions { .. }), "{err}");
    }
    assert!(fx.store.list().await.unwrap().is_empty());
}

/// A directory store that counts `missing` calls and can fail uploads.
#[derive(Debug)]
pub(super) struct Spy {
    pub(super) inner: DirStore,
    pub(super) missing_calls: AtomicUsize,
    pub(super) puts: AtomicUsize,
    pub(super) fail_after_puts: usize,
}

#[async_trait]
impl ChunkStore for Spy {
    async fn get(&self, id: &ChunkId) -> Result<Bytes, StoreError> {
        self.inner.get(id).await
    }
    async fn put(&self, id: &ChunkId, envelope: Bytes) -> Result<(), StoreError> {
        if self.puts.fetch_add(1, Ordering::SeqCst) >= self.fail_after_puts {
            return Err(StoreError::Io {
                op: "write",
                store: self.describe(),
                object: format!("chunk {id}"),
                source: std::io::Error::other("disk full"),
            });
        }
        self.inner.put(id, envelope).await
    }
    async fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError> {
        self.missing_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.missing(ids).await
    }
    async fn list(&self) -> Result<Vec<ListedChunk>, StoreError> {
        self.inner.list().await
    }
    async fn delete(&self, id: &ChunkId) -> Result<(), StoreError> {
        self.inner.delete(id).await
    }
    async fn delete_if_older(
        &self,
        id: &ChunkId,
        cutoff: std::time::SystemTime,
    ) -> Result<bool, StoreError> {
        self.inner.delete_if_older(id, cutoff).await
    }
    async fn put_manifest(&self, name: &str, manifest: Bytes) -> Result<(), StoreError> {
        self.inner.put_manifest(name, manifest).await
    }
    async fn get_manifest(&self, name: &str) -> Result<Bytes, StoreError> {
        self.inner.get_manifest(name).await
    }
    async fn list_manifests(&self) -> Result<Vec<String>, StoreError> {
        self.inner.list_manifests().await
    }
    async fn delete_manifest(&self, name: &str) -> Result<(), StoreError> {
        self.inner.delete_manifest(name).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[tokio::test]
async fn one_missing_query_per_window_and_no_manifest_after_failed_upload() {
    let fx = Fixture::new();
    let path = fx.write_image("image", &sample_image());
    let spy = Arc::new(Spy {
        inner: fx.store.clone(),
        missing_calls: AtomicUsize::new(0),
        puts: AtomicUsize::new(0),
        fail_after_puts: usize::MAX,
    });
    fx.push_with(&path, spy.clone(), 64).await.unwrap();
    assert_eq!(spy.missing_calls.load(Ordering::SeqCst), 1);
    // Five windows of two chunks, each adding a chunk: one query each.
    spy.missing_calls.store(0, Ordering::SeqCst);
    fx.push_with(&path, spy.clone(), 2).await.unwrap();
    assert_eq!(spy.missing_calls.load(Ordering::SeqCst), 5);

    let fx = Fixture::new();
    let spy = Arc::new(Spy {
        inner: fx.store.clone(),
        missing_calls: AtomicUsize::new(0),
        puts: AtomicUsize::new(0),
        fail_after_puts: 3,
    });
    let err = fx.push_with(&path, spy.clone(), 2).await.unwrap_err();
    assert!(matches!(err, TransferError::UploadChunk(_)), "{err:?}");
    assert_eq!(err.kind(), crate::error::ErrorKind::Io);
    let err = fx.store.get_manifest("app").await.unwrap_err();
    assert!(matches!(err, StoreError::ManifestNotFound { .. }), "{err}");
}

#[test]
fn transfers_can_run_on_a_spawned_task() {
    fn assert_send<T: Send>(_: &T) {}
    let fx = Fixture::new();
    let (path, out) = (fx.dir.path().join("image"), fx.dir.path().join("out"));
    let pushing = push(
        &path,
        fx.shared(),
        &fx.tenant,
        &fx.salt,
        options("a"),
        &|_, _| {},
    );
    assert_send(&pushing);
    let exporting = export(fx.shared(), &fx.tenant, "a", &out, &|_, _| {});
    assert_send(&exporting);
}
