//! Arbitrary bytes as a sealed manifest fetched from a store.
//!
//! Properties: neither `Manifest::open` nor `PublicManifest::parse` panics;
//! every refusal names the manifest; a manifest that opens re-seals to exactly
//! the input (the format is deterministic, so there is one encoding of each
//! manifest) and its public part, read without the key, agrees with it.
#![no_main]

use lazyblk::chunk::{Manifest, PublicManifest};
use lazyblk_fuzz::{public_ids, tenant};
use libfuzzer_sys::fuzz_target;

const NAME: &str = "fuzz-manifest";

fuzz_target!(|data: &[u8]| {
    let tenant = tenant();
    let public = PublicManifest::parse(NAME, data);
    match Manifest::open(NAME, data, &tenant) {
        Ok(manifest) => {
            assert!(
                manifest.seal(&tenant) == data,
                "an opened manifest does not re-seal to its own bytes"
            );
            let public = public.expect("the public part of a manifest that opens parses");
            assert_eq!(public.image_size, manifest.image_size);
            assert_eq!(public.chunk_size, manifest.chunk_size);
            assert_eq!(public.salt_domain, manifest.salt_domain);
            assert_eq!(public.source_digest, manifest.source_digest);
            assert_eq!(public.chunk_ids, public_ids(&manifest));
            let chunk_size = u64::from(manifest.chunk_size);
            assert_eq!(
                manifest.chunk_count(),
                manifest.image_size.div_ceil(chunk_size)
            );
            let lens: u64 = (0..manifest.chunk_count())
                .map(|index| manifest.chunk_len(index) as u64)
                .sum();
            assert_eq!(
                lens, manifest.image_size,
                "chunk lengths do not tile the image"
            );
        }
        Err(error) => {
            let message = error.to_string();
            assert!(
                message.contains(NAME),
                "error does not name the manifest: {message}"
            );
            // Opening reads the public part first: where that fails, opening
            // fails the same way.
            if let Err(public_error) = public {
                assert_eq!(public_error.to_string(), message);
            }
        }
    }
});
