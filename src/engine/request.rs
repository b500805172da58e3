//! The engine's one request API: what every frontend translates its
//! protocol into (a ublk tag, a FUSE operation, an NBD or virtio request).

use crate::cache::io::FixedBuf;

/// A block request at byte offsets. Buffers belong to the caller, who keeps
/// them until [`super::Engine::submit`] completes.
#[derive(Debug)]
pub enum Request<'a> {
    /// Fill `buf` with the image's bytes at `offset`.
    Read { offset: u64, buf: ReadBuf<'a> },
    /// Replace the bytes at `offset` with `data`.
    Write { offset: u64, data: WriteBuf<'a> },
    /// Make every write completed before this request durable.
    Flush,
    /// The range's contents are no longer needed. Whole chunks become holes
    /// in the cache and read as zeros; a partial chunk the cache holds is
    /// zeroed there, one it lacks is left alone (a discard promises nothing
    /// about what later reads return). Never fetches.
    Discard { offset: u64, len: u64 },
    /// The range reads as zeros afterwards. Whole chunks become holes
    /// without a fetch; a partial chunk is fetched first if the cache lacks
    /// it, as for a write.
    WriteZeroes { offset: u64, len: u64 },
}

impl Request<'_> {
    /// The operation's name, for logs and errors.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Read { .. } => "read",
            Request::Write { .. } => "write",
            Request::Flush => "flush",
            Request::Discard { .. } => "discard",
            Request::WriteZeroes { .. } => "write-zeroes",
        }
    }

    /// Offset and length in bytes (zero for a flush).
    pub fn range(&self) -> (u64, u64) {
        match self {
            Request::Read { offset, buf } => (*offset, buf.len() as u64),
            Request::Write { offset, data } => (*offset, data.len() as u64),
            Request::Flush => (0, 0),
            Request::Discard { offset, len } | Request::WriteZeroes { offset, len } => {
                (*offset, *len)
            }
        }
    }
}

/// Where a read's bytes go: memory the caller lends, or a buffer registered
/// with the frontend's I/O, which only the [`crate::cache::io::CacheIo`]
/// the request is submitted with can fill.
#[derive(Debug)]
pub enum ReadBuf<'a> {
    Memory(&'a mut [u8]),
    Fixed(FixedBuf),
}

impl ReadBuf<'_> {
    pub fn len(&self) -> usize {
        match self {
            ReadBuf::Memory(buf) => buf.len(),
            ReadBuf::Fixed(fixed) => fixed.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<'a> From<&'a mut [u8]> for ReadBuf<'a> {
    fn from(buf: &'a mut [u8]) -> ReadBuf<'a> {
        ReadBuf::Memory(buf)
    }
}

impl<'a> From<&'a mut Vec<u8>> for ReadBuf<'a> {
    fn from(buf: &'a mut Vec<u8>) -> ReadBuf<'a> {
        ReadBuf::Memory(buf)
    }
}

/// Where a write's bytes come from, as [`ReadBuf`] for reads.
#[derive(Debug, Clone, Copy)]
pub enum WriteBuf<'a> {
    Memory(&'a [u8]),
    Fixed(FixedBuf),
}

impl<'a> WriteBuf<'a> {
    pub fn len(&self) -> usize {
        match self {
            WriteBuf::Memory(data) => data.len(),
            WriteBuf::Fixed(fixed) => fixed.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `len` bytes at `at`.
    pub(super) fn range(self, at: usize, len: usize) -> WriteBuf<'a> {
        match self {
            WriteBuf::Memory(data) => WriteBuf::Memory(&data[at..][..len]),
            WriteBuf::Fixed(fixed) => WriteBuf::Fixed(fixed.range(at, len)),
        }
    }
}

impl<'a> From<&'a [u8]> for WriteBuf<'a> {
    fn from(data: &'a [u8]) -> WriteBuf<'a> {
        WriteBuf::Memory(data)
    }
}
