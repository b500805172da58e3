//! `docker://HOST[:PORT]/REPO[:TAG|@sha256:…]`: an image in a registry,
//! through the OCI distribution API v2.
//!
//! The manifest is fetched with an `Accept` header naming the OCI and
//! Docker v2 index and manifest types; a response of any other content type
//! is refused (an HTML login page, a schema-1 manifest). Indexes are
//! followed to the wanted platform, each document checked against the
//! digest that named it; a manifest fetched by tag is named by its own
//! sha256. Layers stream from `/v2/REPO/blobs/DIGEST`, hashed as they pass.

mod client;

use std::io::Read;
use std::sync::Arc;

pub use client::{parse_challenge, token_from_answer};
use client::{BlobBody, Client};

use super::source::{
    layer_descriptors, layer_stream, parse_digest, resolve, DocumentFetcher, ImageSource,
    LayerDescriptor, SourceError, SourceOptions,
};
use super::spec::{self, Descriptor, DocumentKind};
use super::verify::{BlobError, Digest};

/// Docker Hub's API host for the `docker.io` name.
const DOCKER_HUB: &str = "registry-1.docker.io";

fn accept_documents() -> String {
    [
        spec::OCI_INDEX,
        spec::OCI_MANIFEST,
        spec::DOCKER_LIST,
        spec::DOCKER_MANIFEST,
    ]
    .join(", ")
}

/// A parsed `docker://` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub host: String,
    pub repository: String,
    /// A tag or `sha256:…`.
    pub reference: String,
}

impl Reference {
    /// Parses what follows `docker://`. A first component without `.` or
    /// `:` (and not `localhost`) is a Docker Hub repository, as in Docker.
    pub fn parse(text: &str) -> Result<Reference, String> {
        let (name, reference) = match text.split_once('@') {
            Some((name, digest)) => {
                Digest::parse(digest).map_err(|e| e.to_string())?;
                (name, digest.to_owned())
            }
            None => {
                let last_slash = text.rfind('/').map_or(0, |i| i + 1);
                match text[last_slash..].rfind(':') {
                    Some(colon) => (
                        &text[..last_slash + colon],
                        text[last_slash + colon + 1..].to_owned(),
                    ),
                    None => (text, "latest".to_owned()),
                }
            }
        };
        let (host, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ => ("docker.io".to_owned(), name.to_owned()),
        };
        let repository = if host == "docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let valid_repo = !repository.is_empty()
            && repository.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        if !valid_repo {
            return Err(format!("{repository:?} is not a repository name"));
        }
        let valid_tag = reference.starts_with("sha256:")
            || (!reference.is_empty()
                && reference.len() <= 128
                && reference
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
        if !valid_tag {
            return Err(format!("{reference:?} is not a tag"));
        }
        Ok(Reference {
            host,
            repository,
            reference,
        })
    }
}

pub struct RegistrySource {
    client: Arc<Client>,
    name: String,
    manifest_digest: Digest,
    layers: Vec<LayerDescriptor>,
}

impl RegistrySource {
    pub fn open(text: &str, opts: &SourceOptions) -> Result<Self, SourceError> {
        let reference = Reference::parse(text).map_err(|problem| SourceError::Spec {
            spec: format!("docker://{text}"),
            problem,
        })?;
        let wanted = opts.wanted_platform()?;
        let api_host = if reference.host == "docker.io" {
            DOCKER_HUB
        } else {
            &reference.host
        };
        let scheme = if opts.plain_http { "http" } else { "https" };
        let client = Arc::new(Client::new(
            format!("{scheme}://{api_host}"),
            reference.repository.clone(),
            opts,
        ));
        let url = client.url("manifests", &reference.reference);
        let expected = Digest::parse(&reference.reference).ok();
        let (media_type, bytes) = fetch_document(&client, &url, expected, None)?;
        let digest = Digest::of(&bytes);
        let what = format!("docker://{text}");
        let fetcher = Fetcher { client: &client };
        let (manifest_digest, manifest) =
            resolve(&fetcher, &what, media_type, bytes, digest, &wanted)?;
        let layers = layer_descriptors(&format!("manifest {manifest_digest}"), &manifest)?;
        Ok(RegistrySource {
            client,
            name: what,
            manifest_digest,
            layers,
        })
    }
}

/// GETs a manifest or index, checking its content type, size and digest.
fn fetch_document(
    client: &Client,
    url: &str,
    digest: Option<Digest>,
    size: Option<u64>,
) -> Result<(String, Vec<u8>), SourceError> {
    let accept = accept_documents();
    let response = client.get(url, Some(&accept), 0)?;
    let content_type = response
        .headers()
        .get("Content-Type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    if spec::DOCKER_SCHEMA1.contains(&essence.as_str()) {
        return Err(SourceError::UnsupportedMediaType {
            what: url.to_owned(),
            media_type: essence,
            problem: "Docker schema 1 manifests are obsolete".into(),
        });
    }
    if DocumentKind::of(&essence).is_none() {
        return Err(SourceError::WrongContentType {
            url: url.to_owned(),
            content_type,
            expected: accept,
        });
    }
    let limit = size
        .unwrap_or(spec::MAX_DOCUMENT_LEN)
        .min(spec::MAX_DOCUMENT_LEN);
    let mut bytes = Vec::new();
    response
        .into_body()
        .into_reader()
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| SourceError::Http {
            url: url.to_owned(),
            source: Box::new(ureq::Error::Io(e)),
        })?;
    if bytes.len() as u64 > limit {
        return Err(SourceError::DocumentTooLarge {
            what: url.to_owned(),
            size: bytes.len() as u64,
            max: limit,
        });
    }
    if let Some(expected) = digest {
        let actual = Digest::of(&bytes);
        if actual != expected {
            return Err(SourceError::Verify {
                what: url.to_owned(),
                source: BlobError::DigestMismatch { expected, actual },
            });
        }
    }
    Ok((essence, bytes))
}

