//! GNU sparse members: the map of where a file's data lies, and the reader
//! that expands the stored bytes to the file's real size.
//!
//! GNU tar stores a sparse file as its data regions only, with a map of
//! `(offset, length)` segments in one of four forms:
//! * old GNU (`--format=gnu`, typeflag `S`): up to four segments in the
//!   header, more in 512-byte extension blocks between header and data;
//! * PAX 0.0: repeated `GNU.sparse.offset` / `GNU.sparse.numbytes` records;
//! * PAX 0.1: one `GNU.sparse.map` record, `offset,length,...`;
//! * PAX 1.0 (`--format=pax`, GNU tar's default): the map is decimal text
//!   at the start of the member's data, padded to a block.
//!
//! [`super::layer`] collects the map, [`SparseMap::validate`] checks it
//! against the bytes stored (ordered, non-overlapping, inside the real size,
//! summing to the stored length), and [`SparseReader`] yields the real size:
//! holes read as zeros, which the flattener leaves as holes in the image.
//! A map is bounded like any other metadata ([`MAX_METADATA_LEN`]).

use std::io::{self, Read};

use tar::{GnuSparseHeader, Header};

use super::header::EntryError;
use super::layer_error::MAX_METADATA_LEN;

/// One region of stored data: `len` bytes at `offset` of the real file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
}

/// Where a sparse file's stored bytes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseMap {
    pub real_size: u64,
    pub segments: Vec<Segment>,
}

/// Most segments one map may hold: a map costs 16 bytes a segment in memory.
pub const MAX_SEGMENTS: usize = (MAX_METADATA_LEN / 16) as usize;

fn bad(problem: impl Into<String>) -> EntryError {
    EntryError::SparseMap {
        problem: problem.into(),
    }
}

impl SparseMap {
    /// Checks the map against the `stored` bytes that follow it.
    pub fn validate(&self, stored: u64) -> Result<(), EntryError> {
        let mut end = 0u64;
        let mut total = 0u64;
        for (i, s) in self.segments.iter().enumerate() {
            if s.offset < end {
                return Err(bad(format!(
                    "segment {i} at offset {} starts before the previous one ends ({end})",
                    s.offset
                )));
            }
            end = s
                .offset
                .checked_add(s.len)
                .filter(|&e| e <= self.real_size)
                .ok_or_else(|| {
                    bad(format!(
                        "segment {i} ({} bytes at {}) ends past the real size {}",
                        s.len, s.offset, self.real_size
                    ))
                })?;
            total += s.len;
        }
        if total != stored {
            return Err(bad(format!(
                "the segments hold {total} bytes but the member stores {stored}"
            )));
        }
        Ok(())
    }
}

/// What the PAX records say about a sparse member (`GNU.sparse.*`).
#[derive(Debug, Clone, Default)]
pub struct SparsePax {
    major: Option<u64>,
    minor: Option<u64>,
    /// The real name (1.0, 0.1); the header holds a made-up one.
    pub name: Option<Vec<u8>>,
    /// `GNU.sparse.realsize` (1.0) or `GNU.sparse.size` (0.x).
    real_size: Option<u64>,
    /// 0.0's repeated records, in order.
    offsets: Vec<u64>,
    lengths: Vec<u64>,
    /// 0.1's map.
    map: Option<Vec<u64>>,
}

/// How the member's map is to be found, once its PAX records are read.
#[derive(Debug)]
pub enum SparseKind {
    /// Typeflag `S`: the header and extension blocks.
    OldGnu,
    /// PAX 0.0 or 0.1: the records held the whole map.
    Complete(SparseMap),
    /// PAX 1.0: the map leads the data.
    InData { real_size: u64 },
}

fn decimal(key: &[u8], value: &[u8]) -> Result<u64, EntryError> {
    std::str::from_utf8(value)
        .ok()
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| EntryError::Pax {
            key: String::from_utf8_lossy(key).into_owned(),
            problem: format!(
                "{:?} is not a decimal number",
                String::from_utf8_lossy(value)
            ),
        })
}

