//! Layer compression: gzip, zstd or none, named by the media type and
//! confirmed by the blob's first bytes.
//!
//! A source opens a layer as verified compressed bytes; [`decompressor`]
//! peeks at the magic number, refuses a blob whose bytes contradict its
//! media type, and wraps it in the decoder. A decoder that runs out of input
//! mid-stream reports [`DecompressError::Truncated`] instead of ending the
//! tar early.

use std::io::{self, Cursor, Read};

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// What a layer media type declares, `Err` for an encrypted or unknown
    /// layer type. Docker's `.tar.gzip`, OCI's `+gzip`/`+zstd` and their
    /// non-distributable variants all count.
    pub fn from_media_type(media_type: &str) -> Result<Compression, String> {
        let essence = media_type.split(';').next().unwrap_or("").trim();
        if essence.ends_with("+encrypted") {
            return Err(format!("encrypted layers ({essence}) are not supported"));
        }
        if essence.ends_with("+gzip") || essence.ends_with(".tar.gzip") {
            Ok(Compression::Gzip)
        } else if essence.ends_with("+zstd") || essence.ends_with(".tar.zstd") {
            Ok(Compression::Zstd)
        } else if essence.ends_with(".tar") || essence.ends_with("layer.v1.tar") {
            Ok(Compression::None)
        } else {
            Err(format!("{essence:?} is not a layer media type"))
        }
    }

    /// What the first bytes of a blob say it is.
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(GZIP_MAGIC) {
            Compression::Gzip
        } else if head.starts_with(ZSTD_MAGIC) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "uncompressed tar",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// A failure of the decompressor, as the tar reader sees it.
#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    #[error("the {0} stream is truncated")]
    Truncated(&'static str),
    #[error("corrupt {format} stream")]
    Corrupt {
        format: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Why a blob cannot be decompressed as declared.
#[derive(Debug, thiserror::Error)]
pub enum SniffError {
    #[error("media type {media_type:?} declares {declared} but the blob is {found}")]
    Mismatch {
        media_type: String,
        declared: &'static str,
        found: &'static str,
    },
    #[error("reading the blob's first bytes")]
    Read(#[source] io::Error),
    #[error("starting the zstd decoder")]
    Zstd(#[source] io::Error),
}

/// Wraps a layer blob in its decoder. `declared` is `None` when the source
/// has no trustworthy media type (legacy docker archives): the magic number
/// decides.
pub fn decompressor(
    mut blob: Box<dyn Read + Send>,
    declared: Option<(Compression, &str)>,
) -> Result<Box<dyn Read + Send>, SniffError> {
    let mut head = Vec::with_capacity(4);
    (&mut blob)
        .take(4)
        .read_to_end(&mut head)
        .map_err(SniffError::Read)?;
    let found = Compression::sniff(&head);
    let compression = match declared {
        Some((declared, media_type)) if declared != found => {
            // An empty uncompressed layer has no magic to find.
            if !(declared == Compression::None && head.is_empty()) {
                return Err(SniffError::Mismatch {
                    media_type: media_type.to_owned(),
                    declared: declared.name(),
                    found: found.name(),
                });
            }
            declared
        }
        _ => found,
    };
    let whole = Cursor::new(head).chain(blob);
    Ok(match compression {
        Compression::None => Box::new(whole),
        Compression::Gzip => Box::new(Decoded {
            inner: flate2::read::MultiGzDecoder::new(whole),
            format: "gzip",
        }),
        Compression::Zstd => Box::new(Decoded {
            inner: zstd::stream::read::Decoder::new(whole).map_err(SniffError::Zstd)?,
            format: "zstd",
        }),
    })
}

/// Gives decoder errors a type the layer reader can name.
struct Decoded<D> {
    inner: D,
    format: &'static str,
}

impl<D: Read> Read for Decoded<D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            // Errors of the blob underneath (a digest mismatch, a network
            // failure) pass unchanged.
            if e.get_ref().is_some_and(|inner| {
                inner.is::<super::verify::BlobError>() || inner.is::<DecompressError>()
            }) {
                return e;
            }
            match e.kind() {
                io::ErrorKind::UnexpectedEof => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    DecompressError::Truncated(self.format),
                ),
                io::ErrorKind::Interrupted => e,
                kind => io::Error::new(
                    kind,
                    DecompressError::Corrupt {
                        format: self.format,
                        source: e,
                    },
                ),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        zstd::stream::encode_all(data, 3).unwrap()
    }

    fn decode(blob: Vec<u8>, declared: Option<Compression>) -> io::Result<Vec<u8>> {
        let mut r = decompressor(
            Box::new(Cursor::new(blob)),
            declared.map(|c| (c, "test/type")),
        )
        .map_err(io::Error::other)?;
        let mut out = Vec::new();
        r.read_to_end(&mut out).map(|_| out)
    }

    fn data() -> Vec<u8> {
        (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[test]
    fn media_types_map_to_compression() {
        use Compression::*;
        for (mt, c) in [
            ("application/vnd.oci.image.layer.v1.tar", None),
            ("application/vnd.oci.image.layer.v1.tar+gzip", Gzip),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Zstd),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Gzip,
            ),
            ("application/vnd.docker.image.rootfs.diff.tar.gzip", Gzip),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                Gzip,
            ),
            ("application/vnd.docker.image.rootfs.diff.tar", None),
        ] {
            assert_eq!(Compression::from_media_type(mt), Ok(c), "{mt}");
        }
        assert!(Compression::from_media_type(
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
        )
        .is_err());
        assert!(Compression::from_media_type("text/html").is_err());
    }

    #[test]
    fn round_trips_declared_and_sniffed() {
        let d = data();
        assert_eq!(decode(gzip(&d), Some(Compression::Gzip)).unwrap(), d);
        assert_eq!(decode(zstd(&d), Some(Compression::Zstd)).unwrap(), d);
        assert_eq!(decode(d.clone(), Some(Compression::None)).unwrap(), d);
        assert_eq!(decode(gzip(&d), None).unwrap(), d);
        assert_eq!(decode(zstd(&d), None).unwrap(), d);
        assert!(decode(Vec::new(), Some(Compression::None))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn contradicting_magic_is_refused() {
        let err = decode(zstd(b"x"), Some(Compression::Gzip)).unwrap_err();
        assert!(
            err.to_string()
                .contains("declares gzip but the blob is zstd"),
            "{err}"
        );
        let err = decode(b"plain tar".to_vec(), Some(Compression::Zstd)).unwrap_err();
        assert!(err.to_string().contains("uncompressed"), "{err}");
    }

    #[test]
    fn truncated_streams_say_so() {
        let d = data();
        for (name, blob, c) in [
            ("gzip", gzip(&d), Compression::Gzip),
            ("zstd", zstd(&d), Compression::Zstd),
        ] {
            for cut in [10, blob.len() / 2, blob.len() - 1] {
                let err = decode(blob[..cut].to_vec(), Some(c)).unwrap_err();
                let inner = err
                    .get_ref()
                    .and_then(|e| e.downcast_ref::<DecompressError>());
                assert!(
                    matches!(inner, Some(DecompressError::Truncated(n)) if *n == name),
                    "{name} cut at {cut}: {err:?}"
                );
            }
        }
    }
}
