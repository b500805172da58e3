//! Requests whose buffer is registered with the frontend's I/O (ublk zero
//! copy): the same results as memory buffers, every byte moved through the
//! fixed-buffer operations.

use std::sync::Arc;

use super::testing::{fixture, open_engine, EngineExt, CSU};
use super::testing_registered::RegisteredIo;
use super::*;
use crate::error::ErrorKind;

/// Readahead off, so the fetches counted are the requests' own.
fn open(fx: &testing::Fixture, dir: &std::path::Path) -> Arc<Engine> {
    let opts = EngineOptions {
        readahead_chunks: 0,
        ..EngineOptions::default()
    };
    open_engine(fx, dir, opts).unwrap()
}

#[tokio::test]
async fn registered_reads_serve_fetched_present_and_zero_pieces() {
    let (model, fx) = fixture();
    assert!(matches!(
        fx.manifest.entries[1],
        crate::chunk::ManifestEntry::Zero
    ));
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path());
    // Cold: chunks 0 and 2 are fetched, 1 is zero, all in one request.
    let (at, len) = (CSU / 2, 2 * CSU);
    let got = engine.read_registered(at as u64, len).await.unwrap();
    assert!(got == model[at..at + len], "cold read differs");
    assert_eq!(fx.store.gets(), 2);
    // Warm: the same bytes from the cache, no fetch.
    let got = engine.read_registered(at as u64, len).await.unwrap();
    assert!(got == model[at..at + len], "warm read differs");
    assert_eq!(fx.store.gets(), 2);
    // The whole image, partly warm.
    let got = engine.read_registered(0, model.len()).await.unwrap();
    assert!(got == model, "whole read differs");
}

#[tokio::test]
async fn registered_writes_land_in_present_absent_and_zero_chunks() {
    let (mut model, fx) = fixture();
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path());
    let writes: [(usize, Vec<u8>); 4] = [
        // A whole chunk, never fetched.
        (0, vec![0x11; CSU]),
        // Part of a zero chunk: zeros, then the piece.
        (CSU + 100, vec![0x22; 300]),
        // Part of a stored chunk: fetched first, then patched.
        (3 * CSU + 7, vec![0x33; 50]),
        // Across a stored chunk's end and a zero chunk's start.
        (5 * CSU - 10, vec![0x44; 20]),
    ];
    for (at, data) in &writes {
        engine.write_registered(*at as u64, data).await.unwrap();
        model[*at..*at + data.len()].copy_from_slice(data);
    }
    assert!(engine.read(0, model.len()).await.unwrap() == model);
    assert!(engine.read_registered(0, model.len()).await.unwrap() == model);
    // Across a restart: what the bitmap and the data file kept.
    engine.flush().await.unwrap();
    testing::idle(&engine).await;
    drop(engine);
    let engine = open(&fx, tmp.path());
    assert!(engine.read_registered(0, model.len()).await.unwrap() == model);
}

#[tokio::test]
async fn a_registered_buffer_without_registered_io_fails_the_request() {
    let (_, fx) = fixture();
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path());
    let (_io, fixed) = RegisteredIo::for_read(CSU);
    // SyncIo cannot reach a registered buffer: an error, never a panic
    // nor a silent success.
    let read = Request::Read {
        offset: CSU as u64,
        buf: ReadBuf::Fixed(fixed),
    };
    let error = engine.submit(&SyncIo, read).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Io);
    assert!(matches!(error, EngineError::ZeroFill { .. }), "{error}");
    let (_io, fixed) = RegisteredIo::for_write(&[1; 512]);
    let write = Request::Write {
        offset: 0,
        data: WriteBuf::Fixed(fixed),
    };
    let error = engine.submit(&SyncIo, write).await.unwrap_err();
    assert!(matches!(error, EngineError::WriteCache { .. }), "{error}");
}
