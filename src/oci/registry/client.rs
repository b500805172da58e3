//! HTTP for the distribution API: GETs with retries and back-off, bearer
//! tokens obtained from the realm a 401 names, and blob bodies that resume
//! with a `Range` request when a connection drops mid-stream.
//!
//! ureq is the client: the layer reader is synchronous and pulls bytes with
//! `std::io::Read`, which ureq's body reader is, with no runtime to bridge
//! (oci-client and hyper are async and would need one per pull, plus a
//! channel back to the reader thread).

use std::io::{self, Read};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use ureq::http::{Response, StatusCode};
use ureq::Body;

use crate::oci::source::{SourceError, SourceOptions};

/// How long one back-off may last.
const MAX_DELAY: Duration = Duration::from_secs(10);

pub struct Client {
    agent: ureq::Agent,
    /// `https://host:port` (or `http://` with plain HTTP).
    pub base: String,
    pub repository: String,
    credentials: Option<(String, String)>,
    /// The `Authorization` value that last worked (or was just obtained).
    authorization: Mutex<Option<String>>,
    retries: u32,
    retry_delay: Duration,
}

impl Client {
    pub fn new(base: String, repository: String, opts: &SourceOptions) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .https_only(!opts.plain_http)
            .timeout_connect(Some(opts.timeout))
            .timeout_recv_response(Some(opts.timeout))
            .timeout_per_read(Some(opts.timeout))
            .user_agent("lazyblk")
            .build()
            .into();
        Client {
            agent,
            base,
            repository,
            credentials: opts
                .credentials
                .as_ref()
                .map(|c| (c.username.clone(), c.password.clone())),
            authorization: Mutex::new(None),
            retries: opts.retries,
            retry_delay: opts.retry_delay,
        }
    }

    pub fn url(&self, kind: &str, reference: &str) -> String {
        format!("{}/v2/{}/{kind}/{reference}", self.base, self.repository)
    }

    fn backoff(&self, attempt: u32) {
        let delay = self.retry_delay.saturating_mul(1 << attempt.min(16));
        std::thread::sleep(delay.min(MAX_DELAY));
    }

    /// GETs `url`, authenticating on a 401 and retrying transient failures.
    /// Returns a 2xx response (206 when `range_from` is given and nonzero).
    pub fn get(
        &self,
        url: &str,
        accept: Option<&str>,
        range_from: u64,
    ) -> Result<Response<Body>, SourceError> {
        let mut attempt = 0;
        let mut authenticated = false;
        loop {
            let mut request = self.agent.get(url);
            if let Some(accept) = accept {
                request = request.header("Accept", accept);
            }
            if range_from > 0 {
                request = request.header("Range", format!("bytes={range_from}-"));
            }
            if let Some(value) = self
                .authorization
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
            {
                request = request.header("Authorization", value);
            }
            let response = match request.call() {
                Ok(response) => response,
                Err(e) if attempt < self.retries && transient_error(&e) => {
                    self.backoff(attempt);
                    attempt += 1;
                    continue;
                }
                Err(e) => {
                    return Err(SourceError::Http {
                        url: url.to_owned(),
                        source: Box::new(e),
                    })
                }
            };
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED {
                if authenticated {
                    return Err(SourceError::Unauthorized {
                        url: url.to_owned(),
                    });
                }
                let challenge = response
                    .headers()
                    .get("WWW-Authenticate")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let value = self.authenticate(url, &challenge)?;
                *self.authorization.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
                authenticated = true;
                continue;
            }
            let retryable = matches!(status.as_u16(), 408 | 429 | 500..=599);
            if retryable && attempt < self.retries {
                self.backoff(attempt);
                attempt += 1;
                continue;
            }
            if !status.is_success() {
                let mut body = String::new();
                let _ = response
                    .into_body()
                    .into_reader()
                    .take(1024)
                    .read_to_string(&mut body);
                return Err(SourceError::HttpStatus {
                    url: url.to_owned(),
                    status: status.as_u16(),
                    body: body.trim().to_owned(),
                });
            }
            if range_from > 0 && status != StatusCode::PARTIAL_CONTENT {
                return Err(SourceError::HttpStatus {
                    url: url.to_owned(),
                    status: status.as_u16(),
                    body: format!("a request for bytes {range_from}- was answered without a range"),
                });
            }
            return Ok(response);
        }
    }

    /// The `Authorization` value a 401's challenge asks for.
    fn authenticate(&self, url: &str, challenge: &str) -> Result<String, SourceError> {
        let no_endpoint = || SourceError::NoTokenEndpoint {
            url: url.to_owned(),
            challenge: challenge.to_owned(),
        };
        let (scheme, params) = parse_challenge(challenge).ok_or_else(no_endpoint)?;
        let basic = self.credentials.as_ref().map(|(user, password)| {
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            format!("Basic {encoded}")
        });
        if scheme.eq_ignore_ascii_case("basic") {
            return basic.ok_or_else(no_endpoint);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(no_endpoint());
        }
        let realm = params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("realm"))
            .map(|(_, v)| v.clone())
            .filter(|r| !r.is_empty())
            .ok_or_else(no_endpoint)?;
        let param = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let scope =
            param("scope").unwrap_or_else(|| format!("repository:{}:pull", self.repository));
        let token_error = |problem: String| SourceError::Token {
            url: realm.clone(),
            problem,
        };
        let mut request = self.agent.get(&realm).query("scope", &scope);
        if let Some(service) = param("service") {
            request = request.query("service", &service);
        }
        if let Some(basic) = &basic {
            request = request.header("Authorization", basic);
        }
        let response = request.call().map_err(|e| token_error(e.to_string()))?;
        if !response.status().is_success() {
            return Err(token_error(format!("HTTP {}", response.status().as_u16())));
        }
        let body = response
            .into_body()
            .with_config()
            .limit(1 << 20)
            .read_to_vec()
            .map_err(|e| token_error(e.to_string()))?;
        let token = token_from_answer(&body).map_err(token_error)?;
        Ok(format!("Bearer {token}"))
    }
}

