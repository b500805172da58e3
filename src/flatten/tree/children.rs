//! A directory's names, in name order, packed for images of millions of
//! files.
//!
//! A map from name to [`Child`] that costs 16 bytes per entry plus the
//! name's bytes: the entries sit in runs of at most [`RUN_MAX`], each run a
//! sorted array of fixed-size slots beside one buffer of its names. A
//! balanced tree of boxed names costs four times as much per entry.
//!
//! Invariants: runs are non-empty and in order (every name of a run sorts
//! before every name of the next), slots within a run are sorted and
//! distinct, and a run's buffer holds every name its slots point to. Entries
//! arriving in name order (as tar writers walk directories) fill each run
//! before starting the next; other orders split full runs in halves, so an
//! insertion moves at most one run's slots and lookups stay logarithmic.

use std::cmp::Ordering;
use std::fmt;

use super::Child;

/// The most entries in one run: large enough that a run's own overhead is
/// small per entry, small enough that inserting into one is a short move.
const RUN_MAX: usize = 512;

#[derive(Clone, Copy)]
struct Slot {
    /// Where the name starts in the run's buffer.
    at: u32,
    /// Names are at most 255 bytes (ext4's limit, which entry paths keep).
    len: u8,
    child: Child,
}

#[derive(Default)]
struct Run {
    slots: Vec<Slot>,
    names: Vec<u8>,
    /// Bytes of `names` no slot points to any more.
    garbage: u32,
}

impl Run {
    fn name(&self, slot: &Slot) -> &[u8] {
        &self.names[slot.at as usize..slot.at as usize + usize::from(slot.len)]
    }

    fn last_name(&self) -> &[u8] {
        self.name(self.slots.last().expect("runs are never empty"))
    }

    /// The slot holding `name`, or where it would go.
    fn search(&self, name: &[u8]) -> Result<usize, usize> {
        self.slots.binary_search_by(|s| self.name(s).cmp(name))
    }

    fn push(&mut self, name: &[u8], child: Child) {
        let slot = self.store(name, child);
        self.slots.push(slot);
    }

    /// Adds `name` to the buffer and makes room for one more slot; the slot
    /// to put in place.
    fn store(&mut self, name: &[u8], child: Child) -> Slot {
        grow(&mut self.slots, 1, 4);
        grow(&mut self.names, name.len(), 32);
        let at = u32::try_from(self.names.len()).expect("a run's names fit in u32");
        self.names.extend_from_slice(name);
        Slot {
            at,
            len: u8::try_from(name.len()).expect("names are at most 255 bytes"),
            child,
        }
    }

    /// A copy of `slots` with only the names they use, allocated to size.
    fn packed(&self, slots: &[Slot]) -> Run {
        let mut run = Run {
            slots: Vec::with_capacity(slots.len()),
            names: Vec::with_capacity(slots.iter().map(|s| usize::from(s.len)).sum()),
            garbage: 0,
        };
        for s in slots {
            run.push(self.name(s), s.child);
        }
        run
    }
}

/// Makes room for `extra` more items, growing by a quarter (and at least
/// `least`) rather than the usual doubling: a layer's directories fill while it is applied and are
/// trimmed only at its end, and doubling left up to half of every one
/// unused meanwhile.
fn grow<T>(v: &mut Vec<T>, extra: usize, least: usize) {
    if v.capacity() - v.len() < extra {
        v.reserve_exact(extra.max(v.len() / 4).max(least));
    }
}

/// A directory's entries; see the module docs.
#[derive(Default)]
pub struct Children {
    runs: Vec<Run>,
}

impl Children {
    /// (run, slot) of `name`, or where it would be inserted; `None` when
    /// there are no runs.
    fn find(&self, name: &[u8]) -> Option<(usize, Result<usize, usize>)> {
        if self.runs.is_empty() {
            return None;
        }
        // The first run whose last name is not below `name`; past every
        // run, the end of the last one.
        let r = self
            .runs
            .partition_point(|run| run.last_name().cmp(name) == Ordering::Less)
            .min(self.runs.len() - 1);
        Some((r, self.runs[r].search(name)))
    }