fn pairs(numbers: &[u64]) -> Vec<Segment> {
    numbers
        .chunks_exact(2)
        .map(|p| Segment {
            offset: p[0],
            len: p[1],
        })
        .collect()
}

impl SparsePax {
    /// Takes a `GNU.sparse.*` record; `false` if the key is not one.
    pub fn record(&mut self, key: &[u8], value: &[u8]) -> Result<bool, EntryError> {
        let Some(field) = key.strip_prefix(b"GNU.sparse.") else {
            return Ok(false);
        };
        match field {
            b"major" => self.major = Some(decimal(key, value)?),
            b"minor" => self.minor = Some(decimal(key, value)?),
            b"name" => self.name = Some(value.to_vec()),
            b"realsize" | b"size" => self.real_size = Some(decimal(key, value)?),
            b"offset" => self.offsets.push(decimal(key, value)?),
            b"numbytes" => self.lengths.push(decimal(key, value)?),
            b"map" => {
                let numbers = value
                    .split(|&b| b == b',')
                    .map(|n| decimal(key, n))
                    .collect::<Result<Vec<u64>, _>>()?;
                if numbers.len() % 2 != 0 {
                    return Err(bad("GNU.sparse.map holds an odd count of numbers"));
                }
                self.map = Some(numbers);
            }
            // numblocks only repeats the map's length.
            b"numblocks" => {
                decimal(key, value)?;
            }
            _ => {
                return Err(EntryError::UnsupportedSparse(
                    String::from_utf8_lossy(key).into_owned(),
                ))
            }
        }
        Ok(true)
    }

    /// The member's sparse form, or `None` for an ordinary member.
    pub fn kind(&self) -> Result<Option<SparseKind>, EntryError> {
        let real_size = || {
            self.real_size
                .ok_or_else(|| bad("no GNU.sparse.realsize or GNU.sparse.size record"))
        };
        match (self.major, self.minor) {
            (Some(1), Some(0)) => {
                return Ok(Some(SparseKind::InData {
                    real_size: real_size()?,
                }))
            }
            (None, None) => {}
            (major, minor) => {
                return Err(EntryError::UnsupportedSparse(format!(
                    "GNU.sparse version {}.{}",
                    major.map_or("?".into(), |v| v.to_string()),
                    minor.map_or("?".into(), |v| v.to_string())
                )))
            }
        }
        if let Some(map) = &self.map {
            return Ok(Some(SparseKind::Complete(SparseMap {
                real_size: real_size()?,
                segments: pairs(map),
            })));
        }
        if self.offsets.is_empty() && self.lengths.is_empty() {
            return match self.real_size {
                Some(_) => Err(bad("a real size but no map")),
                None => Ok(None),
            };
        }
        if self.offsets.len() != self.lengths.len() {
            return Err(bad(format!(
                "{} GNU.sparse.offset records but {} GNU.sparse.numbytes",
                self.offsets.len(),
                self.lengths.len()
            )));
        }
        let segments = self
            .offsets
            .iter()
            .zip(&self.lengths)
            .map(|(&offset, &len)| Segment { offset, len })
            .collect();
        Ok(Some(SparseKind::Complete(SparseMap {
            real_size: real_size()?,
            segments,
        })))
    }
}

/// Adds the non-empty entries of an old GNU sparse array to `segments`.
fn push_gnu<'a>(
    entries: impl Iterator<Item = &'a GnuSparseHeader>,
    segments: &mut Vec<Segment>,
) -> Result<(), EntryError> {
    for e in entries.filter(|e| !e.is_empty()) {
        let field = |what, r: io::Result<u64>| {
            r.map_err(|source| EntryError::Field {
                field: what,
                source,
            })
        };
        segments.push(Segment {
            offset: field("sparse offset", e.offset())?,
            len: field("sparse length", e.length())?,
        });
    }
    Ok(())
}

