//! Image sources: where an image's manifest and layers come from.
//!
//! [`open_source`] parses a source string (`oci:DIR[:TAG]`,
//! `docker-archive:FILE[:REF]`, `docker://HOST/REPO:TAG` or `@sha256:…`),
//! resolves indexes down to one image manifest for the wanted platform and
//! returns an [`ImageSource`]. Every document read on the way is checked
//! against the digest that named it; [`ImageSource::open_layer`] hands out
//! the decompressed tar of a layer whose compressed bytes are hashed while
//! they stream (a mismatch is an `io::Error` from `read`, before the last
//! bytes are handed out).

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use super::compress::{decompressor, Compression, SniffError};
use super::spec::{self, Descriptor, DocumentKind, Index, Manifest, Platform, PlatformWanted};
use super::verify::{BlobError, Digest, DigestError, VerifiedReader};
use crate::error::ErrorKind;

/// A layer as the image manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDescriptor {
    /// Digest of the blob as stored (compressed).
    pub digest: Digest,
    pub media_type: String,
    /// Size of the blob as stored, in bytes.
    pub size: u64,
}

/// An image whose layers can be read in order.
pub trait ImageSource: Send + Sync {
    /// The source as a person would name it, for messages and progress.
    fn describe(&self) -> String;
    /// sha256 of the image manifest (for a legacy `docker save` archive,
    /// which keeps no manifest, of the image config: the image ID).
    fn image_digest(&self) -> [u8; 32];
    fn layers(&self) -> &[LayerDescriptor];
    /// The decompressed tar of layer `index` (0 is the base).
    fn open_layer(&self, index: usize) -> Result<Box<dyn Read + Send>, SourceError>;
}

/// Registry login, for `docker://` sources that need one.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <password>)", self.username)
    }
}

/// What the `flatten` and `push` commands let a user choose about a source.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// `os/arch[/variant]` picked from an index; linux/amd64 when `None`.
    pub platform: Option<String>,
    /// Speak plain HTTP to the registry (a loopback test registry).
    pub plain_http: bool,
    pub credentials: Option<Credentials>,
    /// Further attempts after a transient registry failure.
    pub retries: u32,
    /// Delay before the first retry; doubled for each next one.
    pub retry_delay: Duration,
    /// Limit on connecting and on waiting for a response's headers.
    pub timeout: Duration,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            platform: None,
            plain_http: false,
            credentials: None,
            retries: 4,
            retry_delay: Duration::from_millis(250),
            timeout: Duration::from_secs(60),
        }
    }
}

impl SourceOptions {
    pub fn wanted_platform(&self) -> Result<PlatformWanted, SourceError> {
        match &self.platform {
            None => Ok(PlatformWanted::default()),
            Some(text) => text.parse().map_err(|problem| SourceError::Spec {
                spec: text.clone(),
                problem,
            }),
        }
    }
}

