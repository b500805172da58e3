//! `docker-archive:FILE[:REF]`: a `docker save` tar.
//!
//! Both layouts are read through `manifest.json`: the legacy one
//! (`<id>/layer.tar`, `<id>.json` config, identical layers as symlinks) and
//! the OCI-in-archive one of Docker 25+ (`blobs/sha256/…` plus `index.json`).
//! The archive is indexed once (member → offset, size) and members are read
//! in place. A legacy `layer.tar` is the uncompressed layer, so it is checked
//! against the config's `diff_ids`; a blob under `blobs/sha256/` against its
//! name. Compression is decided by the magic number: Docker writes
//! uncompressed layers but the containerd image store keeps them as pulled.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::source::{
    parse, parse_digest, read_document, ImageSource, LayerDescriptor, SourceError, SourceOptions,
};
use super::spec::{self, Config, Descriptor, Index, Manifest};
use super::verify::Digest;

/// One image of `manifest.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveImage {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
    #[serde(default)]
    layer_sources: HashMap<String, Descriptor>,
}

/// Where a member's bytes are in the archive.
#[derive(Debug, Clone, Copy)]
struct Member {
    offset: u64,
    size: u64,
}

pub struct ArchiveSource {
    path: PathBuf,
    reference: Option<String>,
    image_digest: Digest,
    layers: Vec<LayerDescriptor>,
    members: Vec<Member>,
}

/// Hops through symlinked members before giving up (Docker links a
/// repeated layer to its first copy: one hop).
const MAX_LINK_HOPS: usize = 8;

struct MemberIndex {
    archive: PathBuf,
    members: HashMap<String, Member>,
    links: HashMap<String, String>,
}

impl MemberIndex {
    fn build(archive: &Path) -> Result<Self, SourceError> {
        let read_err = |source| SourceError::ReadArchive {
            archive: archive.to_owned(),
            source,
        };
        let file = File::open(archive).map_err(read_err)?;
        let mut tar = tar::Archive::new(BufReader::new(file));
        let mut members = HashMap::new();
        let mut links = HashMap::new();
        for entry in tar.entries_with_seek().map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            let name = normalize(&String::from_utf8_lossy(&entry.path_bytes()));
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let member = Member {
                        offset: entry.raw_file_position(),
                        size: entry.size(),
                    };
                    members.insert(name, member);
                }
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    if let Some(target) = entry.link_name_bytes() {
                        let target = String::from_utf8_lossy(&target).into_owned();
                        let resolved = if entry.header().entry_type() == tar::EntryType::Link {
                            normalize(&target)
                        } else {
                            let parent = name.rsplit_once('/').map_or("", |(p, _)| p);
                            normalize(&format!("{parent}/{target}"))
                        };
                        links.insert(name, resolved);
                    }
                }
                _ => {}
            }
        }
        Ok(MemberIndex {
            archive: archive.to_owned(),
            members,
            links,
        })
    }

    fn find(&self, name: &str) -> Result<Member, SourceError> {
        let mut name = normalize(name);
        for _ in 0..=MAX_LINK_HOPS {
            if let Some(member) = self.members.get(&name) {
                return Ok(*member);
            }
            match self.links.get(&name) {
                Some(target) => name = target.clone(),
                None => break,
            }
        }
        Err(SourceError::MissingMember {
            archive: self.archive.clone(),
            member: name,
        })
    }

    fn open(&self, member: Member) -> Result<impl Read + Send + 'static, SourceError> {
        let read_err = |source| SourceError::ReadArchive {
            archive: self.archive.clone(),
            source,
        };
        let mut file = File::open(&self.archive).map_err(read_err)?;
        file.seek(SeekFrom::Start(member.offset))
            .map_err(read_err)?;
        Ok(BufReader::with_capacity(256 << 10, file).take(member.size))
    }

    fn read_whole(&self, name: &str, digest: Option<Digest>) -> Result<Vec<u8>, SourceError> {
        let member = self.find(name)?;
        let what = format!("{}: {name}", self.archive.display());
        match digest {
            Some(digest) => read_document(&what, self.open(member)?, digest, member.size),
            None => {
                if member.size > spec::MAX_DOCUMENT_LEN {
                    return Err(SourceError::DocumentTooLarge {
                        what,
                        size: member.size,
                        max: spec::MAX_DOCUMENT_LEN,
                    });
                }
                let mut bytes = Vec::new();
                self.open(member)?
                    .read_to_end(&mut bytes)
                    .map_err(|source| SourceError::ReadArchive {
                        archive: self.archive.clone(),
                        source,
                    })?;
                Ok(bytes)
            }
        }
    }
}

