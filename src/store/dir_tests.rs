//! The directory store's tests: layout, atomicity and the garbage
//! collection contract, on real files.

use super::*;
use crate::error::ErrorKind;

fn id(n: u8) -> ChunkId {
    ChunkId::of_envelope(&[n])
}

/// The ids the store lists, sorted.
async fn listed_ids(store: &DirStore) -> Vec<ChunkId> {
    let mut ids: Vec<ChunkId> = store.list().await.unwrap().iter().map(|c| c.id).collect();
    ids.sort();
    ids
}

fn store() -> (tempfile::TempDir, DirStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::open(&dir.path().join("store")).unwrap();
    (dir, store)
}

#[tokio::test]
async fn put_get_round_trip_and_layout() {
    let (_dir, store) = store();
    store.put(&id(1), Bytes::from_static(b"one")).await.unwrap();
    assert_eq!(store.get(&id(1)).await.unwrap(), &b"one"[..]);
    let hex = id(1).to_hex();
    assert!(store
        .root()
        .join("chunks")
        .join(&hex[..2])
        .join(&hex)
        .is_file());
    // A second put of the same id keeps the first bytes: content-addressed.
    store
        .put(&id(1), Bytes::from_static(b"other"))
        .await
        .unwrap();
    assert_eq!(store.get(&id(1)).await.unwrap(), &b"one"[..]);
}

#[tokio::test]
async fn got_chunks_are_aligned_and_mutable_without_copy() {
    let (_dir, store) = store();
    let data = Bytes::from(vec![3u8; 600_000]);
    store.put(&id(1), data.clone()).await.unwrap();
    let got = store.get(&id(1)).await.unwrap();
    assert_eq!(got, data);
    let ptr = got.as_ptr();
    assert_eq!(ptr as usize % ALIGN, 0);
    let mutable = got.try_into_mut().unwrap();
    assert_eq!(mutable.as_ptr(), ptr);
}

