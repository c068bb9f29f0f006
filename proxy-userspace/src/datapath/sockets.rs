//! Ends connected UDP sockets still pinned to a backend that left their Service.
//!
//! A connected UDP socket is translated once, at connect(): afterwards its packets go straight
//! to the backend's address and no hook sees them again. When that backend goes away (a CoreDNS
//! pod replaced, say) the client would keep sending into the void. kube-proxy clears the
//! conntrack entries for this; here there is no conntrack entry, the socket itself holds the
//! backend, so the socket is destroyed with sock_diag's SOCK_DESTROY (kernel ≥ 4.5,
//! `CONFIG_INET_DIAG_DESTROY`): the application's next send()/recv() fails with ECONNABORTED
//! and it opens a new socket, which connect() sends to a live backend.
//!
//! Only sockets that the programs translated through the departed frontend are touched: each
//! candidate's cookie must name an entry in the socket reverse map that points at this
//! backend *and* that frontend's rev-NAT id, so a socket a workload connected to the pod IP
//! directly is left alone. sock_diag only sees its own network namespace, so every namespace
//! that a process of the balanced cgroup lives in is visited.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    fs::{self, File},
    io,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Pod,
    maps::{HashMap, MapData},
};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagDestroy, SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};
use proxy_common::maps::{self as names, AddrV4, AddrV6, SockRevKey, SockRevValue};

use crate::{
    datapath::{
        host,
        maps::{self, FamilyAddr, OpenError},
    },
    pipeline::model::BackendKey,
    pipeline::plan::{Departure, RevNatId},
};

type SockRevMap<A> = HashMap<MapData, SockRevKey<A>, SockRevValue<A>>;

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Terminated {
    pub namespaces: usize,
    pub destroyed: usize,
    /// Namespaces or sockets that could not be handled, described.
    pub failures: Vec<String>,
}

pub(crate) struct StaleSockets {
    cgroup: PathBuf,
    v4: SockRevMap<AddrV4>,
    v6: SockRevMap<AddrV6>,
}

impl StaleSockets {
    pub fn open(pin_dir: &Path, cgroup: &Path) -> Result<Self, OpenError> {
        Ok(Self {
            cgroup: cgroup.to_path_buf(),
            v4: maps::typed(pin_dir, names::SOCK_REV_V4)?,
            v6: maps::typed(pin_dir, names::SOCK_REV_V6)?,
        })
    }

    /// Destroys the connected UDP sockets that reach a departed backend through the frontend it
    /// left.
    pub(crate) fn terminate(&self, departed: &[Departure]) -> Terminated {
        let mut out = Terminated::default();
        if departed.is_empty() {
            return out;
        }
        let mut wanted: StdHashMap<(IpAddr, u16), HashSet<RevNatId>> = StdHashMap::new();
        for d in departed {
            let BackendKey { addr, port, .. } = d.backend;
            wanted.entry((addr, port)).or_default().insert(d.rev_nat_id);
        }
        let namespaces = namespaces_of(&self.cgroup);
        out.namespaces = namespaces.len();
        for (pid, netns) in namespaces {
            match self.terminate_in(&netns, &wanted) {
                Ok(n) => out.destroyed += n,
                Err(e) => out.failures.push(format!("network namespace of pid {pid}: {e}")),
            }
        }
        out
    }

    fn terminate_in(
        &self,
        netns: &File,
        wanted: &StdHashMap<(IpAddr, u16), HashSet<RevNatId>>,
    ) -> io::Result<usize> {
        // A netlink socket stays in the namespace it was created in, whichever thread uses it.
        let diag = host::in_netns(netns, || Socket::new(NETLINK_SOCK_DIAG))?;
        let mut destroyed = 0;
        for family in [AF_INET, AF_INET6] {
            for id in udp_sockets(&diag, family)? {
                let Some(rev_nat_ids) = wanted.get(&(id.destination_address, id.destination_port)) else {
                    continue;
                };
                if self.translated_through(&id, rev_nat_ids) {
                    destroy(&diag, family, id)?;
                    destroyed += 1;
                }
            }
        }
        Ok(destroyed)
    }

    fn translated_through(&self, id: &SocketId, rev_nat_ids: &HashSet<RevNatId>) -> bool {
        let cookie = u64::from_ne_bytes(id.cookie);
        match id.destination_address {
            IpAddr::V4(_) => entry_for(&self.v4, cookie, id),
            IpAddr::V6(_) => entry_for(&self.v6, cookie, id),
        }
        .is_some_and(|rev_nat_id| rev_nat_ids.contains(&rev_nat_id))
    }
}

