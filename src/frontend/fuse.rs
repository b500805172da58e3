//! The FUSE frontend: the engine as one file, `MOUNTPOINT/disk`.
//!
//! `mount -o loop MOUNTPOINT/disk /mnt` then gives the image's filesystem.
//! The loop driver sends the filesystem's flushes as fsync, which this
//! frontend turns into an engine flush. It serves hosts without ublk.
//!
//! Each FUSE operation becomes one engine [`Request`]. Requests arrive on
//! one session thread, which polls each once with [`SyncIo`]: a request
//! whose chunks are all present or zero completes there, without a
//! thread hop. One that must wait (a fetch, a flush) is finished on the
//! runtime's blocking pool, which also does its remaining cache I/O, so a
//! cold chunk never holds up warm requests and no file I/O runs on an async
//! worker. `fallocate` turns into discard (punch hole) and write-zeroes
//! (zero range), which is how the loop driver passes those on.

use std::ffi::OsStr;
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, Session, TimeOrNow,
};
use tokio::runtime::Handle;

use super::errno;
use crate::engine::{Engine, Request as BlockRequest, SyncIo};

const ROOT_INO: u64 = 1;
const DISK_INO: u64 = 2;
/// The name of the one file under the mountpoint.
pub const DISK_FILE_NAME: &str = "disk";
/// Attributes never change behind the kernel's back, so they may be cached long.
const ATTR_TTL: Duration = Duration::from_secs(3600);
/// Largest read or write the kernel sends in one request.
const MAX_REQUEST_BYTES: u32 = 1 << 20;
/// Requests the kernel keeps in flight at once; cold chunks are fetched in
/// parallel only if the kernel sends their reads in parallel.
const MAX_BACKGROUND: u16 = 64;

#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("mount FUSE at {mountpoint}")]
    Mount {
        mountpoint: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{mountpoint} is busy: unmount the filesystem on {disk} and detach its loop device first ({detail})")]
    Busy {
        mountpoint: PathBuf,
        disk: PathBuf,
        detail: String,
    },
    #[error("unmount {mountpoint}: {detail}")]
    Unmount { mountpoint: PathBuf, detail: String },
}

/// A mounted FUSE device. Unmounting ends the session thread.
#[derive(Debug)]
pub struct FuseDevice {
    mountpoint: PathBuf,
    session: std::sync::Mutex<Option<JoinHandle<std::io::Result<()>>>>,
}

