//! Wakes the agent when the node's devices, addresses or routes change: rtnetlink link,
//! address and route notifications, so that a device deleted and recreated (flannel recreates
//! `flannel.1` when it restarts), or a new one `--devices auto` would pick, gets the tc
//! programs, and the devices remote backends' replies arrive on are looked up again.
//!
//! The notifications are not parsed: the agent compares the devices it attached to with those
//! selected now, so a burst of them (or a lost one, when the socket overflowed) costs one
//! comparison.

use std::{io, time::Duration};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tokio::sync::mpsc;

/// How long after the first notification of a burst the agent looks: a device being recreated
/// is deleted, added, set up and given its addresses within a few milliseconds.
const SETTLE: Duration = Duration::from_millis(200);

/// Notifications that a change may be due; `None` for `--devices none`, which follows nothing.
pub(crate) struct LinkEvents(Option<mpsc::Receiver<()>>);

impl LinkEvents {
    pub(crate) fn none() -> Self {
        Self(None)
    }

    /// Subscribes to this network namespace's link and address notifications. A thread of its
    /// own reads them (blocking, never on the run loop) and signals once per settled burst.
    pub(crate) fn subscribe() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind(&SocketAddr::new(0, 0))?;
        for group in [
            libc::RTNLGRP_LINK,
            libc::RTNLGRP_IPV4_IFADDR,
            libc::RTNLGRP_IPV6_IFADDR,
            libc::RTNLGRP_IPV4_ROUTE,
            libc::RTNLGRP_IPV6_ROUTE,
        ] {
            socket.add_membership(group)?;
        }
        let (tx, rx) = mpsc::channel(1);
        std::thread::Builder::new()
            .name("link-events".into())
            .spawn(move || {
                if let Err(e) = forward(&socket, &tx) {
                    tracing::error!(
                        "reading link notifications stopped; device changes are no longer followed: {e}"
                    );
                }
            })?;
        Ok(Self(Some(rx)))
    }

    /// Resolves once a burst of notifications has settled; never for `none`.
    pub(crate) async fn changed(&mut self) {
        let signalled = match &mut self.0 {
            Some(rx) => rx.recv().await.is_some(),
            None => false,
        };
        if !signalled {
            std::future::pending::<()>().await;
        }
    }
}

fn forward(socket: &Socket, tx: &mpsc::Sender<()>) -> io::Result<()> {
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        receive(socket, &mut buf, 0)?;
        std::thread::sleep(SETTLE);
        // What arrived meanwhile belongs to this burst.
        loop {
            match receive(socket, &mut buf, libc::MSG_DONTWAIT) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        // Full: a signal is already waiting, which covers this burst too. Closed: the agent
        // is stopping.
        if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
            return Ok(());
        }
    }
}

/// Reads one datagram. ENOBUFS (the socket overflowed and notifications were lost) counts as a
/// notification: the comparison that follows finds whatever they said.
fn receive(socket: &Socket, buf: &mut Vec<u8>, flags: libc::c_int) -> io::Result<()> {
    buf.clear();
    match socket.recv(buf, flags) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(()),
        Err(e) => Err(e),
    }
}
