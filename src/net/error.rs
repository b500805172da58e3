//! What went wrong with an HTTP exchange, and whether trying again may help.

use std::error::Error as StdError;
use std::io;
use std::time::Duration;

use http::{Method, StatusCode};

use crate::store::StoreError;

type BoxError = Box<dyn StdError + Send + Sync>;

/// A failed HTTP exchange; every message names the method and URL.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// No response: the connection could not be made or broke.
    #[error("{method} {url}: {}", if *.transient { "connection failed" } else { "request failed" })]
    Transport {
        method: Method,
        url: String,
        transient: bool,
        #[source]
        source: BoxError,
    },
    #[error("{method} {url}: no complete answer within {after:?}")]
    Timeout {
        method: Method,
        url: String,
        after: Duration,
    },
    #[error("{method} {url}: the response body is larger than {limit} bytes")]
    BodyTooLarge {
        method: Method,
        url: String,
        limit: usize,
    },
    #[error("{method} {url}: {status}{}", if .reason.is_empty() { String::new() } else { format!(": {}", .reason) })]
    Status {
        method: Method,
        url: String,
        status: StatusCode,
        reason: String,
    },
    #[error("{method} {url}: invalid request")]
    InvalidRequest {
        method: Method,
        url: String,
        #[source]
        source: http::Error,
    },
}

/// Statuses that say "not now" rather than "never": the server timed out
/// on us, is throttling, or it (or a gateway before it) is failing for a
/// while.
pub fn is_transient_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

impl HttpError {
    /// Whether the same request may succeed if sent again after a pause.
    pub fn is_transient(&self) -> bool {
        match self {
            HttpError::Transport { transient, .. } => *transient,
            HttpError::Timeout { .. } => true,
            HttpError::Status { status, .. } => is_transient_status(*status),
            HttpError::BodyTooLarge { .. } | HttpError::InvalidRequest { .. } => false,
        }
    }

    /// The status the server answered with, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            HttpError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// A failure to get any response. A connection that was refused, reset
    /// or cut short is transient, in TLS too; a certificate that does not
    /// verify, a handshake the two ends cannot agree on, or a response that
    /// is not HTTP will fail the same way again (see [`is_permanent_tls`]).
    pub(super) fn transport(
        method: Method,
        url: String,
        source: hyper_util::client::legacy::Error,
    ) -> HttpError {
        let transient = !chain_has_permanent_cause(&source);
        HttpError::Transport {
            method,
            url,
            transient,
            source: Box::new(source),
        }
    }

    /// A body that broke off while being read: the connection failed.
    pub(super) fn body(method: Method, url: String, source: BoxError) -> HttpError {
        let transient = !chain_has_permanent_cause(source.as_ref());
        HttpError::Transport {
            method,
            url,
            transient,
            source,
        }
    }

    /// The store error for this failure: [`StoreError::Unavailable`] when
    /// transient, else [`StoreError::Io`]. Absent objects are the caller's
    /// to recognise (it knows whether a chunk or a manifest was asked for).
    pub fn into_store_error(self, op: &'static str, store: &str, object: String) -> StoreError {
        let transient = self.is_transient();
        let kind = match &self {
            HttpError::Timeout { .. } => io::ErrorKind::TimedOut,
            _ => io::ErrorKind::Other,
        };
        StoreError::exchange(op, store, object, io::Error::new(kind, self), transient)
    }
}

fn chain_has_permanent_cause(error: &(dyn StdError + 'static)) -> bool {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(error) = cause {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return is_permanent_tls(tls);
        }
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            if hyper.is_parse() || hyper.is_user() {
                return true;
            }
        }
        if let Some(inner) = error
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
        {
            // An io::Error's source() is the source of the error it wraps,
            // skipping that error itself; and rustls's certificate error
            // arrives wrapped twice (tokio-rustls, then hyper-rustls).
            cause = Some(inner);
            continue;
        }
        cause = error.source();
    }
    false
}

