//! Subcommands other than `run`.

pub mod demo;
pub mod drift;
pub mod inspect;
pub mod list;
