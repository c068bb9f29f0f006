//! The only code that touches BPF: loading, attaching, writing and reading maps.

pub mod conntrack;
pub mod external;
pub(crate) mod features;
pub mod host;
pub mod layout;
pub(crate) mod links;
pub mod loader;
pub(crate) mod maglev;
pub mod maps;
pub mod reader;
pub mod readings;
pub(crate) mod report;
pub(crate) mod sink;
pub mod sizing;
pub(crate) mod sockets;
#[cfg(test)]
mod stack_limit;
pub mod sys;
pub(crate) mod walker;
pub mod writer;
