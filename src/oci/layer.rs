//! Reading one layer: a tar stream in, validated [`LayerEntry`] values out.
//!
//! The flattener hands [`read_layer`] the decompressed tar of each layer in
//! order and receives every entry through its `apply` callback, with a reader
//! of exactly the entry's data. The walk over the tar blocks is ours (the
//! `tar` crate parses each header and PAX record) so that nothing is
//! allocated or read that the limits have not allowed: a GNU long name or
//! PAX header larger than [`MAX_METADATA_LEN`] is refused before it is read,
//! every byte read counts against the image's [`LayerLimits`], and the
//! stream is read to its very end so that a digest check at EOF (see
//! [`super::verify`]) always runs. PAX global headers change the records in
//! force for every later member; a GNU sparse member's map is read (from
//! its header, extension blocks or the start of its data) and checked, and
//! its reader yields the real size ([`super::sparse`]).
//!
//! Invariants: every error names the layer and the member (its path as
//! written); an entry's data reader yields its declared size or an error,
//! never fewer bytes silently; sparse holes count against the byte budget;
//! no input panics.

use std::io::{self, Read};

use tar::{EntryType, Header};

use super::entry::{EntryKind, LayerEntry};
use super::header::EntryError;
use super::header::{classify, Classified, GlobalPax, RawMember};
use super::layer_error::truncated;
pub use super::layer_error::{
    find_in_chain, ApplyError, LayerError, LayerLimits, LayerStats, Limit, Truncated,
    MAX_METADATA_LEN,
};
use super::sparse::{self, SparseKind, SparseMap, SparseReader};

const BLOCK: usize = 512;
/// Read-ahead between the tar walk and its source.
const READ_BUFFER: usize = 128 << 10;

/// The layer's byte stream, counting every byte against the image budget.
struct Stream<'l, R> {
    inner: R,
    offset: u64,
    limits: &'l mut LayerLimits,
}

impl<R: Read> Read for Stream<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.offset += n as u64;
        self.limits.bytes += n as u64;
        if self.limits.bytes + self.limits.holes > self.limits.max_bytes {
            let limit = Limit::Bytes(self.limits.max_bytes);
            self.limits.exceeded = Some(limit);
            return Err(io::Error::other(limit));
        }
        Ok(n)
    }
}

