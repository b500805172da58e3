//! Neighbourhoods: readahead for readers that jump about within a region.
//!
//! A program loading a large shared library, or a database walking an index,
//! reads one region of the image out of order: chunk 630, then 629, 631,
//! 659, 649… Sequential readahead sees no stream there, so with the origin a
//! round trip away each of those misses waits for a fetch of its own, one
//! after another. Two misses close together say the region around them will
//! be read; a neighbourhood fetches it.
//!
//! **Detection.** The last [`RECENT`] misses that belonged to no stream and
//! no neighbourhood are remembered. A miss near one of them makes a
//! neighbourhood of the two, reaching a margin beyond them on either side.
//! Each further miss near a neighbourhood joins it and doubles its margin,
//! so a region earns its reach by being read, as a stream earns its window;
//! a neighbourhood never spans more than [`MAX_SPAN`] chunks. Misses far
//! apart (random reads over a large image) seldom pair up and so seldom
//! fetch anything extra.
//!
//! **Reach.** How near is near depends on what the chunks hold ([`Reach`]).
//! Where nothing says, [`NEAR`] chunks, with a first margin of
//! [`FIRST_MARGIN`]. Among the small files of a file system it is four times
//! that: a program loading its modules and libraries reads one file, then
//! another a few MiB on, then one between, across a region that its package
//! manager wrote in one go (a cold `import numpy` misses all over 55
//! chunks of the standard library's modules, and 86 of numpy's). Pairing
//! them only when they fall within 4 MiB of each other left most of those
//! misses to wait a round trip each. Not inside a large file, which may be
//! read at random (a database), and not while the link is short of
//! bandwidth: a wider reach is a wider guess. A neighbourhood made wide
//! keeps its margin when the link slows, but its fetches then get fewer
//! permits, like every other guess.
//!
//! This module only decides which chunks a neighbourhood covers and which of
//! them it already started; [`super::readahead`] starts the fetches, under
//! the same in-flight bound as streams, so a chunk a neighbourhood fetched
//! and a reader then read counts toward readahead's precision.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;

/// Misses remembered for pairing with the next one.
pub(super) const RECENT: usize = 8;
/// Two misses this many chunks apart, or closer, make a neighbourhood
/// ([`Reach::Narrow`]).
pub(super) const NEAR: u64 = 8;
/// How far a new neighbourhood reaches beyond its two misses, in chunks
/// ([`Reach::Narrow`]).
pub(super) const FIRST_MARGIN: u64 = 2;
/// [`NEAR`] among a file system's small files ([`Reach::AmongFiles`]).
pub(super) const NEAR_AMONG_FILES: u64 = 32;
/// [`FIRST_MARGIN`] among a file system's small files.
pub(super) const FIRST_MARGIN_AMONG_FILES: u64 = 8;
/// The most chunks one neighbourhood covers: 32 MiB of 512 KiB chunks, a
/// large library; it bounds what a region that stops being read has cost.
pub(super) const MAX_SPAN: u64 = 64;
/// A run of a file's chunks this long or shorter is fetched whole on its
/// first miss: 8 MiB of 512 KiB chunks, a large shared library. A longer
/// one needs a second miss within half of [`MAX_SPAN`] first.
pub(super) const WHOLE_RUN: u64 = 16;
/// Neighbourhoods remembered at once; the least recently used is forgotten.
const NEIGHBOURHOODS: usize = 8;

/// How far apart two misses may lie and still make a neighbourhood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reach {
    /// [`NEAR`]: nothing says what the chunks hold (an image that is not a
    /// file system known here, or one not learnt yet), the miss is inside
    /// a file longer than [`WHOLE_RUN`] (read at random, it may be), or the
    /// link is short of bandwidth (the guessing budget stands below its
    /// most).
    Narrow,
    /// [`NEAR_AMONG_FILES`]: the miss is in a file system whose layout is
    /// known, outside any file longer than [`WHOLE_RUN`].
    AmongFiles,
}