/// `./a//b/` → `a/b`, so names from manifest.json and tar headers agree.
fn normalize(name: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    parts.join("/")
}

/// Whether two image names are the same once Docker's defaults are filled
/// in (`busybox` is `docker.io/library/busybox:latest`).
fn same_reference(a: &str, b: &str) -> bool {
    fn full(name: &str) -> String {
        let (repo, tag) = match name.rfind(':') {
            Some(i) if !name[i..].contains('/') => (&name[..i], &name[i + 1..]),
            _ => (name, "latest"),
        };
        let repo = match repo.split_once('/') {
            Some((first, _))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                repo.to_owned()
            }
            Some(_) => format!("docker.io/{repo}"),
            None => format!("docker.io/library/{repo}"),
        };
        format!("{repo}:{tag}")
    }
    a == b || full(a) == full(b)
}

/// The digest a `blobs/sha256/HEX` member name spells.
fn digest_in_name(name: &str) -> Option<Digest> {
    normalize(name)
        .strip_prefix("blobs/sha256/")
        .and_then(Digest::from_hex)
}

impl ArchiveSource {
    pub fn open(
        path: &Path,
        reference: Option<&str>,
        _opts: &SourceOptions,
    ) -> Result<Self, SourceError> {
        let index = MemberIndex::build(path)?;
        let manifest_what = format!("{}: manifest.json", path.display());
        let images: Vec<ArchiveImage> =
            parse(&manifest_what, &index.read_whole("manifest.json", None)?)?;
        let name = format!("docker-archive:{}", path.display());
        let all_tags = || -> Vec<String> {
            images
                .iter()
                .flat_map(|i| i.repo_tags.clone().unwrap_or_default())
                .collect()
        };
        let image = match reference {
            Some(reference) => images
                .iter()
                .find(|i| {
                    i.repo_tags
                        .iter()
                        .flatten()
                        .any(|t| same_reference(t, reference))
                })
                .ok_or_else(|| SourceError::NoSuchTag {
                    source_name: name.clone(),
                    tag: reference.to_owned(),
                    available: all_tags(),
                })?,
            None => match &images[..] {
                [only] => only,
                many => {
                    return Err(SourceError::Ambiguous {
                        source_name: name,
                        count: many.len(),
                        available: all_tags(),
                    })
                }
            },
        };

        // A legacy config is named `<hex>.json`, a new one by its blob path.
        let config_name = normalize(&image.config);
        let config_digest = digest_in_name(&config_name)
            .or_else(|| config_name.strip_suffix(".json").and_then(Digest::from_hex));
        let config_bytes = index.read_whole(&config_name, config_digest)?;
        let config_digest = Digest::of(&config_bytes);
        let config: Config = parse(&format!("{}: {config_name}", path.display()), &config_bytes)?;
        if config.rootfs.diff_ids.len() != image.layers.len() {
            return Err(SourceError::BadMember {
                archive: path.to_owned(),
                member: config_name,
                problem: format!(
                    "lists {} layers (diff_ids) but manifest.json lists {}",
                    config.rootfs.diff_ids.len(),
                    image.layers.len()
                ),
            });
        }

        let mut layers = Vec::new();
        let mut members = Vec::new();
        for (layer_name, diff_id) in image.layers.iter().zip(&config.rootfs.diff_ids) {
            let member = index.find(layer_name)?;
            let digest = match digest_in_name(layer_name) {
                Some(digest) => digest,
                None => parse_digest(&format!("{}: config diff_ids", path.display()), diff_id)?,
            };
            let media_type = image
                .layer_sources
                .get(diff_id)
                .map(|d| d.media_type.clone())
                .unwrap_or_else(|| "application/vnd.docker.image.rootfs.diff.tar".to_owned());
            layers.push(LayerDescriptor {
                digest,
                media_type,
                size: member.size,
            });
            members.push(member);
        }

        let image_digest = match oci_manifest(&index, &config_digest) {
            Some((digest, manifest)) => {
                // The OCI manifest knows the media types docker's
                // manifest.json leaves out.
                for (layer, described) in layers.iter_mut().zip(&manifest.layers) {
                    if Digest::parse(&described.digest).ok() == Some(layer.digest) {
                        layer.media_type = described.media_type.clone();
                    }
                }
                digest
            }
            None => config_digest,
        };
        Ok(ArchiveSource {
            path: path.to_owned(),
            reference: reference.map(str::to_owned),
            image_digest,
            layers,
            members,
        })
    }
}