    pub fn get(&self, name: &[u8]) -> Option<Child> {
        match self.find(name)? {
            (r, Ok(i)) => Some(self.runs[r].slots[i].child),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, name: &[u8]) -> Option<&mut Child> {
        match self.find(name)? {
            (r, Ok(i)) => Some(&mut self.runs[r].slots[i].child),
            _ => None,
        }
    }

    /// Sets `name` to `child`; the entry it replaced, if any.
    pub fn insert(&mut self, name: &[u8], child: Child) -> Option<Child> {
        let (r, i) = match self.find(name) {
            None => {
                let mut run = Run::default();
                run.push(name, child);
                grow(&mut self.runs, 1, 1);
                self.runs.push(run);
                return None;
            }
            Some((r, Ok(i))) => {
                return Some(std::mem::replace(&mut self.runs[r].slots[i].child, child));
            }
            Some((r, Err(i))) => (r, i),
        };
        let last = r + 1 == self.runs.len();
        let run = &mut self.runs[r];
        if run.slots.len() < RUN_MAX {
            let slot = run.store(name, child);
            run.slots.insert(i, slot);
            return None;
        }
        if i == RUN_MAX && last {
            // Appending in order: the full run stays full.
            run.names.shrink_to_fit();
            let mut next = Run::default();
            next.push(name, child);
            grow(&mut self.runs, 1, 1);
            self.runs.push(next);
            return None;
        }
        let half = RUN_MAX / 2;
        let (left, right) = (
            run.packed(&run.slots[..half]),
            run.packed(&run.slots[half..]),
        );
        self.runs[r] = left;
        grow(&mut self.runs, 1, 1);
        self.runs.insert(r + 1, right);
        let (r, i) = if i <= half { (r, i) } else { (r + 1, i - half) };
        let run = &mut self.runs[r];
        let slot = run.store(name, child);
        run.slots.insert(i, slot);
        None
    }

    /// Removes `name`; the entry it had, if any.
    pub fn remove(&mut self, name: &[u8]) -> Option<Child> {
        let (r, i) = match self.find(name)? {
            (r, Ok(i)) => (r, i),
            _ => return None,
        };
        let run = &mut self.runs[r];
        let slot = run.slots.remove(i);
        if run.slots.is_empty() {
            self.runs.remove(r);
        } else {
            run.garbage += u32::from(slot.len);
            if run.garbage as usize * 2 > run.names.len() {
                *run = run.packed(&run.slots);
            }
        }
        Some(slot.child)
    }

    /// Entries in name order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&[u8], Child)> + '_ {
        self.runs
            .iter()
            .flat_map(|run| run.slots.iter().map(move |s| (run.name(s), s.child)))
    }

    /// Children in name order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = Child> + '_ {
        self.iter().map(|(_, c)| c)
    }

    /// Gives back spare capacity, once the directory's entries have settled.
    pub fn shrink_to_fit(&mut self) {
        self.runs.shrink_to_fit();
        for run in &mut self.runs {
            run.slots.shrink_to_fit();
            run.names.shrink_to_fit();
        }
    }
}

impl fmt::Debug for Children {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.iter()
                    .map(|(name, child)| (String::from_utf8_lossy(name), child)),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn child(id: u32) -> Child {
        Child { id, layer: id % 3 }
    }

    fn check(c: &Children, model: &BTreeMap<Vec<u8>, u32>) {
        let got: Vec<(Vec<u8>, u32)> = c.iter().map(|(n, ch)| (n.to_vec(), ch.id)).collect();
        let want: Vec<(Vec<u8>, u32)> = model.iter().map(|(n, &id)| (n.clone(), id)).collect();
        assert_eq!(got, want);
        for run in &c.runs {
            assert!(!run.slots.is_empty() && run.slots.len() <= RUN_MAX);
        }
    }

    #[test]
    fn names_in_order_fill_whole_runs() {
        let mut c = Children::default();
        let mut model = BTreeMap::new();
        for i in 0..2000u32 {
            let name = format!("file{i:05}").into_bytes();
            assert!(c.insert(&name, child(i)).is_none());
            model.insert(name, i);
        }
        check(&c, &model);
        assert_eq!(c.runs.len(), 2000usize.div_ceil(RUN_MAX));
        assert_eq!(c.get(b"file01234").map(|ch| ch.id), Some(1234));
        assert!(c.get(b"file2").is_none());
        assert!(c.get(b"a").is_none() && c.get(b"z").is_none());
    }

    #[test]
    fn replace_and_remove_keep_the_rest() {
        let mut c = Children::default();
        c.insert(b"b", child(1));
        c.insert(b"a", child(2));
        assert_eq!(c.insert(b"b", child(3)).map(|ch| ch.id), Some(1));
        c.get_mut(b"a").unwrap().layer = 9;
        assert_eq!(c.get(b"a").unwrap().layer, 9);
        assert_eq!(c.remove(b"a").map(|ch| ch.id), Some(2));
        assert!(c.remove(b"a").is_none());
        assert_eq!(c.remove(b"b").map(|ch| ch.id), Some(3));
        assert!(c.runs.is_empty() && c.iter().next().is_none());
    }

    proptest! {
        /// Any mix of inserts and removes matches a `BTreeMap`, with runs
        /// small enough to split and merge many times.
        #[test]
        fn behaves_as_a_sorted_map(ops in prop::collection::vec(
            (any::<bool>(), prop::collection::vec(0u8..4, 1..6), 0u32..1000),
            1..3000,
        )) {
            let mut c = Children::default();
            let mut model = BTreeMap::new();
            for (insert, name, id) in ops {
                if insert {
                    let old = c.insert(&name, child(id)).map(|ch| ch.id);
                    prop_assert_eq!(old, model.insert(name, id));
                } else {
                    prop_assert_eq!(c.remove(&name).map(|ch| ch.id), model.remove(&name));
                }
            }
            check(&c, &model);
            for (name, &id) in &model {
                prop_assert_eq!(c.get(name).map(|ch| ch.id), Some(id));
            }
        }
    }
}
