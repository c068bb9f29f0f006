//! cgroup sock_addr hooks: socket-level load balancing. A connect()/sendmsg() to a frontend is
//! rewritten to a backend before the kernel routes anything, so no packet ever carries the
//! frontend address; recvmsg()/getpeername() rewrite the backend back to the frontend so the
//! application only ever sees the address it asked for.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use proxy_common::{
    counters::Counter,
    maps::{
        AddrV4, AddrV6, ServiceKey, SockFrontend, SockRevKey, SockRevValue, affinity_client, halves, scope,
    },
    proto,
};

use crate::{
    counters::bump,
    family::{Family, V4, V6},
    lb::{self, Client, Draw, Reason, Selected, copy_of},
};

const ALLOW: i32 = 1;
const REJECT: i32 = 0;

const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

/// Reads and writes the family's address in the program's `bpf_sock_addr`. The context is
/// accessed with volatile word-sized loads and stores because the verifier only accepts the
/// exact access sizes it rewrites (the compiler must not merge, split or drop them).
pub trait SockFamily: Family {
    fn user_addr(ctx: &SockAddrContext) -> Self::Addr;
    fn set_user_addr(ctx: &SockAddrContext, addr: Self::Addr);
}

impl SockFamily for V4 {
    #[inline(always)]
    fn user_addr(ctx: &SockAddrContext) -> AddrV4 {
        // SAFETY: `sock_addr` is the context the kernel passed to this run of the program;
        // user_ip4 is a readable u32 field.
        unsafe { read_volatile(&raw const (*ctx.sock_addr).user_ip4) }.to_ne_bytes()
    }

    #[inline(always)]
    fn set_user_addr(ctx: &SockAddrContext, addr: AddrV4) {
        // SAFETY: as for `user_addr`; user_ip4 is writable in these hooks.
        unsafe { write_volatile(&raw mut (*ctx.sock_addr).user_ip4, u32::from_ne_bytes(addr)) }
    }
}

impl SockFamily for V6 {
    #[inline(always)]
    fn user_addr(ctx: &SockAddrContext) -> AddrV6 {
        let sa = ctx.sock_addr;
        // SAFETY: `sa` is the context the kernel passed to this run of the program; user_ip6
        // words are readable u32 fields.
        let word = |i: usize| unsafe { read_volatile(&raw const (*sa).user_ip6[i]) };
        let words = [word(0), word(1), word(2), word(3)];
        // SAFETY: [u32; 4] and [u8; 16] have the same size and every bit pattern is valid.
        unsafe { core::mem::transmute::<[u32; 4], AddrV6>(words) }
    }

    #[inline(always)]
    fn set_user_addr(ctx: &SockAddrContext, addr: AddrV6) {
        // SAFETY: [u8; 16] and [u32; 4] have the same size and every bit pattern is valid.
        let words = unsafe { core::mem::transmute::<AddrV6, [u32; 4]>(addr) };
        for (i, word) in words.into_iter().enumerate() {
            // SAFETY: as for `user_addr`; user_ip6 words are writable u32 fields.
            unsafe { write_volatile(&raw mut (*ctx.sock_addr).user_ip6[i], word) };
        }
    }
}

#[inline(always)]
fn user_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: `sock_addr` is the context the kernel passed to this run of the program;
    // user_port holds the port in network order in its low 16 bits.
    u16::from_be(unsafe { read_volatile(&raw const (*ctx.sock_addr).user_port) } as u16)
}

#[inline(always)]
fn set_user_port(ctx: &SockAddrContext, port: u16) {
    // SAFETY: as for `user_port`; user_port is writable in these hooks.
    unsafe { write_volatile(&raw mut (*ctx.sock_addr).user_port, u32::from(port.to_be())) }
}

