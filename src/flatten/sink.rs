//! Where the image's bytes go: a file ([`FileSink`]) or, cut into chunks as
//! they are completed, a consumer such as push ([`ChunkSink`]).
//!
//! The flattener's writes follow the allocator, which only moves forward:
//! file data, extent-tree blocks and each layer's changed metadata land at
//! increasing offsets. The one exception is the fixed metadata written by
//! [`super::Flattener::finish`]: every group's bitmaps and inode table, and
//! group 0's superblock and descriptors, whose positions are known from the
//! start (see [`crate::ext4::layout`]). That is what lets [`ChunkSink`] hand
//! on each chunk as soon as the writer has moved past it, holding back only
//! the few chunks that contain fixed metadata.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom, Write};

use sha2::{Digest, Sha256};

use crate::ext4::layout::{data_start, meta_start};
use crate::ext4::{BLOCKS_PER_GROUP, BLOCK_SIZE};

const BUFFER: usize = 1 << 20;

/// The flattener's output.
pub trait ImageSink {
    /// Writes `data` at byte `offset` of the image.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;

    /// Writes `data` at block `block`.
    fn write_block(&mut self, block: u64, data: &[u8]) -> io::Result<()> {
        self.write_at(block * BLOCK_SIZE as u64, data)
    }

    /// Pushes buffered bytes on; called at the end of each layer.
    fn flush(&mut self) -> io::Result<()>;

    /// Group `group`'s bitmaps and inode table are complete. Called in
    /// increasing group order, after every layer.
    fn group_done(&mut self, group: u32) -> io::Result<()>;

    /// Completes an image of `size` bytes (a whole number of blocks); the
    /// SHA-256 of its bytes where the sink can compute it.
    fn finish(self, size: u64) -> io::Result<Option<[u8; 32]>>;
}

/// The image as a positioned, buffered writer to a file.
///
/// File data arrives in order and mostly lands contiguously, so writes are
/// gathered until they stop being contiguous; a seek happens only then.
/// Blocks never written stay holes in the output file; the sink remembers
/// which blocks it wrote, so the image's digest reads back only those and
/// hashes the rest as the zeros they are.
pub struct FileSink<W> {
    out: W,
    /// Where the buffered bytes go.
    buf_start: u64,
    buf: Vec<u8>,
    /// The highest byte offset written so far, plus one.
    end: u64,
    /// One bit per block: some byte of it was written.
    written: Vec<u64>,
}

impl<W: Read + Write + Seek> FileSink<W> {
    /// A sink writing to `out`, which must be empty: blocks never written
    /// must read as zeros.
    pub fn new(mut out: W) -> Result<FileSink<W>, super::FlattenError> {
        let len = out
            .seek(SeekFrom::End(0))
            .map_err(super::FlattenError::WriteImage)?;
        if len != 0 {
            return Err(super::FlattenError::OutputNotEmpty { len });
        }
        Ok(FileSink {
            out,
            buf_start: 0,
            buf: Vec::with_capacity(BUFFER),
            end: 0,
            written: Vec::new(),
        })
    }

    fn was_written(&self, block: u64) -> bool {
        self.written
            .get((block / 64) as usize)
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    /// The SHA-256 of the first `size` bytes of the output (a whole number
    /// of blocks): written blocks are read back, the others are zeros and
    /// hashed as such.
    fn digest(&mut self, size: u64) -> io::Result<[u8; 32]> {
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
        Ok(h.finalize().into())
    }
}

impl<W: Read + Write + Seek> ImageSink for FileSink<W> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
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

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.out.seek(SeekFrom::Start(self.buf_start))?;
            self.out.write_all(&self.buf)?;
            self.buf_start += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    fn group_done(&mut self, _group: u32) -> io::Result<()> {
        Ok(())
    }

    fn finish(mut self, size: u64) -> io::Result<Option<[u8; 32]>> {
        self.flush()?;
        if self.end < size {
            // The tail is free space: extending the file keeps it a hole.
            self.out.seek(SeekFrom::Start(size - 1))?;
            self.out.write_all(&[0])?;
        }
        self.out.flush()?;
        self.digest(size).map(Some)
    }
}

/// Where a [`ChunkSink`] hands completed chunks.
pub trait ChunkConsumer {
    /// Room for one chunk.
    type Chunk: AsMut<[u8]>;

    /// Bytes per chunk: a power of two from one block to one group.
    fn chunk_size(&self) -> u64;

    /// A buffer of the chunk size; its contents are arbitrary.
    fn take(&mut self) -> Self::Chunk;

