//! Directory blocks: a single linear block for small directories, a hashed
//! index (htree, one or two levels, half-MD4) for anything larger.
//!
//! Entries are ordered by name (linear) or by (hash, name) (hashed), never
//! by arrival, so a directory's bytes depend only on its contents and the
//! hash seed.

use super::hash::dx_hash;
use super::{put16, put32, Ext4Error, BLOCK_SIZE};

pub const FT_REG: u8 = 1;
pub const FT_DIR: u8 = 2;
pub const FT_CHR: u8 = 3;
pub const FT_BLK: u8 = 4;
pub const FT_FIFO: u8 = 5;
pub const FT_SYMLINK: u8 = 7;

/// `s_def_hash_version` and the root's `hash_version`: half-MD4.
pub const HASH_HALF_MD4: u8 = 1;
const ROOT_LIMIT: usize = (BLOCK_SIZE - 32) / 8;
const NODE_LIMIT: usize = (BLOCK_SIZE - 8) / 8;

/// One name in a directory.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub name: &'a [u8],
    pub ino: u32,
    pub file_type: u8,
}

fn rec_len(name_len: usize) -> usize {
    (8 + name_len).div_ceil(4) * 4
}

fn put_entry(buf: &mut [u8], off: usize, ino: u32, rec: usize, name: &[u8], ft: u8) {
    put32(buf, off, ino);
    put16(buf, off + 4, rec as u16);
    buf[off + 6] = name.len() as u8;
    buf[off + 7] = ft;
    buf[off + 8..off + 8 + name.len()].copy_from_slice(name);
}

