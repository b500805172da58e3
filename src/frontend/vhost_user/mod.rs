//! The vhost-user-blk frontend: the engine as a virtio disk of a VM.
//!
//! A hypervisor (QEMU's `vhost-user-blk-pci`, Cloud Hypervisor, Firecracker)
//! connects to a Unix socket, shares the guest's memory and hands over the
//! disk's virtqueues; requests then go from the guest to this process
//! without the host's block layer. The rust-vmm crates speak the vhost-user
//! protocol and walk the rings; this module turns each descriptor chain
//! into one engine [`crate::engine::Request`] (request.rs).
//!
//! Each queue has a thread of its own that takes chains off the ring. A
//! chain whose chunks are present completes on that thread; one that must
//! wait (a fetch, a flush) is finished on the runtime's blocking pool and
//! put on the used ring when done, so a cold chunk never stalls the
//! requests queued behind it. Completions may reach the used ring out of
//! order, which virtio allows.
//!
//! One hypervisor is served at a time; when it disconnects (the VM exited)
//! the device waits for the next, so a disk outlives its VMs.

mod request;
#[cfg(test)]
mod tests;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::runtime::Handle;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use self::request::{BlkRequest, MAX_RANGES, SECTOR_BYTES};
use crate::engine::Engine;

/// Descriptors per queue the guest may use.
const QUEUE_SIZE: u16 = 256;
/// Most ranges the guest may ask to discard or zero in one go, in sectors
/// (1 GiB).
const MAX_RANGE_SECTORS: u32 = 1 << 21;

type SharedMemory = GuestMemoryAtomic<GuestMemoryMmap>;

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("listen on {socket}")]
    Listen {
        socket: PathBuf,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("serve the hypervisor on {socket}: {detail}")]
    Serve { socket: PathBuf, detail: String },
}

/// How a disk looks to the guest.
#[derive(Debug, Clone)]
pub struct BlkOptions {
    /// The disk's serial number (GET_ID); at most 20 bytes reach the guest.
    pub serial: String,
    pub queues: u16,
}

/// A disk served on a vhost-user socket, one VM after another.
pub struct VhostUserBlk {
    socket: PathBuf,
    listener: Mutex<Option<Listener>>,
    stopping: AtomicBool,
    /// The connected hypervisor, if any.
    connection: Mutex<Option<ShutdownHandle>>,
}

