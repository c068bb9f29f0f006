//! Subcommands other than `run`.

pub mod demo;
pub mod inspect;
pub mod list;
