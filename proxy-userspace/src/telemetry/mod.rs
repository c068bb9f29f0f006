//! Metrics, the HTTP server that exposes them, and log output.

pub mod logging;
pub mod metrics;
pub(crate) mod serve;
