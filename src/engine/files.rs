//! Files: which chunks each file's data lies in, learnt from the image's own
//! inode tables as they are fetched.
//!
//! A program that opens a large file (a shared library the loader maps, a
//! model, a database) reads it out of order, and each first touch of a chunk
//! of it waits a round trip. The block layer does not know that those chunks
//! belong together; the image does. Images are ext4, and the kernel reads
//! a file's inode (and so the inode table chunk holding it) before any of
//! its data: by the time a reader misses in a file, the chunk that says
//! where the file lies has been fetched, and this module has read it.
//!
//! What is kept: for each regular file, the runs of chunks its data lies
//! in (extents that follow each other on disk, as a sparse file's do around
//! its holes, make one run), if a run spans more than one chunk. A file with
//! more extents than its inode holds keeps them in tree blocks; those are
//! read when the chunk holding them is filled, which the kernel also does
//! before it reads the data they map. A miss inside a run becomes a
//! neighbourhood covering it ([`super::neighbourhood`]), fetched at
//! readahead's priority under its budget.
//!
//! The same inode tables say where the directories are, and the superblock
//! where the inode tables are: every path a program opens is looked up
//! through both, so once chunk 0 is filled they are offered to readahead
//! ([`Files::take_wanted`]) to fetch ahead of the lookups.
//!
//! This is a guess and only ever a guess: chunks written since, or an image
//! that is not ext4, just mean no spans or stale ones, and a stale span
//! costs bytes, never correctness (fetched chunks are verified as any
//! other).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Range, RangeInclusive};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::layout::Layout;
use crate::cache::CacheDir;
use crate::ext4::scan::{Geometry, Node};

/// Most tree blocks awaited at once: a bound on what a forged image costs.
const MAX_AWAITED: usize = 1 << 16;
/// Most chunks of metadata ever offered to readahead.
const MAX_OFFERED: usize = 1 << 16;
/// Most inode table chunks read back from the cache when chunk 0 comes
/// after them (or was there when the engine opened).
const MAX_TABLE_READS: usize = 16;
/// Runs of a file longer than this are kept as pieces this long, so a
/// lookup looks back over few spans. Longer than any neighbourhood.
const MAX_RUN: u64 = 2 * super::neighbourhood::MAX_SPAN;
/// Most tree blocks read back from the cache for one filled chunk, however
/// many tables and tree blocks it leads to.
const MAX_TREE_READS: usize = 64;

#[derive(Debug, Default)]
struct State {
    /// `None` until chunk 0, which holds the superblock, is filled.
    geometry: Option<Arc<Geometry>>,
    /// First chunk → last chunk of each run of a file's data spanning more
    /// than one; when two start in the same chunk, the longer.
    spans: BTreeMap<u64, u64>,
    /// Longest span kept, so a lookup knows how far back to look.
    longest: u64,
    /// Byte offsets of extent tree blocks (a file with more extents than
    /// its inode holds) not read yet: read when their chunk is filled.
    awaited: BTreeSet<u64>,
    /// Chunks of metadata (inode tables, directories) worth fetching, not
    /// yet taken by readahead.
    wanted: Vec<u64>,
    /// Every chunk ever put in `wanted`.
    offered: BTreeSet<u64>,
}

/// The file spans of one image.
#[derive(Debug)]
pub(super) struct Files {
    layout: Arc<Layout>,
    state: Mutex<State>,
    /// Whether `wanted` holds any chunk: every read asks, few need the lock.
    any_wanted: AtomicBool,
    /// Whether `geometry` is known: every miss asks.
    knows_layout: AtomicBool,
}