/// Packs entries into blocks in the order given; the last entry of each
/// block reaches the block's end.
fn pack(blocks: &mut Vec<Vec<u8>>, entries: &[Entry<'_>]) {
    let mut buf = vec![0u8; BLOCK_SIZE];
    let mut off = 0;
    let mut last = None;
    for e in entries {
        let rec = rec_len(e.name.len());
        if off + rec > BLOCK_SIZE {
            fix_last(&mut buf, last);
            blocks.push(std::mem::replace(&mut buf, vec![0u8; BLOCK_SIZE]));
            off = 0;
        }
        put_entry(&mut buf, off, e.ino, rec, e.name, e.file_type);
        last = Some(off);
        off += rec;
    }
    if last.is_none() {
        put16(&mut buf, 4, BLOCK_SIZE as u16);
    }
    fix_last(&mut buf, last);
    blocks.push(buf);
}

fn fix_last(buf: &mut [u8], last: Option<usize>) {
    if let Some(off) = last {
        put16(buf, off + 4, (BLOCK_SIZE - off) as u16);
    }
}

/// The blocks of a directory (inode `ino`, parent `parent`) holding
/// `entries`, and whether they form a hashed index.
pub fn build(
    ino: u32,
    parent: u32,
    mut entries: Vec<Entry<'_>>,
    seed: &[u32; 4],
) -> Result<(Vec<Vec<u8>>, bool), Ext4Error> {
    let linear: usize = 24 + entries.iter().map(|e| rec_len(e.name.len())).sum::<usize>();
    if linear <= BLOCK_SIZE {
        entries.sort_by(|a, b| a.name.cmp(b.name));
        let mut all = vec![
            Entry {
                name: b".",
                ino,
                file_type: FT_DIR,
            },
            Entry {
                name: b"..",
                ino: parent,
                file_type: FT_DIR,
            },
        ];
        all.extend(entries);
        let mut blocks = Vec::new();
        pack(&mut blocks, &all);
        return Ok((blocks, false));
    }
    let mut hashed: Vec<(u32, Entry<'_>)> = entries
        .into_iter()
        .map(|e| (dx_hash(e.name, seed), e))
        .collect();
    hashed.sort_by(|a, b| (a.0, a.1.name).cmp(&(b.0, b.1.name)));

    // Leaves: never split a run of equal hashes across two leaves, so every
    // leaf's range starts at a hash no earlier leaf holds.
    let mut leaves: Vec<Vec<u8>> = Vec::new();
    let mut leaf_hashes: Vec<u32> = Vec::new();
    let mut i = 0;
    while i < hashed.len() {
        let start = i;
        let mut used = 0;
        let mut j = i;
        while j < hashed.len() {
            let mut k = j;
            let mut run = 0;
            while k < hashed.len() && hashed[k].0 == hashed[j].0 {
                run += rec_len(hashed[k].1.name.len());
                k += 1;
            }
            if used + run > BLOCK_SIZE {
                break;
            }
            used += run;
            j = k;
        }
        if j == start {
            return Err(Ext4Error::DirectoryTooLarge);
        }
        let group: Vec<Entry<'_>> = hashed[start..j].iter().map(|(_, e)| e.clone()).collect();
        pack(&mut leaves, &group);
        leaf_hashes.push(hashed[start].0);
        i = j;
    }

    let n = leaves.len();
    let (levels, index_blocks) = if n <= ROOT_LIMIT {
        (0u8, 0usize)
    } else {
        let nodes = n.div_ceil(NODE_LIMIT);
        if nodes > ROOT_LIMIT {
            return Err(Ext4Error::DirectoryTooLarge);
        }
        (1, nodes)
    };
    let first_leaf = 1 + index_blocks;
    let mut root = vec![0u8; BLOCK_SIZE];
    put_entry(&mut root, 0, ino, 12, b".", FT_DIR);
    put_entry(&mut root, 12, parent, BLOCK_SIZE - 12, b"..", FT_DIR);
    root[24 + 4] = HASH_HALF_MD4;
    root[24 + 5] = 8;
    root[24 + 6] = levels;
    let mut blocks = vec![root];
    if levels == 0 {
        let targets: Vec<(u32, u32)> = leaf_hashes
            .iter()
            .enumerate()
            .map(|(k, &h)| (h, (first_leaf + k) as u32))
            .collect();
        write_index(&mut blocks[0], 32, ROOT_LIMIT, &targets);
    } else {
        let mut root_targets = Vec::new();
        for (node, span) in leaf_hashes.chunks(NODE_LIMIT).enumerate() {
            let base = node * NODE_LIMIT;
            let targets: Vec<(u32, u32)> = span
                .iter()
                .enumerate()
                .map(|(k, &h)| (h, (first_leaf + base + k) as u32))
                .collect();
            let mut buf = vec![0u8; BLOCK_SIZE];
            put16(&mut buf, 4, BLOCK_SIZE as u16);
            write_index(&mut buf, 8, NODE_LIMIT, &targets);
            blocks.push(buf);
            root_targets.push((span[0], (1 + node) as u32));
        }
        write_index(&mut blocks[0], 32, ROOT_LIMIT, &root_targets);
    }
    blocks.extend(leaves);
    Ok((blocks, true))
}

/// A count/limit header and entries: the first entry's hash slot holds the
/// count and limit, its range starting at hash 0.
fn write_index(buf: &mut [u8], off: usize, limit: usize, targets: &[(u32, u32)]) {
    put16(buf, off, limit as u16);
    put16(buf, off + 2, targets.len() as u16);
    for (k, &(hash, block)) in targets.iter().enumerate() {
        if k > 0 {
            put32(buf, off + 8 * k, hash);
        }
        put32(buf, off + 8 * k + 4, block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_directories_are_one_linear_block() {
        let e = vec![
            Entry {
                name: b"b",
                ino: 13,
                file_type: FT_REG,
            },
            Entry {
                name: b"a",
                ino: 12,
                file_type: FT_DIR,
            },
        ];
        let (blocks, indexed) = build(12, 2, e, &[1, 2, 3, 4]).unwrap();
        assert!(!indexed);
        assert_eq!(blocks.len(), 1);
        assert_eq!(&blocks[0][24 + 8..24 + 9], b"a");
    }

    #[test]
    fn large_directories_get_an_index_with_levels_as_needed() {
        let names: Vec<Vec<u8>> = (0..100_000)
            .map(|i| format!("file-{i:08}").into_bytes())
            .collect();
        let e: Vec<Entry<'_>> = names
            .iter()
            .map(|n| Entry {
                name: n,
                ino: 20,
                file_type: FT_REG,
            })
            .collect();
        let (blocks, indexed) = build(12, 2, e, &[1, 2, 3, 4]).unwrap();
        assert!(indexed);
        assert_eq!(blocks[0][24 + 6], 1, "100k names need two levels");
    }
}
