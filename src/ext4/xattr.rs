//! Extended attributes: the name-index encoding, POSIX ACLs in ext4's own
//! compact form, and the two places attributes live: the inode's spare 96
//! bytes, or one external block.

use super::hash::{xattr_block_hash, xattr_entry_hash};
use super::inode::IBODY_XATTR_SIZE;
use super::{put16, put32, Ext4Error, BLOCK_SIZE};

const MAGIC: u32 = 0xEA02_0000;
const BLOCK_HEADER: usize = 32;

/// One attribute as ext4 stores it: namespace index, name without its
/// prefix, value in on-disk form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub index: u8,
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// Where a set of attributes goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    None,
    /// The in-inode area, [`IBODY_XATTR_SIZE`] bytes.
    Inode(Vec<u8>),
    /// One external block.
    Block(Vec<u8>),
}

/// Converts full names (`user.x`) and values as the VFS sees them into the
/// on-disk form, sorted the way the kernel searches attribute blocks.
pub fn to_disk(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<Attr>, Ext4Error> {
    let mut out = Vec::with_capacity(xattrs.len());
    for (full, value) in xattrs {
        let (index, name): (u8, &[u8]) = if let Some(n) = full.strip_prefix(b"user.") {
            (1, n)
        } else if full == b"system.posix_acl_access" {
            (2, b"")
        } else if full == b"system.posix_acl_default" {
            (3, b"")
        } else if let Some(n) = full.strip_prefix(b"trusted.") {
            (4, n)
        } else if let Some(n) = full.strip_prefix(b"security.") {
            (6, n)
        } else {
            return Err(Ext4Error::XattrNamespace {
                name: String::from_utf8_lossy(full).into_owned(),
            });
        };
        if name.len() > 255 || (name.is_empty() && index != 2 && index != 3) {
            return Err(Ext4Error::XattrNamespace {
                name: String::from_utf8_lossy(full).into_owned(),
            });
        }
        let value = if index == 2 || index == 3 {
            acl_to_disk(value).ok_or_else(|| Ext4Error::AclMalformed {
                name: String::from_utf8_lossy(full).into_owned(),
            })?
        } else {
            value.clone()
        };
        out.push(Attr {
            index,
            name: name.to_vec(),
            value,
        });
    }
    out.sort_by(|a, b| (a.index, a.name.len(), &a.name).cmp(&(b.index, b.name.len(), &b.name)));
    Ok(out)
}

/// The VFS ACL (`posix_acl_xattr`, version 2, 8 bytes per entry) in ext4's
/// form (version 1; 4-byte entries for the owner, group, mask and other
/// tags, 8-byte entries for named users and groups).
fn acl_to_disk(vfs: &[u8]) -> Option<Vec<u8>> {
    if vfs.len() < 4
        || (vfs.len() - 4) % 8 != 0
        || u32::from_le_bytes(vfs[0..4].try_into().ok()?) != 2
    {
        return None;
    }
    let mut out = 1u32.to_le_bytes().to_vec();
    for e in vfs[4..].chunks(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        out.extend_from_slice(&e[0..4]);
        match tag {
            0x01 | 0x04 | 0x10 | 0x20 => {}
            0x02 | 0x08 => out.extend_from_slice(&e[4..8]),
            _ => return None,
        }
    }
    Some(out)
}

fn entry_len(a: &Attr) -> usize {
    (16 + a.name.len()).div_ceil(4) * 4
}

fn value_len(a: &Attr) -> usize {
    a.value.len().div_ceil(4) * 4
}

/// Lays entries and values into `area`: entries from `entries_at`, values
/// packed down from the end; value offsets count from `base`.
fn lay_out(attrs: &[Attr], area: &mut [u8], entries_at: usize, base: usize) -> Vec<u32> {
    let mut hashes = Vec::with_capacity(attrs.len());
    let mut e = entries_at;
    let mut v = area.len();
    for a in attrs {
        let hash = xattr_entry_hash(&a.name, &a.value);
        let offs = if a.value.is_empty() {
            0
        } else {
            v -= value_len(a);
            area[v..v + a.value.len()].copy_from_slice(&a.value);
            v - base
        };
        area[e] = a.name.len() as u8;
        area[e + 1] = a.index;
        put16(area, e + 2, offs as u16);
        put32(area, e + 8, a.value.len() as u32);
        put32(area, e + 12, hash);
        area[e + 16..e + 16 + a.name.len()].copy_from_slice(&a.name);
        e += entry_len(a);
        hashes.push(hash);
    }
    hashes
}

/// Chooses the inode area when everything fits there, else one block.
pub fn place(attrs: &[Attr]) -> Result<Placement, Ext4Error> {
    if attrs.is_empty() {
        return Ok(Placement::None);
    }
    let body: usize = attrs.iter().map(|a| entry_len(a) + value_len(a)).sum();
    if 4 + body + 4 <= IBODY_XATTR_SIZE {
        let mut area = vec![0u8; IBODY_XATTR_SIZE];
        put32(&mut area, 0, MAGIC);
        lay_out(attrs, &mut area, 4, 4);
        return Ok(Placement::Inode(area));
    }
    if BLOCK_HEADER + body + 4 > BLOCK_SIZE {
        return Err(Ext4Error::XattrTooLarge { bytes: body });
    }
    let mut block = vec![0u8; BLOCK_SIZE];
    put32(&mut block, 0, MAGIC);
    put32(&mut block, 4, 1); // h_refcount
    put32(&mut block, 8, 1); // h_blocks
    let hashes = lay_out(attrs, &mut block, BLOCK_HEADER, 0);
    put32(&mut block, 12, xattr_block_hash(&hashes));
    Ok(Placement::Block(block))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(n: &str, v: &[u8]) -> (Vec<u8>, Vec<u8>) {
        (n.as_bytes().to_vec(), v.to_vec())
    }

    #[test]
    fn small_sets_go_in_the_inode_large_in_a_block() {
        let small = to_disk(&[x("user.a", b"1")]).unwrap();
        assert!(matches!(place(&small).unwrap(), Placement::Inode(_)));
        let big = to_disk(&[x("user.a", &[7u8; 200])]).unwrap();
        assert!(matches!(place(&big).unwrap(), Placement::Block(_)));
        let huge = to_disk(&[x("user.a", &[7u8; 5000])]).unwrap();
        assert!(matches!(place(&huge), Err(Ext4Error::XattrTooLarge { .. })));
    }

    #[test]
    fn unknown_namespaces_and_bad_acls_are_refused() {
        assert!(to_disk(&[x("foo.bar", b"")]).is_err());
        assert!(to_disk(&[x("system.posix_acl_access", b"\x02\0\0\0\x01")]).is_err());
        let mut acl = 2u32.to_le_bytes().to_vec();
        acl.extend_from_slice(&[1, 0, 6, 0, 0xff, 0xff, 0xff, 0xff]);
        acl.extend_from_slice(&[2, 0, 4, 0, 0xe8, 3, 0, 0]);
        let d = to_disk(&[x("system.posix_acl_access", &acl)]).unwrap();
        assert_eq!(
            d[0].value,
            [1, 0, 0, 0, 1, 0, 6, 0, 2, 0, 4, 0, 0xe8, 3, 0, 0]
        );
    }
}
