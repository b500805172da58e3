//! One S3 exchange: a request signed by rusty-s3 (a presigned URL, so no
//! header needs computing per request beyond the ones signed), sent through
//! the shared HTTP client, and S3's answer read into a success or an
//! [`S3Error`] that says whether trying again may help.
//!
//! A presigned URL is a bearer credential until it expires, so no message
//! or log line ever shows one: errors carry the URL without its query.

use std::io;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use url::Url;

use super::config::CREDENTIAL_VARS;
use crate::net::{is_transient_status, HttpError, Response};
use crate::store::StoreError;

/// A request ready to send: its signed URL and the headers it was signed with.
#[derive(Debug)]
pub(super) struct Signed {
    pub method: Method,
    pub url: Url,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
}

impl Signed {
    /// The URL as messages show it: no query, so no signature.
    pub fn shown_url(&self) -> String {
        shown_url(&self.url)
    }

    pub fn into_request(self) -> Result<Request<Full<Bytes>>, S3Error> {
        let shown = self.shown_url();
        let mut builder = Request::builder()
            .method(self.method.clone())
            .uri(self.url.as_str());
        for (name, value) in &self.headers {
            builder = builder.header(*name, value);
        }
        builder
            .body(Full::new(self.body))
            .map_err(|source| S3Error::InvalidRequest {
                method: self.method,
                url: shown,
                source,
            })
    }
}

fn shown_url(url: &Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.to_string()
}

/// A failed S3 exchange; every message names the method and the URL
/// (without its signature).
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error(transparent)]
    Http(HttpError),
    /// The server refused who we are: wrong keys, a bad signature, an
    /// expired token, or no permission on the bucket.
    #[error(
        "{method} {url}: access to bucket {bucket:?} denied ({status} {code}: {message}); \
         check {CREDENTIAL_VARS} and the bucket's permissions"
    )]
    Denied {
        method: Method,
        url: String,
        bucket: String,
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("{method} {url}: {status} {code}: {message}")]
    Status {
        method: Method,
        url: String,
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("{method} {url}: no answer within {after:?}, retries included")]
    Deadline {
        method: Method,
        url: String,
        after: Duration,
    },
    #[error("{method} {url}: invalid request")]
    InvalidRequest {
        method: Method,
        url: String,
        #[source]
        source: http::Error,
    },
}

/// S3 error codes that say "not now": the server is throttling us or
/// failing for a while, or gave up waiting for our request.
const TRANSIENT_CODES: [&str; 4] = [
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
];

/// S3 error codes (besides any 403) that mean the credentials are wrong.
const DENIED_CODES: [&str; 6] = [
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationQueryParametersError",
];

impl S3Error {
    pub fn is_transient(&self) -> bool {
        match self {
            S3Error::Http(error) => error.is_transient(),
            S3Error::Status { status, code, .. } => {
                is_transient_status(*status) || TRANSIENT_CODES.contains(&code.as_str())
            }
            S3Error::Deadline { .. } => true,
            S3Error::Denied { .. } | S3Error::InvalidRequest { .. } => false,
        }
    }

    /// Whether the object asked for does not exist (as opposed to its bucket).
    pub fn is_no_such_key(&self) -> bool {
        match self {
            S3Error::Status { status, code, .. } => {
                *status == StatusCode::NOT_FOUND && code != "NoSuchBucket"
            }
            _ => false,
        }
    }

    pub fn into_store_error(self, op: &'static str, store: &str, object: String) -> StoreError {
        let transient = self.is_transient();
        let kind = match &self {
            S3Error::Denied { .. } => io::ErrorKind::PermissionDenied,
            S3Error::Deadline { .. } => io::ErrorKind::TimedOut,
            _ => io::ErrorKind::Other,
        };
        StoreError::exchange(op, store, object, io::Error::new(kind, self), transient)
    }
}

/// The shared client's error, with the URL it names stripped of its query.
pub(super) fn redact(mut error: HttpError, shown: &str) -> S3Error {
    match &mut error {
        HttpError::Transport { url, .. }
        | HttpError::Timeout { url, .. }
        | HttpError::BodyTooLarge { url, .. }
        | HttpError::Status { url, .. }
        | HttpError::InvalidRequest { url, .. } => *url = shown.to_owned(),
    }
    S3Error::Http(error)
}

/// The response if S3 reports success, else the error S3 describes in its
/// XML body (`<Code>`, `<Message>`). A copy can fail after its `200 OK` was
/// sent, with the error in the body, so a 200 carrying `<Error>` is one.
pub(super) fn check(
    response: Response,
    method: &Method,
    url: String,
    bucket: &str,
) -> Result<Response, S3Error> {
    let body_error = response.status == StatusCode::OK
        && *method == Method::PUT
        && find(&response.body, "<Error>").is_some();
    if response.status.is_success() && !body_error {
        return Ok(response);
    }
    let code = tag_text(&response.body, "Code").unwrap_or_else(|| {
        response
            .status
            .canonical_reason()
            .unwrap_or_default()
            .replace(' ', "")
    });
    let message = tag_text(&response.body, "Message").unwrap_or_default();
    let status = if body_error {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        response.status
    };
    // Refused with a 403 like bad credentials, but only the clock can fix it.
    if code == "RequestTimeTooSkewed" {
        return Err(S3Error::Status {
            method: method.clone(),
            url,
            status,
            code,
            message: format!("{message} (this host's clock is off: set it right)"),
        });
    }
    if status == StatusCode::FORBIDDEN || DENIED_CODES.contains(&code.as_str()) {
        return Err(S3Error::Denied {
            method: method.clone(),
            url,
            bucket: bucket.to_owned(),
            status,
            code,
            message,
        });
    }
    Err(S3Error::Status {
        method: method.clone(),
        url,
        status,
        code,
        message,
    })
}

