//! The only code that touches BPF: loading, attaching, writing and reading maps.

pub mod conntrack;
pub mod external;
pub mod features;
pub mod host;
pub mod links;
pub mod loader;
pub mod maps;
pub mod reader;
pub mod readings;
pub mod report;
pub(crate) mod sink;
pub mod sockets;
#[cfg(test)]
mod stack_limit;
pub mod sys;
pub mod writer;
