//! The hashes ext4 stores: the directory-index name hash (half-MD4, the
//! unsigned-char variant the superblock's `EXT2_FLAGS_UNSIGNED_HASH` selects)
//! and the extended-attribute entry hash. Both must match what the kernel
//! and e2fsck compute bit for bit.

const K2: u32 = 0o13240474631;
const K3: u32 = 0o15666365641;

fn f(x: u32, y: u32, z: u32) -> u32 {
    z ^ (x & (y ^ z))
}
fn g(x: u32, y: u32, z: u32) -> u32 {
    (x & y).wrapping_add((x ^ y) & z)
}
fn h(x: u32, y: u32, z: u32) -> u32 {
    x ^ y ^ z
}

fn half_md4_transform(buf: &mut [u32; 4], inp: &[u32; 8]) {
    let [mut a, mut b, mut c, mut d] = *buf;
    macro_rules! round {
        ($f:ident, $a:ident, $b:ident, $c:ident, $d:ident, $x:expr, $s:expr) => {
            $a = $a
                .wrapping_add($f($b, $c, $d))
                .wrapping_add($x)
                .rotate_left($s);
        };
    }
    round!(f, a, b, c, d, inp[0], 3);
    round!(f, d, a, b, c, inp[1], 7);
    round!(f, c, d, a, b, inp[2], 11);
    round!(f, b, c, d, a, inp[3], 19);
    round!(f, a, b, c, d, inp[4], 3);
    round!(f, d, a, b, c, inp[5], 7);
    round!(f, c, d, a, b, inp[6], 11);
    round!(f, b, c, d, a, inp[7], 19);

    round!(g, a, b, c, d, inp[1].wrapping_add(K2), 3);
    round!(g, d, a, b, c, inp[3].wrapping_add(K2), 5);
    round!(g, c, d, a, b, inp[5].wrapping_add(K2), 9);
    round!(g, b, c, d, a, inp[7].wrapping_add(K2), 13);
    round!(g, a, b, c, d, inp[0].wrapping_add(K2), 3);
    round!(g, d, a, b, c, inp[2].wrapping_add(K2), 5);
    round!(g, c, d, a, b, inp[4].wrapping_add(K2), 9);
    round!(g, b, c, d, a, inp[6].wrapping_add(K2), 13);

    round!(h, a, b, c, d, inp[3].wrapping_add(K3), 3);
    round!(h, d, a, b, c, inp[7].wrapping_add(K3), 9);
    round!(h, c, d, a, b, inp[2].wrapping_add(K3), 11);
    round!(h, b, c, d, a, inp[6].wrapping_add(K3), 15);
    round!(h, a, b, c, d, inp[1].wrapping_add(K3), 3);
    round!(h, d, a, b, c, inp[5].wrapping_add(K3), 9);
    round!(h, c, d, a, b, inp[0].wrapping_add(K3), 11);
    round!(h, b, c, d, a, inp[4].wrapping_add(K3), 15);

    buf[0] = buf[0].wrapping_add(a);
    buf[1] = buf[1].wrapping_add(b);
    buf[2] = buf[2].wrapping_add(c);
    buf[3] = buf[3].wrapping_add(d);
}

/// Packs up to `4 * N` bytes of `msg` into words, padded with the length.
fn str2hashbuf<const N: usize>(msg: &[u8]) -> [u32; N] {
    let len = msg.len() as u32;
    let mut pad = len | (len << 8);
    pad |= pad << 16;
    let mut out = [pad; N];
    let mut val = pad;
    let take = msg.len().min(N * 4);
    let mut i = 0;
    for (k, &byte) in msg[..take].iter().enumerate() {
        val = u32::from(byte).wrapping_add(val << 8);
        if k % 4 == 3 {
            out[i] = val;
            i += 1;
            val = pad;
        }
    }
    if i < N {
        out[i] = val;
    }
    out
}

/// The htree hash of `name` under `seed` (the superblock's `s_hash_seed`):
/// even, and never the end-of-directory marker.
pub fn dx_hash(name: &[u8], seed: &[u32; 4]) -> u32 {
    let mut buf = if seed.iter().any(|&w| w != 0) {
        *seed
    } else {
        [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476]
    };
    let mut p = name;
    loop {
        let inp: [u32; 8] = str2hashbuf(p);
        half_md4_transform(&mut buf, &inp);
        if p.len() <= 32 {
            break;
        }
        p = &p[32..];
    }
    let hash = buf[1] & !1;
    if hash == 0x7fff_ffff << 1 {
        (0x7fff_ffff - 1) << 1
    } else {
        hash
    }
}

/// The hash of one extended-attribute entry: its name (without the
/// namespace prefix) and its value padded to four bytes.
pub fn xattr_entry_hash(name: &[u8], value: &[u8]) -> u32 {
    let mut hash: u32 = 0;
    for &c in name {
        hash = (hash << 5) ^ (hash >> 27) ^ u32::from(c);
    }
    for word in value.chunks(4) {
        let mut w = [0u8; 4];
        w[..word.len()].copy_from_slice(word);
        hash = (hash << 16) ^ (hash >> 16) ^ u32::from_le_bytes(w);
    }
    hash
}

/// The hash of a whole attribute block, from its entries' hashes.
pub fn xattr_block_hash(entry_hashes: &[u32]) -> u32 {
    let mut hash: u32 = 0;
    for &e in entry_hashes {
        if e == 0 {
            return 0;
        }
        hash = (hash << 16) ^ (hash >> 16) ^ e;
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from e2fsprogs 1.47.0: `debugfs -R "dx_hash -h half_md4 -s
    /// 00000001-0000-0002-0000-000300000004 NAME"`. ASCII names only: past
    /// 0x7f debugfs computes the signed variant; the unsigned one is checked
    /// by e2fsck on a real directory in `tests/flatten_kernel.rs`.
    #[test]
    fn hash_matches_e2fsprogs() {
        let seed = [0x0100_0000, 0x0200_0000, 0x0300_0000, 0x0400_0000];
        assert_eq!(dx_hash(b"hello", &seed), 0xe00f2e40);
        let long = "hello-with-a-name-longer-than-thirty-two-bytes";
        assert_eq!(dx_hash(long.as_bytes(), &seed), 0x5a62523a);
    }

    #[test]
    fn hash_is_even_and_depends_on_seed_and_every_byte() {
        let seed = [1, 2, 3, 4];
        let a = dx_hash(b"hello", &seed);
        assert_eq!(a & 1, 0);
        assert_ne!(a, dx_hash(b"hellp", &seed));
        assert_ne!(a, dx_hash(b"hello", &[1, 2, 3, 5]));
        let long = vec![b'x'; 200];
        let mut long2 = long.clone();
        long2[150] = b'y';
        assert_ne!(dx_hash(&long, &seed), dx_hash(&long2, &seed));
    }
}
