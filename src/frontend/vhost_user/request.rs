//! One virtio-blk request: read from its descriptor chain into guest
//! addresses the request owns, served through the engine, answered in
//! guest memory.
//!
//! A chain is the request header (type, priority, sector) and, for writes
//! and discards, their data in the descriptors the device reads; then the
//! buffer a read or GET_ID fills and one status byte in the descriptors the
//! device writes. Every request answers with a status, unless its chain
//! has no byte to put one in (then the guest only gets the chain back).

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use crate::engine::{Engine, EngineError, Request, SyncIo};

/// virtio-blk counts in 512-byte sectors whatever the block size.
pub(super) const SECTOR_BYTES: u64 = 512;
/// Largest read or write served; a guest sends at most its queue's
/// segments of at most a few pages, far less. A larger one is refused
/// rather than allocated.
pub(super) const MAX_DATA_BYTES: usize = 32 << 20;
/// Most ranges in one discard or write-zeroes request (advertised in the
/// config space).
pub(super) const MAX_RANGES: u32 = 32;
/// type (u32), ioprio (u32), sector (u64).
const HEADER_BYTES: usize = 16;
/// sector (u64), num_sectors (u32), flags (u32).
const RANGE_BYTES: usize = 16;

/// Guest memory ranges, in chain order.
#[derive(Debug, Default)]
struct Segments(Vec<(GuestAddress, usize)>);

impl Segments {
    fn len(&self) -> usize {
        self.0.iter().map(|(_, len)| len).sum()
    }

    /// Takes the first `n` bytes off the front; `None` if there are fewer.
    fn split_front(&mut self, mut n: usize) -> Option<Segments> {
        if self.len() < n {
            return None;
        }
        let mut front = Vec::new();
        while n > 0 {
            let (addr, len) = self.0.remove(0);
            if len <= n {
                front.push((addr, len));
                n -= len;
            } else {
                front.push((addr, n));
                self.0.insert(0, (addr.unchecked_add(n as u64), len - n));
                n = 0;
            }
        }
        Some(Segments(front))
    }

    /// Takes the last `n` bytes off the back; `None` if there are fewer.
    fn split_back(&mut self, n: usize) -> Option<Segments> {
        let keep = self.len().checked_sub(n)?;
        let front = self.split_front(keep)?;
        Some(std::mem::replace(self, front))
    }

    fn read(&self, mem: &GuestMemoryMmap) -> Result<Vec<u8>, vm_memory::GuestMemoryError> {
        let mut data = vec![0u8; self.len()];
        let mut at = 0;
        for &(addr, len) in &self.0 {
            mem.read_slice(&mut data[at..at + len], addr)?;
            at += len;
        }
        Ok(data)
    }

    /// Writes `data` from the front; the rest of the segments is left alone.
    fn write(&self, mem: &GuestMemoryMmap, data: &[u8]) -> Result<(), vm_memory::GuestMemoryError> {
        let mut rest = data;
        for &(addr, len) in &self.0 {
            let n = len.min(rest.len());
            mem.write_slice(&rest[..n], addr)?;
            rest = &rest[n..];
        }
        Ok(())
    }
}

#[derive(Debug)]
enum Op {
    Read {
        offset: u64,
        into: Segments,
    },
    Write {
        offset: u64,
        from: Segments,
    },
    Flush,
    Discard {
        ranges: Segments,
    },
    WriteZeroes {
        ranges: Segments,
    },
    GetId {
        into: Segments,
    },
    /// Answered with `status` without touching the engine.
    Refused {
        status: u32,
        why: String,
    },
}

/// A request taken off a queue, ready to be served.
#[derive(Debug)]
pub(super) struct BlkRequest {
    op: Op,
    /// Where the status byte goes; none in a chain too short to hold one.
    status: Option<Segments>,
}

