//! Moving images between a file and a store: `push` and `export`.
#![forbid(unsafe_code)]
