//! The virtio-blk translation against a real engine, with the guest's side
//! of one split virtqueue written by hand in real guest memory: chains go on
//! the available ring, answers come back on the used ring and in the
//! chains' buffers.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::{BlkBackend, VhostUserBackend, VringRwLock, VringT};
use crate::engine::testing::{eventually, fixture, open_engine, Fixture, CSU};
use crate::engine::EngineOptions;

const QUEUE: u16 = 32;
/// The rings, as a driver lays them out.
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
/// Where request buffers start, past the rings.
const DATA: u64 = 0x10_0000;
/// Room per request: header, data, status.
const SLOT: u64 = 0x4_0000;

struct Guest {
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    vring: VringRwLock,
    backend: BlkBackend,
    /// Chains put on the ring so far (each takes three descriptors).
    chains: u16,
    _cache: tempfile::TempDir,
}

/// One request as the guest lays it out: where its data and status go.
struct Sent {
    head: u16,
    data: GuestAddress,
    status: GuestAddress,
}

impl Guest {
    fn new(fx: &Fixture, read_only: bool) -> Guest {
        let cache = tempfile::tempdir().unwrap();
        let opts = EngineOptions {
            read_only,
            readahead_chunks: 0,
            ..EngineOptions::default()
        };
        let engine = open_engine(fx, &cache.path().join("cache"), opts).unwrap();
        let memory = GuestMemoryAtomic::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
        );
        let vring = VringRwLock::new(memory.clone(), QUEUE).unwrap();
        vring
            .set_queue_info(DESC_TABLE, AVAIL_RING, USED_RING)
            .unwrap();
        vring.set_queue_size(QUEUE);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let backend = BlkBackend {
            engine,
            runtime: tokio::runtime::Handle::current(),
            serial: Arc::from(&b"an-image-name-longer-than-twenty"[..]),
            queues: 1,
            memory: Mutex::new(memory.clone()),
            event_idx: AtomicBool::new(false),
        };
        Guest {
            memory,
            vring,
            backend,
            chains: 0,
            _cache: cache,
        }
    }

    /// Puts a request on the ring: a header of `kind` at `sector`, then
    /// `out` (bytes the device reads), then `in_len` bytes for the device to
    /// fill, then the status byte.
    fn send(&mut self, kind: u32, sector: u64, out: &[u8], in_len: u32) -> Sent {
        let memory = self.memory.memory();
        let base = GuestAddress(DATA + u64::from(self.chains) * SLOT);
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        memory.write_slice(&header, base).unwrap();
        let out_at = GuestAddress(base.0 + 16);
        memory.write_slice(out, out_at).unwrap();
        let data = GuestAddress(out_at.0 + out.len() as u64);
        let status = GuestAddress(data.0 + u64::from(in_len));
        memory.write_slice(&[0xff], status).unwrap();
        let mut parts = vec![(base, 16, 0)];
        if !out.is_empty() {
            parts.push((out_at, out.len() as u32, 0));
        }
        if in_len > 0 {
            parts.push((data, in_len, VRING_DESC_F_WRITE));
        }
        parts.push((status, 1, VRING_DESC_F_WRITE));
        // Four descriptors a chain at most; a slot is reused once its chain
        // is back (the tests wait for that before sending more than fit).
        let head = (self.chains % (QUEUE / 4)) * 4;
        let last = parts.len() - 1;
        for (i, &(addr, len, flags)) in parts.iter().enumerate() {
            let next = if i < last { VRING_DESC_F_NEXT } else { 0 };
            let mut desc = addr.0.to_le_bytes().to_vec();
            desc.extend_from_slice(&len.to_le_bytes());
            desc.extend_from_slice(&((flags | next) as u16).to_le_bytes());
            desc.extend_from_slice(&(head + i as u16 + 1).to_le_bytes());
            let at = DESC_TABLE + u64::from(head + i as u16) * 16;
            memory.write_slice(&desc, GuestAddress(at)).unwrap();
        }
        // The ring entry, then the index that publishes it.
        let slot = AVAIL_RING + 4 + u64::from(self.chains % QUEUE) * 2;
        memory.write_obj(head, GuestAddress(slot)).unwrap();
        memory
            .write_obj(self.chains + 1, GuestAddress(AVAIL_RING + 2))
            .unwrap();
        self.chains += 1;
        Sent { head, data, status }
    }

    /// What the guest's kick does.
    fn kick(&self) {
        self.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
            .unwrap();
    }

    /// The used ring's entries so far: (head, bytes written).
    fn used(&self) -> Vec<(u16, u32)> {
        let memory = self.memory.memory();
        let count: u16 = memory.read_obj(GuestAddress(USED_RING + 2)).unwrap();
        (0..u64::from(count))
            .map(|i| {
                let at = USED_RING + 4 + i * 8;
                let id: u32 = memory.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = memory.read_obj(GuestAddress(at + 4)).unwrap();
                (id as u16, len)
            })
            .collect()
    }

    async fn wait_used(&self, count: usize) -> Vec<(u16, u32)> {
        eventually(|| self.used().len() >= count).await;
        self.used()
    }

    fn status(&self, sent: &Sent) -> u32 {
        let mut status = [0u8];
        self.memory
            .memory()
            .read_slice(&mut status, sent.status)
            .unwrap();
        u32::from(status[0])
    }

    fn data(&self, sent: &Sent, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.memory
            .memory()
            .read_slice(&mut data, sent.data)
            .unwrap();
        data
    }

    /// Sends one request, kicks, waits for its answer; returns its status.
    async fn roundtrip(&mut self, kind: u32, sector: u64, out: &[u8], in_len: u32) -> (u32, Sent) {
        let sent = self.send(kind, sector, out, in_len);
        let before = self.used().len();
        self.kick();
        self.wait_used(before + 1).await;
        (self.status(&sent), sent)
    }
}

