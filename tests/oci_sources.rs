//! The three image sources against real tools on loopback: layouts built by
//! `umoci` from directories (a whiteout included), converted by `skopeo` to
//! zstd and to a `docker save` archive, and copied into Debian's
//! `docker-registry` started here on a free 127.0.0.1 port. Every source
//! must give the same layers: the same decompressed tar bytes, the same
//! entries, and (layout and registry) the same digests.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lazyblk::error::ErrorKind;
use lazyblk::oci::layer::find_in_chain;
use lazyblk::oci::{
    open_source, read_layer, BlobError, EntryKind, ImageSource, LayerError, LayerLimits,
    SourceError, SourceOptions,
};
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e} (run scripts/install-deps.sh)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn skopeo() -> Command {
    let mut cmd = Command::new("skopeo");
    cmd.arg("--insecure-policy");
    cmd
}

/// Hashes what passes through, so a test can compare decompressed tars.
struct Tee<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// One layer as read: the sha256 of its tar and its entries (path, kind).
type LayerView = (String, Vec<(String, EntryKind)>);

fn read_image(source: &dyn ImageSource) -> Vec<LayerView> {
    let mut limits = LayerLimits::default();
    (0..source.layers().len())
        .map(|i| {
            let mut tee = Tee {
                inner: source.open_layer(i).unwrap(),
                hasher: Sha256::new(),
            };
            let mut entries = Vec::new();
            let label = source.layers()[i].digest.to_string();
            read_layer(&mut tee, &label, &mut limits, &mut |entry, data| {
                io::copy(data, &mut io::sink())?;
                entries.push((entry.path.to_string(), entry.kind));
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{}: layer {i}: {e:?}", source.describe()));
            (hex::encode(tee.hasher.finalize()), entries)
        })
        .collect()
}

/// A two-layer layout `DIR/layout:t`: a base with every file kind, then a
/// layer that deletes a file (a whiteout) and adds one.
fn build_layout(dir: &Path) -> PathBuf {
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let image = format!("{}:t", layout.display());
    run(Command::new("umoci")
        .arg("init")
        .arg("--layout")
        .arg(&layout));
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    let root = bundle.join("rootfs");
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::write(root.join("etc/hello"), "hello\n").unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(root.join("usr/bin/tool"), &big).unwrap();
    fs::set_permissions(
        root.join("usr/bin/tool"),
        fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    symlink("../etc/hello", root.join("usr/hello-link")).unwrap();
    fs::hard_link(root.join("etc/hello"), root.join("etc/hello-hard")).unwrap();
    let long = "n".repeat(200);
    fs::create_dir_all(root.join(&long)).unwrap();
    fs::write(root.join(&long).join("f".repeat(150)), "deep").unwrap();
    run(Command::new("mkfifo").arg(root.join("etc/fifo")));
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    fs::remove_dir_all(&bundle).unwrap();

    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    fs::remove_file(bundle.join("rootfs/etc/hello-hard")).unwrap();
    fs::write(bundle.join("rootfs/etc/added"), "new\n").unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    layout
}

/// `docker-registry serve` on a free loopback port, killed on drop.
struct Registry {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry (run scripts/install-deps.sh)");
        let registry = Registry {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let url = format!("http://127.0.0.1:{port}/v2/");
        while ureq::get(&url).call().is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not come up on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        registry
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn plain_http() -> SourceOptions {
    SourceOptions {
        plain_http: true,
        retries: 1,
        retry_delay: Duration::from_millis(10),
        ..SourceOptions::default()
    }
}

#[test]
fn layout_archive_and_registry_agree() {
    let dir = tempfile::tempdir().unwrap();
    let layout = build_layout(dir.path());
    let opts = plain_http();

    let oci = open_source(&format!("oci:{}:t", layout.display()), &opts).unwrap();
    assert_eq!(oci.layers().len(), 2);
    assert!(oci.layers().iter().all(|l| l.media_type.ends_with("+gzip")));
    let want = read_image(oci.as_ref());
    let base = &want[0].1;
    let kind_of = |layer: &[(String, EntryKind)], path: &str| {
        layer
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, k)| k.clone())
            .unwrap_or_else(|| panic!("no {path} in {layer:?}"))
    };
    assert_eq!(
        kind_of(base, "/usr/bin/tool"),
        EntryKind::Regular { size: 3_000_000 }
    );
    assert!(matches!(
        kind_of(base, "/usr/hello-link"),
        EntryKind::Symlink { .. }
    ));
    assert_eq!(kind_of(base, "/etc/fifo"), EntryKind::Fifo);
    let hello = ["/etc/hello", "/etc/hello-hard"].map(|p| kind_of(base, p));
    assert!(
        hello
            .iter()
            .any(|k| matches!(k, EntryKind::HardLink { .. })),
        "{hello:?}"
    );
    let long = format!("/{}/{}", "n".repeat(200), "f".repeat(150));
    assert_eq!(kind_of(base, &long), EntryKind::Regular { size: 4 });
    assert_eq!(kind_of(&want[1].1, "/etc/hello-hard"), EntryKind::Whiteout);
    assert_eq!(
        kind_of(&want[1].1, "/etc/added"),
        EntryKind::Regular { size: 4 }
    );

    // The same image recompressed with zstd: other blobs, same tars.
    let zstd_layout = dir.path().join("zstd");
    run(skopeo()
        .args(["copy", "--dest-compress-format", "zstd"])
        .arg(format!("oci:{}:t", layout.display()))
        .arg(format!("oci:{}:z", zstd_layout.display())));
    let zstd = open_source(&format!("oci:{}:z", zstd_layout.display()), &opts).unwrap();
    assert!(zstd
        .layers()
        .iter()
        .all(|l| l.media_type.ends_with("+zstd")));
    assert_eq!(read_image(zstd.as_ref()), want);

    // docker save's layout: uncompressed layers, symlinked layer.tar names.
    let archive = dir.path().join("image.tar");
    run(skopeo()
        .arg("copy")
        .arg(format!("oci:{}:t", layout.display()))
        .arg(format!("docker-archive:{}:test/img:v1", archive.display())));
    let docker = open_source(&format!("docker-archive:{}", archive.display()), &opts).unwrap();
    assert_eq!(read_image(docker.as_ref()), want);
    let tagged = open_source(
        &format!("docker-archive:{}:test/img:v1", archive.display()),
        &opts,
    )
    .unwrap();
    assert_eq!(tagged.image_digest(), docker.image_digest());
    for (layer, (tar_sha, _)) in docker.layers().iter().zip(&want) {
        assert_eq!(
            &layer.digest.hex(),
            tar_sha,
            "a docker-save layer is its diff"
        );
    }

    let registry = Registry::start();
    let repo = format!("127.0.0.1:{}/test/img", registry.port);
    run(skopeo()
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:t", layout.display()))
        .arg(format!("docker://{repo}:v1")));
    let remote = open_source(&format!("docker://{repo}:v1"), &opts).unwrap();
    assert_eq!(remote.layers(), oci.layers());
    assert_eq!(remote.image_digest(), oci.image_digest());
    assert_eq!(read_image(remote.as_ref()), want);
    let digest = lazyblk::oci::Digest(oci.image_digest());
    let pinned = open_source(&format!("docker://{repo}@{digest}"), &opts).unwrap();
    assert_eq!(pinned.layers(), oci.layers());

    let err = open_source(&format!("docker://{repo}:nope"), &opts)
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err:?}");
}

#[test]
fn bad_layouts_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let layout = build_layout(dir.path());
    let opts = SourceOptions::default();
    let spec = format!("oci:{}:t", layout.display());

    let err = open_source(&format!("oci:{}:other", layout.display()), &opts)
        .err()
        .unwrap();
    assert!(
        matches!(&err, SourceError::NoSuchTag { available, .. } if available == &["t"]),
        "{err:?}"
    );

    // No tag: fine while the layout holds one image, ambiguous with two.
    let untagged = format!("oci:{}", layout.display());
    let only = open_source(&untagged, &opts).unwrap();
    run(Command::new("umoci").args(["tag", "--image", &format!("{}:t", layout.display()), "t2"]));
    let err = open_source(&untagged, &opts).err().unwrap();
    assert!(
        matches!(&err, SourceError::Ambiguous { available, .. } if available.len() == 2),
        "{err:?}"
    );
    let second = open_source(&format!("oci:{}:t2", layout.display()), &opts).unwrap();
    assert_eq!(second.image_digest(), only.image_digest());

    for (bad, needle) in [
        ("oci:", "no directory"),
        ("tarball:/x", "expected oci:DIR"),
        ("docker://host.io/Bad:tag", "not a repository name"),
    ] {
        let err = open_source(bad, &opts).err().unwrap();
        assert!(err.to_string().contains(needle), "{bad}: {err}");
    }
    let err = open_source("docker-archive:/nonexistent/image.tar", &opts)
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err:?}");
    let err = open_source(&format!("oci:{}", dir.path().display()), &opts)
        .err()
        .unwrap();
    assert!(err.to_string().contains("oci-layout"), "{err}");

    let source = open_source(&spec, &opts).unwrap();
    let layer = source.layers()[0].clone();
    let blob = layout.join("blobs/sha256").join(layer.digest.hex());
    let original = fs::read(&blob).unwrap();
    let read_first = || -> LayerError {
        let stream = source.open_layer(0).unwrap();
        read_layer(stream, "first", &mut LayerLimits::default(), &mut |_, d| {
            io::copy(d, &mut io::sink())?;
            Ok(())
        })
        .unwrap_err()
    };

    // The gzip header's mtime field: decoders ignore it, so the layer
    // still reads whole and only the digest check can tell.
    let mut retimed = original.clone();
    retimed[4] ^= 0x01;
    fs::write(&blob, &retimed).unwrap();
    let err = read_first();
    assert!(
        matches!(
            find_in_chain::<BlobError>(&err),
            Some(BlobError::DigestMismatch { expected, .. }) if *expected == layer.digest
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Integrity);

    fs::write(&blob, &original[..original.len() / 2]).unwrap();
    let err = read_first();
    assert!(
        matches!(
            find_in_chain::<BlobError>(&err),
            Some(BlobError::Truncated { .. })
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Integrity);
    assert!(err.to_string().contains("first"), "{err}");

    let mut flipped = original.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    fs::write(&blob, &flipped).unwrap();
    let err = read_first();
    let text = format!("{err:?}");
    assert!(
        find_in_chain::<BlobError>(&err).is_some() || text.contains("gzip"),
        "{text}"
    );

    fs::write(&blob, &original).unwrap();
    let manifest_blob = layout
        .join("blobs/sha256")
        .join(hex::encode(source.image_digest()));
    let mut bytes = fs::read(&manifest_blob).unwrap();
    bytes[0] = b' ';
    fs::write(&manifest_blob, &bytes).unwrap();
    let err = open_source(&spec, &opts).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err:?}");
}

/// Docker 25+ saves an OCI layout inside the archive (`blobs/sha256/…`,
/// `index.json`) next to `manifest.json`; built here from umoci's layout.
#[test]
fn docker_archive_in_oci_layout_form() {
    let dir = tempfile::tempdir().unwrap();
    let layout = build_layout(dir.path());
    let opts = SourceOptions::default();
    let oci = open_source(&format!("oci:{}:t", layout.display()), &opts).unwrap();
    let want = read_image(oci.as_ref());

    let manifest_digest = lazyblk::oci::Digest(oci.image_digest());
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(layout.join("blobs/sha256").join(manifest_digest.hex())).unwrap(),
    )
    .unwrap();
    let blob_name = |d: &serde_json::Value| {
        format!(
            "blobs/sha256/{}",
            d["digest"].as_str().unwrap().trim_start_matches("sha256:")
        )
    };
    let save_manifest = serde_json::json!([{
        "Config": blob_name(&manifest["config"]),
        "RepoTags": ["example.org/app:1"],
        "Layers": manifest["layers"].as_array().unwrap().iter().map(blob_name).collect::<Vec<_>>(),
    }]);
    fs::write(layout.join("manifest.json"), save_manifest.to_string()).unwrap();
    let archive = dir.path().join("saved.tar");
    let mut builder = tar::Builder::new(fs::File::create(&archive).unwrap());
    builder.append_dir_all(".", &layout).unwrap();
    builder.into_inner().unwrap();

    let saved = open_source(
        &format!("docker-archive:{}:example.org/app:1", archive.display()),
        &opts,
    )
    .unwrap();
    assert_eq!(saved.layers(), oci.layers());
    assert_eq!(
        saved.image_digest(),
        oci.image_digest(),
        "the manifest found through index.json"
    );
    assert_eq!(read_image(saved.as_ref()), want);

    let err = open_source(
        &format!("docker-archive:{}:other:2", archive.display()),
        &opts,
    )
    .err()
    .unwrap();
    assert!(matches!(err, SourceError::NoSuchTag { .. }), "{err:?}");
}
