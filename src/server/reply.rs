//! Building answers, reading bounded bodies, and the Range header.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::outgoing::Outgoing;
use crate::error::ErrorKind;
use crate::store::StoreError;

pub(super) type Reply = Response<Outgoing>;
/// A request's body, from a connection or handed in directly (see
/// [`super::Handler`]).
pub(super) type RequestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>;
/// A handler's outcome: both sides are answers, the error side a refusal.
pub(super) type Handled = Result<Reply, Reply>;

pub(super) fn reply(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Outgoing::new(body.into()));
    *response.status_mut() = status;
    response
}

pub(super) fn json(value: &impl serde::Serialize) -> Reply {
    let mut response = reply(
        StatusCode::OK,
        serde_json::to_vec(value).expect("answers serialize"),
    );
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A refusal with a one-line reason, as plain text.
pub(super) fn refuse(status: StatusCode, reason: impl std::fmt::Display) -> Reply {
    let mut response = reply(status, format!("{reason}\n"));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The answer to a failed store operation. The store's own error stays in
/// the server's log: a client learns the kind, not the server's paths.
pub(super) fn store_failure(error: StoreError) -> Reply {
    let (status, reason) = match error.kind() {
        ErrorKind::NotFound => (StatusCode::NOT_FOUND, "not found"),
        ErrorKind::Transient => (StatusCode::SERVICE_UNAVAILABLE, "the store is unavailable"),
        ErrorKind::Invalid => (StatusCode::BAD_REQUEST, "invalid request"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "the store failed"),
    };
    if status.is_server_error() {
        tracing::warn!(error = %crate::error::chain(&error), "store operation failed");
    }
    if let StoreError::InvalidName { reason, .. } = &error {
        return refuse(status, format!("invalid name: {reason}"));
    }
    refuse(status, reason)
}

/// The request body, refused with 413 past `limit` bytes and with 408 if it
/// does not arrive whole within `timeout`.
pub(super) async fn read_body(
    body: RequestBody,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, Reply> {
    let too_large = || {
        refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {limit} bytes"),
        )
    };
    match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.is::<LengthLimitError>() => Err(too_large()),
        Ok(Err(_)) => Err(refuse(StatusCode::BAD_REQUEST, "the body broke off")),
        Err(_) => Err(refuse(
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not arrive within {timeout:?}"),
        )),
    }
}

/// Refuses a request whose declared length is over `limit` before reading
/// any of its body; the declared length, if any.
pub(super) fn check_length(headers: &http::HeaderMap, limit: usize) -> Result<Option<u64>, Reply> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > limit as u64 => Err(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {limit} bytes"),
        )),
        declared => Ok(declared),
    }
}

/// What a Range header asks of an object `len` bytes long.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Wanted {
    /// The whole object: no Range, or one this server ignores (several
    /// ranges, another unit, bad syntax), as RFC 9110 allows.
    Whole,
    /// Bytes `start..end`.
    Part { start: u64, end: u64 },
    /// No byte of the range exists (416).
    Unsatisfiable,
}

pub(super) fn wanted_range(value: Option<&HeaderValue>, len: u64) -> Wanted {
    let Some(spec) = value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return Wanted::Whole;
    };
    if spec.contains(',') {
        return Wanted::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Wanted::Whole;
    };
    let parse = |s: &str| s.trim().parse::<u64>().ok();
    let (start, end) = match (first.trim().is_empty(), last.trim().is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match parse(last) {
            Some(0) => return Wanted::Unsatisfiable,
            Some(n) => (len.saturating_sub(n), len),
            None => return Wanted::Whole,
        },
        // bytes=A-: from A to the end.
        (false, true) => match parse(first) {
            Some(a) => (a, len),
            None => return Wanted::Whole,
        },
        (false, false) => match (parse(first), parse(last)) {
            (Some(a), Some(b)) if a <= b => (a, b.saturating_add(1).min(len)),
            _ => return Wanted::Whole,
        },
        (true, true) => return Wanted::Whole,
    };
    if start >= len {
        Wanted::Unsatisfiable
    } else {
        Wanted::Part { start, end }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(spec: &str, len: u64) -> Wanted {
        wanted_range(Some(&HeaderValue::from_str(spec).unwrap()), len)
    }

    #[test]
    fn single_ranges_are_served_and_others_ignored() {
        assert_eq!(range("bytes=0-9", 100), Wanted::Part { start: 0, end: 10 });
        assert_eq!(
            range("bytes=90-200", 100),
            Wanted::Part {
                start: 90,
                end: 100
            }
        );
        assert_eq!(
            range("bytes=50-", 100),
            Wanted::Part {
                start: 50,
                end: 100
            }
        );
        assert_eq!(
            range("bytes=-10", 100),
            Wanted::Part {
                start: 90,
                end: 100
            }
        );
        assert_eq!(
            range("bytes=-500", 100),
            Wanted::Part { start: 0, end: 100 }
        );
        assert_eq!(range("bytes=100-", 100), Wanted::Unsatisfiable);
        assert_eq!(range("bytes=-0", 100), Wanted::Unsatisfiable);
        for ignored in [
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=5-1",
            "bytes=x-",
            "bytes=-",
            "bytes",
        ] {
            assert_eq!(range(ignored, 100), Wanted::Whole, "{ignored}");
        }
        assert_eq!(wanted_range(None, 100), Wanted::Whole);
    }
}
