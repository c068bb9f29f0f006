//! Metrics and the HTTP servers that expose them.

pub mod metrics;
pub mod serve;
