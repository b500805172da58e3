//! Erasure coding of one chunk envelope into `k` data shards and `m` parity
//! shards, and its inverse from any `k` of them.
//!
//! The envelope is cut into `k` equal data shards (the last one zero-padded
//! to [`Scheme::shard_len`]); with every data shard at hand a reader only
//! concatenates them, so the common read does no decoding. `m = 1` is plain
//! XOR parity (the paper's 4+1): one pass over the data, and any single
//! loss is the XOR of the survivors. `m ≥ 2` uses reed-solomon-simd
//! (a Reed-Solomon code over GF(2^16)), which repairs any `m` losses.

use std::fmt;
use std::str::FromStr;

use bytes::{Bytes, BytesMut};

/// Shards are padded to a multiple of this many bytes: reed-solomon-simd
/// wants even lengths, and whole 64-byte lines keep XOR vectorised.
const SHARD_ALIGN: usize = 64;
/// Most shards one chunk is cut into: the shard header keeps counts in one
/// byte, and beyond this a chunk's shards are too small to be worth a request.
pub const MAX_SHARDS: usize = 32;

/// How many data (`k`) and parity (`m`) shards each chunk becomes; written
/// (and kept in device records) as `K+M`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Scheme {
    k: u8,
    m: u8,
}

/// A scheme that cannot be used, or shards that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("invalid erasure-coding scheme {spec:?}: {reason}")]
    InvalidScheme { spec: String, reason: String },
    #[error("{present} of {needed} shards present: too few to rebuild the chunk")]
    TooFewShards { present: usize, needed: usize },
    #[error("shard {index} holds {actual} bytes, expected {expected}")]
    ShardLength {
        index: usize,
        expected: usize,
        actual: usize,
    },
    #[error("reed-solomon decode: {0}")]
    ReedSolomon(String),
}

impl Scheme {
    /// The paper's default: four data shards and one XOR parity shard.
    pub const DEFAULT: Scheme = Scheme { k: 4, m: 1 };

    pub fn new(k: usize, m: usize) -> Result<Scheme, CodecError> {
        let invalid = |reason: &str| CodecError::InvalidScheme {
            spec: format!("{k}+{m}"),
            reason: reason.to_owned(),
        };
        if k == 0 || m == 0 {
            return Err(invalid("needs at least one data and one parity shard"));
        }
        if k + m > MAX_SHARDS {
            return Err(invalid(&format!("at most {MAX_SHARDS} shards in all")));
        }
        if m > 1 && !reed_solomon_simd::ReedSolomonEncoder::supports(k, m) {
            return Err(invalid("not supported by the Reed-Solomon code"));
        }
        Ok(Scheme {
            k: k as u8,
            m: m as u8,
        })
    }

    pub fn data_shards(self) -> usize {
        self.k as usize
    }

    pub fn parity_shards(self) -> usize {
        self.m as usize
    }

    pub fn total_shards(self) -> usize {
        self.data_shards() + self.parity_shards()
    }

    /// The length of every shard of an envelope of `envelope_len` bytes.
    pub fn shard_len(self, envelope_len: usize) -> usize {
        let per_shard = envelope_len.div_ceil(self.data_shards()).max(1);
        per_shard.next_multiple_of(SHARD_ALIGN)
    }

    /// Cuts `envelope` into `k + m` shards, data shards first.
    pub fn encode(self, envelope: &[u8]) -> Vec<Bytes> {
        let shard_len = self.shard_len(envelope.len());
        let mut data: Vec<Vec<u8>> = (0..self.data_shards())
            .map(|i| {
                let start = (i * shard_len).min(envelope.len());
                let end = ((i + 1) * shard_len).min(envelope.len());
                let mut shard = Vec::with_capacity(shard_len);
                shard.extend_from_slice(&envelope[start..end]);
                shard.resize(shard_len, 0);
                shard
            })
            .collect();
        let parity = if self.m == 1 {
            vec![xor_all(data.iter().map(Vec::as_slice), shard_len)]
        } else {
            reed_solomon_simd::encode(self.data_shards(), self.parity_shards(), &data)
                .expect("scheme and shard length were validated")
        };
        data.extend(parity);
        data.into_iter().map(Bytes::from).collect()
    }