fn range(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut bytes = sector.to_le_bytes().to_vec();
    bytes.extend_from_slice(&sectors.to_le_bytes());
    bytes.extend_from_slice(&flags.to_le_bytes());
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_waiting_for_its_chunk_does_not_hold_up_the_reads_behind_it() {
    let (image, fx) = fixture();
    let gate = fx.store.gate(fx.id(0));
    let mut guest = Guest::new(&fx, false);
    let stuck = guest.send(VIRTIO_BLK_T_IN, 0, &[], 4096);
    let behind = guest.send(VIRTIO_BLK_T_IN, (3 * CSU / 512) as u64, &[], 8192);
    guest.kick();

    let used = guest.wait_used(1).await;
    assert_eq!(
        used,
        [(behind.head, 8192 + 1)],
        "the later read completes first"
    );
    assert_eq!(guest.status(&behind), VIRTIO_BLK_S_OK);
    assert_eq!(guest.data(&behind, 8192), image[3 * CSU..][..8192]);

    gate.notify_one();
    let used = guest.wait_used(2).await;
    assert_eq!(used[1], (stuck.head, 4096 + 1));
    assert_eq!(guest.status(&stuck), VIRTIO_BLK_S_OK);
    assert_eq!(guest.data(&stuck, 4096), image[..4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_type_reaches_the_engine_and_answers_in_guest_memory() {
    let (image, fx) = fixture();
    let mut guest = Guest::new(&fx, false);

    let written: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
    let (status, _) = guest.roundtrip(VIRTIO_BLK_T_OUT, 9, &written, 0).await;
    assert_eq!(status, VIRTIO_BLK_S_OK);
    let (status, read) = guest.roundtrip(VIRTIO_BLK_T_IN, 8, &[], 8192).await;
    assert_eq!(status, VIRTIO_BLK_S_OK);
    let mut expected = image[4096..][..8192].to_vec();
    expected[512..][..4096].copy_from_slice(&written);
    assert_eq!(guest.data(&read, 8192), expected);

    let (status, _) = guest.roundtrip(VIRTIO_BLK_T_FLUSH, 0, &[], 0).await;
    assert_eq!(status, VIRTIO_BLK_S_OK);

    let (status, id) = guest.roundtrip(VIRTIO_BLK_T_GET_ID, 0, &[], 20).await;
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(guest.data(&id, 20), b"an-image-name-longer");

    // Chunk 3 discarded whole, chunk 4 zeroed whole: both read as zeros.
    let chunk_sectors = (CSU / 512) as u32;
    let discard = range(3 * u64::from(chunk_sectors), chunk_sectors, 0);
    let (status, _) = guest.roundtrip(VIRTIO_BLK_T_DISCARD, 0, &discard, 0).await;
    assert_eq!(status, VIRTIO_BLK_S_OK);
    let zero = range(4 * u64::from(chunk_sectors), chunk_sectors, 1);
    let (status, _) = guest
        .roundtrip(VIRTIO_BLK_T_WRITE_ZEROES, 0, &zero, 0)
        .await;
    assert_eq!(status, VIRTIO_BLK_S_OK);
    let sector = 3 * u64::from(chunk_sectors);
    let (status, read) = guest
        .roundtrip(VIRTIO_BLK_T_IN, sector, &[], 2 * CSU as u32)
        .await;
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert!(guest.data(&read, 2 * CSU).iter().all(|&b| b == 0));

    // What the guest gets wrong is answered, never served.
    let unknown_flag = range(0, 8, 1);
    let (status, _) = guest
        .roundtrip(VIRTIO_BLK_T_DISCARD, 0, &unknown_flag, 0)
        .await;
    assert_eq!(status, VIRTIO_BLK_S_UNSUPP);
    let (status, _) = guest.roundtrip(99, 0, &[], 0).await;
    assert_eq!(status, VIRTIO_BLK_S_UNSUPP);
    let (status, _) = guest.roundtrip(VIRTIO_BLK_T_IN, 0, &[], 1000).await;
    assert_eq!(status, VIRTIO_BLK_S_IOERR, "not a whole number of sectors");
    let past_end = image.len().div_ceil(512) as u64;
    let (status, _) = guest.roundtrip(VIRTIO_BLK_T_IN, past_end, &[], 512).await;
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    let (status, _) = guest.roundtrip(VIRTIO_BLK_T_IN, u64::MAX, &[], 512).await;
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_disk_says_so_and_refuses_writes() {
    let (image, fx) = fixture();
    let mut guest = Guest::new(&fx, true);
    assert_ne!(guest.backend.features() & 1 << VIRTIO_BLK_F_RO, 0);
    let (status, _) = guest.roundtrip(VIRTIO_BLK_T_OUT, 0, &[7; 512], 0).await;
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    let zero = range(0, 8, 0);
    let (status, _) = guest
        .roundtrip(VIRTIO_BLK_T_WRITE_ZEROES, 0, &zero, 0)
        .await;
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    let (status, read) = guest.roundtrip(VIRTIO_BLK_T_IN, 0, &[], 4096).await;
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(guest.data(&read, 4096), image[..4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_space_gives_capacity_and_queue_count() {
    let (image, fx) = fixture();
    let guest = Guest::new(&fx, false);
    assert_eq!(guest.backend.features() & 1 << VIRTIO_BLK_F_RO, 0);
    let capacity = guest.backend.get_config(0, 8);
    assert_eq!(
        u64::from_le_bytes(capacity.try_into().unwrap()),
        image.len() as u64 / 512
    );
    let num_queues = guest.backend.get_config(34, 2);
    assert_eq!(u16::from_le_bytes(num_queues.try_into().unwrap()), 1);
    // Past the end reads as zeros, never a short answer.
    assert_eq!(guest.backend.get_config(1000, 4), [0; 4]);
}
