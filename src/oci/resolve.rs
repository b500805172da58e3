//! From a source's first document to its layers: following indexes to the
//! wanted platform's manifest, checking each document against its digest,
//! and opening a layer blob as a verified, decompressed tar stream. Shared
//! by the three sources, which differ only in where bytes come from.

use std::io::Read;

use super::compress::{decompressor, Compression};
use super::source::{LayerDescriptor, SourceError};
use super::spec::{self, Descriptor, DocumentKind, Index, Manifest, Platform, PlatformWanted};
use super::verify::{BlobError, Digest, VerifiedReader};

/// Where [`resolve`] fetches the documents an index points to.
pub trait DocumentFetcher {
    /// The bytes of the document `descriptor` names, verified, and the
    /// media type they were served with (the descriptor's when the storage
    /// keeps none).
    fn fetch(&self, descriptor: &Descriptor) -> Result<(String, Vec<u8>), SourceError>;
}

/// How deep indexes may nest (an index of indexes of manifests is 2).
const MAX_NESTING: usize = 4;

/// Follows a document down to an image manifest, choosing the wanted
/// platform in each index. Returns the manifest's digest and content.
pub fn resolve(
    fetcher: &dyn DocumentFetcher,
    what: &str,
    mut media_type: String,
    mut bytes: Vec<u8>,
    mut digest: Digest,
    wanted: &PlatformWanted,
) -> Result<(Digest, Manifest), SourceError> {
    for _ in 0..=MAX_NESTING {
        let kind = document_kind(what, &media_type, &bytes)?;
        if kind == DocumentKind::Manifest {
            let manifest: Manifest = parse(what, &bytes)?;
            return Ok((digest, manifest));
        }
        let index: Index = parse(what, &bytes)?;
        let chosen = choose_platform(what, &index.manifests, wanted)?;
        let fetched = fetcher.fetch(chosen)?;
        media_type = fetched.0;
        bytes = fetched.1;
        digest = parse_digest(what, &chosen.digest)?;
    }
    Err(SourceError::NestingTooDeep {
        what: what.to_owned(),
        max: MAX_NESTING,
    })
}

/// The kind of a document from its media type, or from its own
/// `mediaType` field when the storage gave none.
pub fn document_kind(
    what: &str,
    media_type: &str,
    bytes: &[u8],
) -> Result<DocumentKind, SourceError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Sniff {
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let unsupported = |media_type: &str, problem: &str| SourceError::UnsupportedMediaType {
        what: what.to_owned(),
        media_type: media_type.to_owned(),
        problem: problem.to_owned(),
    };
    if spec::DOCKER_SCHEMA1.contains(&media_type) {
        return Err(unsupported(
            media_type,
            "Docker schema 1 manifests are obsolete",
        ));
    }
    if let Some(kind) = DocumentKind::of(media_type) {
        return Ok(kind);
    }
    if !media_type.is_empty() && media_type != "application/json" {
        return Err(unsupported(
            media_type,
            "expected an image index or manifest",
        ));
    }
    let sniff: Sniff = parse(what, bytes)?;
    match sniff.media_type.as_deref() {
        Some(declared) => DocumentKind::of(declared)
            .ok_or_else(|| unsupported(declared, "expected an image index or manifest")),
        // OCI documents may omit mediaType: an index has `manifests`.
        None if sniff.manifests.is_some() => Ok(DocumentKind::Index),
        None => Ok(DocumentKind::Manifest),
    }
}

fn choose_platform<'a>(
    what: &str,
    manifests: &'a [Descriptor],
    wanted: &PlatformWanted,
) -> Result<&'a Descriptor, SourceError> {
    if let Some(found) = manifests
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| wanted.matches(p)))
    {
        return Ok(found);
    }
    // An index of one image with no platform named is that image.
    if let [only] = manifests {
        if only.platform.is_none() {
            return Ok(only);
        }
    }
    Err(SourceError::NoPlatform {
        what: what.to_owned(),
        wanted: wanted.to_string(),
        available: manifests
            .iter()
            .map(|d| {
                d.platform
                    .as_ref()
                    .map_or("(none)".into(), Platform::to_string)
            })
            .collect(),
    })
}

pub fn parse<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, SourceError> {
    serde_json::from_slice(bytes).map_err(|source| SourceError::ParseDocument {
        what: what.to_owned(),
        source,
    })
}

pub fn parse_digest(what: &str, text: &str) -> Result<Digest, SourceError> {
    Digest::parse(text).map_err(|source| SourceError::BadDigest {
        what: what.to_owned(),
        source,
    })
}

/// Reads a whole document of known digest and size, checked.
pub fn read_document(
    what: &str,
    reader: impl Read,
    digest: Digest,
    size: u64,
) -> Result<Vec<u8>, SourceError> {
    if size > spec::MAX_DOCUMENT_LEN {
        return Err(SourceError::DocumentTooLarge {
            what: what.to_owned(),
            size,
            max: spec::MAX_DOCUMENT_LEN,
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    VerifiedReader::new(reader, digest, size)
        .read_to_end(&mut bytes)
        .map_err(
            |e| match e.get_ref().and_then(|i| i.downcast_ref::<BlobError>()) {
                Some(blob) => SourceError::Verify {
                    what: what.to_owned(),
                    source: blob.clone(),
                },
                None => SourceError::ReadFile {
                    path: what.into(),
                    source: e,
                },
            },
        )?;
    Ok(bytes)
}

/// The layers of a manifest, with media types this reader can decompress.
pub fn layer_descriptors(
    what: &str,
    manifest: &Manifest,
) -> Result<Vec<LayerDescriptor>, SourceError> {
    manifest
        .layers
        .iter()
        .map(|layer| {
            Compression::from_media_type(&layer.media_type).map_err(|problem| {
                SourceError::UnsupportedMediaType {
                    what: format!("{what}: layer {}", layer.digest),
                    media_type: layer.media_type.clone(),
                    problem,
                }
            })?;
            Ok(LayerDescriptor {
                digest: parse_digest(what, &layer.digest)?,
                media_type: layer.media_type.clone(),
                size: layer.size,
            })
        })
        .collect()
}

/// A layer's blob, verified while it streams and decompressed. With
/// `trust_media_type` false (legacy archives) the magic number alone
/// decides the compression.
pub fn layer_stream(
    blob: Box<dyn Read + Send>,
    layer: &LayerDescriptor,
    trust_media_type: bool,
) -> Result<Box<dyn Read + Send>, SourceError> {
    let verified = Box::new(VerifiedReader::new(blob, layer.digest, layer.size));
    let declared = if trust_media_type {
        let compression = Compression::from_media_type(&layer.media_type).map_err(|problem| {
            SourceError::UnsupportedMediaType {
                what: format!("layer {}", layer.digest),
                media_type: layer.media_type.clone(),
                problem,
            }
        })?;
        Some((compression, layer.media_type.as_str()))
    } else {
        None
    };
    decompressor(verified, declared).map_err(|source| SourceError::Decompress {
        layer: layer.digest,
        source,
    })
}