#[tokio::test]
async fn get_of_absent_chunk_is_not_found() {
    let (_dir, store) = store();
    let err = store.get(&id(9)).await.unwrap_err();
    assert!(matches!(err, StoreError::ChunkNotFound { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains(&id(9).to_hex()), "{err}");
}

#[tokio::test]
async fn missing_keeps_order_and_list_and_delete() {
    let (_dir, store) = store();
    for n in [1, 3] {
        store.put(&id(n), Bytes::from(vec![n; 10])).await.unwrap();
    }
    let asked = [id(4), id(1), id(2), id(3), id(5)];
    assert_eq!(store.missing(&asked).await.unwrap(), [id(4), id(2), id(5)]);

    let mut listed = listed_ids(&store).await;
    listed.sort();
    let mut expected = vec![id(1), id(3)];
    expected.sort();
    assert_eq!(listed, expected);

    store.delete(&id(1)).await.unwrap();
    store.delete(&id(1)).await.unwrap(); // absent: not an error
    assert_eq!(listed_ids(&store).await, [id(3)]);
    assert_eq!(store.missing(&[id(1)]).await.unwrap(), [id(1)]);
}

#[tokio::test]
async fn list_skips_temp_and_stray_files() {
    let (_dir, store) = store();
    store.put(&id(1), Bytes::from_static(b"x")).await.unwrap();
    let hex = id(1).to_hex();
    let prefix = store.root().join("chunks").join(&hex[..2]);
    fs::write(prefix.join(format!(".tmp-{hex}-0000000000000000")), b"half").unwrap();
    fs::write(prefix.join("README"), b"stray").unwrap();
    // A valid id in the wrong prefix directory is not where get looks.
    let other = id(2).to_hex();
    let wrong = if other[..2] == hex[..2] { id(3) } else { id(2) };
    fs::write(prefix.join(wrong.to_hex()), b"misplaced").unwrap();
    assert_eq!(listed_ids(&store).await, [id(1)]);
}

#[tokio::test]
async fn manifest_put_get_replace() {
    let (_dir, store) = store();
    let err = store.get_manifest("app").await.unwrap_err();
    assert!(matches!(err, StoreError::ManifestNotFound { .. }), "{err}");
    store
        .put_manifest("app", Bytes::from_static(b"v1"))
        .await
        .unwrap();
    assert_eq!(store.get_manifest("app").await.unwrap(), &b"v1"[..]);
    store
        .put_manifest("app", Bytes::from_static(b"v2"))
        .await
        .unwrap();
    assert_eq!(store.get_manifest("app").await.unwrap(), &b"v2"[..]);
    // Manifests are not chunks.
    assert!(listed_ids(&store).await.is_empty());
}

#[tokio::test]
async fn invalid_manifest_names_are_refused() {
    let (_dir, store) = store();
    let long = "a".repeat(129);
    for name in ["", ".hidden", "a/b", "../x", "sp ace", "é", long.as_str()] {
        let err = store
            .put_manifest(name, Bytes::from_static(b"m"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidName { .. }),
            "{name:?}: {err}"
        );
        let err = store.get_manifest(name).await.unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidName { .. }),
            "{name:?}: {err}"
        );
    }
    let ok = "a".repeat(128);
    for name in ["app-1.2_x", "A", ok.as_str()] {
        store
            .put_manifest(name, Bytes::from_static(b"m"))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn writes_leave_no_temp_files() {
    let (_dir, store) = store();
    for n in 0..20 {
        store.put(&id(n), Bytes::from(vec![n; 100])).await.unwrap();
    }
    store
        .put_manifest("m", Bytes::from_static(b"m"))
        .await
        .unwrap();
    let files = all_files(store.root());
    assert_eq!(files.len(), 20 + 1 + 1, "{files:?}");
    assert!(files.iter().all(|f| !f.contains(".tmp")), "{files:?}");
}

#[tokio::test]
async fn failed_write_leaves_no_temp_file() {
    let (_dir, store) = store();
    // A directory where the manifest file should go makes the rename fail
    // after the temp file was written.
    fs::create_dir(store.root().join("manifests/m")).unwrap();
    fs::write(store.root().join("manifests/m/x"), b"").unwrap();
    let err = store
        .put_manifest("m", Bytes::from_static(b"data"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("write manifest \"m\""), "{err}");
    let files = all_files(&store.root().join("manifests"));
    assert_eq!(files, ["m/x"]);
}

#[test]
fn reopen_and_foreign_directories() {
    let dir = tempfile::tempdir().unwrap();
    // An empty existing directory is adopted, and reopens.
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    DirStore::open(&empty).unwrap();
    DirStore::open(&empty).unwrap();
    assert_eq!(fs::read_to_string(empty.join(MARKER)).unwrap(), MARKER_TEXT);

    let foreign = dir.path().join("home");
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("notes.txt"), b"mine").unwrap();
    let err = DirStore::open(&foreign).unwrap_err();
    assert!(matches!(err, StoreError::InvalidSpec { .. }), "{err}");
    assert!(err.to_string().contains("not empty"), "{err}");
    // Nothing was created in it.
    assert_eq!(all_files(&foreign), ["notes.txt"]);
    assert!(!foreign.join("chunks").exists());

    let file = dir.path().join("file");
    fs::write(&file, b"").unwrap();
    assert!(DirStore::open(&file).is_err());

    let future = dir.path().join("future");
    fs::create_dir(&future).unwrap();
    fs::write(future.join(MARKER), b"lazyblk-store 2\n").unwrap();
    let err = DirStore::open(&future).unwrap_err();
    assert!(err.to_string().contains("lazyblk-store 2"), "{err}");
}

#[tokio::test]
async fn open_store_opens_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("s").display().to_string();
    let options = super::super::StoreOptions::default();
    let store = super::super::open_store(&spec, &options).unwrap();
    store.put(&id(1), Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(store.describe(), spec);
    let url = format!("file://{spec}");
    let same = super::super::open_store(&url, &options).unwrap();
    assert_eq!(same.get(&id(1)).await.unwrap(), Bytes::from_static(b"x"));
    for bad in [
        "ftp://host/x",
        "file://relative",
        "http://",
        "http://h/x?q=1",
    ] {
        assert!(super::super::open_store(bad, &options).is_err(), "{bad}");
    }
}

/// Sets chunk `id`'s modification time `age` into the past.
fn backdate(store: &DirStore, id: &ChunkId, age: std::time::Duration) {
    let file = File::options()
        .write(true)
        .open(store.chunk_path(id))
        .unwrap();
    file.set_modified(SystemTime::now() - age).unwrap();
}

fn modified_of(store: &DirStore, id: &ChunkId) -> SystemTime {
    fs::metadata(store.chunk_path(id))
        .unwrap()
        .modified()
        .unwrap()
}

const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

#[tokio::test]
async fn list_reports_size_and_modification_time() {
    let (_dir, store) = store();
    store.put(&id(1), Bytes::from(vec![1; 1000])).await.unwrap();
    backdate(&store, &id(1), HOUR);
    let listed = store.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, id(1));
    assert_eq!(listed[0].size, 1000);
    assert_eq!(listed[0].modified, modified_of(&store, &id(1)));
    let age = SystemTime::now()
        .duration_since(listed[0].modified)
        .unwrap();
    assert!(age >= HOUR, "{age:?}");
}

#[tokio::test]
async fn put_and_missing_refresh_present_chunks() {
    let (_dir, store) = store();
    for n in [1, 2] {
        store.put(&id(n), Bytes::from(vec![n; 10])).await.unwrap();
        backdate(&store, &id(n), HOUR);
    }
    let before = SystemTime::now() - std::time::Duration::from_secs(60);

    store.put(&id(1), Bytes::from(vec![1; 10])).await.unwrap();
    assert!(modified_of(&store, &id(1)) > before);
    assert!(modified_of(&store, &id(2)) < before);

    assert_eq!(store.missing(&[id(2), id(3)]).await.unwrap(), [id(3)]);
    assert!(modified_of(&store, &id(2)) > before);
}

#[tokio::test]
async fn delete_if_older_keeps_fresh_and_refreshed_chunks() {
    let (_dir, store) = store();
    for n in [1, 2, 3] {
        store.put(&id(n), Bytes::from(vec![n; 10])).await.unwrap();
    }
    backdate(&store, &id(1), HOUR);
    backdate(&store, &id(2), HOUR);
    let cutoff = SystemTime::now() - std::time::Duration::from_secs(60);

    assert!(store.delete_if_older(&id(1), cutoff).await.unwrap());
    // Fresh: kept.
    assert!(!store.delete_if_older(&id(3), cutoff).await.unwrap());
    // Listed as old, then relied on by a push: kept.
    store.missing(&[id(2)]).await.unwrap();
    assert!(!store.delete_if_older(&id(2), cutoff).await.unwrap());
    // Absent: nothing to do.
    assert!(!store.delete_if_older(&id(9), cutoff).await.unwrap());

    assert_eq!(listed_ids(&store).await, {
        let mut v = vec![id(2), id(3)];
        v.sort();
        v
    });
    // Nothing set aside is left behind.
    let files = all_files(&store.root().join("chunks"));
    assert_eq!(files.len(), 2, "{files:?}");
}

#[tokio::test]
async fn a_chunk_left_aside_by_a_dead_collection_is_restored_by_the_next_listing() {
    let (_dir, store) = store();
    for n in [1, 2] {
        store.put(&id(n), Bytes::from(vec![n; 10])).await.unwrap();
    }
    // What a collection killed between setting a chunk aside and judging it
    // leaves: the chunk under its set-aside name only.
    let path = store.chunk_path(&id(1));
    let aside = path.with_file_name(format!(".gc-{}-00000000000000aa", id(1).to_hex()));
    fs::rename(&path, &aside).unwrap();
    // And a chunk uploaded again after it was set aside: both copies.
    let twice = store.chunk_path(&id(2));
    let stale = twice.with_file_name(format!(".gc-{}-00000000000000bb", id(2).to_hex()));
    fs::copy(&twice, &stale).unwrap();

    let mut both = vec![id(1), id(2)];
    both.sort();
    assert_eq!(listed_ids(&store).await, both);
    assert_eq!(store.get(&id(1)).await.unwrap(), &[1u8; 10][..]);
    let files = all_files(&store.root().join("chunks"));
    assert_eq!(files.len(), 2, "{files:?}");
}

#[tokio::test]
async fn list_manifests_names_only_manifests() {
    let (_dir, store) = store();
    assert!(store.list_manifests().await.unwrap().is_empty());
    for name in ["app", "base-1.0"] {
        store
            .put_manifest(name, Bytes::from_static(b"m"))
            .await
            .unwrap();
    }
    fs::write(store.root().join("manifests/.tmp-app-0"), b"half").unwrap();
    store.put(&id(1), Bytes::from_static(b"x")).await.unwrap();
    let mut names = store.list_manifests().await.unwrap();
    names.sort();
    assert_eq!(names, ["app", "base-1.0"]);
}

#[tokio::test]
async fn keeps_the_store_contract() {
    let (_dir, store) = store();
    crate::store::contract::check_gc_contract(&store, std::time::Duration::from_millis(10)).await;
}
