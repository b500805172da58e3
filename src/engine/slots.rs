//! Bounded fetch concurrency with priorities: demand reads first, then
//! readahead, then prefetch.
//!
//! A fetch holds a [`Slot`] while it talks to the store. When all slots are
//! taken, a fetch waits in the queue of its priority, and a slot that frees
//! goes to the oldest waiter of the highest priority. A waiting fetch can be
//! raised (a reader now needs the chunk readahead asked for): it joins the
//! higher queue too, and the stale entry below is skipped when reached.
//!
//! Invariant: every slot is either free, held by a [`Slot`], or granted to
//! a waiter that will turn it into a [`Slot`]; a waiter dropped before it
//! noticed its grant hands the slot on (see [`Wait`]'s `Drop`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// Why a chunk is fetched, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Priority {
    /// A request is waiting for the chunk.
    Demand = 0,
    /// A sequential reader is expected to need it soon.
    Readahead = 1,
    /// A recorded trace says a start will need it.
    Prefetch = 2,
}

const LEVELS: usize = 3;

impl Priority {
    fn from_u8(level: u8) -> Priority {
        match level {
            0 => Priority::Demand,
            1 => Priority::Readahead,
            _ => Priority::Prefetch,
        }
    }
}

/// One fetch's place in line.
#[derive(Debug)]
pub struct Ticket {
    priority: AtomicU8,
    /// Set under the slots' lock when a slot is handed to this ticket (or
    /// when its waiter gave up, so it is never handed one).
    granted: AtomicBool,
    notify: Notify,
}

impl Ticket {
    pub fn new(priority: Priority) -> Arc<Ticket> {
        Arc::new(Ticket {
            priority: AtomicU8::new(priority as u8),
            granted: AtomicBool::new(false),
            notify: Notify::new(),
        })
    }

    pub fn priority(&self) -> Priority {
        Priority::from_u8(self.priority.load(Ordering::Acquire))
    }
}

#[derive(Debug)]
struct State {
    free: usize,
    waiting: [VecDeque<Arc<Ticket>>; LEVELS],
}

/// The fetch slots of one engine.
#[derive(Debug)]
pub struct Slots {
    state: Mutex<State>,
}

/// A held slot; dropping it hands the slot to the next waiter.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.release();
    }
}

/// A waiter in line; if dropped after its grant but before taking it, the
/// slot goes on to the next waiter instead of being lost.
struct Wait<'a> {
    slots: &'a Arc<Slots>,
    ticket: &'a Arc<Ticket>,
    taken: bool,
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if self.taken {
            return;
        }
        let state = self.slots.lock();
        if self.ticket.granted.swap(true, Ordering::AcqRel) {
            drop(state);
            self.slots.release();
        }
    }
}

impl Slots {
    pub fn new(count: usize) -> Arc<Slots> {
        Arc::new(Slots {
            state: Mutex::new(State {
                free: count.max(1),
                waiting: Default::default(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a slot in `ticket`'s line.
    ///
    /// # Cancel safety
    /// Dropping the future gives up the place in line; a slot granted
    /// meanwhile is passed on.
    pub async fn acquire(self: &Arc<Self>, ticket: &Arc<Ticket>) -> Slot {
        {
            let mut state = self.lock();
            if state.free > 0 {
                state.free -= 1;
                ticket.granted.store(true, Ordering::Release);
                return Slot {
                    slots: Arc::clone(self),
                };
            }
            state.waiting[ticket.priority() as usize].push_back(Arc::clone(ticket));
        }
        let mut wait = Wait {
            slots: self,
            ticket,
            taken: false,
        };
        loop {
            ticket.notify.notified().await;
            if ticket.granted.load(Ordering::Acquire) {
                wait.taken = true;
                return Slot {
                    slots: Arc::clone(self),
                };
            }
        }
    }

    /// Moves a ticket still waiting to a more urgent line. A ticket that
    /// holds its slot already keeps the priority it ran with.
    pub fn raise(&self, ticket: &Arc<Ticket>, priority: Priority) {
        let mut state = self.lock();
        if priority >= ticket.priority() || ticket.granted.load(Ordering::Acquire) {
            return;
        }
        ticket.priority.store(priority as u8, Ordering::Release);
        state.waiting[priority as usize].push_back(Arc::clone(ticket));
    }

    fn release(&self) {
        let mut state = self.lock();
        for level in 0..LEVELS {
            while let Some(next) = state.waiting[level].pop_front() {
                // A raised ticket is queued twice; a waiter that gave up is
                // marked granted. Either way, skip it.
                if next.granted.swap(true, Ordering::AcqRel) {
                    continue;
                }
                next.notify.notify_one();
                return;
            }
        }
        state.free += 1;
    }

    /// Fetches waiting in `priority`'s line right now.
    #[cfg(test)]
    pub fn waiting(&self, priority: Priority) -> usize {
        self.lock().waiting[priority as usize].len()
    }

    /// Slots free right now.
    #[cfg(test)]
    pub fn free(&self) -> usize {
        self.lock().free
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_most_urgent_waiter_and_raises_count() {
        let slots = Slots::new(1);
        let held = slots.acquire(&Ticket::new(Priority::Prefetch)).await;
        let prefetch = Ticket::new(Priority::Prefetch);
        let readahead = Ticket::new(Priority::Readahead);
        let raised = Ticket::new(Priority::Prefetch);
        let mut waits: Vec<_> = [&prefetch, &readahead, &raised]
            .into_iter()
            .map(|t| {
                let slots = Arc::clone(&slots);
                let t = Arc::clone(t);
                tokio::spawn(async move { slots.acquire(&t).await })
            })
            .collect();
        tokio::task::yield_now().await;
        while slots
            .lock()
            .waiting
            .iter()
            .map(VecDeque::len)
            .sum::<usize>()
            < 3
        {
            tokio::task::yield_now().await;
        }
        slots.raise(&raised, Priority::Demand);
        drop(held);
        // The raised prefetch goes first, then readahead, then prefetch.
        let first = waits.remove(2).await.unwrap();
        assert!(!waits[0].is_finished() && !waits[1].is_finished());
        drop(first);
        let second = waits.remove(1).await.unwrap();
        assert!(!waits[0].is_finished());
        drop(second);
        let third = waits.remove(0).await.unwrap();
        drop(third);
        assert_eq!(slots.free(), 1);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_loses_no_slot() {
        let slots = Slots::new(1);
        let held = slots.acquire(&Ticket::new(Priority::Demand)).await;
        let ticket = Ticket::new(Priority::Demand);
        let mut wait = Box::pin(slots.acquire(&ticket));
        assert!((&mut wait).now_or_never().is_none());
        // Granted while nobody polls, then dropped: the slot comes back.
        drop(held);
        drop(wait);
        assert_eq!(slots.free(), 1);
        let again = slots.acquire(&Ticket::new(Priority::Demand)).now_or_never();
        assert!(again.is_some());
    }
}
