//! The variable parts of a node, each one pointer or less in the common
//! case: most files have no attributes, one extent and no extent tree.
//! Each reads as the slice it stands for.

use std::ops::Deref;

use crate::ext4::extent::Extent;
use crate::oci::entry::Timestamp;

/// A modification time in twelve bytes: packed to four-byte alignment, it
/// leaves no padding in the metadata around it. Read its fields by value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C, packed(4))]
pub struct Mtime {
    pub secs: i64,
    /// Below 1,000,000,000.
    pub nanos: u32,
}

impl From<Timestamp> for Mtime {
    fn from(t: Timestamp) -> Mtime {
        Mtime {
            secs: t.secs,
            nanos: t.nanos,
        }
    }
}

/// (full name, value) pairs.
type Pairs = [(Vec<u8>, Vec<u8>)];

/// Extended attributes, boxed only when there are some. Boxes of boxed
/// slices here are on purpose: the outer box keeps the field one word.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Xattrs(Option<Box<Box<Pairs>>>);

impl From<Vec<(Vec<u8>, Vec<u8>)>> for Xattrs {
    fn from(list: Vec<(Vec<u8>, Vec<u8>)>) -> Xattrs {
        // Empty is always `None`, so equal lists compare equal.
        Xattrs((!list.is_empty()).then(|| Box::new(list.into_boxed_slice())))
    }
}

impl Deref for Xattrs {
    type Target = Pairs;

    fn deref(&self) -> &Pairs {
        self.0.as_deref().map_or(&[], |b| b)
    }
}

/// A node's data (or directory) blocks: none, one extent in place, or more
/// behind a pointer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Extents {
    #[default]
    None,
    One(Extent),
    Many(Box<Box<[Extent]>>),
}

impl From<Vec<Extent>> for Extents {
    fn from(list: Vec<Extent>) -> Extents {
        match list.len() {
            0 => Extents::None,
            1 => Extents::One(list[0]),
            _ => Extents::Many(Box::new(list.into_boxed_slice())),
        }
    }
}

impl Deref for Extents {
    type Target = [Extent];

    fn deref(&self) -> &[Extent] {
        match self {
            Extents::None => &[],
            Extents::One(e) => std::slice::from_ref(e),
            Extents::Many(list) => list,
        }
    }
}

/// The blocks of an extent tree too large for the inode, leaves first;
/// boxed, since few files have one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeBlocks(Option<Box<Box<[u64]>>>);

impl From<Vec<u64>> for TreeBlocks {
    fn from(list: Vec<u64>) -> TreeBlocks {
        TreeBlocks((!list.is_empty()).then(|| Box::new(list.into_boxed_slice())))
    }
}

impl Deref for TreeBlocks {
    type Target = [u64];

    fn deref(&self) -> &[u64] {
        self.0.as_deref().map_or(&[], |b| b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_part_reads_as_what_it_was_made_from() {
        let list = vec![(b"user.a".to_vec(), b"1".to_vec())];
        assert_eq!(&*Xattrs::from(list.clone()), &list[..]);
        assert_eq!(Xattrs::from(Vec::new()), Xattrs::default());
        for n in 0..4u32 {
            let extents: Vec<Extent> = (0..n)
                .map(|i| Extent::new(i * 9, 100 + u64::from(i), 2))
                .collect();
            assert_eq!(&*Extents::from(extents.clone()), &extents[..]);
        }
        assert_eq!(&*TreeBlocks::from(vec![5, 6]), &[5, 6]);
        assert!(TreeBlocks::from(Vec::new()).is_empty());
        assert_eq!(std::mem::size_of::<Extents>(), 16);
        assert_eq!(std::mem::size_of::<Mtime>(), 12);
        let t = Timestamp {
            secs: -5,
            nanos: 999_999_999,
        };
        let m = Mtime::from(t);
        assert_eq!((m.secs, m.nanos), (t.secs, t.nanos));
        assert_eq!(std::mem::size_of::<Xattrs>(), 8);
        assert_eq!(std::mem::size_of::<TreeBlocks>(), 8);
    }
}