/// Whether a TLS failure will happen again on the next try: the peer's
/// certificate does not verify, or the two ends' settings cannot agree.
/// What a broken or tampered link causes (a record that does not decrypt
/// or parse, an unexpected message, a peer's alert about such) may pass on
/// another connection, and is transient, as resets and timeouts are.
pub(crate) fn is_permanent_tls(error: &rustls::Error) -> bool {
    use rustls::AlertDescription as Alert;
    match error {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::InvalidCertRevocationList(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::UnsupportedNameType
        | rustls::Error::PeerIncompatible(_)
        | rustls::Error::NoApplicationProtocol
        | rustls::Error::InconsistentKeys(_)
        | rustls::Error::BadMaxFragmentSize
        | rustls::Error::InvalidEncryptedClientHello(_) => true,
        rustls::Error::AlertReceived(alert) => matches!(
            alert,
            Alert::HandshakeFailure
                | Alert::NoCertificate
                | Alert::BadCertificate
                | Alert::UnsupportedCertificate
                | Alert::CertificateRevoked
                | Alert::CertificateExpired
                | Alert::CertificateUnknown
                | Alert::UnknownCA
                | Alert::AccessDenied
                | Alert::ProtocolVersion
                | Alert::InsufficientSecurity
                | Alert::UnrecognisedName
                | Alert::BadCertificateStatusResponse
                | Alert::BadCertificateHashValue
                | Alert::CertificateRequired
                | Alert::NoApplicationProtocol
        ),
        _ => false,
    }
}

/// The start of an error response's body, on one line, for messages.
pub(super) fn reason_text(body: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn status(code: u16) -> HttpError {
        HttpError::Status {
            method: Method::GET,
            url: "http://127.0.0.1:1/v1/chunks/x".into(),
            status: StatusCode::from_u16(code).unwrap(),
            reason: "why".into(),
        }
    }

    #[test]
    fn busy_and_failing_servers_are_transient_refusals_are_not() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(status(code).is_transient(), "{code}");
        }
        for code in [400, 401, 403, 404, 405, 409, 413, 416, 501] {
            assert!(!status(code).is_transient(), "{code}");
        }
    }

    #[test]
    fn transient_errors_become_unavailable_store_errors() {
        let timeout = HttpError::Timeout {
            method: Method::GET,
            url: "u".into(),
            after: Duration::from_secs(1),
        };
        assert_eq!(
            timeout.into_store_error("get", "s", "o".into()).kind(),
            ErrorKind::Transient
        );
        assert_eq!(
            status(503).into_store_error("get", "s", "o".into()).kind(),
            ErrorKind::Transient
        );
        assert_eq!(
            status(403).into_store_error("get", "s", "o".into()).kind(),
            ErrorKind::Io
        );
        let too_large = HttpError::BodyTooLarge {
            method: Method::GET,
            url: "u".into(),
            limit: 1,
        };
        assert!(!too_large.is_transient());
    }

    #[test]
    fn status_messages_carry_the_servers_reason_on_one_line() {
        assert_eq!(reason_text(b"bad id:\n  not hex\n"), "bad id: not hex");
        let long = vec![b'x'; 1000];
        assert_eq!(reason_text(&long).len(), 200);
        assert!(status(404).to_string().ends_with("404 Not Found: why"));
    }

    /// A transport failure whose cause is `io`, as the client reports it.
    fn broke_with(io: io::Error) -> HttpError {
        HttpError::body(Method::GET, "https://127.0.0.1:1/".into(), Box::new(io))
    }

    /// How tokio-rustls and hyper-rustls hand a rustls error up: inside an
    /// io::Error, inside another.
    fn tls_failure(error: rustls::Error) -> HttpError {
        let inner = io::Error::new(io::ErrorKind::InvalidData, error);
        broke_with(io::Error::other(inner))
    }

    #[test]
    fn tls_verification_failures_are_permanent_broken_links_are_transient() {
        use rustls::{AlertDescription, CertificateError, PeerIncompatible};
        for permanent in [
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            rustls::Error::InvalidCertificate(CertificateError::Expired),
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
            rustls::Error::NoCertificatesPresented,
            rustls::Error::PeerIncompatible(PeerIncompatible::Tls12NotOffered),
            rustls::Error::AlertReceived(AlertDescription::UnknownCA),
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
            rustls::Error::AlertReceived(AlertDescription::HandshakeFailure),
        ] {
            let text = format!("{permanent:?}");
            let error = tls_failure(permanent);
            assert!(!error.is_transient(), "{text}");
            assert_eq!(
                error.into_store_error("get", "s", "o".into()).kind(),
                ErrorKind::Io,
                "{text}"
            );
        }
        for transient in [
            rustls::Error::DecryptError,
            rustls::Error::InvalidMessage(rustls::InvalidMessage::MessageTooShort),
            rustls::Error::PeerSentOversizedRecord,
            rustls::Error::AlertReceived(AlertDescription::BadRecordMac),
            rustls::Error::AlertReceived(AlertDescription::InternalError),
            rustls::Error::HandshakeNotComplete,
        ] {
            let text = format!("{transient:?}");
            let error = tls_failure(transient);
            assert!(error.is_transient(), "{text}");
            assert_eq!(
                error.into_store_error("get", "s", "o".into()).kind(),
                ErrorKind::Transient,
                "{text}"
            );
        }
        // The socket failing under TLS: reset, cut mid-record, timed out.
        for kind in [
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::UnexpectedEof,
            io::ErrorKind::TimedOut,
            io::ErrorKind::BrokenPipe,
        ] {
            let error = broke_with(io::Error::new(kind, "tls connection"));
            assert_eq!(
                error.into_store_error("get", "s", "o".into()).kind(),
                ErrorKind::Transient,
                "{kind:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_transient() {
        // A port that was free a moment ago: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = super::super::HttpClient::new(false);
        let request = http::Request::get(format!("http://127.0.0.1:{port}/"))
            .body(Default::default())
            .unwrap();
        let error = client
            .send(request, Duration::from_secs(5), 1024)
            .await
            .unwrap_err();
        assert!(error.is_transient(), "{error:?}");
    }
}
