//! Arbitrary bytes as a registry's answers: a `WWW-Authenticate` challenge,
//! a token endpoint's JSON, a `Content-Type`, and the image references a
//! user names a registry image by.
//!
//! Properties: nothing panics; a parsed challenge prints back (every value
//! quoted) to a challenge that parses the same; a token taken from an
//! answer fits in an `Authorization` header.
#![no_main]

use lazyblk::oci::registry::{parse_challenge, token_from_answer, Reference};
use lazyblk::oci::resolve::document_kind;
use lazyblk::oci::spec::DocumentKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = token_from_answer(data) {
        assert!(!token.is_empty());
        let header = format!("Bearer {token}");
        assert!(
            http::HeaderValue::from_str(&header).is_ok(),
            "token {token:?} does not fit a header"
        );
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some((scheme, params)) = parse_challenge(text) {
        assert!(
            !scheme.is_empty() && !scheme.contains(char::is_whitespace),
            "scheme {scheme:?}"
        );
        let printed = print_challenge(&scheme, &params);
        let again = parse_challenge(&printed)
            .unwrap_or_else(|| panic!("{printed:?}, printed from {text:?}, does not parse"));
        assert_eq!(again, (scheme, params), "printed as {printed:?}");
    }
    let _ = DocumentKind::of(text);
    let _ = document_kind("fuzz", text, data);
    if let Ok(reference) = Reference::parse(text) {
        assert!(!reference.reference.is_empty(), "{reference:?}");
    }
});

fn print_challenge(scheme: &str, params: &[(String, String)]) -> String {
    let params: Vec<String> = params
        .iter()
        .map(|(key, value)| {
            let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
            format!("{key}=\"{escaped}\"")
        })
        .collect();
    if params.is_empty() {
        scheme.to_owned()
    } else {
        format!("{scheme} {}", params.join(", "))
    }
}
