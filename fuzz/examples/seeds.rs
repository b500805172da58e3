//! Writes the committed seed inputs in `fuzz/seeds/<target>/`: a few valid
//! instances of each format, so the fuzzer starts past the magic numbers,
//! checksums and tags it could not guess.
//!
//! Run it after a format change (the output is deterministic, so an unchanged
//! format gives no diff):
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use lazyblk::cache::bitmap::{encode, Geometry};
use lazyblk::chunk::{
    derive_salt, seal_chunk, ChunkId, Manifest, ManifestEntry, RunStamp, Trace, TraceRun,
    MIN_CHUNK_SIZE,
};
use lazyblk::daemon::{ControlRequest, ControlResponse, DeviceRecord, FrontendKind};
use lazyblk::engine::EngineStats;
use lazyblk_fuzz::tenant;

fn main() -> std::io::Result<()> {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let mut written = 0;
    let mut write = |target: &str, name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let dir: PathBuf = seeds.join(target);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(name), bytes)?;
        written += bytes.len();
        Ok(())
    };

    for (name, chunks, short_tail) in [("empty", 0, 0), ("three", 3, 100), ("nine", 9, 0)] {
        write(
            "manifest_open",
            name,
            &manifest(chunks, short_tail).seal(&tenant()),
        )?;
    }

    let folded = Some(vec![RunStamp::new(1_700_000_000_000_000_000, 7)]);
    for (name, runs, folded) in [
        ("empty", 0u8, None),
        ("two-runs", 2, None),
        ("merged", 1, folded),
    ] {
        let trace = Trace {
            image: "app".into(),
            runs: (0..runs)
                .map(|run| TraceRun {
                    manifest_digest: [run; 32],
                    recorded_at: 1_700_000_000 + u64::from(run),
                    ids: (0..4).map(|i| ChunkId([i + run; 32])).collect(),
                })
                .collect(),
            folded,
        };
        write("trace_open", name, &trace.seal(&tenant()))?;
    }

    for (name, chunks, present) in [
        ("empty", 0, vec![]),
        ("five", 5, vec![0, 3]),
        ("seventy", 70, vec![1, 8, 63, 64, 69]),
    ] {
        let image_size = chunks * u64::from(MIN_CHUNK_SIZE);
        let geometry = Geometry::new([9; 32], image_size, MIN_CHUNK_SIZE).expect("nonzero");
        let mut words = vec![0u64; chunks.div_ceil(64) as usize];
        for index in present {
            words[index / 64] |= 1 << (index % 64);
        }
        write("bitmap_decode", name, &encode(&geometry, &words, &words))?;
    }

    write(
        "control_request",
        "stats",
        line(&ControlRequest::Stats).as_bytes(),
    )?;
    write(
        "control_request",
        "stop",
        line(&ControlRequest::Stop { force: false }).as_bytes(),
    )?;
    let stats = ControlResponse::Stats(Box::new(EngineStats {
        image_bytes: 1 << 30,
        chunk_size: MIN_CHUNK_SIZE,
        chunks_total: 16384,
        ..EngineStats::default()
    }));
    write("control_request", "answer-stats", line(&stats).as_bytes())?;
    let refused = ControlResponse::Error("device is in use".into());
    write("control_request", "answer-error", line(&refused).as_bytes())?;
    let record = DeviceRecord {
        pid: 4242,
        frontend: FrontendKind::Fuse,
        target: "/mnt/app".into(),
        name: "app-v1".into(),
        store: "dir:/var/lib/lazyblk".into(),
        cache_dir: "/var/cache/lazyblk/app-v1".into(),
        read_only: true,
        metrics: None,
        ublk: None,
    };
    write("control_request", "record", line(&record).as_bytes())?;

    let id = seal_chunk(&derive_salt(&[1; 32], "default"), b"seed chunk").id;
    write("chunk_id", "valid", id.to_hex().as_bytes())?;
    write(
        "chunk_id",
        "uppercase",
        id.to_hex().to_uppercase().as_bytes(),
    )?;

    // The structured targets read any bytes; one varied input gets them
    // past the smallest cases at once.
    let varied: Vec<u8> = (0..=255u8).map(|b| b.wrapping_mul(167)).collect();
    write("manifest_roundtrip", "varied", &varied)?;
    write("chunk_open", "varied", &varied)?;

    write("layer_read", "every-kind", &layer_tar()?)?;
    write("layer_read", "empty-layer", &[0u8; 1024])?;

    // OCI documents: a platform index leading to a manifest, a manifest
    // served as such, and a config; each led by its media type's number.
    let layer = format!("sha256:{}", "ab".repeat(32));
    let config = format!("sha256:{}", "cd".repeat(32));
    let image_manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer}","size":100}},{{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"{layer}","size":7}}]}}"#
    );
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{config}","size":9,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},{{"digest":"{layer}","size":9,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
    );
    let mut oci = |name: &str, documents: &[(u8, &str)]| {
        let joined: Vec<Vec<u8>> = documents
            .iter()
            .map(|(choice, text)| [&[*choice][..], text.as_bytes()].concat())
            .collect();
        write("oci_documents", name, &joined.join(&0u8))
    };
    oci("index-then-manifest", &[(0, &index), (1, &image_manifest)])?;
    oci("arm64-index", &[(128, &index), (5, &image_manifest)])?;
    oci("manifest", &[(1, &image_manifest)])?;
    oci(
        "config",
        &[(
            4,
            r#"{"rootfs":{"type":"layers","diff_ids":["sha256:00"]}}"#,
        )],
    )?;

    let answers: [(&str, &str); 6] = [
        (
            "bearer",
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:app:pull""#,
        ),
        ("basic", r#"Basic realm="registry""#),
        ("escaped", r#"Bearer realm="a"b,c", error="invalid_token""#),
        ("token", r#"{"token":"abc.def","expires_in":300}"#),
        ("access-token", r#"{"access_token":"xyz","token":""}"#),
        ("reference", "registry.example:5000/team/app@sha256:0000000000000000000000000000000000000000000000000000000000000000"),
    ];
    for (name, text) in answers {
        write("registry_answers", name, text.as_bytes())?;
    }

    let hex = id.to_hex();
    let protocol = [
        ("missing-request", format!(r#"{{"ids":["{hex}","00"]}}"#)),
        ("missing-answer", format!(r#"{{"missing":["{hex}"]}}"#)),
        (
            "page",
            format!(
                r#"{{"chunks":[{{"id":"{hex}","modified_unix_ns":1700000000000000000,"size":524316}}],"next":"{hex}"}}"#
            ),
        ),
        (
            "manifests",
            r#"{"manifests":["app","base-1.0"]}"#.to_owned(),
        ),
        ("deleted", r#"{"deleted":true}"#.to_owned()),
    ];
    for (name, text) in &protocol {
        write("protocol_json", name, text.as_bytes())?;
    }

    // Requests as the server's target reads them: `METHOD TARGET`, header
    // lines, an empty line, the body.
    let envelope = seal_chunk(&derive_salt(&[1; 32], "default"), b"seed chunk").envelope;
    let read = "Authorization: Bearer fuzz-read-token";
    let write_token = "Authorization: Bearer fuzz-write-token";
    let mut put = format!("PUT /v1/chunks/{hex} HTTP/1.1\n{write_token}\n\n").into_bytes();
    put.extend_from_slice(&envelope);
    let requests: Vec<(&str, Vec<u8>)> = vec![
        ("put-chunk", put),
        (
            "get-chunk-range",
            format!("GET /v1/chunks/{hex}\n{read}\nRange: bytes=2-9\n\n").into_bytes(),
        ),
        (
            "missing",
            format!("POST /v1/chunks/missing\n{write_token}\n\n{{\"ids\":[\"{hex}\"]}}")
                .into_bytes(),
        ),
        (
            "list",
            format!("GET /v1/chunks?after={hex}&limit=10\n{read}\n\n").into_bytes(),
        ),
        (
            "put-manifest",
            format!("PUT /v1/manifests/app-1.0\n{write_token}\n\nsealed").into_bytes(),
        ),
        (
            "delete-older",
            format!("DELETE /v1/chunks/{hex}?older_than_unix_ns=5\n{write_token}\n\n").into_bytes(),
        ),
        (
            "shard",
            format!("GET /v1/shards/{hex}/3\n{read}\n\n").into_bytes(),
        ),
        ("metrics", b"GET /metrics\n\n".to_vec()),
    ];
    for (name, bytes) in &requests {
        write("server_request", name, bytes)?;
    }

    println!("wrote {written} bytes of seeds under {}", seeds.display());
    Ok(())
}

/// A manifest of `chunks` 64 KiB chunks, every third one zero, the last one
/// `short_tail` bytes short.
fn manifest(chunks: u64, short_tail: u64) -> Manifest {
    let salt = derive_salt(&[3; 32], "seeds");
    let entries = (0..chunks)
        .map(|index| {
            if index % 3 == 1 {
                ManifestEntry::Zero
            } else {
                let sealed = seal_chunk(&salt, format!("chunk {index}").as_bytes());
                ManifestEntry::Chunk {
                    id: sealed.id,
                    key: sealed.key,
                }
            }
        })
        .collect();
    Manifest {
        image_size: (chunks * u64::from(MIN_CHUNK_SIZE)).saturating_sub(short_tail),
        chunk_size: MIN_CHUNK_SIZE,
        salt_domain: "seeds".into(),
        source_digest: [7; 32],
        entries,
    }
}

/// A control-socket message as it travels: one JSON line.
fn line<T: serde::Serialize>(value: &T) -> String {
    let mut line = serde_json::to_string(value).expect("control messages serialise");
    line.push('\n');
    line
}

/// A small layer with one member of every kind the reader knows: PAX
/// records (path, mtime, uid, xattrs), GNU long names and links,
/// whiteouts, an opaque marker, devices, a fifo, links.
fn layer_tar() -> std::io::Result<Vec<u8>> {
    use tar::{EntryType, Header};
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: EntryType, size: u64| {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o755);
        h.set_mtime(1_600_000_000);
        h
    };
    b.append_data(
        &mut header(EntryType::Directory, 0),
        "etc/",
        std::io::empty(),
    )?;
    b.append_data(
        &mut header(EntryType::Regular, 5),
        "etc/hosts",
        &b"hello"[..],
    )?;
    let pax = b"30 mtime=1700000000.123456789\n25 SCHILY.xattr.user.a=1\n";
    b.append_data(
        &mut header(EntryType::XHeader, pax.len() as u64),
        "PaxHeader",
        &pax[..],
    )?;
    b.append_data(&mut header(EntryType::Regular, 1), "etc/pax", &b"p"[..])?;
    let long = format!("{}/{}", "d".repeat(120), "f".repeat(40));
    b.append_data(&mut header(EntryType::Regular, 0), &long, std::io::empty())?;
    b.append_link(&mut header(EntryType::Link, 0), "etc/hard", &long)?;
    b.append_link(
        &mut header(EntryType::Symlink, 0),
        "etc/soft",
        "../etc/hosts",
    )?;
    let mut dev = header(EntryType::Char, 0);
    dev.set_device_major(1)?;
    dev.set_device_minor(3)?;
    b.append_data(&mut dev, "dev/null", std::io::empty())?;
    b.append_data(
        &mut header(EntryType::Fifo, 0),
        "run/fifo",
        std::io::empty(),
    )?;
    b.append_data(
        &mut header(EntryType::Regular, 0),
        "var/.wh.gone",
        std::io::empty(),
    )?;
    b.append_data(
        &mut header(EntryType::Regular, 0),
        "opt/.wh..wh..opq",
        std::io::empty(),
    )?;
    b.into_inner()
}
