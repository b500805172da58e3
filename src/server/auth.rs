//! Bearer tokens: who may read and who may write.

use std::fmt;

use http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The tokens a server accepts, kept as digests so that a comparison takes
/// the same time whatever the presented token's length and content.
#[derive(Clone, Default)]
pub struct Tokens {
    read: Option<[u8; 32]>,
    write: Option<[u8; 32]>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("read", &self.read.is_some())
            .field("write", &self.write.is_some())
            .finish()
    }
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    Read,
    Write,
}

/// Why a request was refused: the status and the reason sent back.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// No token, or a wrong one (401).
    Unauthorized(&'static str),
    /// The server takes no writes at all (403).
    NoWrites,
}

impl Tokens {
    /// With no read token, reads are open (chunks and manifests are
    /// ciphertext); with no write token, the server takes no writes.
    pub fn new(read: Option<&str>, write: Option<&str>) -> Tokens {
        let digest = |token: &str| Sha256::digest(token.as_bytes()).into();
        Tokens {
            read: read.map(digest),
            write: write.map(digest),
        }
    }

    /// Whether the request's `Authorization: Bearer` token grants `access`.
    /// The write token grants reads too.
    pub(super) fn check(&self, headers: &HeaderMap, access: Access) -> Result<(), Refusal> {
        let wanted = match access {
            Access::Read if self.read.is_none() => return Ok(()),
            Access::Read => [self.read, self.write],
            Access::Write if self.write.is_none() => return Err(Refusal::NoWrites),
            Access::Write => [self.write, None],
        };
        let Some(presented) = bearer(headers) else {
            return Err(Refusal::Unauthorized("this needs a bearer token"));
        };
        let presented: [u8; 32] = Sha256::digest(presented).into();
        let mut matched = subtle::Choice::from(0);
        for token in wanted.iter().flatten() {
            matched |= token.ct_eq(&presented);
        }
        if bool::from(matched) {
            Ok(())
        } else {
            Err(Refusal::Unauthorized(match access {
                Access::Read => "the token does not grant reads",
                Access::Write => "the token does not grant writes",
            }))
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then_some(token)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(token: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(token) = token {
            headers.insert(
                header::AUTHORIZATION,
                format!("Bearer {token}").parse().unwrap(),
            );
        }
        headers
    }

    #[test]
    fn open_reads_and_no_writes_without_tokens() {
        let tokens = Tokens::default();
        assert_eq!(tokens.check(&with(None), Access::Read), Ok(()));
        assert_eq!(
            tokens.check(&with(Some("x")), Access::Write),
            Err(Refusal::NoWrites)
        );
    }

    #[test]
    fn the_write_token_writes_and_reads_the_read_token_only_reads() {
        let tokens = Tokens::new(Some("r"), Some("w"));
        assert_eq!(tokens.check(&with(Some("w")), Access::Write), Ok(()));
        assert_eq!(tokens.check(&with(Some("w")), Access::Read), Ok(()));
        assert_eq!(tokens.check(&with(Some("r")), Access::Read), Ok(()));
        assert!(tokens.check(&with(Some("r")), Access::Write).is_err());
        assert!(tokens.check(&with(None), Access::Read).is_err());
        assert!(tokens.check(&with(Some("wrong")), Access::Read).is_err());
        let mut basic = HeaderMap::new();
        basic.insert(header::AUTHORIZATION, "Basic dzp3".parse().unwrap());
        assert!(tokens.check(&basic, Access::Read).is_err());
        let mut lower = HeaderMap::new();
        lower.insert(header::AUTHORIZATION, "bearer r".parse().unwrap());
        assert_eq!(tokens.check(&lower, Access::Read), Ok(()));
    }

    #[test]
    fn prefixes_extensions_and_near_misses_of_a_token_are_refused() {
        // Compared as digests: a prefix matches nothing, so a guesser learns
        // nothing from how much of a token was right, whatever the timing.
        let tokens = Tokens::new(None, Some("write-secret"));
        for near in [
            "w",
            "write-secre",
            "write-secret ",
            "write-secretX",
            "Write-secret",
        ] {
            assert!(
                tokens.check(&with(Some(near)), Access::Write).is_err(),
                "{near:?}"
            );
        }
        assert_eq!(
            tokens.check(&with(Some("write-secret")), Access::Write),
            Ok(())
        );
        // Nothing of the token is kept but its digest, nor shown.
        let shown = format!("{tokens:?}");
        assert!(!shown.contains("write-secret"), "{shown}");
    }
}
