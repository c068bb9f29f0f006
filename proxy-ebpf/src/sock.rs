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
    maps::{AddrV4, AddrV6, ServiceKey, SockRevKey, SockRevValue, affinity_client, halves, scope},
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
    let key = ServiceKey::frontend(frontend_addr, frontend_port, protocol(ctx), scope::ALL);
    // A TCP socket connects once, so a random draw spreads connections; an unconnected UDP
    // socket comes here with every datagram, and its cookie keeps them on one backend.
    let draw = if protocol(ctx) == proto::TCP {
        Draw::Random
    } else {
        Draw::Socket(cookie(ctx))
    };
    let Some(selected) = lb::select::<F>(&key, || netns_client(ctx), draw)? else {
        let guard = ServiceKey::frontend(frontend_addr, 0, proto::ANY, scope::ALL);
        if F::services().get_ptr(guard).is_some() {
            return Err(Refusal::UnknownPort);
        }
        return Ok(());
    };
    F::set_user_addr(ctx, selected.backend.addr);
    set_user_port(ctx, selected.backend.port);
    bump(Counter::SockForward);
    remember_frontend::<F>(ctx, &selected, frontend_addr, frontend_port);
    Ok(())
}

/// Records which frontend this socket meant, for recvmsg and getpeername.
#[inline(always)]
fn remember_frontend<F: SockFamily>(
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
    // An unconnected UDP client (a resolver) sends many datagrams to the same backend: skip the
    // LRU write when the entry is already there. A TCP socket connects once: nothing to find.
    if protocol(ctx) != proto::TCP
        // SAFETY: the pointer comes from this lookup.
        && let Some(existing) = unsafe { copy_of(F::sock_rev().get_ptr(key)) }
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

/// recvmsg4/6 and getpeername4/6: backend → frontend. These hooks must always return 1.
#[inline(always)]
pub fn reverse<F: SockFamily>(ctx: &SockAddrContext) -> i32 {
    let key = SockRevKey::new(cookie(ctx), F::user_addr(ctx), user_port(ctx));
    // SAFETY: the pointer comes from this lookup.
    let Some(entry) = (unsafe { copy_of(F::sock_rev().get_ptr(key)) }) else {
        return ALLOW;
    };
    // SAFETY: the pointer comes from this lookup.
    match unsafe { copy_of(F::rev_nat().get_ptr(entry.rev_nat_id)) } {
        Some(frontend) if frontend.addr == entry.addr && frontend.port == entry.port => {
            F::set_user_addr(ctx, entry.addr);
            set_user_port(ctx, entry.port);
            bump(Counter::SockReverse);
        }
        // The service was deleted, or its rev-NAT id now names another frontend: the
        // application must see the real peer rather than a frontend that no longer maps to it.
        _ => {
            let _ = F::sock_rev().remove(key);
        }
    }
    ALLOW
}