impl<R: Read> Stream<'_, R> {
    /// Fills `block`; `false` at a clean end of stream.
    fn read_block(&mut self, block: &mut [u8; BLOCK]) -> io::Result<bool> {
        let mut filled = 0;
        while filled < BLOCK {
            match self.read(&mut block[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => return Err(truncated((BLOCK - filled) as u64, "a header")),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// The next 512 bytes, which must be there.
    fn next_block(&mut self, inside: &'static str) -> io::Result<[u8; BLOCK]> {
        let mut block = [0u8; BLOCK];
        if self.read_block(&mut block)? {
            Ok(block)
        } else {
            Err(truncated(BLOCK as u64, inside))
        }
    }

    /// Reads and drops `len` bytes.
    fn skip(&mut self, mut len: u64, inside: &'static str) -> io::Result<()> {
        let mut buf = [0u8; 16 * 1024];
        while len > 0 {
            let want = len.min(buf.len() as u64) as usize;
            match self.read(&mut buf[..want]) {
                Ok(0) => return Err(truncated(len, inside)),
                Ok(n) => len -= n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn read_vec(&mut self, len: u64, inside: &'static str) -> io::Result<Vec<u8>> {
        let mut data = Vec::with_capacity(len as usize);
        (&mut *self).take(len).read_to_end(&mut data)?;
        if (data.len() as u64) < len {
            return Err(truncated(len - data.len() as u64, inside));
        }
        Ok(data)
    }
}

/// Members that only describe the next one.
#[derive(Clone, Copy)]
enum Extension {
    LongName,
    LongLink,
    Pax,
    Global,
}

impl Extension {
    fn what(self) -> &'static str {
        match self {
            Extension::LongName => "GNU long name",
            Extension::LongLink => "GNU long link",
            Extension::Pax => "PAX header",
            Extension::Global => "PAX global header",
        }
    }
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// An entry's data as `apply` sees it: exactly `remaining` bytes, or an
/// error. The first error is kept so the layer error can carry it whole.
struct EntryData<'s, 'l, R> {
    stream: &'s mut Stream<'l, R>,
    remaining: u64,
    failure: Option<io::Error>,
}

impl<R: Read> Read for EntryData<'_, '_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        if let Some(e) = &self.failure {
            return Err(io::Error::new(e.kind(), e.to_string()));
        }
        let want = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let result = match self.stream.read(&mut buf[..want]) {
            Ok(0) => Err(truncated(self.remaining, "an entry's data")),
            other => other,
        };
        match result {
            Ok(n) => {
                self.remaining -= n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let copy = io::Error::new(e.kind(), e.to_string());
                self.failure = Some(e);
                Err(copy)
            }
        }
    }
}

/// Reads one layer's tar stream and hands each entry to `apply`, in order.
///
/// `layer` labels errors (the layer's digest, say). `limits` is the image's
/// budget, shared by all its layers. The data reader given to `apply` yields
/// exactly the entry's size (regular files; nothing for other kinds); what
/// `apply` leaves unread is skipped. After the end-of-archive marker the
/// stream is read to its end, so a source that verifies a digest at EOF
/// reports a mismatch here.
pub fn read_layer<R: Read>(
    tar: R,
    layer: &str,
    limits: &mut LayerLimits,
    apply: &mut dyn FnMut(LayerEntry, &mut dyn Read) -> Result<(), ApplyError>,
) -> Result<LayerStats, LayerError> {
    let start_bytes = limits.bytes;
    let mut stream = Stream {
        // Headers are read 512 bytes at a time; a decompressor asked for so
        // little per call spends more on calls than on inflating.
        inner: io::BufReader::with_capacity(READ_BUFFER, tar),
        offset: 0,
        limits,
    };
    let mut stats = LayerStats::default();
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut pax: Option<Vec<u8>> = None;
    let mut globals = GlobalPax::default();
    let mut previous = String::from("the start of the layer");
    let mut block = [0u8; BLOCK];
    let layer_name = || layer.to_owned();

    loop {
        let offset = stream.offset;
        let more = stream.read_block(&mut block).map_err(|source| {
            limit_or(stream.limits, layer, &previous, || LayerError::ReadHeader {
                layer: layer_name(),
                offset,
                previous: previous.clone(),
                source,
            })
        })?;
        if !more || block.iter().all(|&b| b == 0) {
            if let Some(what) = [
                (long_name.is_some(), "a GNU long name"),
                (long_link.is_some(), "a GNU long link"),
                (pax.is_some(), "a PAX header"),
            ]
            .iter()
            .find_map(|&(pending, what)| pending.then_some(what))
            {
                return Err(LayerError::DanglingExtension {
                    layer: layer_name(),
                    what,
                    offset,
                });
            }
            break;
        }
        let header = Header::from_byte_slice(&block);
        let entry_name = String::from_utf8_lossy(&header.path_bytes()).into_owned();
        check_checksum(header).map_err(|(stored, computed)| LayerError::Checksum {
            layer: layer_name(),
            entry: entry_name.clone(),
            offset,
            stored,
            computed,
        })?;
        let extension = match header.entry_type() {
            EntryType::GNULongName => Some(Extension::LongName),
            EntryType::GNULongLink => Some(Extension::LongLink),
            EntryType::XHeader => Some(Extension::Pax),
            EntryType::XGlobalHeader => Some(Extension::Global),
            _ => None,
        };
        if let Some(extension) = extension {
            // Its own header alone frames it: PAX records describe members.
            let size = header.entry_size().map_err(|source| LayerError::Entry {
                layer: layer_name(),
                entry: entry_name.clone(),
                source: EntryError::Field {
                    field: "size",
                    source,
                },
            })?;
            if size > MAX_METADATA_LEN {
                return Err(LayerError::MetadataTooLarge {
                    layer: layer_name(),
                    entry: entry_name,
                    what: extension.what(),
                    len: size,
                });
            }
            let data = stream
                .read_vec(size, "an extension header")
                .and_then(|data| stream.skip(padding(size), "padding").map(|()| data))
                .map_err(|source| {
                    limit_or(stream.limits, layer, &entry_name, || LayerError::ReadData {
                        layer: layer_name(),
                        entry: entry_name.clone(),
                        source,
                    })
                })?;
            // A second one for the same member: the later wins, as in GNU
            // tar. A global header changes what every later member gets.
            match extension {
                Extension::LongName => long_name = Some(data),
                Extension::LongLink => long_link = Some(data),
                Extension::Pax => pax = Some(data),
                Extension::Global => {
                    globals.update(&data).map_err(|source| LayerError::Entry {
                        layer: layer_name(),
                        entry: entry_name.clone(),
                        source,
                    })?;
                    stats.skipped += 1;
                }
            }
            continue;
        }

        let records = globals.resolve(pax.as_deref()).map_err(|source| {
            let entry = match &long_name {
                Some(name) => String::from_utf8_lossy(name).into_owned(),
                None => entry_name.clone(),
            };
            LayerError::Entry {
                layer: layer_name(),
                entry,
                source,
            }
        })?;
        let member = RawMember {
            header,
            long_name: long_name.as_deref(),
            long_link: long_link.as_deref(),
            pax: &records,
        };
        let entry = String::from_utf8_lossy(&member.raw_path()).into_owned();
        let entry_error = |source| LayerError::Entry {
            layer: layer_name(),
            entry: entry.clone(),
            source,
        };
        let size = member.size().map_err(entry_error)?;
        let read_error = |limits: &LayerLimits, source: io::Error| {
            limit_or(limits, layer, &entry, || LayerError::ReadData {
                layer: layer_name(),
                entry: entry.clone(),
                source,
            })
        };

        stream.limits.entries += 1;
        if stream.limits.entries > stream.limits.max_entries {
            let limit = Limit::Entries(stream.limits.max_entries);
            stream.limits.exceeded = Some(limit);
            return Err(LayerError::LimitExceeded {
                layer: layer_name(),
                entry: entry.clone(),
                limit,
            });
        }
        // A sparse member: its map, and the bytes of data that precede the
        // stored regions (PAX 1.0 keeps the map there).
        let sparse_kind = if header.entry_type() == EntryType::GNUSparse {
            Some(SparseKind::OldGnu)
        } else {
            records.sparse().map_err(entry_error)?
        };
        let sparse_error = |limits: &LayerLimits, e: Result<EntryError, io::Error>| match e {
            Ok(source) => entry_error(source),
            Err(source) => read_error(limits, source),
        };
        let (map, map_len): (Option<SparseMap>, u64) = match sparse_kind {
            None => (None, 0),
            Some(SparseKind::Complete(map)) => (Some(map), 0),
            Some(SparseKind::OldGnu) => {
                let map = sparse::old_gnu_map(header, || {
                    stream.next_block("a GNU sparse extension block")
                })
                .map_err(|e| sparse_error(stream.limits, e))?;
                (Some(map), 0)
            }
            Some(SparseKind::InData { real_size }) => {
                let (segments, used) =
                    sparse::read_map_1_0(size, || stream.next_block("a GNU sparse map"))
                        .map_err(|e| sparse_error(stream.limits, e))?;
                let map = SparseMap {
                    real_size,
                    segments,
                };
                (Some(map), used)
            }
        };
        let stored = size - map_len;
        if let Some(map) = &map {
            map.validate(stored).map_err(entry_error)?;
        }
        let real_size = map.as_ref().map_or(size, |m| m.real_size);
        stream.limits.holes += real_size - map.as_ref().map_or(real_size, |_| stored);
        if stream.limits.bytes + stream.limits.holes > stream.limits.max_bytes {
            let limit = Limit::Bytes(stream.limits.max_bytes);
            stream.limits.exceeded = Some(limit);
            return Err(LayerError::LimitExceeded {
                layer: layer_name(),
                entry: entry.clone(),
                limit,
            });
        }
        let classified = classify(&member, real_size).map_err(entry_error)?;
        long_name = None;
        long_link = None;
        pax = None;
        let unread = match classified {
            Classified::Skip => {
                stats.skipped += 1;
                stored
            }
            Classified::Entry(layer_entry) => {
                let data_len = match layer_entry.kind {
                    EntryKind::Regular { size } => size,
                    _ => 0,
                };
                // What the stream holds for the reader: a sparse file's
                // stored regions, another file's data whole.
                let stream_len = match (&map, data_len) {
                    (_, 0) => 0,
                    (Some(_), _) => stored,
                    (None, len) => len,
                };
                let mut data = EntryData {
                    stream: &mut stream,
                    remaining: stream_len,
                    failure: None,
                };
                let (applied, remaining, failure) = match (map, data_len) {
                    (Some(map), len) if len > 0 => {
                        let mut expanded = SparseReader::new(data, map);
                        let applied = apply(layer_entry, &mut expanded);
                        let data = expanded.inner;
                        (applied, data.remaining, data.failure)
                    }
                    _ => {
                        let applied = apply(layer_entry, &mut data);
                        (applied, data.remaining, data.failure)
                    }
                };
                if let Err(source) = applied {
                    if stream.limits.exceeded.is_some() {
                        return Err(read_error(stream.limits, io::Error::other("limit")));
                    }
                    return Err(match failure {
                        Some(failure) => read_error(stream.limits, failure),
                        None => LayerError::Apply {
                            layer: layer_name(),
                            entry: entry.clone(),
                            source,
                        },
                    });
                }
                stats.entries += 1;
                stats.data_bytes += data_len;
                remaining + (stored - stream_len)
            }
        };
        stream
            .skip(unread, "an entry's data")
            .and_then(|()| stream.skip(padding(size), "padding"))
            .map_err(|e| read_error(stream.limits, e))?;
        previous = entry;
    }

    // Whatever follows the end marker (more zero blocks, the writer's
    // record padding) is read so the source's EOF checks run.
    io::copy(&mut stream, &mut io::sink()).map_err(|source| {
        limit_or(stream.limits, layer, "the end-of-archive marker", || {
            LayerError::ReadTrailer {
                layer: layer.to_owned(),
                source,
            }
        })
    })?;
    stats.tar_bytes = stream.limits.bytes - start_bytes;
    Ok(stats)
}

/// The limit error if the budget ran out, since any read error may hide it.
fn limit_or(
    limits: &LayerLimits,
    layer: &str,
    entry: &str,
    otherwise: impl FnOnce() -> LayerError,
) -> LayerError {
    match limits.exceeded {
        Some(limit) => LayerError::LimitExceeded {
            layer: layer.to_owned(),
            entry: entry.to_owned(),
            limit,
        },
        None => otherwise(),
    }
}

/// Checks the header checksum, accepting the signed-byte sum some old tars
/// wrote as GNU tar and Go do. On failure: (as recorded, as computed).
fn check_checksum(header: &Header) -> Result<(), (String, u32)> {
    let bytes = header.as_bytes();
    let rest = bytes[..148].iter().chain(&bytes[156..]);
    let unsigned: u32 = rest.clone().map(|&b| u32::from(b)).sum::<u32>() + 8 * 32;
    let signed: i64 = rest.map(|&b| i64::from(b as i8)).sum::<i64>() + 8 * 32;
    match header.cksum() {
        Ok(stored) if stored == unsigned || i64::from(stored) == signed => Ok(()),
        Ok(stored) => Err((stored.to_string(), unsigned)),
        Err(_) => Err((
            format!("{:?}", String::from_utf8_lossy(&bytes[148..156])),
            unsigned,
        )),
    }
}
