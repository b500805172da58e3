//! Structured manifests (any geometry, salt domain and entries within the
//! format's limits) sealed and opened again.
//!
//! Properties: sealing is deterministic and has the size docs/FORMAT.md
//! gives; open(seal(m)) == m; the public part lists m's ids; flipping any one
//! bit, truncating, or opening with another tenant key is refused.
#![no_main]

use arbitrary::Arbitrary;
use lazyblk::chunk::{Manifest, ManifestEntry, ManifestError, PublicManifest, TenantKey};
use lazyblk_fuzz::{public_ids, tenant, ArbitraryManifest};
use libfuzzer_sys::fuzz_target;

const NAME: &str = "fuzz-manifest";

#[derive(Debug, Arbitrary)]
struct Input {
    manifest: ArbitraryManifest,
    /// Which bit of the sealed manifest to flip (taken modulo its length).
    flip: u64,
    /// How many bytes to cut from the end (taken modulo its length, plus one).
    cut: u64,
}

fuzz_target!(|input: Input| {
    let manifest = input.manifest.0;
    let tenant = tenant();
    let sealed = manifest.seal(&tenant);
    assert!(
        sealed == manifest.seal(&tenant),
        "sealing is not deterministic"
    );

    let stored = manifest
        .entries
        .iter()
        .filter(|entry| **entry != ManifestEntry::Zero)
        .count();
    let expected_len =
        53 + manifest.salt_domain.len() + manifest.entries.len().div_ceil(8) + 28 + 64 * stored;
    assert_eq!(
        sealed.len(),
        expected_len,
        "size differs from docs/FORMAT.md"
    );

    let opened = Manifest::open(NAME, &sealed, &tenant).expect("a sealed manifest opens");
    assert_eq!(opened, manifest);
    let public = PublicManifest::parse(NAME, &sealed).expect("its public part parses");
    assert_eq!(public.chunk_ids, public_ids(&manifest));

    let bit = (input.flip % (sealed.len() as u64 * 8)) as usize;
    let mut flipped = sealed.clone();
    flipped[bit / 8] ^= 1 << (bit % 8);
    let error =
        Manifest::open(NAME, &flipped, &tenant).expect_err("a manifest with a flipped bit opened");
    assert!(error.to_string().contains(NAME), "{error}");

    let cut = (input.cut % sealed.len() as u64) as usize + 1;
    let error = Manifest::open(NAME, &sealed[..sealed.len() - cut], &tenant)
        .expect_err("a truncated manifest opened");
    assert!(error.to_string().contains(NAME), "{error}");

    let mut other = tenant.0;
    other[bit % 32] ^= 1 << (bit % 8);
    let error = Manifest::open(NAME, &sealed, &TenantKey(other))
        .expect_err("a manifest opened with another tenant's key");
    assert!(
        matches!(error, ManifestError::Authentication { .. }),
        "{error}"
    );
});
