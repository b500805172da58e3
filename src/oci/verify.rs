//! Content addresses and their checking while bytes stream past.
//!
//! Every blob a source hands out (layers, and the manifests and configs it
//! reads whole) is named by a sha256 [`Digest`] and a size. A
//! [`VerifiedReader`] hashes the bytes as they pass and holds back the read
//! that completes the blob until it has confirmed the end of the stream and
//! the digest, so a reader never receives the last bytes of a blob that
//! does not match; the mismatch arrives as an `io::Error` wrapping a
//! [`BlobError`] instead.

use std::fmt;
use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

/// A `sha256:` content address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; 32]);

/// Why a string is not a digest this reader can check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest {0:?} uses an algorithm other than sha256")]
    Algorithm(String),
    #[error("digest {0:?} is not `sha256:` followed by 64 lowercase hex digits")]
    Malformed(String),
}

impl Digest {
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    pub fn parse(text: &str) -> Result<Digest, DigestError> {
        let Some((algorithm, hex_part)) = text.split_once(':') else {
            return Err(DigestError::Malformed(text.to_owned()));
        };
        if algorithm != "sha256" {
            return Err(DigestError::Algorithm(text.to_owned()));
        }
        Digest::from_hex(hex_part).ok_or_else(|| DigestError::Malformed(text.to_owned()))
    }

    /// 64 lowercase hex digits, as blob file names spell a digest.
    pub fn from_hex(hex_part: &str) -> Option<Digest> {
        if hex_part.len() != 64 || hex_part.bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes).ok()?;
        Some(Digest(bytes))
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// A blob whose bytes are not the ones its descriptor names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    #[error("blob {expected} hashes to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("blob {digest} ends after {got} bytes, {expected} expected")]
    Truncated {
        digest: Digest,
        got: u64,
        expected: u64,
    },
    #[error("blob {digest} is longer than the {expected} bytes expected")]
    TooLong { digest: Digest, expected: u64 },
}

impl BlobError {
    fn into_io(self) -> io::Error {
        let kind = match self {
            BlobError::Truncated { .. } => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }
}

/// Checks a blob against its digest and size while it is read.
pub struct VerifiedReader<R> {
    inner: R,
    digest: Digest,
    size: u64,
    read: u64,
    hasher: Sha256,
    state: State,
}

#[derive(Debug)]
enum State {
    Reading,
    Verified,
    Failed(BlobError),
}

impl<R: Read> VerifiedReader<R> {
    pub fn new(inner: R, digest: Digest, size: u64) -> Self {
        VerifiedReader {
            inner,
            digest,
            size,
            read: 0,
            hasher: Sha256::new(),
            state: State::Reading,
        }
    }

    fn fail(&mut self, error: BlobError) -> io::Error {
        self.state = State::Failed(error.clone());
        error.into_io()
    }

    /// Confirms the stream ends here and the digest holds.
    fn finish(&mut self) -> Result<(), io::Error> {
        let mut probe = [0u8; 1];
        loop {
            match self.inner.read(&mut probe) {
                Ok(0) => break,
                Ok(_) => {
                    return Err(self.fail(BlobError::TooLong {
                        digest: self.digest,
                        expected: self.size,
                    }))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let actual = Digest(std::mem::take(&mut self.hasher).finalize().into());
        if actual != self.digest {
            return Err(self.fail(BlobError::DigestMismatch {
                expected: self.digest,
                actual,
            }));
        }
        self.state = State::Verified;
        Ok(())
    }
}

impl<R: Read> Read for VerifiedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.state {
            State::Verified => return Ok(0),
            State::Failed(e) => return Err(e.clone().into_io()),
            State::Reading => {}
        }
        if buf.is_empty() {
            return Ok(0);
        }
        if self.read == self.size {
            // An empty blob: nothing to hand out, only the check.
            self.finish()?;
            return Ok(0);
        }
        // Never past the declared size, so an overlong blob cannot slip
        // extra bytes through before it is caught.
        let want = buf
            .len()
            .min((self.size - self.read).min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(self.fail(BlobError::Truncated {
                digest: self.digest,
                got: self.read,
                expected: self.size,
            }));
        }
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        if self.read == self.size {
            self.finish()?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(r: impl Read) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut r = r;
        r.read_to_end(&mut out).map(|_| out)
    }

    #[test]
    fn digest_parses_and_prints() {
        let d = Digest::of(b"abc");
        assert_eq!(Digest::parse(&d.to_string()), Ok(d));
        assert!(matches!(
            Digest::parse("sha512:00"),
            Err(DigestError::Algorithm(_))
        ));
        assert!(Digest::parse("sha256:xyz").is_err());
        assert!(Digest::parse(&d.to_string().to_uppercase().replace("SHA", "sha")).is_err());
    }

    #[test]
    fn good_blob_passes_whole() {
        let data = vec![7u8; 100_000];
        let got = read_all(VerifiedReader::new(&data[..], Digest::of(&data), 100_000)).unwrap();
        assert_eq!(got, data);
        let empty = read_all(VerifiedReader::new(&b""[..], Digest::of(b""), 0)).unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn mismatch_withholds_the_last_bytes() {
        let data = b"hello world".to_vec();
        let mut r = VerifiedReader::new(&data[..], Digest::of(b"hello worle"), 11);
        let mut buf = [0u8; 64];
        let err = r.read(&mut buf).unwrap_err();
        let blob = err.get_ref().unwrap().downcast_ref::<BlobError>().unwrap();
        assert!(matches!(blob, BlobError::DigestMismatch { .. }), "{blob}");
        // Reading on repeats the failure, never hands out the bytes.
        assert!(r.read(&mut buf).is_err());
    }

    #[test]
    fn short_and_long_blobs_fail() {
        let data = b"0123456789";
        let err = read_all(VerifiedReader::new(&data[..], Digest::of(data), 11)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let err = read_all(VerifiedReader::new(&data[..], Digest::of(&data[..9]), 9)).unwrap_err();
        assert!(err.to_string().contains("longer"), "{err}");
    }
}