impl Files {
    pub fn new(layout: Arc<Layout>) -> Files {
        Files {
            layout,
            state: Mutex::new(State::default()),
            any_wanted: AtomicBool::new(false),
            knows_layout: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Learns from chunk `index`, just filled with `plaintext` and marked
    /// present. Runs on the filling thread (never an async worker), and may
    /// read from `cache` what it learns of only now: on chunk 0, the inode
    /// table chunks filled before it; tree blocks in chunks already there.
    pub fn note_filled(&self, index: u64, plaintext: &[u8], cache: &CacheDir) {
        let start = self.layout.chunk_start(index);
        // Blocks read back from the cache for this one chunk: its waiters
        // may be waiting for this call to end.
        let mut reads = 0;
        if index == 0 {
            let Some(geometry) = Geometry::parse(plaintext).map(Arc::new) else {
                return;
            };
            let tables: BTreeSet<u64> = self.table_chunks(&geometry).take(MAX_OFFERED).collect();
            {
                let mut state = self.lock();
                state.geometry = Some(Arc::clone(&geometry));
                self.knows_layout.store(true, Ordering::Relaxed);
                // Every lookup of a path reads inode tables.
                self.want(&mut state, tables.iter().copied());
            }
            self.learn_inodes(&geometry, 0, plaintext, cache, &mut reads);
            let earlier = tables.iter().filter(|&&i| i != 0 && cache.is_present(i));
            for &earlier in earlier.take(MAX_TABLE_READS) {
                let mut buf = vec![0u8; self.layout.chunk_len(earlier)];
                let at = self.layout.chunk_start(earlier);
                // A chunk that cannot be read back teaches nothing; the
                // reader that needs it will find the error itself.
                if cache.read_at(&mut buf, at).is_ok() {
                    self.learn_inodes(&geometry, at, &buf, cache, &mut reads);
                }
            }
            return;
        }
        let (geometry, awaited) = {
            let mut state = self.lock();
            let Some(geometry) = state.geometry.clone() else {
                return;
            };
            let end = start + plaintext.len() as u64;
            let awaited: Vec<u64> = state.awaited.range(start..end).copied().collect();
            for at in &awaited {
                state.awaited.remove(at);
            }
            (geometry, awaited)
        };
        self.learn_inodes(&geometry, start, plaintext, cache, &mut reads);
        let nodes = awaited
            .into_iter()
            .filter_map(|at| {
                let from = (at - start) as usize;
                geometry.tree_node(plaintext.get(from..from + geometry.block_size as usize)?)
            })
            .collect();
        self.learn(&geometry, nodes, cache, &mut reads);
    }

    /// Learns from the inodes in `bytes`, the image from byte `at` on:
    /// files' runs, and the chunks of directories, which every lookup of a
    /// path below them reads.
    fn learn_inodes(
        &self,
        geometry: &Geometry,
        at: u64,
        bytes: &[u8],
        cache: &CacheDir,
        reads: &mut usize,
    ) {
        let mut directories = geometry.directories_in(at, bytes);
        if !directories.is_empty() {
            let chunk = self.layout.chunk_size();
            let count = self.layout.chunk_count();
            // A directory's blocks are few; a forged image's may claim the
            // same chunks many times over: each chunk is looked at once.
            directories.sort_by_key(|d| d.start);
            let mut chunks: Vec<(u64, u64)> = Vec::new();
            for d in directories
                .iter()
                .filter(|d| d.start < d.end && d.start / chunk < count)
            {
                let (first, last) = (d.start / chunk, ((d.end - 1) / chunk).min(count - 1));
                match chunks.last_mut() {
                    Some((_, hi)) if first <= *hi + 1 => *hi = (*hi).max(last),
                    _ => chunks.push((first, last)),
                }
            }
            let chunks = chunks
                .into_iter()
                .flat_map(|(lo, hi)| lo..=hi)
                .take(MAX_OFFERED);
            self.want(&mut self.lock(), chunks);
        }
        self.learn(geometry, geometry.files_in(at, bytes), cache, reads);
    }

    /// Adds `chunks` of metadata to those worth fetching, each once.
    fn want(&self, state: &mut State, chunks: impl Iterator<Item = u64>) {
        let count = self.layout.chunk_count();
        for index in chunks.take_while(|&i| i < count) {
            if state.offered.len() >= MAX_OFFERED {
                break;
            }
            if state.offered.insert(index) {
                state.wanted.push(index);
            }
        }
        self.any_wanted
            .store(!state.wanted.is_empty(), Ordering::Relaxed);
    }

    /// Whether the image's superblock was read: its files are then learnt
    /// as their inodes are filled.
    pub fn knows_layout(&self) -> bool {
        self.knows_layout.load(Ordering::Relaxed)
    }

    /// Whether [`Files::take_wanted`] has chunks to give.
    pub fn has_wanted(&self) -> bool {
        self.any_wanted.load(Ordering::Relaxed)
    }

    /// Takes the chunks of metadata learnt of since last asked, in the
    /// order learnt: inode tables, then directories. Readahead fetches them
    /// as it would a stream's.
    pub fn take_wanted(&self) -> Vec<u64> {
        if !self.any_wanted.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let mut state = self.lock();
        self.any_wanted.store(false, Ordering::Relaxed);
        std::mem::take(&mut state.wanted)
    }

    /// Learns from chunk 0 if the cache already holds it (an engine opened
    /// on a cache that outlived its last process), as if it had just been
    /// filled. Blocks on the cache: call it off the async workers.
    pub fn learn_from_cache(&self, cache: &CacheDir) {
        if !cache.is_present(0) {
            return;
        }
        let mut head = vec![0u8; self.layout.chunk_len(0)];
        if cache.read_at(&mut head, 0).is_ok() {
            self.note_filled(0, &head, cache);
        }
    }

    /// The chunks that hold some inode table.
    fn table_chunks<'a>(&'a self, geometry: &'a Geometry) -> impl Iterator<Item = u64> + 'a {
        let chunk = self.layout.chunk_size();
        let count = self.layout.chunk_count();
        geometry
            .inode_tables
            .iter()
            .filter(move |t| t.start < t.end && t.start / chunk < count)
            .flat_map(move |t| t.start / chunk..=((t.end - 1) / chunk).min(count - 1))
    }

    /// Keeps what `nodes` say: the spans of leaves, and the tree blocks
    /// below indexes, read now if their chunk is present, else awaited.
    fn learn(
        &self,
        geometry: &Geometry,
        mut nodes: Vec<Node>,
        cache: &CacheDir,
        reads: &mut usize,
    ) {
        while let Some(node) = nodes.pop() {
            match node {
                Node::Extents(extents) => self.keep_runs(&extents),
                Node::Children(blocks) => {
                    for at in blocks {
                        let index = at / self.layout.chunk_size();
                        if index >= self.layout.chunk_count() {
                            continue;
                        }
                        // Awaited first, then looked for: a fill of its
                        // chunk in between finds it awaited.
                        let inserted = {
                            let mut state = self.lock();
                            state.awaited.len() < MAX_AWAITED && state.awaited.insert(at)
                        };
                        // Not ours to read (someone else awaits it), or its
                        // chunk is still to come.
                        if !inserted || !cache.is_present(index) {
                            continue;
                        }
                        // Present: ours to read now, or to drop past this
                        // fill's allowance (a present chunk is filled no
                        // more, so an entry left would wait forever).
                        if !self.lock().awaited.remove(&at) || *reads >= MAX_TREE_READS {
                            continue;
                        }
                        *reads += 1;
                        let mut block = vec![0u8; geometry.block_size as usize];
                        if cache.read_at(&mut block, at).is_ok() {
                            nodes.extend(geometry.tree_node(&block));
                        }
                    }
                }
            }
        }
    }

    /// Keeps one file's extents (in the file's order) as spans of chunks:
    /// extents that follow each other on disk within a chunk, as a sparse
    /// file's do around its holes, make one span.
    fn keep_runs(&self, extents: &[Range<u64>]) {
        let chunk = self.layout.chunk_size();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for extent in extents.iter().filter(|e| e.start < e.end) {
            let (first, last) = (extent.start / chunk, (extent.end - 1) / chunk);
            match runs.last_mut() {
                Some((lo, hi)) if first >= *lo && first <= *hi + 1 => *hi = (*hi).max(last),
                _ => runs.push((first, last)),
            }
        }
        let count = self.layout.chunk_count();
        let mut state = self.lock();
        let pieces = runs.into_iter().flat_map(|(first, last)| {
            (first..=last)
                .step_by(MAX_RUN as usize)
                .map(move |lo| (lo, (lo + MAX_RUN - 1).min(last)))
        });
        for (first, last) in pieces {
            if first >= last || last >= count {
                continue;
            }
            let kept = state.spans.entry(first).or_insert(last);
            *kept = (*kept).max(last);
            state.longest = state.longest.max(last - first + 1);
        }
    }

    /// The chunks of the run of file data that holds chunk `index`, if one
    /// spanning several chunks is known; of several, the longest.
    pub fn span_of(&self, index: u64) -> Option<RangeInclusive<u64>> {
        let state = self.lock();
        let from = index.saturating_sub(state.longest);
        state
            .spans
            .range(from..=index)
            .filter(|&(_, &last)| last >= index)
            .max_by_key(|&(&first, &last)| last - first)
            .map(|(&first, &last)| first..=last)
    }
}
