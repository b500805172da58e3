//! Where an `s3://BUCKET/PREFIX` store lives and how to sign for it: the
//! store spec, the command line's S3 options and the standard AWS
//! environment variables, checked up front so that a mistake is reported
//! before any request is made.

use rusty_s3::{Bucket, Credentials, UrlStyle};
use url::Url;

use crate::store::StoreError;

/// The variables that hold credentials, named in every message about them.
pub(super) const CREDENTIAL_VARS: &str =
    "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials)";

/// The S3 settings the command line may give; the environment supplies the rest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// The S3 API endpoint (`--s3-endpoint`); else `AWS_ENDPOINT_URL_S3`,
    /// `AWS_ENDPOINT_URL`, or AWS's regional endpoint.
    pub endpoint: Option<String>,
    /// Address buckets as `ENDPOINT/BUCKET/KEY` instead of
    /// `BUCKET.ENDPOINT/KEY` (`--s3-path-style`). Implied for an endpoint
    /// that is an IP address or `localhost`, which has no subdomains.
    pub path_style: bool,
}

/// Everything needed to address and sign requests for one store.
#[derive(Debug)]
pub(super) struct S3Config {
    pub bucket: Bucket,
    pub credentials: Credentials,
    /// Prepended to every key: empty, or ending in `/`.
    pub prefix: String,
}

impl S3Config {
    /// Reads `spec` (`s3://BUCKET[/PREFIX]`), `options` and the environment
    /// through `env`, so tests need not touch the process's variables.
    pub fn new(
        spec: &str,
        options: &S3Options,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<S3Config, StoreError> {
        let invalid = |reason: String| StoreError::InvalidSpec {
            spec: spec.to_owned(),
            reason,
        };
        let rest = spec
            .strip_prefix("s3://")
            .ok_or_else(|| invalid("an S3 store is named s3://BUCKET[/PREFIX]".into()))?;
        let (bucket_name, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        validate_bucket_name(bucket_name).map_err(|reason| invalid(reason.into()))?;
        let prefix = normalize_prefix(prefix).map_err(invalid)?;

        let env = |name: &str| env(name).filter(|value| !value.is_empty());
        let region = env("AWS_REGION")
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".to_owned());
        let (endpoint_text, endpoint_source) = match &options.endpoint {
            Some(endpoint) => (endpoint.clone(), "--s3-endpoint"),
            None => match env("AWS_ENDPOINT_URL_S3") {
                Some(endpoint) => (endpoint, "AWS_ENDPOINT_URL_S3"),
                None => match env("AWS_ENDPOINT_URL") {
                    Some(endpoint) => (endpoint, "AWS_ENDPOINT_URL"),
                    None => (format!("https://s3.{region}.amazonaws.com"), "AWS_REGION"),
                },
            },
        };
        let endpoint = Url::parse(&endpoint_text)
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some())
            .ok_or_else(|| {
                invalid(format!(
                    "the S3 endpoint {endpoint_text:?} (from {endpoint_source}) is not an \
                     http:// or https:// URL"
                ))
            })?;
        let path_style = options.path_style || has_no_subdomains(&endpoint);
        let style = if path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(endpoint, style, bucket_name.to_owned(), region).map_err(|e| {
            invalid(format!(
                "bucket {bucket_name:?} at {endpoint_text}: {e:?}; \
                 try --s3-path-style"
            ))
        })?;

        let credentials = match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            (Some(key), Some(secret)) => match env("AWS_SESSION_TOKEN") {
                Some(token) => Credentials::new_with_token(key, secret, token),
                None => Credentials::new(key, secret),
            },
            (key, _) => {
                let unset = if key.is_none() {
                    "AWS_ACCESS_KEY_ID"
                } else {
                    "AWS_SECRET_ACCESS_KEY"
                };
                return Err(invalid(format!(
                    "no S3 credentials: {unset} is not set; set {CREDENTIAL_VARS}"
                )));
            }
        };
        Ok(S3Config {
            bucket,
            credentials,
            prefix,
        })
    }
}

/// S3's rules for bucket names that work in both URL styles: 3 to 63 of
/// `a-z 0-9 . -`, starting and ending with a letter or digit.
fn validate_bucket_name(name: &str) -> Result<(), &'static str> {
    let edge_ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if name.is_empty() {
        Err("no bucket name: an S3 store is named s3://BUCKET[/PREFIX]")
    } else if !(3..=63).contains(&name.len()) {
        Err("a bucket name is 3 to 63 characters long")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-'))
    {
        Err("a bucket name holds only a-z 0-9 . -")
    } else if !edge_ok(name.as_bytes().first()) || !edge_ok(name.as_bytes().last()) {
        Err("a bucket name starts and ends with a letter or digit")
    } else {
        Ok(())
    }
}

