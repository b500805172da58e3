//! The server over TLS: ALPN picks HTTP/2 or HTTP/1.1, a client trusting
//! the server's private CA gets through, one that does not is refused for
//! the certificate, and a handshake that never finishes is cut off.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::tests::{dir_store, options, Running};
use crate::net::tls::{client_config_trusting, server_config};
use crate::net::{HttpClient, HttpError};

#[path = "../../tests/common/tls.rs"]
mod tls;
use tls::private_ca;

/// A server over TLS with a certificate from [`private_ca`] in `dir`;
/// returns it and the CA's PEM file.
async fn tls_server(dir: &tempfile::TempDir) -> (Running, std::path::PathBuf) {
    let [ca, cert, key] = private_ca(dir.path());
    let server = Running::start(
        dir_store(dir),
        "127.0.0.1:0".parse().unwrap(),
        super::ServerOptions {
            tls: Some(server_config(&cert, &key).unwrap()),
            ..options(None, None)
        },
    )
    .await;
    (server, ca)
}

async fn get_metrics(client: &HttpClient, url: &str) -> Result<crate::net::Response, HttpError> {
    let request = Request::builder()
        .method(Method::GET)
        .uri(format!("{url}/metrics"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    client.send(request, Duration::from_secs(10), 1 << 20).await
}

#[tokio::test]
async fn tls_serves_h2_through_alpn_to_a_client_trusting_its_ca_and_refuses_others() {
    let dir = crate::private::test_dir();
    let (server, ca) = tls_server(&dir).await;
    let url = format!("https://{}", server.addr);

    let trusting = HttpClient::with_tls(false, client_config_trusting(&ca).unwrap());
    let answer = get_metrics(&trusting, &url).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.version, http::Version::HTTP_2, "ALPN chose h2");

    // Public roots only: the private CA is unknown, and that is no
    // passing failure worth retrying.
    let error = get_metrics(&HttpClient::new(false), &url)
        .await
        .unwrap_err();
    let text = crate::error::chain(&error);
    assert!(!error.is_transient(), "{text}");
    assert!(text.contains("certificate"), "{text}");

    // Plain HTTP to the TLS port gets no answer.
    assert!(get_metrics(&trusting, &format!("http://{}", server.addr))
        .await
        .is_err());

    // Without ALPN, HTTP/1.1.
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(client_config_trusting(&ca).unwrap()));
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tls.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    server.stop().await;
}

#[tokio::test]
async fn a_handshake_that_never_finishes_is_cut_off() {
    let dir = crate::private::test_dir();
    let (server, _) = tls_server(&dir).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    // The first bytes of a ClientHello, then nothing.
    stream.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the server kept a stalled handshake open: {closed:?}"
    );
    server.stop().await;
}

#[test]
fn a_tls_key_others_may_read_and_files_without_pem_are_refused_by_name() {
    use std::os::unix::fs::PermissionsExt;
    let dir = crate::private::test_dir();
    let [ca, cert, key] = private_ca(dir.path());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = server_config(&cert, &key).unwrap_err().to_string();
    assert!(
        text.contains(&format!("chmod 600 {}", key.display())),
        "{text}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Certificate and key swapped.
    let text = server_config(&key, &key).unwrap_err().to_string();
    assert!(text.contains("holds no PEM certificate"), "{text}");
    let text = client_config_trusting(&key).unwrap_err().to_string();
    assert!(
        text.contains(&format!("TLS CA file {}", key.display())),
        "{text}"
    );
    client_config_trusting(&ca).unwrap();
}
