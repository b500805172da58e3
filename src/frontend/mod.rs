//! Frontends: how the engine is presented to the kernel.