/// The bearer token in a token endpoint's JSON answer (`token`, or OAuth's
/// `access_token`), which must be non-empty visible ASCII: it goes back in
/// a header.
pub fn token_from_answer(body: &[u8]) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        token: Option<String>,
        access_token: Option<String>,
    }
    let parsed: TokenResponse =
        serde_json::from_slice(body).map_err(|e| format!("bad JSON: {e}"))?;
    let token = parsed
        .token
        .filter(|t| !t.is_empty())
        .or(parsed.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| "the answer holds no token".to_owned())?;
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token is not visible ASCII".into());
    }
    Ok(token)
}

fn transient_error(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Io(_) | ureq::Error::Timeout(_) | ureq::Error::ConnectionFailed
    )
}

/// `Scheme k="v", k2=v2` → (scheme, pairs). Quoted values may hold commas
/// and backslash escapes.
pub fn parse_challenge(header: &str) -> Option<(String, Vec<(String, String)>)> {
    let header = header.trim();
    // Any whitespace ends the scheme (not only a space), so a scheme never
    // carries whitespace that a second parse of the same header would trim.
    let (scheme, rest) = header
        .split_once(char::is_whitespace)
        .unwrap_or((header, ""));
    if scheme.is_empty() {
        return None;
    }
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.trim().is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = chars.by_ref().take_while(|c| *c != ',').collect();
        }
        params.push((key.trim().to_owned(), value.trim().to_owned()));
    }
    Some((scheme.to_owned(), params))
}

/// A blob's body that picks up where it broke off: a transient error
/// mid-stream re-requests the rest with `Range` (the digest check above it
/// sees one continuous stream).
pub struct BlobBody {
    client: Arc<Client>,
    url: String,
    offset: u64,
    body: Option<ureq::BodyReader<'static>>,
    resumes_left: u32,
}

impl BlobBody {
    pub fn open(client: Arc<Client>, url: String) -> Result<Self, SourceError> {
        let body = client.get(&url, None, 0)?.into_body().into_reader();
        Ok(BlobBody {
            url,
            offset: 0,
            body: Some(body),
            resumes_left: client.retries,
            client,
        })
    }
}

impl Read for BlobBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let body = match &mut self.body {
                Some(body) => body,
                None => {
                    let response = self
                        .client
                        .get(&self.url, None, self.offset)
                        .map_err(io::Error::other)?;
                    self.body.insert(response.into_body().into_reader())
                }
            };
            match body.read(buf) {
                Ok(n) => {
                    self.offset += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if self.resumes_left > 0 => {
                    tracing::warn!(url = %self.url, offset = self.offset, error = %e, "blob download broke off; resuming");
                    self.resumes_left -= 1;
                    self.body = None;
                    self.client.backoff(0);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let (scheme, params) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(scheme, "Bearer");
        assert_eq!(
            params,
            vec![
                ("realm".into(), "https://auth.example/token".into()),
                ("service".into(), "registry.example".into()),
                ("scope".into(), "repository:a/b:pull,push".into()),
            ]
        );
        let (scheme, params) = parse_challenge("Basic realm=x").unwrap();
        assert_eq!(
            (scheme.as_str(), params),
            ("Basic", vec![("realm".into(), "x".into())])
        );
        assert!(parse_challenge("").is_none());
        // A form feed ends the scheme as a space does (found by fuzzing).
        assert_eq!(
            parse_challenge("Bearer\u{c} ,").unwrap(),
            ("Bearer".into(), vec![])
        );
    }

    #[test]
    fn token_answers_give_a_header_safe_token() {
        assert_eq!(token_from_answer(br#"{"token":"abc"}"#).unwrap(), "abc");
        let oauth = br#"{"token":"","access_token":"xyz"}"#;
        assert_eq!(token_from_answer(oauth).unwrap(), "xyz");
        assert!(token_from_answer(br#"{}"#).is_err());
        assert!(token_from_answer(br#"{"token":"a\r\nX-Evil: 1"}"#).is_err());
        assert!(token_from_answer(b"not json").is_err());
    }
}