// A pair of misses `near` apart must leave room in a span.
const _: () = assert!(NEAR_AMONG_FILES < MAX_SPAN && NEAR < MAX_SPAN);

impl Reach {
    fn near(self) -> u64 {
        match self {
            Reach::Narrow => NEAR,
            Reach::AmongFiles => NEAR_AMONG_FILES,
        }
    }

    fn first_margin(self) -> u64 {
        match self {
            Reach::Narrow => FIRST_MARGIN,
            Reach::AmongFiles => FIRST_MARGIN_AMONG_FILES,
        }
    }
}

#[derive(Debug)]
pub(super) struct Neighbourhood {
    /// The first and last chunk a miss in it touched.
    lo: u64,
    hi: u64,
    margin: u64,
    /// The chunk of its latest miss: fetches start nearest it.
    latest: u64,
    /// Chunks it started, or found present, already: each is started at
    /// most once, so a chunk whose fetch failed is left to the readers.
    started: BTreeSet<u64>,
    used: u64,
}

impl Neighbourhood {
    /// The chunks it covers, within an image of `end` chunks.
    pub fn span(&self, end: u64) -> RangeInclusive<u64> {
        let lo = self.lo.saturating_sub(self.margin);
        let hi = (self.hi + self.margin).min(end.saturating_sub(1));
        lo..=hi
    }

    /// The chunks of its span not started yet, nearest its latest miss
    /// first.
    pub fn unstarted(&self, end: u64) -> impl Iterator<Item = u64> + '_ {
        let span = self.span(end);
        let (lo, hi, from) = (*span.start(), *span.end(), self.latest);
        let reach = (from - lo).max(hi.saturating_sub(from));
        (1..=reach)
            .flat_map(move |d| [from.checked_add(d), from.checked_sub(d)])
            .flatten()
            .filter(move |i| (lo..=hi).contains(i))
            .filter(|i| !self.started.contains(i))
    }

    pub fn mark_started(&mut self, index: u64) {
        self.started.insert(index);
    }

    /// Whether every chunk of its span was started. (`started` may also
    /// hold chunks a shrunken margin left outside the span.)
    pub fn is_done(&self, end: u64) -> bool {
        self.unstarted(end).next().is_none()
    }

    /// Whether its span holds `lo..=hi`.
    fn covers(&self, lo: u64, hi: u64) -> bool {
        self.lo.saturating_sub(self.margin) <= lo && self.hi.saturating_add(self.margin) >= hi
    }

    /// Takes in a miss at `first..=last` if it lies within `near` chunks
    /// and the span stays within [`MAX_SPAN`].
    fn join(&mut self, first: u64, last: u64, near: u64, tick: u64) -> bool {
        if last + near < self.lo || first > self.hi + near {
            return false;
        }
        let (lo, hi) = (self.lo.min(first), self.hi.max(last));
        if hi - lo + 1 > MAX_SPAN {
            return false;
        }
        self.lo = lo;
        self.hi = hi;
        // The margin never takes the span past MAX_SPAN.
        let room = (MAX_SPAN - (hi - lo + 1)) / 2;
        self.margin = (self.margin * 2).min(room);
        self.latest = first;
        self.used = tick;
        self.started.extend(first..=last);
        true
    }
}

/// At most [`MAX_SPAN`] chunks of `file` holding the miss `first..=last`:
/// as many after the miss as before it, and where the file ends on one
/// side, more on the other.
fn around(first: u64, last: u64, file: &RangeInclusive<u64>) -> (u64, u64) {
    let (start, end) = (*file.start(), *file.end());
    let lo = start.max(first.saturating_sub(MAX_SPAN / 2));
    let hi = end.min(lo + MAX_SPAN - 1);
    let lo = start.max((hi + 1).saturating_sub(MAX_SPAN));
    (lo.min(first), hi.max(last))
}

/// Keeps `neighbourhood` in `list`, forgetting the least recently used one
/// if there are [`NEIGHBOURHOODS`] already; its index.
fn keep(list: &mut Vec<Neighbourhood>, neighbourhood: Neighbourhood) -> usize {
    if list.len() < NEIGHBOURHOODS {
        list.push(neighbourhood);
        return list.len() - 1;
    }
    let oldest = (0..list.len()).min_by_key(|&i| list[i].used).unwrap_or(0);
    list[oldest] = neighbourhood;
    oldest
}

