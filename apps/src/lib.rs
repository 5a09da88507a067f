//! The compute of oxray's demo applications, with no runtime in it.
//!
//! - [`env`]: classic-control environments with Gymnasium's published dynamics.
//! - [`policy`]: a linear or one-hidden-layer policy over a flat parameter vector.
//! - [`es`]: evolution strategies, worker side and driver side, plus a sequential runner.
//! - [`report`]: the learning curve as CSV and as a PNG plot.
//! - [`ps`]: a parameter server for linear and logistic regression on generated, sharded data.
pub mod env;
pub mod es;
pub mod policy;
pub mod ps;
pub mod report;
