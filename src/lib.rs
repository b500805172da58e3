//! lazyblk: container images as chunked, convergently encrypted disk images,
//! served lazily as block devices.
//!
//! The modules follow the data path:
//!
//! ```text
//! image file ──chunk──▶ sealed chunks + manifest ──store──▶ chunk store
//!                                                            │
//!   reader ◀── frontend (FUSE, ublk) ◀── engine ◀── cache ◀──┘ (fetch on miss)
//! ```
//!
//! * [`oci`]: OCI image sources and the entries of their layers.
//! * [`flatten`]: layers applied in order and written as one ext4 image.
//! * [`ext4`]: the deterministic ext4 geometry and on-disk encodings.
//! * [`chunk`]: cutting an image into chunks, convergent encryption, chunk
//!   names and the sealed manifest. Pure: no I/O.
//! * [`store`]: the [`store::ChunkStore`] trait and its engines.
//! * [`net`]: the HTTP client the network stores share.
//! * [`server`]: the chunk server that serves a store over HTTP.
//! * [`fault_proxy`]: a loopback proxy injecting network faults, for tests.
//! * [`retry`]: the back-off schedule for transient failures.
//! * [`metrics`]: Prometheus text exposition of counters and histograms.
//! * [`transfer`]: `push` (image → store) and `export` (store → image).
//! * [`maint`]: store upkeep: garbage collection and verification.
//! * [`cache`]: the per-device sparse data file and persistent present-bitmap.
//! * [`engine`]: the block engine serving reads and writes at byte offsets.
//! * [`frontend`]: how the engine is presented to the kernel (FUSE today).
//! * [`daemon`]: the run directory and control socket shared by all frontends.
//! * [`private`]: files and directories only their owner may use (keys,
//!   device caches and their logs).
//! * [`durable`]: replacing a file atomically and durably, for every layer
//!   that keeps files.
//!
//! `unsafe` is denied crate-wide and allowed in one module only, the ublk
//! frontend's control commands that libublk cannot send (see [`frontend`]);
//! each block there names who keeps its memory alive.
#![deny(unsafe_code)]

pub mod cache;
pub mod chunk;
pub mod cli;
pub mod daemon;
pub mod durable;
pub mod engine;
pub mod error;
pub mod ext4;
pub mod fault_proxy;
pub mod flatten;
pub mod frontend;
pub mod maint;
pub mod metrics;
pub mod net;
pub mod oci;
pub mod private;
pub mod report;
pub mod retry;
pub mod server;
pub mod socket;
pub mod store;
pub mod transfer;