#[derive(Debug, Default)]
pub(super) struct Neighbourhoods {
    recent: Vec<u64>,
    all: Vec<Neighbourhood>,
    /// Made from files' extents ([`Neighbourhoods::note_file_miss`]).
    files: Vec<Neighbourhood>,
    /// The last misses in runs of files longer than [`WHOLE_RUN`].
    file_misses: Vec<u64>,
    tick: u64,
}

impl Neighbourhoods {
    /// Records a miss of chunks `first..=last` that no stream took; the
    /// neighbourhood it joined or made, if any.
    pub fn note_miss(&mut self, first: u64, last: u64, reach: Reach) -> Option<usize> {
        self.tick += 1;
        let tick = self.tick;
        let near = reach.near();
        if let Some(i) = self
            .all
            .iter_mut()
            .position(|n| n.join(first, last, near, tick))
        {
            return Some(i);
        }
        let paired = self.recent.iter().position(|&m| {
            m != first && last + near >= m && first <= m + near && last - first < MAX_SPAN - near
        });
        let Some(r) = paired else {
            if self.recent.len() == RECENT {
                self.recent.remove(0);
            }
            self.recent.push(first);
            return None;
        };
        let m = self.recent.remove(r);
        let lo = m.min(first);
        let hi = m.max(last);
        Some(keep(
            &mut self.all,
            Neighbourhood {
                lo,
                hi,
                margin: reach.first_margin().min((MAX_SPAN - (hi - lo + 1)) / 2),
                latest: first,
                // Their own fetches are the readers'.
                started: (first..=last).chain([m]).collect(),
                used: tick,
            },
        ))
    }

    /// Records a miss of chunks `first..=last` inside `file`, the chunks of
    /// one run of one file's data; the file neighbourhood it made or moved,
    /// if any ([`Neighbourhoods::get_file_mut`]).
    ///
    /// A file's run of up to [`WHOLE_RUN`] chunks needs no second miss to
    /// prove it: it becomes a neighbourhood at once; of a longer run, up to
    /// [`MAX_SPAN`] chunks around the miss do on a second miss in it nearby.
    /// Not if one already covers them (a file neighbourhood that does
    /// then fetches nearest this miss first). File neighbourhoods are kept
    /// apart from those misses make: they never grow, and they take no
    /// miss that could have paired with another.
    pub fn note_file_miss(
        &mut self,
        first: u64,
        last: u64,
        file: RangeInclusive<u64>,
    ) -> Option<usize> {
        self.tick += 1;
        let tick = self.tick;
        let (lo, hi) = around(first, last, &file);
        if let Some(i) = self.files.iter().position(|n| n.covers(lo, hi)) {
            // The reader moved within the file: fetch nearest it from now.
            let n = &mut self.files[i];
            n.used = tick;
            n.latest = first;
            n.started.extend(first..=last);
            return Some(i);
        }
        if self.all.iter().any(|n| n.covers(lo, hi)) {
            return None;
        }
        if file.end() - file.start() + 1 > WHOLE_RUN {
            // A large file read at random (a database, a disk image) would
            // cost a whole span per read: a second miss nearby in the same
            // run proves it is being loaded.
            let paired = self
                .file_misses
                .iter()
                .any(|&m| m != first && file.contains(&m) && m.abs_diff(first) <= MAX_SPAN / 2);
            if self.file_misses.len() == RECENT {
                self.file_misses.remove(0);
            }
            self.file_misses.push(first);
            if !paired {
                return None;
            }
        }
        Some(keep(
            &mut self.files,
            Neighbourhood {
                lo,
                hi,
                margin: 0,
                latest: first,
                started: (first..=last).collect(),
                used: tick,
            },
        ))
    }

    pub fn get_file_mut(&mut self, i: usize) -> &mut Neighbourhood {
        &mut self.files[i]
    }

