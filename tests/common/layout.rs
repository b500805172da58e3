//! OCI image layouts written directly, for hosts (like the test VM) that have
//! no umoci or skopeo: gzip layers built with the `tar` crate, a config, a
//! manifest and an index tagging it, every blob named by its SHA-256.

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// One entry of a layer.
pub enum Item {
    Dir(&'static str),
    File(String, Vec<u8>, u32),
    /// Path, target and the header's mode (Linux shows every symlink 0777;
    /// a layer may still say otherwise).
    Symlink(&'static str, &'static str, u32),
    Whiteout(&'static str),
}

fn blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let hex = hex::encode(Sha256::digest(bytes));
    fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    (format!("sha256:{hex}"), bytes.len())
}

fn layer_tar(items: &[Item]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    for item in items {
        match item {
            Item::Dir(path) => {
                let mut h = header(tar::EntryType::Directory, 0o755, 0);
                builder.append_data(&mut h, path, &[][..]).unwrap();
            }
            Item::File(path, data, mode) => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                builder.append_data(&mut h, path, &data[..]).unwrap();
            }
            Item::Symlink(path, target, mode) => {
                let mut h = header(tar::EntryType::Symlink, *mode, 0);
                builder.append_link(&mut h, path, target).unwrap();
            }
            Item::Whiteout(path) => {
                let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
                let marker = if dir.is_empty() {
                    format!(".wh.{name}")
                } else {
                    format!("{dir}/.wh.{name}")
                };
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                builder.append_data(&mut h, marker, &[][..]).unwrap();
            }
        }
    }
    builder.into_inner().unwrap()
}

/// Writes an OCI layout at `dir` whose image, tagged `t`, has `layers`
/// (base first); returns `dir`.
pub fn write_layout(dir: &Path, layers: &[Vec<Item>]) -> PathBuf {
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for items in layers {
        let tar = layer_tar(items);
        diff_ids.push(format!("sha256:{}", hex::encode(Sha256::digest(&tar))));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        let (digest, size) = blob(dir, &gz.finish().unwrap());
        descriptors.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest, "size": size,
        }));
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (config_digest, config_size) = blob(dir, config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest, "size": config_size,
        },
        "layers": descriptors,
    });
    let (manifest_digest, manifest_size) = blob(dir, manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": "t"},
        }],
    });
    fs::write(dir.join("index.json"), index.to_string()).unwrap();
    dir.to_path_buf()
}