    /// Rebuilds an envelope of `envelope_len` bytes from `shards`, indexed
    /// by shard number (`None` for a shard that is missing). Needs any `k`.
    pub fn decode(
        self,
        shards: &[Option<Bytes>],
        envelope_len: usize,
    ) -> Result<Bytes, CodecError> {
        let (k, shard_len) = (self.data_shards(), self.shard_len(envelope_len));
        let present = shards.iter().flatten().count();
        if shards.len() != self.total_shards() || present < k {
            return Err(CodecError::TooFewShards { present, needed: k });
        }
        for (index, shard) in shards.iter().enumerate() {
            if let Some(shard) = shard.as_ref().filter(|s| s.len() != shard_len) {
                return Err(CodecError::ShardLength {
                    index,
                    expected: shard_len,
                    actual: shard.len(),
                });
            }
        }
        let mut data: Vec<Option<Bytes>> = shards[..k].to_vec();
        let lost: Vec<usize> = (0..k).filter(|&i| data[i].is_none()).collect();
        if !lost.is_empty() {
            if self.m == 1 {
                // k of k + 1 present and one data shard lost: it is the XOR
                // of everything else, parity included.
                let survivors = shards.iter().flatten().map(|s| &s[..]);
                data[lost[0]] = Some(Bytes::from(xor_all(survivors, shard_len)));
            } else {
                let originals = data
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)));
                let recovery = shards[k..]
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)));
                let restored =
                    reed_solomon_simd::decode(k, self.parity_shards(), originals, recovery)
                        .map_err(|e| CodecError::ReedSolomon(e.to_string()))?;
                for (index, shard) in restored {
                    data[index] = Some(Bytes::from(shard));
                }
            }
        }
        let mut envelope = BytesMut::with_capacity(k * shard_len);
        for shard in data {
            let shard = shard.ok_or(CodecError::TooFewShards { present, needed: k })?;
            envelope.extend_from_slice(&shard);
        }
        envelope.truncate(envelope_len);
        Ok(envelope.freeze())
    }
}

impl Default for Scheme {
    fn default() -> Scheme {
        Scheme::DEFAULT
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{}", self.k, self.m)
    }
}

/// `K+M`, as on the command line (`4+1`, `4+2`).
impl FromStr for Scheme {
    type Err = CodecError;

    fn from_str(s: &str) -> Result<Scheme, CodecError> {
        let parsed = s
            .split_once('+')
            .and_then(|(k, m)| Some((k.trim().parse().ok()?, m.trim().parse().ok()?)));
        match parsed {
            Some((k, m)) => Scheme::new(k, m),
            None => Err(CodecError::InvalidScheme {
                spec: s.to_owned(),
                reason: "expected K+M, e.g. 4+1".to_owned(),
            }),
        }
    }
}

impl From<Scheme> for String {
    fn from(scheme: Scheme) -> String {
        scheme.to_string()
    }
}

impl TryFrom<String> for Scheme {
    type Error = CodecError;

    fn try_from(text: String) -> Result<Scheme, CodecError> {
        text.parse()
    }
}

