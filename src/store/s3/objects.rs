//! The S3 requests the store is made of, on one bucket: each signed by
//! rusty-s3, sent through the shared HTTP client and retried on the shared
//! schedule while it fails transiently.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::Method;
use rusty_s3::actions::{DeleteObject, GetObject, HeadObject, ListObjectsV2, PutObject, S3Action};

use super::config::S3Config;
use super::wire::{self, check, redact, S3Error, Signed};
use crate::net::{HttpClient, Response};
use crate::retry::{GaveUp, RetryPolicy};

/// How long a signed URL stays valid: longer than any one request may take.
const SIGNATURE_LIFETIME: Duration = Duration::from_secs(300);

/// How long one request may take, and how long one operation may take with
/// its retries.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timing {
    request_timeout: Duration,
    retry: RetryPolicy,
}

/// Chunk reads, checks, deletes and listing pages: small answers, with a
/// deadline below the engine's fetch deadline so a slow origin fails a
/// chunk over to the next tier rather than holding a guest's I/O.
pub(super) const QUICK: Timing = Timing {
    request_timeout: Duration::from_secs(5),
    retry: RetryPolicy {
        deadline: Duration::from_secs(8),
        max_attempts: 5,
        first_backoff: Duration::from_millis(50),
    },
};
/// Uploads, and manifests (up to 256 MiB), which move the most bytes.
pub(super) const BULK: Timing = Timing {
    request_timeout: Duration::from_secs(60),
    retry: RetryPolicy {
        deadline: Duration::from_secs(180),
        max_attempts: 6,
        first_backoff: Duration::from_millis(100),
    },
};
/// An XML answer (a listing page of 1000 keys, a copy's result, an error)
/// is well under this.
const MAX_ANSWER: usize = 16 << 20;

/// One bucket (and the credentials to use it) behind the shared client.
#[derive(Debug)]
pub(super) struct Objects {
    pub config: S3Config,
    pub client: HttpClient,
}

/// One object found by a listing, its key relative to the listed prefix.
#[derive(Debug)]
pub(super) struct Listed {
    pub name: String,
    pub modified: SystemTime,
    pub size: u64,
}

impl Objects {
    /// Sends the request `sign` makes (signed afresh for every attempt),
    /// retrying transient failures, and returns the successful answer.
    async fn send(
        &self,
        timing: Timing,
        max_body: usize,
        sign: impl Fn() -> Signed,
    ) -> Result<Response, S3Error> {
        let attempt = || async {
            let signed = sign();
            let (method, shown) = (signed.method.clone(), signed.shown_url());
            let request = signed.into_request()?;
            let response = self
                .client
                .send(request, timing.request_timeout, max_body)
                .await
                .map_err(|error| redact(error, &shown))?;
            check(response, &method, shown, self.config.bucket.name())
        };
        let retried = |error: &S3Error, attempt: u32| {
            tracing::debug!(bucket = %self.config.bucket.name(), attempt, error = %error, "transient S3 failure, retrying");
        };
        match timing
            .retry
            .run(attempt, S3Error::is_transient, retried)
            .await
        {
            Ok(response) => Ok(response),
            Err(GaveUp::Failed { error, .. }) => Err(error),
            Err(GaveUp::TimedOut { .. }) => {
                let probe = sign();
                Err(S3Error::Deadline {
                    method: probe.method.clone(),
                    url: probe.shown_url(),
                    after: timing.retry.deadline,
                })
            }
        }
    }

    /// A signed request for `action` with `headers` (signed too) and `body`.
    fn signed<'a>(
        &'a self,
        mut action: impl S3Action<'a>,
        method: Method,
        headers: Vec<(&'static str, String)>,
        body: Bytes,
    ) -> Signed {
        for (name, value) in &headers {
            action.headers_mut().insert(*name, value.clone());
        }
        Signed {
            method,
            url: action.sign(SIGNATURE_LIFETIME),
            headers,
            body,
        }
    }

    fn credentials(&self) -> Option<&rusty_s3::Credentials> {
        Some(&self.config.credentials)
    }

