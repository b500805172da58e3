//! Making a chunk present: one flight per chunk, bounded and prioritised.
//!
//! `inflight` maps a chunk index to a shared future ([`Fill`]) that
//! completes when whoever is filling that chunk is done. Two kinds of fill
//! take an entry:
//! * a fetch ([`Fetcher::fetch`]): a task on the runtime that waits for a
//!   [`Slot`] in its priority's line, gets the envelope (deadline, retries:
//!   `retrieve.rs`), then on one blocking thread verifies and decrypts it,
//!   writes the plaintext into the cache and marks it present. Its waiters
//!   get that plaintext: nobody reads it back from the cache;
//! * a fill lock ([`Fetcher::try_lock_fill`]) taken by a request that
//!   replaces a whole chunk (a write, a discard) so no fetch of the same
//!   chunk can land on top of it.
//!
//! Whoever inserts an entry removes it, and only after marking the chunk
//! present (on success). So a request that finds no entry and no present bit
//! may start a fill itself; it re-checks the bit under the map's shard lock
//! to close the race with a fill that has just finished.
//!
//! A fetch started for readahead or prefetch hands its waiters no error: a
//! speculative fetch that failed leaves the chunk to the readers, who fetch
//! it themselves ([`Filled::LookAgain`]). Once a reader needs a chunk still
//! waiting in a lower line, the fetch is raised to demand and its outcome,
//! error included, is theirs.

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Instant;

use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use super::access::Access;
use super::budget::Budget;
use super::files::Files;
use super::layout::{Content, Layout};
use super::readahead::Readahead;
use super::retrieve::{get_envelope, open_envelope, FetchPolicy};
use super::slots::{Priority, Slot, Slots, Ticket};
use super::stats::{add, Counters};
use super::{EngineError, EngineOptions};
use crate::cache::CacheDir;
use crate::chunk::{ChunkId, ChunkKey};
use crate::error::{chain, ErrorKind};
use crate::store::ChunkStore;

/// How a fill ended for those who waited on it.
#[derive(Debug, Clone)]
pub(super) enum Filled {
    /// The chunk's plaintext, now also in the cache and marked present.
    Plaintext(Bytes),
    /// Go and look again: the chunk may be present now (a write filled it)
    /// or still missing (a speculative fetch failed).
    LookAgain,
}

/// Completes when a fill of one chunk ends.
pub(super) type Fill = Shared<BoxFuture<'static, Result<Filled, EngineError>>>;

/// Where a fetch sends its outcome: once, by whoever has it first (the
/// blocking thread with the plaintext, else the task).
type Reply = Arc<Mutex<Option<oneshot::Sender<Result<Filled, EngineError>>>>>;

fn send(reply: &Reply, outcome: Result<Filled, EngineError>) {
    let sender = reply.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(sender) = sender {
        // No waiter left is fine: the chunk is in the cache either way.
        let _ = sender.send(outcome);
    }
}

struct Flight {
    fill: Fill,
    /// The fetch's place in line; none for a fill lock.
    ticket: Option<Arc<Ticket>>,
}

/// The fetches of one engine.
pub(super) struct Fetcher {
    store: Arc<dyn ChunkStore>,
    cache: Arc<CacheDir>,
    layout: Arc<Layout>,
    runtime: Handle,
    policy: FetchPolicy,
    slots: Arc<Slots>,
    inflight: DashMap<u64, Flight>,
    counters: Arc<Counters>,
    access: Arc<Access>,
    /// Speculative fetches allowed at once, told how long each get took.
    budget: Arc<Budget>,
    /// Told of every chunk filled, to learn where files lie.
    files: Arc<Files>,
    /// Woken when a fill taught `files` of metadata worth fetching.
    readahead: OnceLock<Weak<Readahead>>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("store", &self.store.describe())
            .field("policy", &self.policy)
            .field("inflight", &self.inflight.len())
            .finish()
    }
}

/// Held by a request that fills a chunk itself; while it lives, no fetch or
/// other fill of that chunk starts.
pub(super) struct FillGuard<'a> {
    fetcher: &'a Fetcher,
    index: u64,
    // Dropped after `drop` has removed the map entry: waiters wake to find
    // the entry gone and the bit set.
    _done: oneshot::Sender<()>,
}

impl Drop for FillGuard<'_> {
    fn drop(&mut self) {
        self.fetcher.inflight.remove(&self.index);
    }
}

/// Removes a fetch's map entry when its task ends, even by panic.
struct FlightDone {
    fetcher: Arc<Fetcher>,
    index: u64,
}

impl Drop for FlightDone {
    fn drop(&mut self) {
        self.fetcher.inflight.remove(&self.index);
    }
}