/// Why an image or one of its layers could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source {spec:?}: {problem}")]
    Spec { spec: String, problem: String },
    #[error("reading {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {what}")]
    ReadDocument {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {what}")]
    ParseDocument {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what} names a bad digest")]
    BadDigest {
        what: String,
        #[source]
        source: DigestError,
    },
    #[error("verifying {what}")]
    Verify {
        what: String,
        #[source]
        source: BlobError,
    },
    #[error("{what} is {size} bytes, more than the {max} a document may have")]
    DocumentTooLarge { what: String, size: u64, max: u64 },
    #[error("{source_name} has no image tagged {tag:?} (tags: {available:?})")]
    NoSuchTag {
        source_name: String,
        tag: String,
        available: Vec<String>,
    },
    #[error("{source_name} holds {count} images: name one (tags: {available:?})")]
    Ambiguous {
        source_name: String,
        count: usize,
        available: Vec<String>,
    },
    #[error("{what} has no image for platform {wanted} (it has: {available:?})")]
    NoPlatform {
        what: String,
        wanted: String,
        available: Vec<String>,
    },
    #[error("{what} has media type {media_type:?}, which is not supported: {problem}")]
    UnsupportedMediaType {
        what: String,
        media_type: String,
        problem: String,
    },
    #[error("{what}: indexes nest deeper than {max} levels")]
    NestingTooDeep { what: String, max: usize },
    #[error("layer index {index} is out of range: the image has {count} layers")]
    LayerIndex { index: usize, count: usize },
    #[error("layer {layer}")]
    Decompress {
        layer: Digest,
        #[source]
        source: SniffError,
    },
    #[error("{archive}: no member {member:?}")]
    MissingMember { archive: PathBuf, member: String },
    #[error("{archive}: member {member:?}: {problem}")]
    BadMember {
        archive: PathBuf,
        member: String,
        problem: String,
    },
    #[error("reading {archive}")]
    ReadArchive {
        archive: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("GET {url}")]
    Http {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("GET {url}: HTTP {status}: {body}")]
    HttpStatus {
        url: String,
        status: u16,
        body: String,
    },
    #[error("GET {url}: the registry sent content type {content_type:?}, not one of {expected}")]
    WrongContentType {
        url: String,
        content_type: String,
        expected: String,
    },
    #[error(
        "GET {url}: the registry requires authentication (401) but names no token endpoint \
         (WWW-Authenticate: {challenge:?})"
    )]
    NoTokenEndpoint { url: String, challenge: String },
    #[error("GET {url}: the registry refused the credentials or token (HTTP 401)")]
    Unauthorized { url: String },
    #[error("token endpoint {url}: {problem}")]
    Token { url: String, problem: String },
}

impl SourceError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SourceError::ReadFile { source, .. }
            | SourceError::ReadArchive { source, .. }
            | SourceError::ReadDocument { source, .. } => {
                if source.kind() == std::io::ErrorKind::NotFound {
                    ErrorKind::NotFound
                } else {
                    ErrorKind::Io
                }
            }
            SourceError::Verify { .. } => ErrorKind::Integrity,
            SourceError::NoSuchTag { .. }
            | SourceError::MissingMember { .. }
            | SourceError::NoPlatform { .. } => ErrorKind::NotFound,
            SourceError::UnsupportedMediaType { .. } => ErrorKind::Unsupported,
            SourceError::Http { .. } => ErrorKind::Transient,
            SourceError::HttpStatus { status, .. } => match status {
                404 => ErrorKind::NotFound,
                408 | 429 | 500..=599 => ErrorKind::Transient,
                _ => ErrorKind::Invalid,
            },
            SourceError::Decompress {
                source: SniffError::Read(_),
                ..
            } => ErrorKind::Io,
            _ => ErrorKind::Invalid,
        }
    }
}

/// Opens the image a source string names.
pub fn open_source(spec: &str, opts: &SourceOptions) -> Result<Box<dyn ImageSource>, SourceError> {
    let bad = |problem: &str| SourceError::Spec {
        spec: spec.to_owned(),
        problem: problem.to_owned(),
    };
    if let Some(rest) = spec.strip_prefix("oci:") {
        // Like skopeo, the first `:` ends the directory.
        let (dir, tag) = match rest.split_once(':') {
            Some((dir, tag)) => (dir, Some(tag).filter(|t| !t.is_empty())),
            None => (rest, None),
        };
        if dir.is_empty() {
            return Err(bad("no directory after `oci:`"));
        }
        Ok(Box::new(super::layout::LayoutSource::open(
            dir.as_ref(),
            tag,
            opts,
        )?))
    } else if let Some(rest) = spec.strip_prefix("docker-archive:") {
        let (file, reference) = match rest.split_once(':') {
            Some((file, reference)) => (file, Some(reference).filter(|r| !r.is_empty())),
            None => (rest, None),
        };
        if file.is_empty() {
            return Err(bad("no file after `docker-archive:`"));
        }
        Ok(Box::new(super::archive::ArchiveSource::open(
            file.as_ref(),
            reference,
            opts,
        )?))
    } else if let Some(rest) = spec.strip_prefix("docker://") {
        Ok(Box::new(super::registry::RegistrySource::open(rest, opts)?))
    } else {
        Err(bad(
            "expected oci:DIR[:TAG], docker-archive:FILE[:REF] or docker://HOST/REPO[:TAG|@DIGEST]",
        ))
    }
}

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
