//! OCI images: where their layers come from and what a layer contains.
//!
//! [`entry`] holds the validated form of a layer's entries, which the
//! flattener applies in order.

pub mod entry;