/// Segments in one extension block, and its "more follow" byte's offset.
const EXT_SEGMENTS: usize = 21;
const EXT_FLAG: usize = EXT_SEGMENTS * 24;

/// The map of an old GNU (`S`) member: the header's entries, then those of
/// each extension block `next_block` yields while the previous one says
/// more follow. A read error comes back as `Err(Err(_))`.
pub fn old_gnu_map(
    header: &Header,
    mut next_block: impl FnMut() -> io::Result<[u8; 512]>,
) -> Result<SparseMap, Result<EntryError, io::Error>> {
    let gnu = header
        .as_gnu()
        .ok_or_else(|| Ok(bad("a GNU sparse member without a GNU header")))?;
    let real_size = gnu.real_size().map_err(|source| {
        Ok(EntryError::Field {
            field: "real size",
            source,
        })
    })?;
    let mut segments = Vec::new();
    push_gnu(gnu.sparse.iter(), &mut segments).map_err(Ok)?;
    let mut extended = gnu.is_extended();
    while extended {
        if segments.len() + EXT_SEGMENTS > MAX_SEGMENTS {
            return Err(Ok(bad(format!(
                "more than {MAX_SEGMENTS} segments in its extension blocks"
            ))));
        }
        let block = next_block().map_err(Err)?;
        let entries: Vec<GnuSparseHeader> = block[..EXT_FLAG]
            .chunks_exact(24)
            .map(|e| GnuSparseHeader {
                offset: e[..12].try_into().expect("12 bytes"),
                numbytes: e[12..].try_into().expect("12 bytes"),
            })
            .collect();
        push_gnu(entries.iter(), &mut segments).map_err(Ok)?;
        extended = block[EXT_FLAG] == 1;
    }
    Ok(SparseMap {
        real_size,
        segments,
    })
}

/// Reads a PAX 1.0 map from the start of a member's data: the count of
/// segments, then offset and length of each, one decimal number a line,
/// padded with NULs to a block. `read_block` yields the data's next 512
/// bytes; at most `available` bytes may be read. Returns the map and the
/// bytes it took.
pub fn read_map_1_0(
    available: u64,
    mut read_block: impl FnMut() -> io::Result<[u8; 512]>,
) -> Result<(Vec<Segment>, u64), Result<EntryError, io::Error>> {
    let mut numbers: Vec<u64> = Vec::new();
    let mut digits = String::new();
    let mut used = 0u64;
    let mut wanted: Option<usize> = None;
    loop {
        if wanted.is_some_and(|w| numbers.len() == 1 + 2 * w) {
            break;
        }
        if used + 512 > available.min(MAX_METADATA_LEN) {
            return Err(Ok(bad(if used + 512 > available {
                "the map runs past the member's data".to_string()
            } else {
                format!("the map is larger than {MAX_METADATA_LEN} bytes")
            })));
        }
        let block = read_block().map_err(Err)?;
        used += 512;
        for &b in &block {
            if wanted.is_some_and(|w| numbers.len() == 1 + 2 * w) {
                break;
            }
            match b {
                b'0'..=b'9' if digits.len() < 20 => digits.push(b as char),
                b'\n' => {
                    let n = digits
                        .parse::<u64>()
                        .map_err(|_| Ok(bad(format!("{digits:?} in the map is not a number"))))?;
                    digits.clear();
                    numbers.push(n);
                    if numbers.len() == 1 {
                        if n > MAX_SEGMENTS as u64 {
                            return Err(Ok(bad(format!("{n} segments, more than {MAX_SEGMENTS}"))));
                        }
                        wanted = Some(n as usize);
                    }
                }
                _ => return Err(Ok(bad(format!("byte {b:#04x} in the map's text")))),
            }
        }
    }
    Ok((pairs(&numbers[1..]), used))
}