impl FuseDevice {
    /// Mounts `engine` at `mountpoint`; tasks for reads that must wait run on `runtime`.
    pub fn mount(
        engine: Arc<Engine>,
        runtime: Handle,
        mountpoint: &Path,
    ) -> Result<FuseDevice, FuseError> {
        let mount_error = |source| FuseError::Mount {
            mountpoint: mountpoint.to_owned(),
            source,
        };
        let owner = std::fs::metadata("/proc/self").map_err(mount_error)?;
        let mut options = vec![
            MountOption::FSName("lazyblk".into()),
            MountOption::Subtype("lazyblk".into()),
            MountOption::NoAtime,
        ];
        if engine.read_only() {
            options.push(MountOption::RO);
        }
        let filesystem = DiskFs {
            engine,
            runtime,
            uid: owner.uid(),
            gid: owner.gid(),
            created: SystemTime::now(),
        };
        let mut session = Session::new(filesystem, mountpoint, &options).map_err(mount_error)?;
        let thread = std::thread::Builder::new()
            .name("fuse-session".into())
            .spawn(move || session.run())
            .map_err(mount_error)?;
        Ok(FuseDevice {
            mountpoint: mountpoint.to_owned(),
            session: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Unmounts; refused while a loop device or an open file holds the disk.
    pub fn unmount(&self) -> Result<(), FuseError> {
        let output = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mountpoint)
            .output()
            .map_err(|e| FuseError::Unmount {
                mountpoint: self.mountpoint.clone(),
                detail: format!("run fusermount3: {e}"),
            })?;
        if output.status.success() {
            return Ok(());
        }
        let detail = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if detail.contains("busy") {
            Err(FuseError::Busy {
                mountpoint: self.mountpoint.clone(),
                disk: self.mountpoint.join(DISK_FILE_NAME),
                detail,
            })
        } else {
            Err(FuseError::Unmount {
                mountpoint: self.mountpoint.clone(),
                detail,
            })
        }
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Blocks until the session ends (after [`FuseDevice::unmount`] or an
    /// unmount from outside). Only the first caller waits.
    pub fn wait(&self) -> std::io::Result<()> {
        let session = self
            .session
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        match session.map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(std::io::Error::other("FUSE session thread panicked")),
            None => Ok(()),
        }
    }
}

struct DiskFs {
    engine: Arc<Engine>,
    runtime: Handle,
    uid: u32,
    gid: u32,
    created: SystemTime,
}

impl DiskFs {
    /// Runs `request` on this thread if it completes without waiting, else
    /// finishes it on a blocking thread.
    fn run(&self, request: impl Future<Output = ()> + Send + 'static) {
        super::run_inline_or_blocking(&self.runtime, request);
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == ROOT_INO {
            (FileType::Directory, 0o755, 0, 2)
        } else {
            let perm = if self.engine.read_only() {
                0o444
            } else {
                0o644
            };
            (FileType::RegularFile, perm, self.engine.size(), 1)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        // The kernel may refuse larger values; it then keeps its own, which still works.
        let _ = config.set_max_write(MAX_REQUEST_BYTES);
        let _ = config.set_max_readahead(MAX_REQUEST_BYTES);
        let _ = config.set_max_background(MAX_BACKGROUND);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT_INO && name == DISK_FILE_NAME {
            reply.entry(&ATTR_TTL, &self.attr(DISK_INO), 0);
        } else {
            reply.error(libc::ENOENT);
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match ino {
            ROOT_INO | DISK_INO => reply.attr(&ATTR_TTL, &self.attr(ino)),
            _ => reply.error(libc::ENOENT),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        // A disk has a fixed size; ownership and times are not kept.
        if ino != DISK_INO {
            reply.error(libc::EPERM);
        } else if size.is_some_and(|size| size != self.engine.size()) {
            reply.error(libc::EINVAL);
        } else {
            reply.attr(&ATTR_TTL, &self.attr(ino));
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if ino != DISK_INO {
            reply.error(libc::EISDIR);
        } else if self.engine.read_only() && flags & libc::O_ACCMODE != libc::O_RDONLY {
            reply.error(libc::EROFS);
        } else {
            // Only this daemon changes the disk, so cached pages stay valid across opens.
            reply.opened(0, fuser::consts::FOPEN_KEEP_CACHE);
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        if ino != DISK_INO {
            return reply.error(libc::EISDIR);
        }
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(libc::EINVAL);
        };
        // Reads past the end are short, as for any file.
        let len = u64::from(size).min(self.engine.size().saturating_sub(offset)) as usize;
        if len == 0 {
            return reply.data(&[]);
        }
        let engine = self.engine.clone();
        self.run(async move {
            let mut buf = vec![0u8; len];
            let read = BlockRequest::Read {
                offset,
                buf: (&mut buf).into(),
            };
            match engine.submit(&SyncIo, read).await {
                Ok(()) => reply.data(&buf),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        if ino != DISK_INO {
            return reply.error(libc::EISDIR);
        }
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(libc::EINVAL);
        };
        let engine = self.engine.clone();
        let data = data.to_vec();
        self.run(async move {
            let write = BlockRequest::Write {
                offset,
                data: data.as_slice().into(),
            };
            match engine.submit(&SyncIo, write).await {
                Ok(()) => reply.written(data.len() as u32),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let engine = self.engine.clone();
        self.run(async move {
            match engine.submit(&SyncIo, BlockRequest::Flush).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != DISK_INO {
            return reply.error(libc::EISDIR);
        }
        let (Ok(offset), Ok(len)) = (u64::try_from(offset), u64::try_from(length)) else {
            return reply.error(libc::EINVAL);
        };
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let request = if mode == punch {
            BlockRequest::Discard { offset, len }
        } else if mode & !libc::FALLOC_FL_KEEP_SIZE == libc::FALLOC_FL_ZERO_RANGE {
            BlockRequest::WriteZeroes { offset, len }
        } else if mode & !libc::FALLOC_FL_KEEP_SIZE == 0
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.engine.size())
        {
            // Allocating space inside a disk of fixed size: nothing to do.
            return reply.ok();
        } else {
            return reply.error(libc::EOPNOTSUPP);
        };
        let engine = self.engine.clone();
        self.run(async move {
            match engine.submit(&SyncIo, request).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn flush(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _lock_owner: u64,
        reply: ReplyEmpty,
    ) {
        // close() promises no durability; fsync does.
        reply.ok();
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT_INO {
            return reply.error(libc::ENOTDIR);
        }
        let entries = [
            (ROOT_INO, FileType::Directory, "."),
            (ROOT_INO, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, DISK_FILE_NAME),
        ];
        for (index, (ino, kind, name)) in entries.iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(*ino, index as i64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}