fn find(haystack: &[u8], needle: &str) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle.as_bytes())
}

/// The text of the first `<tag>…</tag>` in an XML body, on one line and
/// cut to a readable length. S3's error bodies are flat, so this is all of
/// XML they need.
fn tag_text(body: &[u8], tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = find(body, &open)? + open.len();
    let end = start + find(&body[start..], &format!("</{tag}>"))?;
    let text = String::from_utf8_lossy(&body[start..end]);
    let mut text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.len() > 200 {
        let cut = (0..=200)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(cut);
    }
    Some(text)
}

/// An ISO 8601 time as ListObjectsV2 gives `LastModified`.
pub(super) fn parse_iso_time(text: &str) -> Option<SystemTime> {
    text.parse::<jiff::Timestamp>().ok().map(SystemTime::from)
}

/// An HTTP date as HEAD gives `Last-Modified`.
pub(super) fn parse_http_date(text: &str) -> Option<SystemTime> {
    jiff::fmt::rfc2822::DateTimeParser::new()
        .parse_timestamp(text)
        .ok()
        .map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn response(status: u16, body: &str) -> Response {
        Response {
            status: StatusCode::from_u16(status).unwrap(),
            version: http::Version::HTTP_11,
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_owned()),
        }
    }

    fn error(status: u16, body: &str) -> S3Error {
        check(
            response(status, body),
            &Method::GET,
            "http://h/b/k".into(),
            "b",
        )
        .unwrap_err()
    }

    const SLOW: &str = "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code>\
                        <Message>Please reduce\n  your request rate.</Message></Error>";

    #[test]
    fn s3_error_codes_decide_what_is_retried() {
        assert!(error(503, SLOW).is_transient());
        assert!(error(500, "").is_transient());
        assert!(error(400, "<Error><Code>RequestTimeout</Code></Error>").is_transient());
        assert!(!error(400, "<Error><Code>InvalidArgument</Code></Error>").is_transient());
        assert!(!error(409, "").is_transient());
        let message = error(503, SLOW).to_string();
        assert_eq!(
            message,
            "GET http://h/b/k: 503 Service Unavailable SlowDown: Please reduce your request rate."
        );
    }

    #[test]
    fn refusals_name_the_bucket_and_the_credential_variables() {
        for (status, body) in [
            (
                403,
                "<Error><Code>SignatureDoesNotMatch</Code><Message>no</Message></Error>",
            ),
            (403, ""),
            (400, "<Error><Code>ExpiredToken</Code></Error>"),
        ] {
            let denied = error(status, body);
            assert!(matches!(denied, S3Error::Denied { .. }), "{denied}");
            assert!(!denied.is_transient());
            let message = denied.to_string();
            assert!(message.contains("bucket \"b\""), "{message}");
            assert!(message.contains("AWS_SECRET_ACCESS_KEY"), "{message}");
        }
    }

    #[test]
    fn a_skewed_clock_is_named_and_not_retried() {
        let skewed = error(403, "<Error><Code>RequestTimeTooSkewed</Code></Error>");
        assert!(matches!(skewed, S3Error::Status { .. }), "{skewed}");
        assert!(!skewed.is_transient());
        assert!(skewed.to_string().contains("clock"), "{skewed}");
    }

    #[test]
    fn not_found_tells_keys_from_buckets() {
        assert!(error(404, "").is_no_such_key());
        assert!(error(404, "<Error><Code>NoSuchKey</Code></Error>").is_no_such_key());
        assert!(!error(404, "<Error><Code>NoSuchBucket</Code></Error>").is_no_such_key());
    }

    #[test]
    fn an_error_inside_a_200_copy_answer_is_an_error() {
        let body = "<?xml version=\"1.0\"?>\n<Error><Code>InternalError</Code></Error>";
        let put = check(response(200, body), &Method::PUT, "u".into(), "b").unwrap_err();
        assert!(put.is_transient());
        let ok = "<?xml version=\"1.0\"?><CopyObjectResult></CopyObjectResult>";
        assert!(check(response(200, ok), &Method::PUT, "u".into(), "b").is_ok());
    }

    #[test]
    fn shown_urls_carry_no_signature() {
        let url = Url::parse("http://h:1/b/k?X-Amz-Signature=secret&X-Amz-Credential=a").unwrap();
        assert_eq!(shown_url(&url), "http://h:1/b/k");
    }

    #[test]
    fn s3_times_parse() {
        let iso = parse_iso_time("2026-12-01T07:29:13.914Z").unwrap();
        let http = parse_http_date("Tue, 01 Dec 2026 07:29:13 GMT").unwrap();
        assert_eq!(
            iso.duration_since(http).unwrap(),
            Duration::from_millis(914)
        );
        assert!(parse_iso_time("yesterday").is_none());
        assert!(parse_http_date("").is_none());
    }
}
