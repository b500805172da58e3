//! The host cache's access log: how processes that share one cache
//! directory agree on what it holds and in which order to evict.
//!
//! Every process appends one text line per event to `access.log`:
//!
//! ```text
//! I <id> <bytes>    a chunk file was put in place
//! H <id>            a chunk file was read
//! E <id>            a chunk file was evicted (removed)
//! ```
//!
//! Each line is one `write` to a file opened with `O_APPEND`, so lines from
//! several processes never interleave. Each process replays the log into its
//! own copy of the eviction policy (a replica) as it goes; all replicas see
//! the same events in the same order. Only a process that holds the
//! directory's lock file (`flock`) evicts or compacts, after catching up with
//! the log, so victims are chosen on the latest view and removed once.
//!
//! Compaction replaces the log (atomic rename) with one `I` line per chunk
//! file present, coldest first, plus an `H` line for each chunk the policy
//! protects; the other processes notice the new inode and replay it. A line
//! torn by a crash fails to parse and is skipped; a chunk file whose `I`
//! line was lost is picked up by the next compaction, which lists the files.
//!
//! No line is lost to a compaction: an appender holds a shared `flock` on
//! the log while it checks that the log is still the one under the path and
//! writes its line, and the compactor holds it exclusively from reading the
//! old log's last lines (copied after the compacted ones) to the rename. A
//! line is thus either in the old log before that read, or in the new log.
//! Appenders wait only for that short tail (the bulk of the new log is
//! written and synced before it, the tail and the rename synced after),
//! never for an eviction or an fsync.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;

use crate::chunk::ChunkId;
use crate::store::policy::{default_policy, DefaultPolicy, EvictionPolicy};

pub(super) const LOG: &str = "access.log";
pub(super) const LOCK: &str = "lock";
/// Replayed lines past which the log is compacted, beyond four per chunk.
const COMPACT_SLACK: u64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Record {
    Insert(ChunkId, u64),
    Hit(ChunkId),
    Evict(ChunkId),
}

impl Record {
    fn line(&self) -> String {
        match self {
            Record::Insert(id, bytes) => format!("I {id} {bytes}\n"),
            Record::Hit(id) => format!("H {id}\n"),
            Record::Evict(id) => format!("E {id}\n"),
        }
    }

    fn parse(line: &[u8]) -> Option<Record> {
        let line = std::str::from_utf8(line).ok()?;
        let mut words = line.split(' ');
        let (kind, id) = (words.next()?, words.next()?.parse().ok()?);
        let record = match (kind, words.next()) {
            // A size no envelope can have is a damaged line, not a weight
            // that could overflow the policy's byte count.
            ("I", Some(bytes)) => Record::Insert(
                id,
                bytes
                    .parse()
                    .ok()
                    .filter(|&bytes| bytes <= crate::store::MAX_ENVELOPE_SIZE as u64)?,
            ),
            ("H", None) => Record::Hit(id),
            ("E", None) => Record::Evict(id),
            _ => return None,
        };
        words.next().is_none().then_some(record)
    }
}

/// One process's handle on the log and its replica of the policy.
#[derive(Debug)]
pub(super) struct AccessLog {
    path: PathBuf,
    /// Opened read + append: appends go to the end, replay reads at `offset`.
    file: File,
    inode: u64,
    offset: u64,
    capacity: u64,
    policy: DefaultPolicy<ChunkId>,
    replayed: u64,
}

impl AccessLog {
    /// Opens (or creates) the log in `root` and replays it.
    pub(super) fn open(root: &Path, capacity: u64) -> io::Result<AccessLog> {
        let path = root.join(LOG);
        let (file, inode) = open_log(&path)?;
        let mut log = AccessLog {
            path,
            file,
            inode,
            offset: 0,
            capacity,
            policy: default_policy(capacity),
            replayed: 0,
        };
        log.catch_up()?;
        Ok(log)
    }

    pub(super) fn policy(&self) -> &DefaultPolicy<ChunkId> {
        &self.policy
    }

    /// Appends one record; after another process compacted the log, to the
    /// new one.
    pub(super) fn append(&mut self, record: Record) -> io::Result<()> {
        loop {
            let shared = Flock::take(&self.file, FlockOperation::LockShared)?;
            if fs::metadata(&self.path)?.ino() == self.inode {
                return (&self.file).write_all(record.line().as_bytes());
            }
            drop(shared);
            self.reload()?;
        }
    }