    pub fn get_mut(&mut self, i: usize) -> &mut Neighbourhood {
        &mut self.all[i]
    }

    /// Every neighbourhood, those misses made before those of files.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Neighbourhood> {
        self.all.iter_mut().chain(self.files.iter_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const END: u64 = 10_000;

    #[test]
    fn misses_far_apart_make_no_neighbourhood() {
        let mut n = Neighbourhoods::default();
        for miss in [100, 300, 120, 500, 700, 900, 140, 1100, 1300] {
            assert_eq!(n.note_miss(miss, miss, Reach::Narrow), None, "{miss}");
        }
    }

    #[test]
    fn two_near_misses_cover_the_region_between_and_a_margin() {
        let mut n = Neighbourhoods::default();
        assert_eq!(n.note_miss(630, 630, Reach::Narrow), None);
        let i = n.note_miss(626, 626, Reach::Narrow).unwrap();
        assert_eq!(n.get_mut(i).span(END), 624..=632);
        // Nearest the latest miss first.
        let order: Vec<u64> = n.get_mut(i).unstarted(END).take(4).collect();
        assert_eq!(order, [627, 625, 628, 624]);
    }

    #[test]
    fn each_miss_that_joins_doubles_the_reach_up_to_the_largest_span() {
        let mut n = Neighbourhoods::default();
        n.note_miss(630, 630, Reach::Narrow);
        let i = n.note_miss(629, 629, Reach::Narrow).unwrap();
        assert_eq!(n.get_mut(i).span(END), 627..=632);
        assert_eq!(n.note_miss(636, 636, Reach::Narrow), Some(i));
        assert_eq!(n.get_mut(i).span(END), 625..=640);
        assert_eq!(n.note_miss(622, 622, Reach::Narrow), Some(i));
        assert_eq!(n.get_mut(i).span(END), 614..=644);
        // Near the misses' extent (622..=636), not its margin, is what joins.
        assert_eq!(n.note_miss(646, 646, Reach::Narrow), None);
        for miss in [644, 652, 614, 660, 668, 606] {
            assert_eq!(n.note_miss(miss, miss, Reach::Narrow), Some(i), "{miss}");
            let span = n.get_mut(i).span(END);
            assert!(span.end() + 1 - span.start() <= MAX_SPAN, "{span:?}");
        }
        assert_eq!(n.get_mut(i).span(END), 606..=668);
        // Started before the margin shrank, now outside the span: 602..=605
        // and 669..=672 count for nothing, so 640 still waits.
        for index in (602..=672).filter(|&i| i != 640) {
            n.get_mut(i).mark_started(index);
        }
        assert!(!n.get_mut(i).is_done(END));
        n.get_mut(i).mark_started(640);
        assert!(n.get_mut(i).is_done(END));
        // 676 is near, but would take it past the largest span.
        assert_ne!(n.note_miss(676, 676, Reach::Narrow), Some(i));
    }

    #[test]
    fn among_files_misses_pair_from_further_and_reach_further() {
        let mut n = Neighbourhoods::default();
        // 20 chunks apart: too far where nothing says what the chunks hold...
        assert_eq!(n.note_miss(600, 600, Reach::Narrow), None);
        assert_eq!(n.note_miss(620, 620, Reach::Narrow), None);
        // ...near among a file system's small files.
        let i = n.note_miss(640, 640, Reach::AmongFiles).unwrap();
        assert_eq!(n.get_mut(i).span(END), 612..=648);
        // Joining takes the same reach.
        assert_eq!(n.note_miss(670, 670, Reach::Narrow), None);
        assert_eq!(n.note_miss(671, 671, Reach::AmongFiles), Some(i));
        assert_eq!(n.get_mut(i).span(END), 614..=677);
    }

    #[test]
    fn among_files_misses_further_apart_than_their_reach_make_nothing() {
        let mut n = Neighbourhoods::default();
        assert_eq!(n.note_miss(600, 600, Reach::AmongFiles), None);
        assert_eq!(n.note_miss(633, 633, Reach::AmongFiles), None);
        assert_eq!(n.note_miss(567, 567, Reach::AmongFiles), None);
    }

    #[test]
    fn a_span_ends_at_the_image_and_is_done_once_all_started() {
        let mut n = Neighbourhoods::default();
        n.note_miss(9, 9, Reach::Narrow);
        let i = n.note_miss(8, 8, Reach::Narrow).unwrap();
        assert_eq!(n.get_mut(i).span(10), 6..=9);
        // The two misses are their readers' to fetch.
        let todo: Vec<u64> = n.get_mut(i).unstarted(10).collect();
        assert_eq!(todo, [7, 6]);
        for index in todo {
            assert!(!n.get_mut(i).is_done(10));
            n.get_mut(i).mark_started(index);
        }
        assert!(n.get_mut(i).is_done(10));
        assert_eq!(n.get_mut(i).unstarted(10).count(), 0);
    }

    #[test]
    fn the_least_recently_used_neighbourhood_is_forgotten() {
        let mut n = Neighbourhoods::default();
        for k in 0..NEIGHBOURHOODS as u64 + 1 {
            n.note_miss(k * 1000, k * 1000, Reach::Narrow);
            assert!(n
                .note_miss(k * 1000 + 1, k * 1000 + 1, Reach::Narrow)
                .is_some());
        }
        // The first one (around 0) was replaced by the last.
        assert_eq!(n.note_miss(3, 3, Reach::Narrow), None);
        assert!(n.note_miss(1003, 1003, Reach::Narrow).is_some());
    }

    #[test]
    fn a_miss_in_a_known_file_covers_the_file_at_once() {
        let mut n = Neighbourhoods::default();
        let i = n.note_file_miss(284, 284, 280..=293).unwrap();
        assert_eq!(n.get_file_mut(i).span(END), 280..=293);
        let order: Vec<u64> = n.get_file_mut(i).unstarted(END).take(4).collect();
        assert_eq!(order, [285, 283, 286, 282]);
        // Another miss in the same file makes nothing new, but moves where
        // its fetches go next...
        assert_eq!(n.note_file_miss(290, 290, 280..=293), Some(i));
        let order: Vec<u64> = n.get_file_mut(i).unstarted(END).take(3).collect();
        assert_eq!(order, [291, 289, 292]);
        // ...and is still free to pair with a miss outside the file.
        assert_eq!(n.note_miss(290, 290, Reach::Narrow), None);
        let paired = n.note_miss(296, 296, Reach::Narrow).unwrap();
        assert_eq!(n.get_mut(paired).span(END), 288..=298);
        // A file already inside a neighbourhood of misses needs none.
        assert_eq!(n.note_file_miss(296, 296, 295..=297), None);
    }

    #[test]
    fn a_large_file_is_covered_up_to_the_largest_span_around_the_miss() {
        let mut n = Neighbourhoods::default();
        // One miss in a long run fetches nothing: it may be read at random.
        assert_eq!(n.note_file_miss(629, 629, 562..=629), None);
        assert_eq!(n.note_file_miss(562, 562, 562..=629), None);
        // A second one nearby proves it is being loaded. A miss at the end
        // reaches back; one at the start reaches forward.
        let end = n.note_file_miss(627, 627, 562..=629).unwrap();
        assert_eq!(n.get_file_mut(end).span(END), 566..=629);
        let start = n.note_file_miss(563, 563, 562..=629).unwrap();
        assert_ne!(start, end);
        assert_eq!(n.get_file_mut(start).span(END), 562..=625);
        assert_eq!(n.note_file_miss(1100, 1100, 1000..=1300), None);
        assert_eq!(n.note_file_miss(1200, 1200, 1000..=1300), None, "too far");
        let middle = n.note_file_miss(1110, 1110, 1000..=1300).unwrap();
        let span = n.get_file_mut(middle).span(END);
        assert_eq!(span.end() + 1 - span.start(), MAX_SPAN);
        assert_eq!(span, 1078..=1141);
    }
}
