//! What opening a cache directory checks, and how it repairs what fails.
//!
//! The files of a cache may have been damaged while no process held them (a
//! full disk, a careless copy, a bad sector, a crash of the file system
//! itself). None of that is ever trusted: a damaged `present` file, a
//! missing or resized `data` file, or a fetched chunk whose bytes are a hole
//! loses the bits that cannot be vouched for. Those chunks are fetched again;
//! chunks the device wrote to and that lose their bit are lost, which is what
//! a disk that lost those blocks would do, and the log says so.
//!
//! A cache made for another image is not damage: it is refused, never
//! repaired (see [`CacheError::WrongManifest`]).

use std::fmt;
use std::fs::File;
use std::path::Path;

use super::bitmap::{self, DecodeError, Geometry, PresentBits};
use super::{open_data, write_bitmap, CacheError, BITMAP_FILE, DATA_FILE, WRITTEN_LOG};

/// Damage found when a cache was opened, and the bits dropped for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub damage: Damage,
    /// The chunks whose bits were dropped (present, and written if set).
    pub dropped: Vec<u64>,
}

/// What was wrong with a cache's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// `present` failed its checks: every chunk counts as absent.
    Bitmap(DecodeError),
    /// `data` exists without `present`: nothing in it can be vouched for.
    BitmapMissing,
    /// `present` lists chunks but `data` is gone.
    DataMissing,
    /// `data` was `actual` bytes, not the image's size: chunks past its end
    /// are gone, and it is resized.
    DataSize { actual: u64 },
    /// Fetched chunks whose bytes in `data` are holes (a fetched chunk is
    /// never all zeros: the manifest stores none).
    Holes,
}

impl fmt::Display for Repair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.damage {
            Damage::Bitmap(reason) => write!(
                f,
                "{BITMAP_FILE} is damaged ({reason}): every chunk is fetched again and writes \
                 to the device since it was created are lost"
            )?,
            Damage::BitmapMissing => write!(
                f,
                "{DATA_FILE} exists without {BITMAP_FILE}: every chunk is fetched again and \
                 writes to the device since it was created are lost"
            )?,
            Damage::DataMissing => write!(f, "{DATA_FILE} is missing")?,
            Damage::DataSize { actual } => write!(
                f,
                "{DATA_FILE} is {actual} bytes, not the image's size: chunks past its end are dropped"
            )?,
            Damage::Holes => write!(f, "fetched chunks in {DATA_FILE} are holes")?,
        }
        if !self.dropped.is_empty() {
            write!(
                f,
                "; dropped {} chunk(s): {}",
                self.dropped.len(),
                list_indices(&self.dropped)
            )?;
        }
        Ok(())
    }
}

/// Chunk indices for a message: all of a few, or the first ones of many.
pub fn list_indices(indices: &[u64]) -> String {
    const SHOWN: usize = 16;
    let mut text = indices
        .iter()
        .take(SHOWN)
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if indices.len() > SHOWN {
        text.push_str(&format!(" and {} more", indices.len() - SHOWN));
    }
    text
}

/// Whether opening may change a cache's files to repair them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// Repair what is damaged, creating what is absent.
    Repair,
    /// Change nothing on disk: damage is found and reported, bits that
    /// cannot be vouched for are dropped in memory only.
    ReadOnly,
}

/// A cache directory's files, checked (and repaired, for [`Access::Repair`]).
pub(super) struct Loaded {
    /// `None` only read-only, when `data` is missing.
    pub data: Option<File>,
    /// The chunks in `data` and those the device wrote, as `present` lists
    /// them.
    pub present: PresentBits,
    pub written: PresentBits,
    pub repairs: Vec<Repair>,
    /// `None` only read-only, when `written.log` is missing.
    pub written_log: Option<File>,
    /// Present chunks `written.log` marks written.
    pub logged: Vec<u64>,
    /// Where the next entry of `written.log` goes.
    pub log_len: u64,
}

