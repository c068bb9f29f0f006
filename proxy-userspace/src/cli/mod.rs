//! Subcommands other than `run`.

pub mod drift;
pub mod inspect;
pub mod list;