/// A sparse member's data at its real size: stored bytes where the map puts
/// them, zeros elsewhere. `inner` yields exactly the stored bytes.
pub struct SparseReader<R> {
    pub inner: R,
    segments: Vec<Segment>,
    next: usize,
    pos: u64,
    real_size: u64,
}

impl<R: Read> SparseReader<R> {
    /// `map` must have passed [`SparseMap::validate`].
    pub fn new(inner: R, map: SparseMap) -> Self {
        SparseReader {
            inner,
            segments: map.segments,
            next: 0,
            pos: 0,
            real_size: map.real_size,
        }
    }
}

impl<R: Read> Read for SparseReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self
            .segments
            .get(self.next)
            .is_some_and(|s| self.pos >= s.offset + s.len)
        {
            self.next += 1;
        }
        let (until, stored) = match self.segments.get(self.next) {
            Some(s) if self.pos >= s.offset => (s.offset + s.len, true),
            Some(s) => (s.offset, false),
            None => (self.real_size, false),
        };
        let n = buf
            .len()
            .min((until - self.pos).min(usize::MAX as u64) as usize);
        if n == 0 {
            return Ok(0);
        }
        let n = if stored {
            // The inner reader fails rather than end early.
            self.inner.read(&mut buf[..n])?
        } else {
            buf[..n].fill(0);
            n
        };
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(real_size: u64, segs: &[(u64, u64)]) -> SparseMap {
        SparseMap {
            real_size,
            segments: segs
                .iter()
                .map(|&(offset, len)| Segment { offset, len })
                .collect(),
        }
    }

    #[test]
    fn holes_read_as_zeros_and_data_lands_in_place() {
        let m = map(20, &[(2, 3), (10, 0), (15, 5)]);
        m.validate(8).unwrap();
        let mut out = Vec::new();
        SparseReader::new(&b"abcVWXYZ"[..], m)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"\0\0abc\0\0\0\0\0\0\0\0\0\0VWXYZ");
    }

    #[test]
    fn bad_maps_are_refused() {
        let problem = |m: SparseMap, stored| match m.validate(stored) {
            Err(EntryError::SparseMap { problem }) => problem,
            other => panic!("{other:?}"),
        };
        assert!(problem(map(100, &[(10, 10), (15, 5)]), 15).contains("before the previous"));
        assert!(problem(map(100, &[(20, 5), (10, 5)]), 10).contains("before the previous"));
        assert!(problem(map(100, &[(90, 20)]), 20).contains("past the real size"));
        assert!(problem(map(100, &[(u64::MAX, 2)]), 2).contains("past the real size"));
        assert!(problem(map(100, &[(0, 10)]), 11).contains("hold 10 bytes"));
        map(100, &[(0, 10), (10, 90), (100, 0)])
            .validate(100)
            .unwrap();
    }

    #[test]
    fn pax_1_0_map_text() {
        let mut text = b"2\n0\n5\n4096\n10\n".to_vec();
        text.resize(512, 0);
        let mut blocks = vec![text.try_into().unwrap()].into_iter();
        let (segs, used) = read_map_1_0(600, || Ok(blocks.next().unwrap())).unwrap();
        assert_eq!(used, 512);
        assert_eq!(
            segs,
            vec![
                Segment { offset: 0, len: 5 },
                Segment {
                    offset: 4096,
                    len: 10
                }
            ]
        );
        let mut garbage = [0u8; 512];
        garbage[..4].copy_from_slice(b"1\nx\n");
        assert!(matches!(
            read_map_1_0(512, || Ok(garbage)),
            Err(Ok(EntryError::SparseMap { .. }))
        ));
        // A count the data cannot hold runs out of data, never of memory.
        let mut huge = [0u8; 512];
        huge[..8].copy_from_slice(b"100000\n0");
        assert!(matches!(
            read_map_1_0(512, || Ok(huge)),
            Err(Ok(EntryError::SparseMap { .. }))
        ));
    }
}
