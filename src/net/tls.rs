//! TLS settings for both ends: the chunk server's certificate and key
//! (`serve --tls-cert --tls-key`) and the private CA a client trusts
//! (`--tls-ca`), read from PEM files. rustls with the ring provider; TLS
//! 1.2 and 1.3; the server offers HTTP/2 and HTTP/1.1 through ALPN.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::private::{self, PrivacyError};

/// What the server offers through ALPN, preferred first.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// A TLS setting that could not be loaded, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("read {what} {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {} holds no PEM {wanted}", path.display())]
    Empty {
        what: &'static str,
        path: PathBuf,
        wanted: &'static str,
    },
    #[error("{what} {} is not valid PEM", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{what} {} is refused by TLS", path.display())]
    Refused {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS client CA file {} cannot verify clients", path.display())]
    ClientCa {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error(transparent)]
    Private(#[from] PrivacyError),
}

/// A TLS server's private key.
pub const TLS_KEY: private::Kind = private::Kind {
    what: "TLS key file",
    holds: "the server's private key",
};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's TLS settings: the certificate chain in `cert` (PEM, leaf
/// first) and its private key in `key` (PEM; refused if group or others
/// may read it, as tenant keys are).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_verifying_clients(cert, key, None)
}

/// [`server_config`], and with `client_ca`, every client must present a
/// certificate that chains to a CA certificate in that file (PEM).
pub fn server_config_verifying_clients(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_certificates(cert, "TLS certificate file")?;
    private::check(key, TLS_KEY)?;
    let key_pem = zeroize::Zeroizing::new(read(key, TLS_KEY.what)?);
    let private_key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            what: TLS_KEY.what,
            path: key.to_owned(),
            wanted: "private key",
        },
        source => TlsError::Pem {
            what: TLS_KEY.what,
            path: key.to_owned(),
            source,
        },
    })?;
    let refused = |source| TlsError::Refused {
        what: "TLS certificate and key",
        path: cert.to_owned(),
        source,
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(refused)?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(client_verifier(ca)?),
    };
    let mut config = builder
        .with_single_cert(chain, private_key)
        .map_err(refused)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// A client's TLS settings trusting the CA certificates in `ca` (PEM), and
/// only those: a private CA or a self-signed server certificate.
pub fn client_config_trusting(ca: &Path) -> Result<ClientConfig, TlsError> {
    const WHAT: &str = "TLS CA file";
    let roots = roots_from(ca, WHAT)?;
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Refused {
            what: WHAT,
            path: ca.to_owned(),
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The CA certificates in `ca` (PEM, the `what` of errors), as trust roots.
fn roots_from(ca: &Path, what: &'static str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certificates(ca, what)? {
        roots.add(cert).map_err(|source| TlsError::Refused {
            what,
            path: ca.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

/// Accepts clients whose certificate chains to a CA in `ca`, and no other.
fn client_verifier(
    ca: &Path,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    const WHAT: &str = "TLS client CA file";
    let roots = roots_from(ca, WHAT)?;
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|source| TlsError::ClientCa {
            path: ca.to_owned(),
            source,
        })
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn read_certificates(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
            wanted: "certificate",
        });
    }
    Ok(certs)
}
