//! The compute of oxray's demo applications, with no runtime in it.
//!
//! - [`env`]: classic-control environments with Gymnasium's published dynamics.
pub mod env;
