//! The run directory and control socket shared by every frontend.
#![forbid(unsafe_code)]