#[inline(always)]
fn protocol(ctx: &SockAddrContext) -> u8 {
    // SAFETY: as for `user_port`; protocol is a readable u32 field.
    unsafe { read_volatile(&raw const (*ctx.sock_addr).protocol) as u8 }
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper only reads the socket behind the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

#[inline(always)]
fn netns_client(ctx: &SockAddrContext) -> Client {
    // SAFETY: the helper only reads the network namespace of the program's own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let [lo, hi] = halves(cookie);
    Client {
        id: [lo, hi, 0, 0],
        kind: affinity_client::NETNS,
    }
}

#[inline(always)]
fn reject(errno: i32) -> i32 {
    // SAFETY: bpf_set_retval only sets the syscall's return value; connect and sendmsg hooks
    // may call it. The negative errno is what connect()/sendmsg() then return.
    unsafe { bpf_set_retval(-errno) };
    REJECT
}

/// Why a socket was refused or left alone.
enum Refusal {
    Lb(Reason),
    /// A ClusterIP asked for a port or protocol its Service does not serve.
    UnknownPort,
}

impl From<Reason> for Refusal {
    fn from(reason: Reason) -> Self {
        Self::Lb(reason)
    }
}

/// connect4/6 and sendmsg4/6: frontend → backend.
#[inline(always)]
pub fn connect<F: SockFamily>(ctx: &SockAddrContext) -> i32 {
    match try_connect::<F>(ctx) {
        Ok(()) => ALLOW,
        Err(Refusal::UnknownPort) => {
            bump(Counter::SockRejectUnknownPort);
            reject(ECONNREFUSED)
        }
        Err(Refusal::Lb(Reason::NoBackend)) => {
            bump(Counter::SockRejectNoBackend);
            reject(ECONNREFUSED)
        }
        Err(Refusal::Lb(Reason::BackendMissing)) => {
            bump(Counter::SockBackendMissing);
            reject(EHOSTUNREACH)
        }
    }
}

#[inline(always)]
fn try_connect<F: SockFamily>(ctx: &SockAddrContext) -> Result<(), Refusal> {
    let frontend_addr = F::user_addr(ctx);
    let frontend_port = user_port(ctx);
    let udp = protocol(ctx) == proto::UDP;
    let key = ServiceKey::frontend(frontend_addr, frontend_port, protocol(ctx), scope::ALL);
    // A TCP socket connects once, so a random draw spreads connections; an unconnected UDP
    // socket comes here with every datagram, and its cookie keeps them on one backend.
    let draw = if udp {
        Draw::Socket(cookie(ctx))
    } else {
        Draw::Random
    };
    let Some(selected) = lb::select::<F>(&key, || netns_client(ctx), draw)? else {
        if !udp {
            forget_frontend::<F>(ctx);
        }
        let guard = ServiceKey::frontend(frontend_addr, 0, proto::ANY, scope::ALL);
        if F::services().get_ptr(guard).is_some() {
            return Err(Refusal::UnknownPort);
        }
        return Ok(());
    };
    F::set_user_addr(ctx, selected.backend.addr);
    set_user_port(ctx, selected.backend.port);
    bump(Counter::SockForward);
    if udp {
        remember_datagram_frontend::<F>(ctx, &selected, frontend_addr, frontend_port);
    } else {
        remember_socket_frontend::<F>(ctx, &selected, frontend_addr, frontend_port);
    }
    Ok(())
}

/// The socket behind the program's context, for the socket-local storage helpers.
#[inline(always)]
fn sk(ctx: &SockAddrContext) -> *mut aya_ebpf::bindings::bpf_sock {
    // SAFETY: `sock_addr` is the context the kernel passed to this run of the program; `sk` is
    // a readable pointer field, never null in sock_addr programs.
    unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }
}

/// A connected TCP (or SCTP) socket: the frontend goes into the socket's own storage. That is
/// one allocation freed with the socket, where the LRU took its lock, and at scale let the
/// entries of live sockets be evicted by closed ones. The agent never needs these back: only
/// UDP sockets are destroyed when their backend leaves, and TCP sockets get an RST instead.
#[inline(always)]
fn remember_socket_frontend<F: SockFamily>(
    ctx: &SockAddrContext,
    selected: &Selected<F::Addr>,
    frontend_addr: F::Addr,
    frontend_port: u16,
) {
    // SAFETY: the helper only reads and allocates storage of the program's own socket.
    let ptr = unsafe { F::sock_frontend().get_or_insert_ptr_mut(ctx, None) };
    if ptr.is_null() {
        bump(Counter::SockRevUpdateFailed);
        return;
    }
    let value = SockFrontend {
        addr: frontend_addr,
        port: frontend_port,
        _pad: 0,
        rev_nat_id: selected.rev_nat_id,
        backend_addr: selected.backend.addr,
        backend_port: selected.backend.port,
        _pad2: 0,
    };
    // SAFETY: a non-null pointer from bpf_sk_storage_get is this socket's value, valid for the
    // whole run; the socket is locked during connect, so no other run writes it.
    unsafe { ptr.write(value) };
}

