//! The block engine: serves reads and writes at byte offsets of one image.
#![forbid(unsafe_code)]
