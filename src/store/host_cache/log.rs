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

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

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
        if fs::metadata(&self.path)?.ino() != self.inode {
            self.reload()?;
        }
        self.file.write_all(record.line().as_bytes())
    }

    /// Replays what was appended since the last replay, by any process.
    pub(super) fn catch_up(&mut self) -> io::Result<()> {
        if fs::metadata(&self.path)?.ino() != self.inode {
            return self.reload();
        }
        let len = self.file.metadata()?.len();
        if len <= self.offset {
            return Ok(());
        }
        let mut text = vec![0; usize::try_from(len - self.offset).unwrap_or(usize::MAX)];
        self.file.read_exact_at(&mut text, self.offset)?;
        // A line still being written is left for the next replay.
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        for line in text[..complete].split(|&b| b == b'\n') {
            match Record::parse(line) {
                Some(Record::Insert(id, bytes)) => self.policy.insert(id, bytes),
                Some(Record::Hit(id)) => {
                    self.policy.touch(&id);
                }
                Some(Record::Evict(id)) => {
                    self.policy.remove(&id);
                }
                None => {}
            }
            self.replayed += 1;
        }
        self.offset += complete as u64;
        Ok(())
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
        crate::durable::write_with_mode(&self.path, text.as_bytes(), 0o600)?;
        self.reload()
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
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)?;
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
}