/// The XOR of equal-length shards.
fn xor_all<'a>(shards: impl Iterator<Item = &'a [u8]>, shard_len: usize) -> Vec<u8> {
    let mut out = vec![0u8; shard_len];
    for shard in shards {
        // A plain byte loop over equal-length slices: the compiler vectorises it.
        for (o, s) in out.iter_mut().zip(shard) {
            *o ^= s;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn envelope(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    }

    /// Every subset of `n` shard indexes of size `lost`.
    fn loss_patterns(n: usize, lost: usize) -> Vec<Vec<usize>> {
        (0u32..1 << n)
            .filter(|mask| mask.count_ones() as usize == lost)
            .map(|mask| (0..n).filter(|i| mask & (1 << i) != 0).collect())
            .collect()
    }

    fn check_every_loss_up_to_m(scheme: Scheme, len: usize) {
        let original = envelope(len, 7);
        let shards = scheme.encode(&original);
        assert_eq!(shards.len(), scheme.total_shards());
        for lost in 0..=scheme.parity_shards() {
            for pattern in loss_patterns(scheme.total_shards(), lost) {
                let mut partial: Vec<Option<Bytes>> = shards.iter().cloned().map(Some).collect();
                for &i in &pattern {
                    partial[i] = None;
                }
                let rebuilt = scheme.decode(&partial, len).unwrap();
                assert_eq!(&rebuilt[..], &original[..], "{scheme}, lost {pattern:?}");
            }
        }
        let too_many = loss_patterns(scheme.total_shards(), scheme.parity_shards() + 1);
        let mut partial: Vec<Option<Bytes>> = shards.iter().cloned().map(Some).collect();
        for &i in &too_many[0] {
            partial[i] = None;
        }
        assert!(matches!(
            scheme.decode(&partial, len),
            Err(CodecError::TooFewShards { .. })
        ));
    }

    #[test]
    fn four_plus_one_survives_every_single_loss() {
        check_every_loss_up_to_m(Scheme::new(4, 1).unwrap(), 512 * 1024 + 28);
    }

    #[test]
    fn four_plus_two_survives_every_double_loss() {
        check_every_loss_up_to_m(Scheme::new(4, 2).unwrap(), 512 * 1024 + 28);
    }

    #[test]
    fn xor_parity_is_the_xor_of_the_data_shards() {
        let shards = Scheme::DEFAULT.encode(&envelope(1000, 3));
        let xor: Vec<u8> = (0..shards[0].len())
            .map(|i| shards[..4].iter().fold(0, |acc, s| acc ^ s[i]))
            .collect();
        assert_eq!(&shards[4][..], &xor[..]);
    }

    #[test]
    fn schemes_parse_and_bad_ones_say_why() {
        assert_eq!("4+2".parse::<Scheme>().unwrap(), Scheme::new(4, 2).unwrap());
        assert_eq!(Scheme::DEFAULT.to_string(), "4+1");
        for bad in ["4", "4+0", "0+1", "a+b", "30+3", ""] {
            let err = bad.parse::<Scheme>().unwrap_err().to_string();
            assert!(
                err.contains("invalid erasure-coding scheme"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_shard_of_the_wrong_length_is_refused() {
        let scheme = Scheme::DEFAULT;
        let mut shards: Vec<Option<Bytes>> = scheme
            .encode(&envelope(4096, 1))
            .into_iter()
            .map(Some)
            .collect();
        shards[2] = Some(Bytes::from_static(b"short"));
        assert!(matches!(
            scheme.decode(&shards, 4096),
            Err(CodecError::ShardLength { index: 2, .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn any_k_shards_rebuild_any_envelope(
            len in 0usize..20_000,
            k in 1usize..8,
            m in 1usize..4,
            seed: u8,
            drop_seed: u64,
        ) {
            let scheme = Scheme::new(k, m).unwrap();
            let original = envelope(len, seed);
            let mut shards: Vec<Option<Bytes>> =
                scheme.encode(&original).into_iter().map(Some).collect();
            // Drop m shards chosen by the seed.
            let mut order: Vec<usize> = (0..k + m).collect();
            let mut state = drop_seed | 1;
            for i in (1..order.len()).rev() {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                order.swap(i, (state % (i as u64 + 1)) as usize);
            }
            for &i in &order[..m] {
                shards[i] = None;
            }
            prop_assert_eq!(&scheme.decode(&shards, len).unwrap()[..], &original[..]);
        }
    }
}