    /// Chunk `index` is complete: its first `len` bytes are the image's
    /// (`len` is short only for the last chunk). Each index comes at most
    /// once, not necessarily in order; an index that never comes is zeros.
    fn put(&mut self, index: u64, chunk: Self::Chunk, len: usize) -> io::Result<()>;

    /// Every chunk has come; the image is `image_size` bytes.
    fn finish(self, image_size: u64) -> io::Result<()>;
}

/// The image cut into chunks as it is written, each handed to the consumer
/// once the writer has moved past it, so no image file is needed.
///
/// Chunks that contain fixed metadata are held until their groups are
/// complete ([`ImageSink::group_done`]); the chunk with the superblock and
/// descriptors until the end. Everything else is held only while the
/// writer is still in it: memory stays at a few chunks per group.
pub struct ChunkSink<C: ChunkConsumer> {
    consumer: C,
    chunk_size: u64,
    /// Chunks written to and not yet handed on.
    open: BTreeMap<u64, C::Chunk>,
    /// Chunks below this one that hold no fixed metadata are handed on.
    frontier: u64,
    /// Groups whose fixed metadata is complete: `0..groups_done`.
    groups_done: u32,
}

impl<C: ChunkConsumer> ChunkSink<C> {
    /// Fails if the consumer's chunk size is not one the layout can cut.
    pub fn new(consumer: C) -> io::Result<ChunkSink<C>> {
        let chunk_size = consumer.chunk_size();
        let group_bytes = u64::from(BLOCKS_PER_GROUP) * BLOCK_SIZE as u64;
        if !chunk_size.is_power_of_two()
            || chunk_size < BLOCK_SIZE as u64
            || chunk_size > group_bytes
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "chunk size {chunk_size} is not a power of two from {BLOCK_SIZE} to {group_bytes}"
                ),
            ));
        }
        Ok(ChunkSink {
            consumer,
            chunk_size,
            open: BTreeMap::new(),
            frontier: 0,
            groups_done: 0,
        })
    }

    /// For a chunk with fixed metadata, the group it belongs to; `None` for
    /// a chunk of data only. (Chunks never straddle groups: both are powers
    /// of two and a chunk is at most a group.)
    fn meta_group(&self, index: u64) -> Option<u32> {
        let blocks_per_chunk = self.chunk_size / BLOCK_SIZE as u64;
        let first = index * blocks_per_chunk;
        let group = (first / u64::from(BLOCKS_PER_GROUP)) as u32;
        let meta = u64::from(group) * u64::from(BLOCKS_PER_GROUP)..data_start(group);
        (first < meta.end && meta.start < first + blocks_per_chunk).then_some(group)
    }

    /// Whether chunk `index` holds part of the superblock or descriptors,
    /// which [`super::Flattener::finish`] writes last.
    fn holds_header(&self, index: u64) -> bool {
        index * self.chunk_size < meta_start(0) * BLOCK_SIZE as u64
    }

    /// Whether chunk `index` has been handed on (or, never written, counts
    /// as zeros) and must not be written again.
    fn is_sealed(&self, index: u64) -> bool {
        match self.meta_group(index) {
            Some(group) => group < self.groups_done && !self.holds_header(index),
            None => index < self.frontier,
        }
    }

    fn hand_on(&mut self, index: u64, chunk: C::Chunk, image_size: Option<u64>) -> io::Result<()> {
        let start = index * self.chunk_size;
        let len = match image_size {
            Some(size) => (size - start).min(self.chunk_size),
            None => self.chunk_size,
        };
        self.consumer.put(index, chunk, len as usize)
    }

    /// Hands on every open chunk below `index` that holds no fixed metadata.
    fn advance(&mut self, index: u64) -> io::Result<()> {
        if index <= self.frontier {
            return Ok(());
        }
        let done: Vec<u64> = self
            .open
            .range(self.frontier..index)
            .map(|(&i, _)| i)
            .filter(|&i| self.meta_group(i).is_none())
            .collect();
        for i in done {
            let chunk = self.open.remove(&i).expect("listed above");
            self.hand_on(i, chunk, None)?;
        }
        self.frontier = index;
        Ok(())
    }
}

