//! Frontends: how the engine is presented to the kernel.
//!
//! A frontend turns kernel requests into [`crate::engine::Engine`] calls and
//! completes each with data or an errno from [`crate::error::ErrorKind::errno`],
//! the one errno mapping. It holds no state of its own about the image.
//!
//! # Unsafe
//!
//! The crate forbids `unsafe` today. If the ublk frontend ever needs it (to
//! hand the kernel buffers it must not touch until a completion), the crate
//! attribute becomes `#![deny(unsafe_code)]`, with `#[allow(unsafe_code)]`
//! on that one module alone, and each `unsafe` block carries a `// SAFETY:`
//! comment naming who keeps the memory alive until the kernel is done with
//! it (clippy's `undocumented_unsafe_blocks` refuses a block without one).

pub mod fuse;
pub mod ublk;
