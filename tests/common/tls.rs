//! A private certificate authority for TLS tests, shared by the crate's own
//! server tests and the command-line tests.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A private CA and a certificate it issued for 127.0.0.1 and localhost, as
/// PEM files in `dir`: (ca.pem, server.pem, server.key), the key readable by
/// its owner only, as every command requires of a secret.
pub fn private_ca(dir: &Path) -> [PathBuf; 3] {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "lazyblk test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let paths = ["ca.pem", "server.pem", "server.key"].map(|name| dir.join(name));
    fs::write(&paths[0], ca_cert.pem()).unwrap();
    fs::write(&paths[1], server_cert.pem()).unwrap();
    fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&paths[2])
        .and_then(|mut f| f.write_all(server_key.serialize_pem().as_bytes()))
        .unwrap();
    paths
}