impl Fetcher {
    pub fn new(
        store: Arc<dyn ChunkStore>,
        cache: Arc<CacheDir>,
        layout: Arc<Layout>,
        runtime: Handle,
        opts: &EngineOptions,
        counters: Arc<Counters>,
        access: Arc<Access>,
    ) -> Fetcher {
        Fetcher {
            store,
            cache,
            files: Arc::new(Files::new(Arc::clone(&layout))),
            readahead: OnceLock::new(),
            layout,
            runtime,
            policy: opts.fetch,
            slots: Slots::new(opts.max_fetches),
            inflight: DashMap::new(),
            counters,
            access,
            budget: Budget::new(u64::from(opts.readahead_chunks), opts.adaptive_readahead),
        }
    }

    /// Where the image's files lie, learnt from the chunks this fetcher
    /// filled.
    pub fn files(&self) -> &Arc<Files> {
        &self.files
    }

    /// Names the readahead that fetches the metadata fills teach of, so it
    /// starts as soon as it is known rather than at the next read.
    pub fn set_readahead(&self, readahead: &Arc<Readahead>) {
        // Set once, when the engine is made.
        let _ = self.readahead.set(Arc::downgrade(readahead));
    }

    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    pub fn runtime(&self) -> &Handle {
        &self.runtime
    }

    /// What to wait for before chunk `index` can be read: `None` if it is
    /// present or all-zero (or past the end), else the fill in flight,
    /// started now if there was none. A fill already waiting for a slot is
    /// raised to `priority` if that is more urgent.
    pub fn fetch(self: &Arc<Self>, index: u64, priority: Priority) -> Option<Fill> {
        self.fetch_or_join(index, priority, true)
    }

    /// Starts a fetch of chunk `index` at `priority` and returns its fill,
    /// or `None` if the chunk is present, zero, past the end or already
    /// being filled: a speculative fetch joins no one.
    pub fn start_fetch(self: &Arc<Self>, index: u64, priority: Priority) -> Option<Fill> {
        self.fetch_or_join(index, priority, false)
    }

    fn fetch_or_join(self: &Arc<Self>, index: u64, priority: Priority, join: bool) -> Option<Fill> {
        if self.cache.is_present(index) {
            return None;
        }
        match self.inflight.entry(index) {
            Entry::Occupied(flight) if join => {
                if let Some(ticket) = &flight.get().ticket {
                    self.slots.raise(ticket, priority);
                }
                Some(flight.get().fill.clone())
            }
            Entry::Occupied(_) => None,
            Entry::Vacant(slot) => {
                if self.cache.is_present(index) {
                    return None;
                }
                let Some(Content::Sealed { id, key }) = self.layout.content(index) else {
                    return None;
                };
                if priority == Priority::Demand {
                    add(&self.counters.demand_fetches, 1);
                }
                let ticket = Ticket::new(priority);
                let fill = self.start(index, *id, key.clone(), Arc::clone(&ticket));
                slot.insert(Flight {
                    fill: fill.clone(),
                    ticket: Some(ticket),
                });
                Some(fill)
            }
        }
    }

    /// Fetches waiting for a store slot in `priority`'s line.
    #[cfg(test)]
    pub fn waiting(&self, priority: Priority) -> usize {
        self.slots.waiting(priority)
    }

    /// Whether a fill of chunk `index` is running.
    pub fn is_busy(&self, index: u64) -> bool {
        self.inflight.contains_key(&index)
    }