/// A socket that connects, after a failed connect to a frontend, to an address that is not
/// one must not keep the old frontend. Nearly free on a socket without storage: the helper
/// finds the socket's storage pointer null and returns.
#[inline(always)]
fn forget_frontend<F: SockFamily>(ctx: &SockAddrContext) {
    // SAFETY: `sk` is the program's own socket.
    let _ = unsafe { F::sock_frontend().delete(sk(ctx)) };
}

/// A UDP socket: records in the LRU which frontend it meant, for recvmsg and getpeername. An
/// unconnected socket talks to several frontends, so the entry is per (socket, backend); and
/// the agent finds a connected socket's entry by the cookie sock_diag reports, to destroy the
/// socket when its backend leaves.
#[inline(always)]
fn remember_datagram_frontend<F: SockFamily>(
    ctx: &SockAddrContext,
    selected: &Selected<F::Addr>,
    frontend_addr: F::Addr,
    frontend_port: u16,
) {
    let key = SockRevKey::new(cookie(ctx), selected.backend.addr, selected.backend.port);
    let value = SockRevValue {
        addr: frontend_addr,
        port: frontend_port,
        _pad: 0,
        rev_nat_id: selected.rev_nat_id,
    };
    // A resolver sends many datagrams to the same backend: skip the LRU write when the entry
    // is already there.
    // SAFETY: the pointer comes from this lookup.
    if let Some(existing) = unsafe { copy_of(F::sock_rev().get_ptr(key)) }
        && existing.addr == value.addr
        && existing.port == value.port
        && existing.rev_nat_id == value.rev_nat_id
    {
        return;
    }
    if F::sock_rev().insert(key, value, 0).is_err() {
        bump(Counter::SockRevUpdateFailed);
    }
}

/// Shows the frontend a socket meant as its peer, if that frontend still maps to its rev-NAT
/// id; false when it does not: a deleted Service, or an id reused by another frontend, must
/// show the real peer.
#[inline(always)]
fn show_frontend<F: SockFamily>(ctx: &SockAddrContext, rev_nat_id: u32, addr: F::Addr, port: u16) -> bool {
    // SAFETY: the pointer comes from this lookup.
    let serves = matches!(unsafe { copy_of(F::rev_nat().get_ptr(rev_nat_id)) },
        Some(frontend) if frontend.addr == addr && frontend.port == port);
    if serves {
        F::set_user_addr(ctx, addr);
        set_user_port(ctx, port);
        bump(Counter::SockReverse);
    }
    serves
}

/// getpeername4/6: backend → frontend, from the socket's own storage for TCP and SCTP, from
/// the LRU for connected UDP. These hooks must always return 1.
#[inline(always)]
pub fn peer<F: SockFamily>(ctx: &SockAddrContext) -> i32 {
    if protocol(ctx) == proto::UDP {
        return reverse::<F>(ctx);
    }
    // SAFETY: the helper only reads the storage of the program's own socket.
    let ptr = unsafe { F::sock_frontend().get_ptr_mut(ctx) };
    if ptr.is_null() {
        return ALLOW;
    }
    // SAFETY: a non-null pointer from bpf_sk_storage_get is this socket's value for the run.
    let entry = unsafe { ptr.read() };
    if entry.backend_addr != F::user_addr(ctx) || entry.backend_port != user_port(ctx) {
        return ALLOW;
    }
    if !show_frontend::<F>(ctx, entry.rev_nat_id, entry.addr, entry.port) {
        // SAFETY: `sk` is the program's own socket.
        let _ = unsafe { F::sock_frontend().delete(sk(ctx)) };
    }
    ALLOW
}

/// recvmsg4/6, and getpeername4/6 of UDP sockets: backend → frontend through the LRU. These
/// hooks must always return 1.
#[inline(always)]
pub fn reverse<F: SockFamily>(ctx: &SockAddrContext) -> i32 {
    let key = SockRevKey::new(cookie(ctx), F::user_addr(ctx), user_port(ctx));
    // SAFETY: the pointer comes from this lookup.
    let Some(entry) = (unsafe { copy_of(F::sock_rev().get_ptr(key)) }) else {
        return ALLOW;
    };
    if !show_frontend::<F>(ctx, entry.rev_nat_id, entry.addr, entry.port) {
        let _ = F::sock_rev().remove(key);
    }
    ALLOW
}
