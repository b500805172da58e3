//! How many speculative fetches (readahead streams and neighbourhoods) may
//! run at once: up to `readahead_chunks`, fewer while they slow the store.
//!
//! Speculation pays when the origin is a round trip away with bandwidth to
//! spare: fetches overlap, and a reader finds its chunk already there. When
//! bandwidth is what limits (a slow link), every guessed chunk delays the
//! chunks readers wait for, and a start takes as long as its bytes take to
//! cross. The store's answers tell the two apart: with bandwidth to spare a
//! get takes about as long however many run; on a full link gets slow down
//! as more run at once. So the bound works like a delay-based congestion
//! window: a get that took more than [`SLOW_FACTOR`] × the fastest full get
//! seen, plus [`SLACK`], while speculative fetches were in flight halves it,
//! down to none; a get within that raises it by one, up to the maximum.
//! Slow gets with nothing speculative in flight are not speculation's doing
//! and change nothing. The fastest get drifts up toward what gets take, so
//! a store that became slower for good is not judged by an old best.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A get slower than this many times the fastest is slowed by others.
const SLOW_FACTOR: f64 = 1.5;
/// Noise allowed on top: scheduling on a busy host, a disk read at the
/// store.
pub(super) const SLACK: Duration = Duration::from_millis(5);
/// The fastest get moves this share of the way toward each slower one.
const DRIFT: u64 = 64;

#[derive(Debug)]
pub(super) struct Budget {
    max: u64,
    /// Speculative fetches allowed at once now, `0..=max`.
    limit: AtomicU64,
    in_flight: AtomicU64,
    /// Fastest get of a whole chunk seen, in microseconds.
    fastest_us: AtomicU64,
    adaptive: bool,
}

/// One speculative fetch's place in the budget, given back when dropped.
#[derive(Debug)]
pub(super) struct Permit(Arc<Budget>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Budget {
    /// A budget of `max` fetches; `adaptive` false keeps it at `max`.
    pub fn new(max: u64, adaptive: bool) -> Arc<Budget> {
        Arc::new(Budget {
            max,
            limit: AtomicU64::new(max),
            in_flight: AtomicU64::new(0),
            fastest_us: AtomicU64::new(u64::MAX),
            adaptive,
        })
    }

    /// A permit for one more speculative fetch, if the budget allows it.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let limit = self.limit.load(Ordering::Acquire);
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(Arc::clone(self)))
    }

    #[cfg(test)]
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Acquire)
    }

    /// Whether the store has kept pace with every guess so far: the limit
    /// stands at its most. Guesses of the widest kind (what a file system
    /// says a program may read next) wait for that.
    pub fn has_room(&self) -> bool {
        self.limit.load(Ordering::Acquire) >= self.max
    }

    /// A store get of a whole chunk (`whole`: not the image's short last
    /// one) took `took`.
    pub fn note_get(&self, took: Duration, whole: bool) {
        if !self.adaptive || !whole {
            return;
        }
        let us = (took.as_micros() as u64).max(1);
        let fastest = self
            .fastest_us
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| {
                Some(if us <= f { us } else { f + (us - f) / DRIFT })
            })
            .map_or(us, |before| before.min(us));
        let slow_after = fastest as f64 * SLOW_FACTOR + SLACK.as_micros() as f64;
        let slow = us as f64 > slow_after;
        if slow && self.in_flight.load(Ordering::Acquire) == 0 {
            return;
        }
        let _ = self
            .limit
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |limit| {
                Some(if slow {
                    limit / 2
                } else {
                    (limit + 1).min(self.max)
                })
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn permits_stop_at_the_limit_and_come_back_when_dropped() {
        let budget = Budget::new(2, true);
        let a = budget.try_acquire().unwrap();
        let _b = budget.try_acquire().unwrap();
        assert!(budget.try_acquire().is_none());
        drop(a);
        assert!(budget.try_acquire().is_some());
    }

    #[test]
    fn gets_that_slow_down_while_speculating_halve_the_limit_to_none() {
        let budget = Budget::new(8, true);
        budget.note_get(ms(26), true);
        let _speculating = budget.try_acquire().unwrap();
        // A full link: 26 ms alone, 47 with one more transfer beside it.
        for expected in [4, 2, 1, 0, 0] {
            budget.note_get(ms(47), true);
            assert_eq!(budget.limit(), expected);
        }
        assert!(budget.try_acquire().is_none());
    }

    #[test]
    fn gets_that_keep_their_pace_raise_it_back_to_the_maximum() {
        let budget = Budget::new(4, true);
        budget.note_get(ms(10), true);
        let speculating = budget.try_acquire().unwrap();
        budget.note_get(ms(40), true);
        budget.note_get(ms(40), true);
        assert_eq!(budget.limit(), 1);
        drop(speculating);
        // A round trip away with bandwidth to spare: within 1.5× + 5 ms.
        for expected in [2, 3, 4, 4] {
            budget.note_get(ms(19), true);
            assert_eq!(budget.limit(), expected);
        }
    }

    #[test]
    fn slow_gets_with_nothing_speculative_in_flight_change_nothing() {
        let budget = Budget::new(8, true);
        budget.note_get(ms(10), true);
        budget.note_get(ms(200), true);
        assert_eq!(budget.limit(), 8);
    }

    #[test]
    fn short_chunks_and_a_fixed_budget_are_not_judged() {
        let budget = Budget::new(8, true);
        budget.note_get(ms(1), false);
        budget.note_get(ms(10), true);
        let _speculating = budget.try_acquire().unwrap();
        budget.note_get(ms(19), true);
        assert_eq!(budget.limit(), 8, "the 1 ms short chunk set no pace");
        let fixed = Budget::new(8, false);
        fixed.note_get(ms(10), true);
        let _speculating = fixed.try_acquire().unwrap();
        fixed.note_get(ms(500), true);
        assert_eq!(fixed.limit(), 8);
    }

    #[test]
    fn the_fastest_get_drifts_up_toward_a_store_that_became_slower() {
        let budget = Budget::new(8, true);
        budget.note_get(ms(10), true);
        let _speculating = budget.try_acquire().unwrap();
        // Every get now takes 60 ms, speculating or not: at first judged
        // slow, then the new pace.
        for _ in 0..400 {
            budget.note_get(ms(60), true);
        }
        assert_eq!(budget.limit(), 8);
    }
}