    /// Replays what was appended since the last replay, by any process.
    pub(super) fn catch_up(&mut self) -> io::Result<()> {
        if fs::metadata(&self.path)?.ino() != self.inode {
            return self.reload();
        }
        let text = self.unreplayed_lines()?;
        if text.is_empty() {
            return Ok(());
        }
        for line in text[..text.len() - 1].split(|&b| b == b'\n') {
            match Record::parse(line) {
                // A chunk put again, or named twice by a compaction (a file
                // listed that another process put after the replay before
                // it, and that process's line copied after), is no read:
                // reads are `H` lines. The policy's insert would count it
                // as one and protect a chunk nobody read.
                Some(Record::Insert(id, bytes)) if !self.policy.contains(&id) => {
                    self.policy.insert(id, bytes);
                }
                Some(Record::Hit(id)) => {
                    self.policy.touch(&id);
                }
                Some(Record::Evict(id)) => {
                    self.policy.remove(&id);
                }
                Some(Record::Insert(..)) | None => {}
            }
            self.replayed += 1;
        }
        self.offset += text.len() as u64;
        Ok(())
    }

    /// The whole lines appended after the last replay.
    fn unreplayed_lines(&self) -> io::Result<Vec<u8>> {
        let len = self.file.metadata()?.len();
        if len <= self.offset {
            return Ok(Vec::new());
        }
        let mut text = vec![0; usize::try_from(len - self.offset).unwrap_or(usize::MAX)];
        self.file.read_exact_at(&mut text, self.offset)?;
        // A line still being written is left for the next replay.
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        text.truncate(complete);
        Ok(text)
    }

    /// Starts over on the log now under the path.
    fn reload(&mut self) -> io::Result<()> {
        (self.file, self.inode) = open_log(&self.path)?;
        self.offset = 0;
        self.replayed = 0;
        self.policy = default_policy(self.capacity);
        self.catch_up()
    }

    /// Whether the cache holds more than it may, or the log has grown long
    /// enough to compact (after catching up with other processes).
    pub(super) fn needs_upkeep(&mut self, force_compaction: bool) -> io::Result<bool> {
        self.catch_up()?;
        Ok(force_compaction || self.policy.weight() > self.capacity || self.is_long())
    }

    fn is_long(&self) -> bool {
        self.replayed > 4 * self.policy.len() as u64 + COMPACT_SLACK
    }

    /// Under the directory's lock (`_held`): catches up, removes what the
    /// policy evicts until the cache fits (`remove` deletes one chunk's
    /// file), and compacts the log if it has grown long (`list` names every
    /// chunk file present, with its size). Returns the chunks evicted.
    pub(super) fn evict_and_compact(
        &mut self,
        _held: &DirLock,
        force_compaction: bool,
        remove: impl Fn(&ChunkId) -> io::Result<()>,
        list: impl FnOnce() -> io::Result<Vec<(ChunkId, u64)>>,
    ) -> io::Result<Vec<ChunkId>> {
        self.catch_up()?;
        let long = self.is_long();
        let mut evicted = Vec::new();
        let mut evict = |log: &mut AccessLog, id: ChunkId| -> io::Result<()> {
            // Logged before the file goes: a process that finds the file
            // gone and puts it back logs its insert after this line, so
            // every replica keeps counting the file. The other order lets
            // the eviction line land after that insert and leaves a file
            // no replica counts, beyond the bound.
            log.append(Record::Evict(id))?;
            remove(&id)?;
            evicted.push(id);
            Ok(())
        };
        for (id, _) in self.policy.evict_to(self.capacity) {
            evict(self, id)?;
        }
        if long || force_compaction {
            self.compact(list()?)?;
            for (id, _) in self.policy.evict_to(self.capacity) {
                evict(self, id)?;
            }
        }
        Ok(evicted)
    }