/// In an OCI-in-archive save, the manifest whose config is `config`, with
/// its digest: the same digest a registry would give the image.
fn oci_manifest(index: &MemberIndex, config: &Digest) -> Option<(Digest, Manifest)> {
    let top: Index = serde_json::from_slice(&index.read_whole("index.json", None).ok()?).ok()?;
    let mut pending: Vec<Descriptor> = top.manifests;
    let mut budget = 64;
    while let Some(descriptor) = pending.pop() {
        budget -= 1;
        if budget == 0 {
            return None;
        }
        let digest = Digest::parse(&descriptor.digest).ok()?;
        let bytes = index
            .read_whole(&format!("blobs/sha256/{}", digest.hex()), Some(digest))
            .ok()?;
        if let Ok(manifest) = serde_json::from_slice::<Manifest>(&bytes) {
            if Digest::parse(&manifest.config.digest).ok() == Some(*config) {
                return Some((digest, manifest));
            }
        } else if let Ok(nested) = serde_json::from_slice::<Index>(&bytes) {
            pending.extend(nested.manifests);
        }
    }
    None
}

impl ImageSource for ArchiveSource {
    fn describe(&self) -> String {
        match &self.reference {
            Some(reference) => format!("docker-archive:{}:{reference}", self.path.display()),
            None => format!("docker-archive:{}", self.path.display()),
        }
    }

    fn image_digest(&self) -> [u8; 32] {
        self.image_digest.0
    }

    fn layers(&self) -> &[LayerDescriptor] {
        &self.layers
    }

    fn open_layer(&self, index: usize) -> Result<Box<dyn Read + Send>, SourceError> {
        let (layer, member) =
            self.layers
                .get(index)
                .zip(self.members.get(index))
                .ok_or(SourceError::LayerIndex {
                    index,
                    count: self.layers.len(),
                })?;
        let file = File::open(&self.path).map_err(|source| SourceError::ReadArchive {
            archive: self.path.clone(),
            source,
        });
        let mut file = file?;
        file.seek(SeekFrom::Start(member.offset))
            .map_err(|source| SourceError::ReadArchive {
                archive: self.path.clone(),
                source,
            })?;
        let blob = BufReader::with_capacity(256 << 10, file).take(member.size);
        super::source::layer_stream(Box::new(blob), layer, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_match_with_docker_defaults() {
        assert!(same_reference("docker.io/test/img:v1", "test/img:v1"));
        assert!(same_reference(
            "docker.io/library/busybox:latest",
            "busybox"
        ));
        assert!(same_reference("localhost:5000/a:b", "localhost:5000/a:b"));
        assert!(!same_reference("docker.io/test/img:v1", "test/img:v2"));
        assert!(!same_reference("quay.io/a:b", "a:b"));
        assert_eq!(normalize("./a//b/../c/"), "a/c");
    }
}
