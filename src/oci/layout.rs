//! `oci:DIR[:TAG]`: an OCI image layout directory, as skopeo, umoci and
//! buildah write it (`oci-layout`, `index.json`, `blobs/sha256/…`).
//!
//! The tag is matched against the `org.opencontainers.image.ref.name`
//! annotation of `index.json`'s entries; without one the layout must hold a
//! single image (or a single image per platform). Nested indexes are
//! followed down to the wanted platform's manifest. Every blob is checked
//! against its digest: documents when read, layers while they stream.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::source::{
    layer_descriptors, layer_stream, parse, parse_digest, read_document, resolve, DocumentFetcher,
    ImageSource, LayerDescriptor, SourceError, SourceOptions,
};
use super::spec::{self, Descriptor, Index};
use super::verify::Digest;

pub struct LayoutSource {
    dir: PathBuf,
    tag: Option<String>,
    manifest_digest: Digest,
    layers: Vec<LayerDescriptor>,
}

impl LayoutSource {
    pub fn open(dir: &Path, tag: Option<&str>, opts: &SourceOptions) -> Result<Self, SourceError> {
        let wanted = opts.wanted_platform()?;
        let marker = dir.join("oci-layout");
        if !marker.is_file() {
            return Err(SourceError::ReadFile {
                path: marker,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not an OCI image layout: no oci-layout file",
                ),
            });
        }
        let index_path = dir.join("index.json");
        let index_bytes = std::fs::read(&index_path).map_err(|source| SourceError::ReadFile {
            path: index_path.clone(),
            source,
        })?;
        let what = index_path.display().to_string();
        let index: Index = parse(&what, &index_bytes)?;
        let name = format!("oci:{}", dir.display());
        let tags = || -> Vec<String> {
            index
                .manifests
                .iter()
                .filter_map(|d| d.annotations.get(spec::REF_NAME).cloned())
                .collect()
        };
        let fetcher = LayoutFetcher { dir };
        let (media_type, bytes, digest) = match tag {
            Some(tag) => {
                let chosen = index
                    .manifests
                    .iter()
                    .find(|d| d.annotations.get(spec::REF_NAME).map(String::as_str) == Some(tag))
                    .ok_or_else(|| SourceError::NoSuchTag {
                        source_name: name.clone(),
                        tag: tag.to_owned(),
                        available: tags(),
                    })?;
                let (media_type, bytes) = fetcher.fetch(chosen)?;
                (media_type, bytes, parse_digest(&what, &chosen.digest)?)
            }
            None => match &index.manifests[..] {
                [only] => {
                    let (media_type, bytes) = fetcher.fetch(only)?;
                    (media_type, bytes, parse_digest(&what, &only.digest)?)
                }
                // Several entries all naming platforms: the layout's index
                // is itself a multi-platform index.
                many if !many.is_empty() && many.iter().all(|d| d.platform.is_some()) => (
                    spec::OCI_INDEX.to_owned(),
                    index_bytes.clone(),
                    Digest::of(&index_bytes),
                ),
                many => {
                    return Err(SourceError::Ambiguous {
                        source_name: name,
                        count: many.len(),
                        available: tags(),
                    })
                }
            },
        };
        let (manifest_digest, manifest) =
            resolve(&fetcher, &what, media_type, bytes, digest, &wanted)?;
        let layers = layer_descriptors(&format!("manifest {manifest_digest}"), &manifest)?;
        Ok(LayoutSource {
            dir: dir.to_owned(),
            tag: tag.map(str::to_owned),
            manifest_digest,
            layers,
        })
    }
}

struct LayoutFetcher<'a> {
    dir: &'a Path,
}

fn blob_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join("blobs").join("sha256").join(digest.hex())
}

impl DocumentFetcher for LayoutFetcher<'_> {
    fn fetch(&self, descriptor: &Descriptor) -> Result<(String, Vec<u8>), SourceError> {
        let digest = parse_digest("index entry", &descriptor.digest)?;
        let path = blob_path(self.dir, &digest);
        let file = File::open(&path).map_err(|source| SourceError::ReadFile {
            path: path.clone(),
            source,
        })?;
        let bytes = read_document(&path.display().to_string(), file, digest, descriptor.size)?;
        Ok((descriptor.media_type.clone(), bytes))
    }
}

impl ImageSource for LayoutSource {
    fn describe(&self) -> String {
        match &self.tag {
            Some(tag) => format!("oci:{}:{tag}", self.dir.display()),
            None => format!("oci:{}", self.dir.display()),
        }
    }

    fn image_digest(&self) -> [u8; 32] {
        self.manifest_digest.0
    }

    fn layers(&self) -> &[LayerDescriptor] {
        &self.layers
    }

    fn open_layer(&self, index: usize) -> Result<Box<dyn Read + Send>, SourceError> {
        let layer = super::source::layer_at(&self.layers, index)?;
        let path = blob_path(&self.dir, &layer.digest);
        let file = File::open(&path).map_err(|source| SourceError::ReadFile { path, source })?;
        layer_stream(
            Box::new(std::io::BufReader::with_capacity(256 << 10, file)),
            layer,
            true,
        )
    }
}