impl<C: ChunkConsumer> ImageSink for ChunkSink<C> {
    fn write_at(&mut self, mut offset: u64, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let index = offset / self.chunk_size;
            if self.is_sealed(index) {
                return Err(io::Error::other(format!(
                    "write at byte {offset} of the image, in chunk {index}, which was already handed on"
                )));
            }
            self.advance(index)?;
            let within = (offset % self.chunk_size) as usize;
            let len = data.len().min(self.chunk_size as usize - within);
            let chunk = match self.open.entry(index) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let mut chunk = self.consumer.take();
                    chunk.as_mut().fill(0);
                    e.insert(chunk)
                }
            };
            chunk.as_mut()[within..within + len].copy_from_slice(&data[..len]);
            offset += len as u64;
            data = &data[len..];
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn group_done(&mut self, group: u32) -> io::Result<()> {
        if group != self.groups_done {
            return Err(io::Error::other(format!(
                "group {group} completed after {} groups",
                self.groups_done
            )));
        }
        self.groups_done = group + 1;
        let done: Vec<u64> = self
            .open
            .keys()
            .copied()
            .filter(|&i| self.meta_group(i) == Some(group) && !self.holds_header(i))
            .collect();
        for i in done {
            let chunk = self.open.remove(&i).expect("listed above");
            self.hand_on(i, chunk, None)?;
        }
        Ok(())
    }

    fn finish(mut self, size: u64) -> io::Result<Option<[u8; 32]>> {
        let chunks = size.div_ceil(self.chunk_size);
        if let Some((&last, _)) = self.open.last_key_value() {
            if last >= chunks {
                return Err(io::Error::other(format!(
                    "chunk {last} was written but the image ends at byte {size}"
                )));
            }
        }
        for (index, chunk) in std::mem::take(&mut self.open) {
            self.hand_on(index, chunk, Some(size))?;
        }
        self.consumer.finish(size)?;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flatten::tests::Collect;

    #[test]
    fn chunks_are_handed_on_once_the_writer_is_past_them() {
        let mut collect = Collect::new(64 * 1024);
        let mut sink = ChunkSink::new(&mut collect).unwrap();
        let data_chunk = data_start(0) * BLOCK_SIZE as u64 / (64 * 1024) + 1;
        sink.write_at(data_chunk * 65536 + 10, b"abc").unwrap();
        sink.write_at(data_chunk * 65536 + 65530, &[7; 20]).unwrap();
        sink.write_at((data_chunk + 3) * 65536, b"z").unwrap();
        // The first two data chunks are complete; the third is still open.
        assert_eq!(sink.consumer.chunks.len(), 2);
        let err = sink.write_at(data_chunk * 65536, b"late").unwrap_err();
        assert!(err.to_string().contains("already handed on"), "{err}");
        // Fixed metadata is held until its group is done, the header until the end.
        let bitmap = meta_start(1) * BLOCK_SIZE as u64;
        sink.write_at(bitmap, b"bits").unwrap();
        sink.write_at(1024, b"super").unwrap();
        sink.group_done(0).unwrap();
        sink.group_done(1).unwrap();
        assert!(sink.consumer.chunks.contains_key(&(bitmap / 65536)));
        assert!(!sink.consumer.chunks.contains_key(&0));
        let err = sink.write_at(bitmap, b"x").unwrap_err();
        assert!(err.to_string().contains("already handed on"), "{err}");
        let size = (bitmap / 65536 + 2) * 65536 - 4096;
        sink.finish(size).unwrap();

        assert_eq!(collect.size, Some(size));
        let c = &collect.chunks;
        assert_eq!(&c[&0][1024..1029], b"super");
        assert!(
            c[&0][..1024].iter().all(|&b| b == 0),
            "fresh chunks are zeroed"
        );
        assert_eq!(&c[&data_chunk][10..13], b"abc");
        assert_eq!(&c[&data_chunk][65530..], &[7; 6]);
        assert_eq!(&c[&(data_chunk + 1)][..14], &[7; 14]);
        assert_eq!(&c[&(data_chunk + 3)][..1], b"z");
        assert!(!c.contains_key(&(data_chunk + 2)), "never written: zeros");
    }

    #[test]
    fn the_last_chunk_is_cut_to_the_image_and_nothing_lies_past_it() {
        let mut collect = Collect::new(64 * 1024);
        let mut sink = ChunkSink::new(&mut collect).unwrap();
        sink.write_at(1024, b"super").unwrap();
        sink.finish(8192).unwrap();
        assert_eq!(collect.chunks[&0].len(), 8192);

        let mut collect = Collect::new(64 * 1024);
        let mut sink = ChunkSink::new(&mut collect).unwrap();
        sink.write_at(10 * 65536, b"data").unwrap();
        let err = sink.finish(65536).unwrap_err();
        assert!(
            err.to_string().contains("image ends at byte 65536"),
            "{err}"
        );
    }

    #[test]
    fn chunk_sizes_the_layout_cannot_cut_are_refused() {
        for size in [0, 1000, 2048, 3 << 20, 256 << 20] {
            assert!(ChunkSink::new(&mut Collect::new(size)).is_err(), "{size}");
        }
    }
}
