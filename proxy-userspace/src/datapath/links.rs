//! Links pinned on bpffs. A pinned link outlives the agent, so a restart points the same link
//! at the newly loaded program (BPF_LINK_UPDATE swaps it atomically) instead of detaching and
//! attaching again: there is no instant at which the hook runs no program.
//!
//! A link outlives its hook too: a device deleted while the link is pinned leaves it severed
//! (attached to nothing), and updating it fails with ENOLINK. Such a link is unpinned and the
//! program attached afresh, to the device of that name if there is one now.

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

/// How a program came to be attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// An existing attachment now runs the new program (a restart).
    Updated,
    /// Nothing was attached.
    Created,
    /// The recorded attachment had lost its hook (its device was deleted, maybe recreated):
    /// attached afresh.
    Reattached,
}

/// Points the link pinned at `pin` to `program`; with no link pinned there, or a severed one,
/// attaches through `create` and pins the link it returns. `fd` is the program type's `fd`
/// method (aya's program types share no trait for it).
pub(crate) fn attach_or_update<P, E: Display>(
    pin: &Path,
    program: &mut P,
    fd: fn(&P) -> Result<&ProgramFd, ProgramError>,
    create: impl FnOnce(&mut P) -> Result<FdLink, E>,
) -> Result<Attached, PinnedLinkError<E>> {
    let pin_err = |what| {
        move |source| PinnedLinkError::Pin {
            what,
            path: pin.to_path_buf(),
            source,
        }
    };
    let mut attached = Attached::Created;
    if pin.exists() {
        let link = sys::obj_get(pin).map_err(pin_err("opening pinned link"))?;
        let prog = fd(program).map_err(PinnedLinkError::Program)?;
        match sys::link_update(&link, prog) {
            Ok(()) => return Ok(Attached::Updated),
            Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {
                tracing::info!(pin = %pin.display(), "pinned link severed (its hook is gone): attaching afresh");
                sys::unpin_link(pin).map_err(pin_err("unpinning severed link"))?;
                attached = Attached::Reattached;
            }
            Err(e) => return Err(pin_err("updating pinned link")(e)),
        }
    }
    let link = create(program).map_err(PinnedLinkError::Attach)?;
    link.pin(pin)
        .map_err(|e| pin_err("pinning link")(io::Error::other(e)))?;
    Ok(attached)
}