/// Opens (creating if absent) the files of the cache in `dir`, which the
/// caller has locked, for `geometry`; with [`Access::Repair`], damage is
/// repaired and the repaired bitmap persisted before this returns.
pub(super) fn load(dir: &Path, geometry: &Geometry, access: Access) -> Result<Loaded, CacheError> {
    let repair = access == Access::Repair;
    let data_path = dir.join(DATA_FILE);
    let bitmap_path = dir.join(BITMAP_FILE);
    let data_exists = data_path
        .try_exists()
        .map_err(|source| CacheError::OpenData {
            path: data_path.clone(),
            source,
        })?;
    let empty = || {
        (
            PresentBits::empty(geometry.chunk_count),
            PresentBits::empty(geometry.chunk_count),
        )
    };
    let mut repairs = Vec::new();
    let (present, written) = match std::fs::read(&bitmap_path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if data_exists {
                repairs.push(Repair {
                    damage: Damage::BitmapMissing,
                    dropped: Vec::new(),
                });
            } else if repair {
                // The bitmap is written before the data file exists, so a
                // crash between the two leaves an empty bitmap and no data:
                // the next open finishes the job.
                let none = PresentBits::empty(geometry.chunk_count).snapshot();
                write_bitmap(dir, &bitmap::encode(geometry, &none, &none))?;
            }
            empty()
        }
        Err(source) => {
            return Err(CacheError::ReadBitmap {
                path: bitmap_path,
                source,
            })
        }
        Ok(bytes) => match bitmap::decode(&bytes) {
            Ok(found) if found.geometry != *geometry => {
                return Err(CacheError::WrongManifest {
                    dir: dir.to_owned(),
                    found: Box::new(found.geometry),
                    expected: Box::new(*geometry),
                })
            }
            Ok(found) => (
                PresentBits::from_words(geometry.chunk_count, found.present),
                PresentBits::from_words(geometry.chunk_count, found.written),
            ),
            // A newer format is not damage: leave it to the build that wrote it.
            Err(reason @ DecodeError::Version(_)) => {
                return Err(CacheError::UnsupportedBitmap {
                    path: bitmap_path,
                    reason,
                })
            }
            Err(reason) => {
                repairs.push(Repair {
                    damage: Damage::Bitmap(reason),
                    dropped: Vec::new(),
                });
                empty()
            }
        },
    };

    let data = if repair {
        Some(open_data(
            dir,
            &data_path,
            geometry.image_size,
            data_exists,
        )?)
    } else if data_exists {
        Some(
            File::open(&data_path).map_err(|source| CacheError::OpenData {
                path: data_path.clone(),
                source,
            })?,
        )
    } else {
        None
    };
    let chunk_end =
        |index: u64| ((index + 1) * u64::from(geometry.chunk_size)).min(geometry.image_size);
    if !data_exists {
        let dropped = drop_where(&present, &written, |_| true);
        if !dropped.is_empty() {
            repairs.push(Repair {
                damage: Damage::DataMissing,
                dropped,
            });
        }
    } else if let Some(data) = &data {
        let open_err = |source| CacheError::OpenData {
            path: data_path.clone(),
            source,
        };
        let actual = data.metadata().map_err(open_err)?.len();
        if actual != geometry.image_size {
            let dropped = drop_where(&present, &written, |index| chunk_end(index) > actual);
            if repair {
                data.set_len(geometry.image_size).map_err(open_err)?;
                data.sync_all().map_err(open_err)?;
            }
            repairs.push(Repair {
                damage: Damage::DataSize { actual },
                dropped,
            });
        }
        let fetched = present.indices().into_iter().filter(|&i| !written.get(i));
        let mut holes = Vec::new();
        for index in fetched {
            let start = index * u64::from(geometry.chunk_size);
            if is_hole(data, start, chunk_end(index)).map_err(open_err)? {
                holes.push(index);
            }
        }
        if !holes.is_empty() {
            drop_where(&present, &written, |index| {
                holes.binary_search(&index).is_ok()
            });
            repairs.push(Repair {
                damage: Damage::Holes,
                dropped: holes,
            });
        }
    }
    let (written_log, logged, log_len) = open_written_log(dir, &present, access)?;
    if repair && !repairs.is_empty() {
        for repair in &repairs {
            tracing::warn!(cache = %dir.display(), "cache repaired on open: {repair}");
        }
        write_bitmap(
            dir,
            &bitmap::encode(geometry, &present.snapshot(), &written.snapshot()),
        )?;
    }
    Ok(Loaded {
        data,
        present,
        written,
        repairs,
        written_log,
        logged,
        log_len,
    })
}

/// Opens `written.log` (creating it if absent, unless read-only) and reads
/// the present chunks it marks written: indices as `u64` little-endian.
/// Entries for chunks not present mean nothing, and a torn last entry is
/// overwritten.
fn open_written_log(
    dir: &Path,
    present: &PresentBits,
    access: Access,
) -> Result<(Option<File>, Vec<u64>, u64), CacheError> {
    let path = dir.join(WRITTEN_LOG);
    let log_err = |source| CacheError::RecordWritten {
        path: path.clone(),
        source,
    };
    let file = match access {
        Access::Repair => crate::private::file_options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path),
        Access::ReadOnly => File::open(&path),
    };
    let file = match file {
        Err(e) if access == Access::ReadOnly && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((None, Vec::new(), 0))
        }
        opened => opened.map_err(log_err)?,
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut &file, &mut bytes).map_err(log_err)?;
    let logged = bytes
        .chunks_exact(8)
        .map(|entry| u64::from_le_bytes(entry.try_into().expect("8 bytes")))
        .filter(|&index| present.get(index))
        .collect();
    Ok((Some(file), logged, bytes.len() as u64 / 8 * 8))
}

/// Whether `data` holds no byte in `start..end`, by `SEEK_DATA`. A file
/// system without it reports data everywhere, which keeps every bit.
fn is_hole(data: &File, start: u64, end: u64) -> std::io::Result<bool> {
    match rustix::fs::seek(data, rustix::fs::SeekFrom::Data(start)) {
        Ok(next) => Ok(next >= end),
        Err(rustix::io::Errno::NXIO) => Ok(true),
        Err(errno) => Err(errno.into()),
    }
}

/// Clears the present and written bits of every present chunk `drop`
/// picks; returns those chunks.
fn drop_where(
    present: &PresentBits,
    written: &PresentBits,
    drop: impl Fn(u64) -> bool,
) -> Vec<u64> {
    let dropped: Vec<u64> = present.indices().into_iter().filter(|&i| drop(i)).collect();
    for &index in &dropped {
        present.clear(index);
        written.clear(index);
    }
    dropped
}
