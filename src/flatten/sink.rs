//! The output image as a positioned, buffered writer.
//!
//! File data arrives in order and mostly lands contiguously, so writes are
//! gathered until they stop being contiguous; a seek happens only then.
//! Blocks never written stay holes in the output file.

use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::ext4::BLOCK_SIZE;

const BUFFER: usize = 1 << 20;

pub struct Sink<W> {
    out: W,
    /// Where the buffered bytes go.
    buf_start: u64,
    buf: Vec<u8>,
    /// The highest byte offset written so far, plus one.
    pub end: u64,
}

impl<W: Read + Write + Seek> Sink<W> {
    pub fn new(out: W) -> Sink<W> {
        Sink {
            out,
            buf_start: 0,
            buf: Vec::with_capacity(BUFFER),
            end: 0,
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
        Ok(())
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

    /// Flushes and hands back the output, positioned at its start.
    pub fn into_inner(mut self) -> io::Result<W> {
        self.flush()?;
        self.out.flush()?;
        self.out.seek(SeekFrom::Start(0))?;
        Ok(self.out)
    }
}
