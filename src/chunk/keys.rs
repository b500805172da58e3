//! Tenant keys and the salt of convergent encryption.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// A tenant's 32-byte secret. It seals manifests and, unless an operator
/// shares a salt secret, derives the salt, so data deduplicates within the
/// tenant only.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct TenantKey(pub [u8; 32]);

impl std::fmt::Debug for TenantKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TenantKey(..)")
    }
}

/// The salt mixed into every chunk key: HMAC-SHA-256(secret, salt domain).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Salt(pub [u8; 32]);

/// Why a key file's contents were refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("a key file holds 64 hex digits (32 bytes) and a newline; this one holds {0} bytes of something else")]
    Malformed(usize),
}

impl TenantKey {
    /// Parses the text of a key file: 64 hex digits, optionally followed by a newline.
    pub fn parse(text: &[u8]) -> Result<TenantKey, KeyFileError> {
        let trimmed = text.strip_suffix(b"\n").unwrap_or(text);
        let mut key = [0u8; 32];
        if trimmed.len() != 64 || hex::decode_to_slice(trimmed, &mut key).is_err() {
            return Err(KeyFileError::Malformed(text.len()));
        }
        Ok(TenantKey(key))
    }

    /// The text of a key file for this key.
    pub fn to_file_text(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(hex::encode(self.0));
        text.push('\n');
        text
    }

    /// A subkey for one purpose. Labels contain a space, which a salt domain
    /// may not, so no subkey ever equals a salt.
    pub(crate) fn subkey(&self, label: &str) -> [u8; 32] {
        hmac_sha256(&self.0, label.as_bytes())
    }
}

pub(crate) fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Checks a salt domain name: 1 to 64 of `A-Z a-z 0-9 . _ -`.
pub fn validate_salt_domain(domain: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&domain.len())
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "salt domain {domain:?} must be 1 to 64 characters of A-Z a-z 0-9 . _ -"
        ))
    }
}

/// The salt for `domain` under `secret` (the tenant key, or an operator's
/// shared salt secret for cross-tenant deduplication).
pub fn derive_salt(secret: &[u8; 32], domain: &str) -> Salt {
    Salt(hmac_sha256(secret, domain.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trip() {
        let key = TenantKey([0xab; 32]);
        let parsed = TenantKey::parse(key.to_file_text().as_bytes()).unwrap();
        assert_eq!(parsed.0, key.0);
    }

    #[test]
    fn malformed_key_file_is_refused() {
        assert!(TenantKey::parse(b"abc\n").is_err());
        assert!(TenantKey::parse(&[b'g'; 64]).is_err());
    }

    #[test]
    fn salt_depends_on_secret_and_domain() {
        let a = derive_salt(&[1; 32], "default");
        let b = derive_salt(&[1; 32], "eu-2026-11");
        let c = derive_salt(&[2; 32], "default");
        assert_ne!(a.0, b.0);
        assert_ne!(a.0, c.0);
    }

    #[test]
    fn salt_domain_rules() {
        assert!(validate_salt_domain("default").is_ok());
        assert!(validate_salt_domain("eu-west.2026_11").is_ok());
        assert!(validate_salt_domain("").is_err());
        assert!(validate_salt_domain("has space").is_err());
        assert!(validate_salt_domain(&"x".repeat(65)).is_err());
    }
}