/// The key prefix as `a/b/` (or empty). Segments hold `A-Z a-z 0-9 . _ -`
/// and are never `.` or `..`, so a key means the same to every server,
/// including those (SeaweedFS) that map keys onto a directory tree.
fn normalize_prefix(prefix: &str) -> Result<String, String> {
    let mut normalized = String::new();
    for segment in prefix.split('/').filter(|s| !s.is_empty()) {
        let safe = segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !safe || segment == "." || segment == ".." {
            return Err(format!(
                "prefix segment {segment:?}: segments hold A-Z a-z 0-9 . _ - and are not . or .."
            ));
        }
        normalized.push_str(segment);
        normalized.push('/');
    }
    if normalized.len() > 512 {
        return Err("the prefix is longer than 512 characters".into());
    }
    Ok(normalized)
}

/// An endpoint whose host is an IP address or `localhost` cannot put the
/// bucket in a subdomain.
fn has_no_subdomains(endpoint: &Url) -> bool {
    match endpoint.host() {
        Some(url::Host::Domain(domain)) => domain == "localhost",
        Some(_) => true,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    const KEYS: [(&str, &str); 2] = [
        ("AWS_ACCESS_KEY_ID", "AKID"),
        ("AWS_SECRET_ACCESS_KEY", "SECRET"),
    ];

    fn error(spec: &str, options: &S3Options, vars: &[(&str, &str)]) -> String {
        let err = S3Config::new(spec, options, env(vars)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        err.to_string()
    }

    #[test]
    fn aws_defaults_use_virtual_hosts_in_the_region() {
        let mut vars = KEYS.to_vec();
        vars.push(("AWS_DEFAULT_REGION", "eu-west-3"));
        let config = S3Config::new("s3://images/a//b/", &S3Options::default(), env(&vars)).unwrap();
        assert_eq!(config.prefix, "a/b/");
        assert_eq!(config.bucket.region(), "eu-west-3");
        assert_eq!(
            config.bucket.object_url("k").as_str(),
            "https://images.s3.eu-west-3.amazonaws.com/k"
        );
        assert_eq!(config.credentials.token(), None);
    }

    #[test]
    fn the_option_beats_the_environment_and_ip_endpoints_are_path_style() {
        let mut vars = KEYS.to_vec();
        vars.extend([
            ("AWS_REGION", "r1"),
            ("AWS_DEFAULT_REGION", "r2"),
            ("AWS_ENDPOINT_URL", "http://env.example:9000"),
            ("AWS_SESSION_TOKEN", "TOKEN"),
        ]);
        let options = S3Options {
            endpoint: Some("http://127.0.0.1:8333".into()),
            path_style: false,
        };
        let config = S3Config::new("s3://images", &options, env(&vars)).unwrap();
        assert_eq!(config.prefix, "");
        assert_eq!(config.bucket.region(), "r1");
        assert_eq!(
            config.bucket.object_url("chunks/x").as_str(),
            "http://127.0.0.1:8333/images/chunks/x"
        );
        assert_eq!(config.credentials.token(), Some("TOKEN"));

        let from_env = S3Config::new("s3://images", &S3Options::default(), env(&vars)).unwrap();
        assert_eq!(
            from_env.bucket.object_url("k").as_str(),
            "http://images.env.example:9000/k"
        );
        let forced = S3Options {
            endpoint: None,
            path_style: true,
        };
        let path = S3Config::new("s3://images", &forced, env(&vars)).unwrap();
        assert_eq!(
            path.bucket.object_url("k").as_str(),
            "http://env.example:9000/images/k"
        );
    }

    #[test]
    fn missing_credentials_name_the_variables() {
        let message = error("s3://images", &S3Options::default(), &[]);
        assert!(
            message.contains("AWS_ACCESS_KEY_ID is not set"),
            "{message}"
        );
        assert!(message.contains("AWS_SECRET_ACCESS_KEY"), "{message}");
        let message = error(
            "s3://images",
            &S3Options::default(),
            &[("AWS_ACCESS_KEY_ID", "AKID"), ("AWS_SECRET_ACCESS_KEY", "")],
        );
        assert!(
            message.contains("AWS_SECRET_ACCESS_KEY is not set"),
            "{message}"
        );
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let none = S3Options::default();
        for (spec, needle) in [
            ("s3://", "no bucket name"),
            ("s3://ab", "3 to 63"),
            ("s3://Images", "a-z 0-9"),
            ("s3://-images", "starts and ends"),
            ("s3://images/../x", "not . or .."),
            ("s3://images/a b", "segments hold"),
        ] {
            let message = error(spec, &none, &KEYS);
            assert!(message.contains(needle), "{spec}: {message}");
        }
        let endpoint = S3Options {
            endpoint: Some("ftp://host".into()),
            path_style: false,
        };
        let message = error("s3://images", &endpoint, &KEYS);
        assert!(message.contains("from --s3-endpoint"), "{message}");
    }
}
