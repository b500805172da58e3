//! The few image-spec documents a source reads: indexes (manifest lists),
//! manifests, descriptors and the config's `rootfs`, as small serde structs.
//!
//! Only the fields this reader acts on are declared; unknown fields are
//! ignored, as the spec asks. `oci-spec` would bring the whole spec with a
//! builder per type; these are the thirty lines we need, and they accept
//! Docker's v2 documents (same shape, other media types) unchanged.

use std::collections::BTreeMap;

use serde::Deserialize;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_SCHEMA1: &[&str] = &[
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];
/// The annotation that names a manifest in an OCI layout's index.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Largest manifest, index or config this reader loads into memory.
pub const MAX_DOCUMENT_LEN: u64 = 8 << 20;

/// Whether a media type names an index (manifest list) or an image manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentKind {
    Index,
    Manifest,
}

impl DocumentKind {
    pub fn of(media_type: &str) -> Option<DocumentKind> {
        match media_type.split(';').next().unwrap_or("").trim() {
            OCI_INDEX | DOCKER_LIST => Some(DocumentKind::Index),
            OCI_MANIFEST | DOCKER_MANIFEST => Some(DocumentKind::Manifest),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// `os/arch[/variant]` as `--platform` takes it; linux/amd64 by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformWanted {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Default for PlatformWanted {
    fn default() -> Self {
        PlatformWanted {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl std::str::FromStr for PlatformWanted {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split('/').collect();
        match parts[..] {
            [os, architecture] | [os, architecture, _]
                if !os.is_empty() && !architecture.is_empty() =>
            {
                Ok(PlatformWanted {
                    os: os.into(),
                    architecture: architecture.into(),
                    variant: parts
                        .get(2)
                        .filter(|v| !v.is_empty())
                        .map(|v| v.to_string()),
                })
            }
            _ => Err(format!("platform {text:?} is not OS/ARCH[/VARIANT]")),
        }
    }
}

impl PlatformWanted {
    /// A variant asked for must match; one not asked for matches any.
    pub fn matches(&self, platform: &Platform) -> bool {
        platform.os == self.os
            && platform.architecture == self.architecture
            && self
                .variant
                .as_ref()
                .is_none_or(|v| platform.variant.as_deref() == Some(v.as_str()))
    }
}

impl std::fmt::Display for PlatformWanted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// The part of an image config that lists the uncompressed layer digests.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_and_match() {
        let p: PlatformWanted = "linux/arm64/v8".parse().unwrap();
        let arm = Platform {
            architecture: "arm64".into(),
            os: "linux".into(),
            variant: Some("v8".into()),
        };
        assert!(p.matches(&arm));
        assert!("linux/arm64"
            .parse::<PlatformWanted>()
            .unwrap()
            .matches(&arm));
        assert!(!PlatformWanted::default().matches(&arm));
        assert!("linux".parse::<PlatformWanted>().is_err());
        assert!("/amd64".parse::<PlatformWanted>().is_err());
    }
}
