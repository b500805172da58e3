//! The per-device cache: a sparse data file the size of the image and a persistent present-bitmap.
#![forbid(unsafe_code)]
