//! Subcommands other than `run`.

pub mod demo;
pub mod list;
