//! Frontends: how the engine is presented to the kernel.
//!
//! A frontend turns kernel requests into [`crate::engine::Engine`] calls and
//! completes each with data or an errno from [`crate::error::ErrorKind::errno`],
//! the one errno mapping. It holds no state of its own about the image.

pub mod fuse;
pub mod ublk;