impl BlkRequest {
    /// Reads the header of `chain` and sorts its descriptors. Never fails:
    /// a malformed chain becomes a request that answers IOERR.
    pub(super) fn parse<M>(chain: DescriptorChain<M>, mem: &GuestMemoryMmap) -> BlkRequest
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        let (mut readable, mut writable) = (Segments::default(), Segments::default());
        for desc in chain {
            let segments = if desc.is_write_only() {
                &mut writable
            } else {
                &mut readable
            };
            segments.0.push((desc.addr(), desc.len() as usize));
        }
        let status = writable.split_back(1);
        let refuse = |status, why: String| Op::Refused { status, why };
        let header = readable
            .split_front(HEADER_BYTES)
            .map(|header| header.read(mem));
        let op = match header {
            None => refuse(VIRTIO_BLK_S_IOERR, "chain shorter than a header".into()),
            Some(Err(e)) => refuse(VIRTIO_BLK_S_IOERR, format!("header: {e}")),
            Some(Ok(header)) => {
                let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
                let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
                Self::op(kind, sector, readable, writable)
            }
        };
        BlkRequest { op, status }
    }

    fn op(kind: u32, sector: u64, readable: Segments, writable: Segments) -> Op {
        let offset = sector.checked_mul(SECTOR_BYTES);
        let data_error = |len: usize| {
            if len % SECTOR_BYTES as usize != 0 {
                Some(format!("{len} bytes is not a whole number of sectors"))
            } else if len > MAX_DATA_BYTES {
                Some(format!("{len} bytes is more than {MAX_DATA_BYTES}"))
            } else {
                offset
                    .is_none()
                    .then(|| format!("sector {sector} is past any disk"))
            }
        };
        let ioerr = |why| Op::Refused {
            status: VIRTIO_BLK_S_IOERR,
            why,
        };
        match kind {
            VIRTIO_BLK_T_IN => match data_error(writable.len()) {
                Some(why) => ioerr(why),
                None => Op::Read {
                    offset: offset.unwrap_or_default(),
                    into: writable,
                },
            },
            VIRTIO_BLK_T_OUT => match data_error(readable.len()) {
                Some(why) => ioerr(why),
                None => Op::Write {
                    offset: offset.unwrap_or_default(),
                    from: readable,
                },
            },
            VIRTIO_BLK_T_FLUSH => Op::Flush,
            VIRTIO_BLK_T_GET_ID => Op::GetId { into: writable },
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let len = readable.len();
                if len == 0 || len % RANGE_BYTES != 0 || len / RANGE_BYTES > MAX_RANGES as usize {
                    ioerr(format!("{len} bytes of ranges"))
                } else if kind == VIRTIO_BLK_T_DISCARD {
                    Op::Discard { ranges: readable }
                } else {
                    Op::WriteZeroes { ranges: readable }
                }
            }
            other => Op::Refused {
                status: VIRTIO_BLK_S_UNSUPP,
                why: format!("request type {other}"),
            },
        }
    }

    /// Serves the request and writes its answer into guest memory. Returns
    /// the bytes written into the chain (data and status), what the used
    /// ring reports.
    pub(super) async fn serve(self, engine: &Engine, serial: &[u8], mem: &GuestMemoryMmap) -> u32 {
        let (status, written) = match self.run(engine, serial, mem).await {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err((status, why)) => {
                if !why.is_empty() {
                    // A malformed request or guest memory it cannot use:
                    // the guest's doing, which it learns from the status.
                    tracing::debug!("virtio-blk request refused: {why}");
                }
                (status, 0)
            }
        };
        let Some(status_byte) = self.status else {
            tracing::warn!("virtio-blk request without a status byte; returned unanswered");
            return 0;
        };
        match status_byte.write(mem, &[status as u8]) {
            Ok(()) => written as u32 + 1,
            Err(e) => {
                tracing::warn!("write virtio-blk status: {e}");
                written as u32
            }
        }
    }

    /// The bytes written into the chain's data, or the status to answer
    /// and why the guest's request was refused (empty for an engine
    /// failure, which is logged already).
    async fn run(
        &self,
        engine: &Engine,
        serial: &[u8],
        mem: &GuestMemoryMmap,
    ) -> Result<usize, (u32, String)> {
        let memory_error = |e: vm_memory::GuestMemoryError| (VIRTIO_BLK_S_IOERR, e.to_string());
        match &self.op {
            Op::Read { offset, into } => {
                let mut buf = vec![0u8; into.len()];
                let read = Request::Read {
                    offset: *offset,
                    buf: (&mut buf).into(),
                };
                engine.submit(&SyncIo, read).await.map_err(failed)?;
                into.write(mem, &buf).map_err(memory_error)?;
                Ok(buf.len())
            }
            Op::Write { offset, from } => {
                let data = from.read(mem).map_err(memory_error)?;
                let write = Request::Write {
                    offset: *offset,
                    data: data.as_slice().into(),
                };
                engine.submit(&SyncIo, write).await.map_err(failed)?;
                Ok(0)
            }
            Op::Flush => {
                engine
                    .submit(&SyncIo, Request::Flush)
                    .await
                    .map_err(failed)?;
                Ok(0)
            }
            Op::Discard { ranges } | Op::WriteZeroes { ranges } => {
                let zeroes = matches!(self.op, Op::WriteZeroes { .. });
                let ranges = ranges.read(mem).map_err(memory_error)?;
                for range in ranges.chunks_exact(RANGE_BYTES) {
                    engine
                        .submit(&SyncIo, range_request(range, zeroes)?)
                        .await
                        .map_err(failed)?;
                }
                Ok(0)
            }
            Op::GetId { into } => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let n = serial.len().min(id.len());
                id[..n].copy_from_slice(&serial[..n]);
                let n = into.len().min(id.len());
                into.write(mem, &id[..n]).map_err(memory_error)?;
                Ok(n)
            }
            Op::Refused { status, why } => Err((*status, why.clone())),
        }
    }
}

/// The engine request of one discard or write-zeroes range.
fn range_request(range: &[u8], zeroes: bool) -> Result<Request<'static>, (u32, String)> {
    let sector = u64::from_le_bytes(range[0..8].try_into().expect("8 bytes"));
    let sectors = u32::from_le_bytes(range[8..12].try_into().expect("4 bytes"));
    let flags = u32::from_le_bytes(range[12..16].try_into().expect("4 bytes"));
    // Unmapping is how the engine zeroes whole chunks anyway; a discard
    // takes no flags.
    let known = if zeroes {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    } else {
        0
    };
    if flags & !known != 0 {
        return Err((VIRTIO_BLK_S_UNSUPP, format!("range flags {flags:#x}")));
    }
    let offset = sector.checked_mul(SECTOR_BYTES).ok_or_else(|| {
        (
            VIRTIO_BLK_S_IOERR,
            format!("sector {sector} is past any disk"),
        )
    })?;
    let len = u64::from(sectors) * SECTOR_BYTES;
    Ok(if zeroes {
        Request::WriteZeroes { offset, len }
    } else {
        Request::Discard { offset, len }
    })
}

/// The status of a failed engine request, logged as every frontend logs
/// one ([`crate::frontend::log_failed`]).
fn failed(error: EngineError) -> (u32, String) {
    crate::frontend::log_failed("virtio-blk request", &error);
    (VIRTIO_BLK_S_IOERR, String::new())
}