fn entry_for<A: FamilyAddr>(map: &SockRevMap<A>, cookie: u64, id: &SocketId) -> Option<RevNatId>
where
    SockRevKey<A>: Pod,
    SockRevValue<A>: Pod,
    proxy_common::maps::ServiceKey<A>: Pod,
    proxy_common::maps::Backend<A>: Pod,
    proxy_common::maps::RevNat<A>: Pod,
{
    let addr = A::from_ip(id.destination_address)?;
    let key = SockRevKey::new(cookie, addr, id.destination_port);
    map.get(&key, 0).ok().map(|v| v.rev_nat_id)
}

/// One network namespace per distinct namespace among the processes of `cgroup` and its
/// descendants, with a pid that lives in it.
fn namespaces_of(cgroup: &Path) -> Vec<(u32, File)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        // A cgroup can vanish while it is walked; that is not an error.
        let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) else {
            continue;
        };
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            // Processes exit while they are walked, and kernel threads have no namespace to open.
            let Ok(file) = File::open(format!("/proc/{pid}/ns/net")) else {
                continue;
            };
            if let Ok(meta) = file.metadata()
                && seen.insert(meta.ino())
            {
                out.push((pid, file));
            }
        }
        if let Ok(children) = fs::read_dir(&dir) {
            dirs.extend(
                children
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    out
}

fn request(family: u8, socket_id: SocketId) -> SockDiagMessage {
    SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_UDP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id,
    })
}

fn empty_id(family: u8) -> SocketId {
    if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    }
}

fn send<T: netlink_packet_core::NetlinkSerializable + std::fmt::Debug>(
    socket: &Socket,
    flags: u16,
    payload: T,
) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(())
}

/// The ids of the connected UDP sockets of `family` in the socket's namespace.
fn udp_sockets(socket: &Socket, family: u8) -> io::Result<Vec<SocketId>> {
    send(
        socket,
        NLM_F_REQUEST | NLM_F_DUMP,
        request(family, empty_id(family)),
    )?;
    let mut out = Vec::new();
    loop {
        let (buf, _) = socket.recv_from_full()?;
        let mut offset = 0;
        while offset < buf.len() {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[offset..])
                .map_err(|e| io::Error::other(format!("sock_diag reply: {e}")))?;
            let len = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let id = r.header.socket_id;
                    // Unconnected sockets (no peer) are translated per datagram: never stale.
                    if id.destination_port != 0 && !id.destination_address.is_unspecified() {
                        out.push(id);
                    }
                }
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

fn destroy(socket: &Socket, family: u8, id: SocketId) -> io::Result<()> {
    match destroy_exact(socket, family, id) {
        // A socket that closed meanwhile is fine.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn destroy_exact(socket: &Socket, family: u8, id: SocketId) -> io::Result<()> {
    send(
        socket,
        NLM_F_REQUEST | NLM_F_ACK,
        SockDiagDestroy::new(request(family, id)),
    )?;
    let (buf, _) = socket.recv_from_full()?;
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(&buf)
        .map_err(|e| io::Error::other(format!("sock_diag reply: {e}")))?;
    match message.payload {
        // An ack is an error message with code 0.
        NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
        _ => Ok(()),
    }
}

/// Whether this kernel destroys UDP sockets through sock_diag (`CONFIG_INET_DIAG_DESTROY`,
/// and the udp_diag handler): a socket of the agent's own, connected on loopback (which sends
/// nothing), is destroyed, and must then report ECONNABORTED. Without the option the kernel
/// answers EOPNOTSUPP, without udp_diag ENOENT.
pub(crate) fn destroy_supported() -> io::Result<bool> {
    let probe = std::net::UdpSocket::bind("127.0.0.1:0")?;
    probe.connect("127.0.0.1:9")?;
    let (local, peer) = (probe.local_addr()?, probe.peer_addr()?);
    let mut id = SocketId::new_v4();
    id.source_address = local.ip();
    id.source_port = local.port();
    id.destination_address = peer.ip();
    id.destination_port = peer.port();
    // INET_DIAG_NOCOOKIE: match by address alone.
    id.cookie = [0xff; 8];
    let diag = Socket::new(NETLINK_SOCK_DIAG)?;
    match destroy_exact(&diag, AF_INET, id) {
        Ok(()) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOENT)) => return Ok(false),
        Err(e) => return Err(e),
    }
    probe.set_nonblocking(true)?;
    let aborted = probe.recv(&mut [0u8; 1]).err().and_then(|e| e.raw_os_error());
    Ok(aborted == Some(libc::ECONNABORTED))
}