    /// Takes the fill lock of chunk `index`, or hands back the fill to wait
    /// for when someone else holds it.
    pub fn try_lock_fill(&self, index: u64) -> Result<FillGuard<'_>, Fill> {
        match self.inflight.entry(index) {
            Entry::Occupied(flight) => Err(flight.get().fill.clone()),
            Entry::Vacant(slot) => {
                let (done, waiters) = oneshot::channel::<()>();
                // The sender is only ever dropped, never used: that is the signal.
                slot.insert(Flight {
                    fill: waiters.map(|_| Ok(Filled::LookAgain)).boxed().shared(),
                    ticket: None,
                });
                Ok(FillGuard {
                    fetcher: self,
                    index,
                    _done: done,
                })
            }
        }
    }

    /// Spawns the fetch of chunk `index`. Called with the map's shard lock
    /// held; the task's removal of its entry waits for that lock, so it
    /// cannot run before the entry is inserted.
    fn start(
        self: &Arc<Self>,
        index: u64,
        id: ChunkId,
        key: ChunkKey,
        ticket: Arc<Ticket>,
    ) -> Fill {
        let (tx, rx) = oneshot::channel();
        let reply: Reply = Arc::new(Mutex::new(Some(tx)));
        let fetcher = Arc::clone(self);
        let files = Arc::clone(&self.files);
        let readahead = self.readahead.get().cloned();
        let origin = ticket.priority();
        self.runtime.spawn(async move {
            let fetched = {
                let done = FlightDone { fetcher, index };
                done.fetcher
                    .run(index, id, key, origin, &ticket, &reply)
                    .await
            };
            // The entry is gone now: a waiter told to look again, or failed,
            // finds no stale flight to join.
            let outcome = match fetched {
                Err(_) if ticket.priority() != Priority::Demand => Ok(Filled::LookAgain),
                fetched => fetched,
            };
            send(&reply, outcome);
            if files.has_wanted() {
                if let Some(readahead) = readahead.as_ref().and_then(Weak::upgrade) {
                    readahead.fetch_metadata();
                }
            }
        });
        rx.map(move |sent| {
            sent.unwrap_or_else(|_| {
                Err(EngineError::TaskFailed {
                    task: format!("fetch of chunk {index}"),
                    reason: "the runtime dropped it".into(),
                })
            })
        })
        .boxed()
        .shared()
    }

    async fn run(
        &self,
        index: u64,
        id: ChunkId,
        key: ChunkKey,
        origin: Priority,
        ticket: &Arc<Ticket>,
        reply: &Reply,
    ) -> Result<Filled, EngineError> {
        let slot: Slot = self.slots.acquire(ticket).await;
        let started = Instant::now();
        let fetched = get_envelope(
            &*self.store,
            &self.policy,
            index,
            &id,
            &self.counters.fetch_retries,
        )
        .await;
        // The slot bounds requests to the store; decrypting needs none.
        drop(slot);
        if fetched.is_ok() {
            let whole = self.layout.chunk_len(index) as u64 == self.layout.chunk_size();
            self.budget.note_get(started.elapsed(), whole);
        }
        let envelope = match fetched {
            Ok(envelope) => envelope,
            Err(error) => {
                if matches!(error, EngineError::FetchTimeout { .. }) {
                    add(&self.counters.fetch_timeouts, 1);
                } else {
                    add(&self.counters.fetch_errors, 1);
                }
                self.log_failure(index, &id, ticket, &error);
                return Err(error);
            }
        };
        add(&self.counters.bytes_fetched, envelope.len() as u64);
        let cache = Arc::clone(&self.cache);
        let (expected, offset) = (self.layout.chunk_len(index), self.layout.chunk_start(index));
        let waiters = Arc::clone(reply);
        let counters = Arc::clone(&self.counters);
        let access = Arc::clone(&self.access);
        let files = Arc::clone(&self.files);
        let got_after = started.elapsed();
        let place = Arc::clone(ticket);
        // SHA-256 and AES-GCM of a whole chunk take a few hundred
        // microseconds, and the cache write may block: a blocking thread,
        // never an async worker. It also hands the plaintext to the
        // waiters, so they wake straight from there.
        let filled = tokio::task::spawn_blocking(move || {
            let plaintext = open_envelope(index, &id, &key, envelope, expected)?;
            cache
                .write_at(&plaintext, offset)
                .map_err(|source| EngineError::FillCache {
                    index,
                    source: Arc::new(source),
                })?;
            cache.mark_present(index);
            access.note_filled(index, origin, &counters);
            // Counted before the waiters wake, so what they see includes it.
            add(&counters.chunks_fetched, 1);
            counters.record_fetch_latency(started.elapsed());
            tracing::debug!(
                chunk = index,
                ?origin,
                priority = ?place.priority(),
                get_ms = got_after.as_secs_f64() * 1e3,
                filled_ms = started.elapsed().as_secs_f64() * 1e3,
                "chunk filled"
            );
            // Before the waiters wake: what the chunk teaches (where files
            // lie, which metadata to fetch next) is then there for the
            // readahead their reads start. Reading an inode table takes
            // microseconds; a round trip, milliseconds.
            files.note_filled(index, &plaintext, &cache);
            send(&waiters, Ok(Filled::Plaintext(plaintext.clone())));
            Ok(plaintext)
        })
        .await
        .unwrap_or_else(|e| {
            Err(EngineError::TaskFailed {
                task: format!("verification of chunk {index}"),
                reason: e.to_string(),
            })
        });
        match filled {
            Ok(plaintext) => Ok(Filled::Plaintext(plaintext)),
            Err(error) => {
                if error.kind() == ErrorKind::Integrity {
                    add(&self.counters.integrity_failures, 1);
                }
                self.log_failure(index, &id, ticket, &error);
                Err(error)
            }
        }
    }

    fn log_failure(&self, index: u64, id: &ChunkId, ticket: &Ticket, error: &EngineError) {
        let priority = ticket.priority();
        let integrity = error.kind() == ErrorKind::Integrity;
        let error = chain(error);
        if priority == Priority::Demand {
            tracing::warn!(chunk = index, id = %id, error, "chunk fetch failed");
        } else if integrity {
            // A bad chunk in the store is worth an error whoever fetched it.
            tracing::error!(chunk = index, id = %id, ?priority, error, "fetched chunk failed verification");
        } else {
            tracing::debug!(chunk = index, id = %id, ?priority, error, "speculative fetch failed");
        }
    }
}
