//! OCI images: where their layers come from and what a layer contains.
//!
//! ```text
//! source (oci: dir, docker-archive:, docker://) ──open_layer──▶ verified,
//!   decompressed tar ──read_layer──▶ LayerEntry values ──▶ flattener
//! ```
//!
//! * [`source`]: [`open_source`] and the [`ImageSource`] trait; each source
//!   resolves an image to its manifest and layer descriptors and opens a
//!   layer as a tar stream whose compressed bytes are checked against their
//!   digest while they stream ([`verify`]) and decompressed ([`compress`]).
//! * [`layer`]: [`read_layer`] walks a tar stream within the image's
//!   [`LayerLimits`] and turns each member into a [`LayerEntry`]
//!   ([`header`] does the per-member validation).
//! * [`pump`]: runs a layer's decompression on a thread beside its consumer.
//! * [`entry`]: the validated form of a layer's entries, which the
//!   flattener applies in order. Which entry wins and what a whiteout
//!   removes is the flattener's business, not this module's.

pub mod archive;
pub mod compress;
pub mod entry;
pub mod header;
pub mod layer;
pub mod layer_error;
pub mod layout;
pub mod pump;
pub mod registry;
pub mod resolve;
pub mod source;
pub mod sparse;
pub mod spec;
pub mod verify;

#[cfg(test)]
mod layer_pax_tests;
#[cfg(test)]
mod layer_tests;

pub use entry::{EntryKind, EntryMeta, EntryPath, LayerEntry, Timestamp};
pub use layer::{read_layer, ApplyError, LayerError, LayerLimits, LayerStats, Limit};
pub use source::{
    open_source, Credentials, ImageSource, LayerDescriptor, SourceError, SourceOptions,
};
pub use verify::{BlobError, Digest};