struct Fetcher<'a> {
    client: &'a Client,
}

impl DocumentFetcher for Fetcher<'_> {
    fn fetch(&self, descriptor: &Descriptor) -> Result<(String, Vec<u8>), SourceError> {
        let digest = parse_digest("index entry", &descriptor.digest)?;
        let url = self.client.url("manifests", &digest.to_string());
        fetch_document(self.client, &url, Some(digest), Some(descriptor.size))
    }
}

impl ImageSource for RegistrySource {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn image_digest(&self) -> [u8; 32] {
        self.manifest_digest.0
    }

    fn layers(&self) -> &[LayerDescriptor] {
        &self.layers
    }

    fn open_layer(&self, index: usize) -> Result<Box<dyn Read + Send>, SourceError> {
        let layer = crate::oci::source::layer_at(&self.layers, index)?;
        let url = self.client.url("blobs", &layer.digest.to_string());
        let body = BlobBody::open(Arc::clone(&self.client), url)?;
        layer_stream(Box::new(body), layer, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(host: &str, repository: &str, reference: &str) -> Reference {
        Reference {
            host: host.into(),
            repository: repository.into(),
            reference: reference.into(),
        }
    }

    #[test]
    fn references_parse_like_docker() {
        assert_eq!(
            Reference::parse("127.0.0.1:5000/app/web:v1"),
            Ok(r("127.0.0.1:5000", "app/web", "v1"))
        );
        assert_eq!(
            Reference::parse("localhost/app"),
            Ok(r("localhost", "app", "latest"))
        );
        assert_eq!(
            Reference::parse("busybox"),
            Ok(r("docker.io", "library/busybox", "latest"))
        );
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            Reference::parse(&format!("quay.io/a/b@{digest}")),
            Ok(r("quay.io", "a/b", &digest))
        );
        assert!(Reference::parse("host.io/UPPER:tag").is_err());
        assert!(Reference::parse("host.io/a@sha256:short").is_err());
        assert!(Reference::parse("host.io/a:bad tag").is_err());
    }
}