    pub async fn get_object(
        &self,
        key: &str,
        timing: Timing,
        max_body: usize,
    ) -> Result<Option<Bytes>, S3Error> {
        let bucket = &self.config.bucket;
        let sign = || {
            let action = GetObject::new(bucket, self.credentials(), key);
            self.signed(action, Method::GET, Vec::new(), Bytes::new())
        };
        match self.send(timing, max_body, sign).await {
            Ok(response) => Ok(Some(response.body)),
            Err(error) if error.is_no_such_key() => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Uploads `body`, which the server checks against `sha256`.
    pub async fn put_object(
        &self,
        key: &str,
        body: Bytes,
        sha256: [u8; 32],
    ) -> Result<(), S3Error> {
        let checksum = base64::engine::general_purpose::STANDARD.encode(sha256);
        let sign = || {
            let action = PutObject::new(&self.config.bucket, self.credentials(), key);
            let headers = vec![("x-amz-checksum-sha256", checksum.clone())];
            self.signed(action, Method::PUT, headers, body.clone())
        };
        self.send(BULK, MAX_ANSWER, sign).await.map(drop)
    }

    /// Rewrites an object onto itself, server side, which refreshes its
    /// modification time; `false` if it does not exist.
    pub async fn refresh_object(&self, key: &str) -> Result<bool, S3Error> {
        // Bucket names and keys (hex ids, manifest names, checked prefixes)
        // hold nothing that needs escaping.
        let source = format!("/{}/{key}", self.config.bucket.name());
        let sign = || {
            let action = PutObject::new(&self.config.bucket, self.credentials(), key);
            let headers = vec![
                ("x-amz-copy-source", source.clone()),
                // S3 refuses to copy an object onto itself unchanged.
                ("x-amz-metadata-directive", "REPLACE".to_owned()),
            ];
            self.signed(action, Method::PUT, headers, Bytes::new())
        };
        match self.send(QUICK, MAX_ANSWER, sign).await {
            Ok(_) => Ok(true),
            Err(error) if error.is_no_such_key() => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// The object's modification time, or `None` if it does not exist.
    pub async fn head_object(&self, key: &str) -> Result<Option<SystemTime>, S3Error> {
        let sign = || {
            let action = HeadObject::new(&self.config.bucket, self.credentials(), key);
            self.signed(action, Method::HEAD, Vec::new(), Bytes::new())
        };
        match self.send(QUICK, MAX_ANSWER, sign).await {
            // No time given makes the object look new, so it is kept.
            Ok(response) => Ok(Some(
                response
                    .headers
                    .get(http::header::LAST_MODIFIED)
                    .and_then(|value| value.to_str().ok())
                    .and_then(wire::parse_http_date)
                    .unwrap_or_else(SystemTime::now),
            )),
            Err(error) if error.is_no_such_key() => Ok(None),
            Err(error) => Err(error),
        }
    }

    pub async fn delete_object(&self, key: &str) -> Result<(), S3Error> {
        let sign = || {
            let action = DeleteObject::new(&self.config.bucket, self.credentials(), key);
            self.signed(action, Method::DELETE, Vec::new(), Bytes::new())
        };
        match self.send(QUICK, MAX_ANSWER, sign).await {
            Err(error) if error.is_no_such_key() => Ok(()),
            result => result.map(drop),
        }
    }

    /// Every object whose key starts with `prefix`, one ListObjectsV2 page
    /// after another, named without the prefix.
    pub async fn list_objects(&self, prefix: &str) -> Result<Vec<Listed>, S3Error> {
        let mut listed = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let sign = || {
                let mut action = ListObjectsV2::new(&self.config.bucket, self.credentials());
                action.with_prefix(prefix);
                action.with_max_keys(1000);
                if let Some(token) = &token {
                    action.with_continuation_token(token.as_str());
                }
                self.signed(action, Method::GET, Vec::new(), Bytes::new())
            };
            let response = self.send(QUICK, MAX_ANSWER, sign).await?;
            let page = std::str::from_utf8(&response.body)
                .ok()
                .and_then(|text| ListObjectsV2::parse_response(text).ok())
                .ok_or_else(|| {
                    let probe = sign();
                    S3Error::Status {
                        method: Method::GET,
                        url: probe.shown_url(),
                        status: response.status,
                        code: "MalformedListing".into(),
                        message: "the listing is not a ListBucketResult document".into(),
                    }
                })?;
            listed.extend(page.contents.into_iter().filter_map(|object| {
                Some(Listed {
                    name: object.key.strip_prefix(prefix)?.to_owned(),
                    // A server that gives no time makes the object look new,
                    // so garbage collection keeps it.
                    modified: object
                        .last_modified
                        .as_deref()
                        .and_then(wire::parse_iso_time)
                        .unwrap_or_else(SystemTime::now),
                    size: object.size.unwrap_or(0),
                })
            }));
            match page.next_continuation_token {
                // A server that hands back the token it was given would
                // have us ask for the same page forever.
                Some(next) if token.as_ref() != Some(&next) => token = Some(next),
                Some(_) => {
                    return Err(S3Error::Status {
                        method: Method::GET,
                        url: sign().shown_url(),
                        status: response.status,
                        code: "MalformedListing".into(),
                        message: "the listing does not advance: the same continuation token again"
                            .into(),
                    })
                }
                None => return Ok(listed),
            }
        }
    }
}
