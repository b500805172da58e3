//! Where an image holds data, so that push reads data and skips holes.
//!
//! Linux reports a regular file's holes through `lseek(SEEK_DATA)` and
//! `lseek(SEEK_HOLE)` (ext4, XFS, btrfs, tmpfs and others; a file system
//! without support answers as if the whole file were data, which is still
//! correct). A push of a 64 GiB file holding 320 MiB then reads 320 MiB
//! instead of 64 GiB of zeros.
//!
//! A block device refuses both (`EINVAL`: the block layer's `lseek` knows
//! the device's size and nothing of its allocation; checked on Linux 6.18
//! with a loop device over a sparse file), and no generic interface tells
//! which ranges of a device are unmapped or known to be zero. A block device is therefore read whole, and its
//! zero chunks are found by their content (still neither sealed nor stored).
//!
//! Any failure to ask is answered "data": reading too much is slow but
//! right, skipping too much would lose data.

use std::fs::File;
use std::ops::Range;

use rustix::fs::{seek, SeekFrom};
use rustix::io::Errno;

/// The start of the first data at or after `from`, or `None` if the file
/// holds none there (all holes up to its end).
pub(super) fn next_data(file: &File, from: u64) -> Option<u64> {
    match seek(file, SeekFrom::Data(from)) {
        Ok(at) => Some(at),
        Err(Errno::NXIO) => None,
        Err(_) => Some(from),
    }
}

/// The end of the data that starts at `from`: the next hole, or `limit`.
fn next_hole(file: &File, from: u64, limit: u64) -> u64 {
    match seek(file, SeekFrom::Hole(from)) {
        Ok(at) if at > from => at.min(limit),
        _ => limit,
    }
}

/// The ranges of `range` that hold data, in order.
pub(super) fn data_ranges(file: &File, range: Range<u64>) -> Vec<Range<u64>> {
    let mut ranges = Vec::new();
    let mut at = range.start;
    while at < range.end {
        let Some(start) = next_data(file, at).filter(|&start| start < range.end) else {
            break;
        };
        let end = next_hole(file, start, range.end);
        ranges.push(start..end);
        at = end;
    }
    ranges
}

/// Whether any of `ranges` (sorted, disjoint) overlaps `chunk`.
pub(super) fn overlaps(ranges: &[Range<u64>], chunk: &Range<u64>) -> bool {
    // The first range that ends after the chunk starts is the only candidate.
    let first = ranges.partition_point(|r| r.end <= chunk.start);
    ranges.get(first).is_some_and(|r| r.start < chunk.end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn finds_data_between_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let file = File::options()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        const MIB: u64 = 1 << 20;
        file.set_len(64 * MIB).unwrap();
        file.write_all_at(&[1; 4096], 8 * MIB).unwrap();
        file.write_all_at(&[2; 4096], 40 * MIB + 100).unwrap();
        let ranges = data_ranges(&file, 0..64 * MIB);
        // File systems report data in blocks: ranges cover what was written,
        // and nothing near the middle of the holes.
        assert_eq!(ranges.len(), 2, "{ranges:?}");
        assert!(ranges[0].start <= 8 * MIB && ranges[0].end >= 8 * MIB + 4096);
        assert!(ranges[1].start <= 40 * MIB + 100 && ranges[1].end >= 40 * MIB + 4196);
        assert!(!overlaps(&ranges, &(20 * MIB..21 * MIB)));
        assert!(overlaps(&ranges, &(8 * MIB..9 * MIB)));
        assert!(overlaps(&ranges, &(40 * MIB..41 * MIB)));
        assert!(!overlaps(&ranges, &(60 * MIB..64 * MIB)));
        assert_eq!(next_data(&file, 41 * MIB), None);
        // A window inside one range, and one inside a hole.
        assert_eq!(data_ranges(&file, 8 * MIB + 1..8 * MIB + 2).len(), 1);
        assert!(data_ranges(&file, 30 * MIB..31 * MIB).is_empty());
    }
}
