//! Links pinned on bpffs. A pinned link outlives the agent, so a restart points the same link
//! at the newly loaded program (BPF_LINK_UPDATE swaps it atomically) instead of detaching and
//! attaching again: there is no instant at which the hook runs no program.

use std::{
    fmt::Display,
    io,
    path::{Path, PathBuf},
};

use aya::programs::{ProgramError, ProgramFd, links::FdLink};

use super::sys;

#[derive(Debug, thiserror::Error)]
pub(crate) enum PinnedLinkError<E: Display> {
    #[error("{what} {path}: {source}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{0}")]
    Program(ProgramError),
    #[error("{0}")]
    Attach(E),
}

/// Points the link pinned at `pin` to `program`; with no link pinned there, attaches through
/// `create` and pins the link it returns. `fd` is the program type's `fd` method (aya's
/// program types share no trait for it). Returns whether an existing link was updated.
pub(crate) fn attach_or_update<P, E: Display>(
    pin: &Path,
    program: &mut P,
    fd: fn(&P) -> Result<&ProgramFd, ProgramError>,
    create: impl FnOnce(&mut P) -> Result<FdLink, E>,
) -> Result<bool, PinnedLinkError<E>> {
    let pin_err = |what| {
        move |source| PinnedLinkError::Pin {
            what,
            path: pin.to_path_buf(),
            source,
        }
    };
    if pin.exists() {
        let link = sys::obj_get(pin).map_err(pin_err("opening pinned link"))?;
        let program = fd(program).map_err(PinnedLinkError::Program)?;
        sys::link_update(&link, program).map_err(pin_err("updating pinned link"))?;
        return Ok(true);
    }
    let link = create(program).map_err(PinnedLinkError::Attach)?;
    link.pin(pin)
        .map_err(|e| pin_err("pinning link")(io::Error::other(e)))?;
    Ok(false)
}
