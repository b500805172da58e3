//! The output image as a positioned, buffered writer.
//!
//! File data arrives in order and mostly lands contiguously, so writes are
//! gathered until they stop being contiguous; a seek happens only then.
//! Blocks never written stay holes in the output file; the sink remembers
//! which blocks it wrote, so the image's digest reads back only those and
//! hashes the rest as the zeros they are.

use std::io::{self, Read, Seek, SeekFrom, Write};

use sha2::{Digest, Sha256};

use crate::ext4::BLOCK_SIZE;

const BUFFER: usize = 1 << 20;

pub struct Sink<W> {
    out: W,
    /// Where the buffered bytes go.
    buf_start: u64,
    buf: Vec<u8>,
    /// The highest byte offset written so far, plus one.
    pub end: u64,
    /// One bit per block: some byte of it was written.
    written: Vec<u64>,
}

impl<W: Read + Write + Seek> Sink<W> {
    pub fn new(out: W) -> Sink<W> {
        Sink {
            out,
            buf_start: 0,
            buf: Vec::with_capacity(BUFFER),
            end: 0,
            written: Vec::new(),
        }
    }

    /// Writes `data` at block `block`.
    pub fn write_block(&mut self, block: u64, data: &[u8]) -> io::Result<()> {
        self.write_at(block * BLOCK_SIZE as u64, data)
    }

    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if offset != self.buf_start + self.buf.len() as u64 || self.buf.len() + data.len() > BUFFER
        {
            self.flush()?;
            self.buf_start = offset;
        }
        if data.len() > BUFFER {
            self.out.seek(SeekFrom::Start(offset))?;
            self.out.write_all(data)?;
            self.buf_start = offset + data.len() as u64;
        } else {
            self.buf.extend_from_slice(data);
        }
        self.end = self.end.max(offset + data.len() as u64);
        let bs = BLOCK_SIZE as u64;
        for block in offset / bs..(offset + data.len() as u64).div_ceil(bs) {
            let word = (block / 64) as usize;
            if word >= self.written.len() {
                self.written.resize(word + 1, 0);
            }
            self.written[word] |= 1 << (block % 64);
        }
        Ok(())
    }

    fn was_written(&self, block: u64) -> bool {
        self.written
            .get((block / 64) as usize)
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.out.seek(SeekFrom::Start(self.buf_start))?;
            self.out.write_all(&self.buf)?;
            self.buf_start += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Flushes, then the SHA-256 of the first `size` bytes of the output
    /// (a whole number of blocks): written blocks are read back, the others
    /// are zeros and hashed as such.
    pub fn finish(mut self, size: u64) -> io::Result<(W, [u8; 32])> {
        self.flush()?;
        self.out.flush()?;
        let bs = BLOCK_SIZE as u64;
        let blocks = size / bs;
        let mut h = Sha256::new();
        let zeros = vec![0u8; BUFFER];
        let mut buf = vec![0u8; BUFFER];
        let mut block = 0;
        while block < blocks {
            let written = self.was_written(block);
            let mut end = block + 1;
            while end < blocks
                && self.was_written(end) == written
                && end - block < (BUFFER / BLOCK_SIZE) as u64
            {
                end += 1;
            }
            let len = ((end - block) * bs) as usize;
            if written {
                self.out.seek(SeekFrom::Start(block * bs))?;
                self.out.read_exact(&mut buf[..len])?;
                h.update(&buf[..len]);
            } else {
                h.update(&zeros[..len]);
            }
            block = end;
        }
        Ok((self.out, h.finalize().into()))
    }
}