impl std::fmt::Debug for VhostUserBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserBlk")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl VhostUserBlk {
    /// Listens on `socket`, replacing a stale socket file there; a live
    /// one, or any other file, is refused.
    pub fn bind(socket: &Path) -> Result<VhostUserBlk, VhostUserError> {
        let listen_error = |source| VhostUserError::Listen {
            socket: socket.to_owned(),
            source,
        };
        // Whoever can connect reads and writes the image's plaintext: the
        // owner alone, as for NBD's socket; chmod to share it. The vhost
        // listener removes the socket file when dropped.
        let listener = crate::socket::bind_replacing_stale(socket, |path| {
            Listener::new(path, false).map_err(|e| match e {
                vhost::vhost_user::Error::SocketError(e) => e,
                other => std::io::Error::other(other.to_string()),
            })
        })
        .map_err(|e| listen_error(vhost::vhost_user::Error::SocketError(e)))?;
        Ok(VhostUserBlk {
            socket: socket.to_owned(),
            listener: Mutex::new(Some(listener)),
            stopping: AtomicBool::new(false),
            connection: Mutex::new(None),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Serves `engine` to each hypervisor that connects, until
    /// [`VhostUserBlk::stop`]; blocks, so run it on a thread of its own.
    /// Requests that wait run on `runtime`. Removes the socket at the end.
    pub fn serve(
        &self,
        engine: Arc<Engine>,
        runtime: Handle,
        options: BlkOptions,
    ) -> Result<(), VhostUserError> {
        let serve_error = |detail: String| VhostUserError::Serve {
            socket: self.socket.clone(),
            detail,
        };
        let mut listener = lock(&self.listener)
            .take()
            .ok_or_else(|| serve_error("already served".into()))?;
        let serial: Arc<[u8]> = options.serial.as_bytes().into();
        while !self.stopping.load(Ordering::Acquire) {
            let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let backend = Arc::new(BlkBackend {
                engine: engine.clone(),
                runtime: runtime.clone(),
                serial: serial.clone(),
                queues: options.queues,
                memory: Mutex::new(memory.clone()),
                event_idx: AtomicBool::new(false),
            });
            let mut daemon = VhostUserDaemon::new("vhost-user-blk".into(), backend, memory)
                .map_err(|e| serve_error(e.to_string()))?;
            daemon
                .start(&mut listener)
                .map_err(|e| serve_error(e.to_string()))?;
            *lock(&self.connection) = daemon.shutdown_handle();
            if self.stopping.load(Ordering::Acquire) {
                // The connection that woke the accept up to stop.
                daemon.request_shutdown();
            } else {
                tracing::info!(socket = %self.socket.display(), "hypervisor connected");
            }
            // A VM that exits or dies ends its connection; either way the
            // next one is served.
            match daemon.wait() {
                Ok(()) => tracing::info!("hypervisor disconnected"),
                Err(e) => tracing::warn!("hypervisor connection ended: {e}"),
            }
            *lock(&self.connection) = None;
        }
        Ok(())
    }

    /// Whether a hypervisor is connected.
    pub fn connected(&self) -> bool {
        lock(&self.connection).is_some()
    }

    /// Makes [`VhostUserBlk::serve`] return: refused while a hypervisor is
    /// connected unless `force`, which disconnects it (the guest's disk
    /// then stops answering).
    pub fn stop(&self, force: bool) -> Result<(), String> {
        let connection = lock(&self.connection).clone();
        if connection.is_some() && !force {
            return Err(format!(
                "a VM is connected to {}: stop it first, or use --force",
                self.socket.display()
            ));
        }
        self.stopping.store(true, Ordering::Release);
        match connection {
            Some(connection) => connection.shutdown(),
            // Wakes the accept, which then sees `stopping`.
            None => drop(UnixStream::connect(&self.socket)),
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The device one hypervisor connection sees.
struct BlkBackend {
    engine: Arc<Engine>,
    runtime: Handle,
    serial: Arc<[u8]>,
    queues: u16,
    memory: Mutex<SharedMemory>,
    event_idx: AtomicBool,
}

impl BlkBackend {
    /// Takes every available chain off `vring` and starts serving it.
    fn drain(&self, vring: &VringRwLock) -> std::io::Result<()> {
        let memory = lock(&self.memory).memory().into_inner();
        let chains: Vec<_> = vring
            .get_mut()
            .get_queue_mut()
            .iter(memory.clone())
            .map_err(std::io::Error::other)?
            .collect();
        for chain in chains {
            let head = chain.head_index();
            let request = BlkRequest::parse(chain, &memory);
            let (engine, serial, memory, vring) = (
                self.engine.clone(),
                self.serial.clone(),
                memory.clone(),
                vring.clone(),
            );
            super::run_inline_or_blocking(&self.runtime, async move {
                let written = request.serve(&engine, &serial, &memory).await;
                complete(&vring, head, written);
            });
        }
        Ok(())
    }

    fn config_space(&self) -> Vec<u8> {
        let mut config = vec![0u8; std::mem::size_of::<virtio_blk_config>()];
        let mut put = |offset: usize, bytes: &[u8]| {
            config[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        use std::mem::offset_of;
        let capacity = self.engine.size() / SECTOR_BYTES;
        put(
            offset_of!(virtio_blk_config, capacity),
            &capacity.to_le_bytes(),
        );
        // Linux puts at most two descriptors of its own (header, status) in a chain.
        let seg_max = u32::from(QUEUE_SIZE) - 2;
        put(
            offset_of!(virtio_blk_config, seg_max),
            &seg_max.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, blk_size),
            &(SECTOR_BYTES as u32).to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, num_queues),
            &self.queues.to_le_bytes(),
        );
        for (limit, value) in [
            (
                offset_of!(virtio_blk_config, max_discard_sectors),
                MAX_RANGE_SECTORS,
            ),
            (offset_of!(virtio_blk_config, max_discard_seg), MAX_RANGES),
            // 4 KiB: the image's file system block.
            (offset_of!(virtio_blk_config, discard_sector_alignment), 8),
            (
                offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                MAX_RANGE_SECTORS,
            ),
            (
                offset_of!(virtio_blk_config, max_write_zeroes_seg),
                MAX_RANGES,
            ),
        ] {
            put(limit, &value.to_le_bytes());
        }
        // Zeroing whole chunks leaves holes in the cache.
        put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
        config
    }
}

/// Puts a served chain on the used ring and tells the guest if it asked to
/// be told. Under the vring's lock, so concurrent completions on one queue
/// neither lose an entry nor a notification.
fn complete(vring: &VringRwLock, head: u16, written: u32) {
    let mut state = vring.get_mut();
    if let Err(e) = state.add_used(head, written) {
        tracing::warn!("virtio-blk used ring: {e}");
        return;
    }
    match state.needs_notification() {
        Ok(false) => {}
        Ok(true) | Err(_) => {
            if let Err(e) = state.signal_used_queue() {
                tracing::warn!("virtio-blk notify guest: {e}");
            }
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.engine.read_only() {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.config_space();
        let mut out = vec![0u8; size as usize];
        if let Some(tail) = config.get(offset as usize..) {
            let n = tail.len().min(out.len());
            out[..n].copy_from_slice(&tail[..n]);
        }
        out
    }

    fn update_memory(&self, memory: SharedMemory) -> std::io::Result<()> {
        *lock(&self.memory) = memory;
        Ok(())
    }

    /// One thread per queue: a queue stalled on a full ring leaves the
    /// others running.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queues).map(|queue| 1u64 << queue).collect()
    }

    /// Lets the daemon end a queue thread when its hypervisor goes away.
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        queue: u16,
        events: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> std::io::Result<()> {
        if events != EventSet::IN {
            return Err(std::io::Error::other(format!(
                "unexpected events {events:?} on queue {queue}"
            )));
        }
        let vring = vrings.get(usize::from(queue)).ok_or_else(|| {
            std::io::Error::other(format!("kick for queue {queue}, which does not exist"))
        })?;
        if !self.event_idx.load(Ordering::Acquire) {
            return self.drain(vring);
        }
        // With EVENT_IDX the guest kicks only when told to: look again
        // after re-enabling kicks, or a chain added meanwhile would wait.
        loop {
            vring
                .disable_notification()
                .map_err(std::io::Error::other)?;
            self.drain(vring)?;
            if !vring.enable_notification().map_err(std::io::Error::other)? {
                return Ok(());
            }
        }
    }
}
