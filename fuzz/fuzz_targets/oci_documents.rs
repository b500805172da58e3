//! Arbitrary bytes as the OCI documents a source reads from a registry, an
//! OCI layout or an archive: the first document (served under a chosen
//! media type), the indexes and manifests it leads to, and image configs.
//!
//! The input is documents separated by NUL bytes, each led by one byte
//! that picks the media type it is served with; the first is the document
//! named, the others what the descriptors followed lead to, in order.
//!
//! Properties: nothing panics; following indexes ends within the nesting
//! limit whatever they point to; a manifest that resolves gives layer
//! descriptors whose digests print back as the manifest wrote them.
#![no_main]

use std::cell::RefCell;

use lazyblk::oci::resolve::{document_kind, layer_descriptors, resolve, DocumentFetcher};
use lazyblk::oci::spec::{self, Config, Descriptor, Index, Manifest, PlatformWanted};
use lazyblk::oci::{Digest, SourceError};
use libfuzzer_sys::fuzz_target;

/// Media types a store may serve a document with.
const MEDIA_TYPES: &[&str] = &[
    spec::OCI_INDEX,
    spec::OCI_MANIFEST,
    spec::DOCKER_LIST,
    spec::DOCKER_MANIFEST,
    "",
    "application/json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.oci.image.index.v1+json; charset=utf-8",
    "text/html",
];

struct Fetcher<'a> {
    documents: RefCell<std::vec::IntoIter<(u8, &'a [u8])>>,
    fetches: RefCell<usize>,
}

impl DocumentFetcher for Fetcher<'_> {
    fn fetch(&self, descriptor: &Descriptor) -> Result<(String, Vec<u8>), SourceError> {
        *self.fetches.borrow_mut() += 1;
        match self.documents.borrow_mut().next() {
            Some((media_type, bytes)) => Ok((media_type_of(media_type), bytes.to_vec())),
            None => Err(SourceError::NestingTooDeep {
                what: format!("fuzz input ran out at {}", descriptor.digest),
                max: 0,
            }),
        }
    }
}

/// The media type a leading byte picks (its high bit picks the platform
/// wanted, for the first document).
fn media_type_of(choice: u8) -> String {
    MEDIA_TYPES[usize::from(choice) % MEDIA_TYPES.len()].to_owned()
}

fuzz_target!(|data: &[u8]| {
    let mut documents = data
        .split(|&b| b == 0)
        .map(|piece| match piece.split_first() {
            Some((&choice, bytes)) => (choice, bytes),
            None => (0, piece),
        })
        .collect::<Vec<_>>()
        .into_iter();
    let (choice, top) = documents.next().unwrap_or((0, &[]));
    let _ = serde_json::from_slice::<Index>(top);
    let _ = serde_json::from_slice::<Config>(top);
    let media_type = media_type_of(choice);
    let _ = document_kind("fuzz", &media_type, top);

    let fetcher = Fetcher {
        documents: RefCell::new(documents),
        fetches: RefCell::new(0),
    };
    let wanted = if choice >= 128 {
        "linux/arm64/v8".parse().expect("a valid platform")
    } else {
        PlatformWanted::default()
    };
    let digest = Digest::parse(&format!("sha256:{}", "0".repeat(64))).expect("a valid digest");
    let resolved = resolve(&fetcher, "fuzz", media_type, top.to_vec(), digest, &wanted);
    // An index of indexes of … is followed a bounded number of times.
    assert!(
        *fetcher.fetches.borrow() <= 5,
        "followed {} documents",
        fetcher.fetches.borrow()
    );
    let Ok((_, manifest)) = resolved else {
        return;
    };
    check_layers(&manifest);
});

fn check_layers(manifest: &Manifest) {
    let Ok(layers) = layer_descriptors("fuzz", manifest) else {
        return;
    };
    assert_eq!(layers.len(), manifest.layers.len());
    for (layer, declared) in layers.iter().zip(&manifest.layers) {
        assert_eq!(layer.digest.to_string(), declared.digest);
        assert_eq!(layer.size, declared.size);
    }
}