    /// Rewrites the log from the chunk files `present`, in the replica's
    /// order, and replays it.
    fn compact(&mut self, present: Vec<(ChunkId, u64)>) -> io::Result<()> {
        let sizes: std::collections::HashMap<ChunkId, u64> = present.iter().copied().collect();
        let mut text = String::new();
        // Files the replica never heard of go first, as the coldest.
        for (id, bytes) in &present {
            if !self.policy.contains(id) {
                text.push_str(&Record::Insert(*id, *bytes).line());
            }
        }
        let mut protected = String::new();
        for (id, _) in self.policy.entries() {
            if let Some(&bytes) = sizes.get(&id) {
                text.push_str(&Record::Insert(id, bytes).line());
                if self.policy.is_protected(&id) {
                    protected.push_str(&Record::Hit(id).line());
                }
            }
        }
        text.push_str(&protected);
        let (temp, mut file) = crate::durable::TempFile::create_with_mode(&self.path, 0o600)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        {
            // Only the holder of the directory's lock compacts, so the log
            // under the path is still `self.file`. What other processes
            // appended since the replay above follows the compacted lines,
            // in the order every replica replayed it.
            // Appenders wait for this block, so it syncs nothing.
            let _exclusive = Flock::take(&self.file, FlockOperation::LockExclusive)?;
            file.write_all(&self.unreplayed_lines()?)?;
            temp.rename_unsynced()?;
        }
        // A crash before these syncs leaves the old log, or the new one with
        // its synced bulk and maybe not the copied tail: at most those last
        // lines are lost, as any line not yet synced may be, and the next
        // compaction adopts the files they named.
        file.sync_all()?;
        crate::durable::sync_dir(&crate::durable::parent_dir(&self.path))?;
        self.reload()
    }
}

/// An `flock` on an open file, released when dropped (or when the file is
/// closed, should the release fail).
struct Flock<'a> {
    file: &'a File,
}

impl<'a> Flock<'a> {
    fn take(file: &'a File, operation: FlockOperation) -> io::Result<Flock<'a>> {
        rustix::fs::flock(file, operation)?;
        Ok(Flock { file })
    }
}

impl Drop for Flock<'_> {
    fn drop(&mut self) {
        let _ = rustix::fs::flock(self.file, FlockOperation::Unlock);
    }
}

/// The cache directory's lock, held until dropped.
pub(super) struct DirLock {
    _file: File,
}

/// Takes the cache directory's lock, waiting for it: never while holding
/// the log's mutex, or every reader of this process waits on another
/// process's eviction.
pub(super) fn lock_dir(root: &Path) -> io::Result<DirLock> {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(root.join(LOCK))?;
    rustix::fs::flock(&lock, FlockOperation::LockExclusive)?;
    Ok(DirLock { _file: lock })
}

fn open_log(path: &Path) -> io::Result<(File, u64)> {
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    let inode = file.metadata()?.ino();
    Ok((file, inode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_torn_lines_are_refused() {
        let id = ChunkId::of_envelope(b"x");
        for record in [
            Record::Insert(id, 524_288),
            Record::Hit(id),
            Record::Evict(id),
        ] {
            let line = record.line();
            assert!(line.ends_with('\n'));
            assert_eq!(Record::parse(line.trim_end().as_bytes()), Some(record));
        }
        let line = Record::Insert(id, 10).line();
        for cut in 0..line.len() - 3 {
            assert_eq!(Record::parse(&line.as_bytes()[..cut]), None, "{cut}");
        }
        assert_eq!(Record::parse(b"H 12"), None);
        assert_eq!(Record::parse(format!("H {id} 5").as_bytes()), None);
        assert_eq!(
            Record::parse(format!("I {id} {}", u64::MAX).as_bytes()),
            None
        );
    }

    /// An `I` line for a chunk the replica already tracks (put again, or
    /// named twice by a compaction that raced with a put) is no read: the
    /// chunk stays unprotected until an `H` line says it was read.
    #[test]
    fn a_repeated_insert_is_not_a_read() {
        let dir = tempfile::tempdir().unwrap();
        let unread = ChunkId::of_envelope(b"unread");
        let read = ChunkId::of_envelope(b"read");
        let mut log = AccessLog::open(dir.path(), 1 << 30).unwrap();
        for record in [
            Record::Insert(unread, 10),
            Record::Insert(read, 10),
            Record::Insert(unread, 10),
            Record::Hit(read),
        ] {
            log.append(record).unwrap();
        }
        let replica = AccessLog::open(dir.path(), 1 << 30).unwrap();
        assert!(!replica.policy().is_protected(&unread));
        assert!(replica.policy().is_protected(&read));
        assert_eq!(replica.policy().len(), 2);
    }
}
