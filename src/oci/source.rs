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

use super::compress::SniffError;
use super::spec::PlatformWanted;
use super::verify::{BlobError, Digest, DigestError};
use crate::error::ErrorKind;

pub use super::resolve::{
    document_kind, layer_descriptors, layer_stream, parse, parse_digest, read_document, resolve,
    DocumentFetcher,
};

/// A layer as the image manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDescriptor {
    /// Digest of the blob as stored (compressed).
    pub digest: Digest,
    pub media_type: String,
    /// Size of the blob as stored, in bytes.
    pub size: u64,
}

/// Layer `index` of `layers`, or an error naming the index and the count.
pub(super) fn layer_at(
    layers: &[LayerDescriptor],
    index: usize,
) -> Result<&LayerDescriptor, SourceError> {
    layers.get(index).ok_or(SourceError::LayerIndex {
        index,
        count: layers.len(),
    })
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
