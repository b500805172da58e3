//! Frontends: how the engine is presented to the kernel.
//!
//! A frontend turns kernel requests into [`crate::engine::Engine`] calls and
//! completes each with data or an errno from [`crate::error::ErrorKind::errno`],
//! the one errno mapping. It holds no state of its own about the image.
//!
//! # Unsafe
//!
//! The crate denies `unsafe`. One module allows it: `ublk/control.rs`,
//! which submits the control commands libublk cannot send (a kernel buffer
//! named in an io_uring SQE). Each `unsafe` block carries a `// SAFETY:`
//! comment naming who keeps the memory alive until the kernel is done with
//! it (clippy's `undocumented_unsafe_blocks` refuses a block without one).

pub mod fuse;
pub mod ublk;
