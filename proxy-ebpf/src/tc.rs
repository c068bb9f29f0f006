//! tc (TCX) programs on the node's external devices: NodePort, LoadBalancer IP and externalIP
//! traffic from outside the node. Ingress translates a new flow to a backend (DNAT, plus SNAT
//! to the node address when the backend is on another node under externalTrafficPolicy
//! Cluster) and records both directions in conntrack; later packets of the flow, and replies
//! arriving from a remote backend, are translated from conntrack alone. Egress translates
//! replies of local backends on their way back to the client.
//!
//! IPv4 only for now: IPv6 external traffic passes untranslated (the socket hooks serve IPv6).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::lpm_trie::Key,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::TcContext,
};
use proxy_common::{
    conntrack,
    counters::Counter,
    maps::{
        AddrV4, CtKey, CtValue, NodeConfig, ServiceKey, SourceRange, affinity_client, backend_flags,
        ct_flags, scope, svc_flags,
    },
    proto,
};

use crate::{
    BACKENDS_V4, CONNTRACK_V4, NODE, SERVICES_V4, SOURCE_RANGES_V4,
    counters::bump,
    family::V4,
    lb::{self, Client, Reason, copy_of},
    reject, route,
};

const OK: i32 = TC_ACT_OK;
const SHOT: i32 = TC_ACT_SHOT;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_FRAG: usize = ETH_HLEN + 6;
const IP_PROTO: usize = ETH_HLEN + 9;
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SADDR: usize = ETH_HLEN + 12;
const IP_DADDR: usize = ETH_HLEN + 16;
/// Fragment offset bits of the IPv4 flags/offset field.
const IP_OFFSET_MASK: u16 = 0x1fff;
const TCP_FLAGS: usize = 13;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
/// How many SNAT ports a new flow tries before giving up (the client's own, then random ones).
const SNAT_ATTEMPTS: u32 = 4;

/// The fields of an IPv4 TCP/UDP packet the programs translate.
pub struct Packet {
    pub saddr: AddrV4,
    pub daddr: AddrV4,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Offset of the L4 header.
    pub l4: usize,
    pub tcp_flags: u8,
}

impl Packet {
    fn ct_key(&self) -> CtKey<AddrV4> {
        CtKey::new(self.saddr, self.daddr, self.sport, self.dport, self.proto)
    }

    fn l4_csum(&self) -> usize {
        self.l4 + if self.proto == proto::TCP { 16 } else { 6 }
    }
}

enum Parsed {
    Packet(Packet),
    /// A non-first fragment: no ports to translate by.
    Fragment,
    /// Not IPv4 TCP/UDP: none of our business.
    Other,
}

/// Reads the headers with as few helper calls as the layout allows: Ethernet and IPv4
/// together, then the ports, then (TCP only) the flags.
#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Parsed, i64> {
    let head: [u8; ETH_HLEN + 20] = ctx.load(0)?;
    let version_ihl = head[ETH_HLEN];
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if u16::from_be_bytes([head[12], head[13]]) != ETH_P_IP || version_ihl >> 4 != 4 || ihl < 20 {
        return Ok(Parsed::Other);
    }
    let protocol = head[IP_PROTO];
    if protocol != proto::TCP && protocol != proto::UDP {
        return Ok(Parsed::Other);
    }
    if u16::from_be_bytes([head[IP_FRAG], head[IP_FRAG + 1]]) & IP_OFFSET_MASK != 0 {
        return Ok(Parsed::Fragment);
    }
    let l4 = ETH_HLEN + ihl;
    let ports: [u8; 4] = ctx.load(l4)?;
    let tcp_flags = if protocol == proto::TCP {
        ctx.load::<u8>(l4 + TCP_FLAGS)?
    } else {
        0
    };
    Ok(Parsed::Packet(Packet {
        saddr: [
            head[IP_SADDR],
            head[IP_SADDR + 1],
            head[IP_SADDR + 2],
            head[IP_SADDR + 3],
        ],
        daddr: [
            head[IP_DADDR],
            head[IP_DADDR + 1],
            head[IP_DADDR + 2],
            head[IP_DADDR + 3],
        ],
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        proto: protocol,
        l4,
        tcp_flags,
    }))
}

/// tc ingress on an external device.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    match parse(ctx) {
        Ok(Parsed::Packet(packet)) => tracked(ctx, &packet, false).unwrap_or_else(|| new_flow(ctx, &packet)),
        Ok(Parsed::Fragment) => {
            bump(Counter::TcFragment);
            OK
        }
        Ok(Parsed::Other) | Err(_) => OK,
    }
}

/// tc egress on an external device: replies of local backends.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    match parse(ctx) {
        Ok(Parsed::Packet(packet)) => tracked(ctx, &packet, true).unwrap_or(OK),
        _ => OK,
    }
}

/// The node settings and the time, read only once a packet turns out to be ours: most
/// packets on a device belong to no flow and no frontend.
#[inline(always)]
fn clock() -> (NodeConfig, u64) {
    let config = copy_of(NODE.get_ptr(0)).unwrap_or_default();
    // SAFETY: bpf_ktime_get_ns takes no arguments and has no preconditions.
    (config, unsafe { bpf_ktime_get_ns() })
}

/// Translates a packet of a known flow; `None` when conntrack has no live entry for it (or,
/// with `replies_only`, none for a reply).
#[inline(always)]
fn tracked(ctx: &TcContext, packet: &Packet, replies_only: bool) -> Option<i32> {
    let entry_ptr = CONNTRACK_V4.get_ptr_mut(packet.ct_key())?;
    // SAFETY: the pointer comes from a successful lookup and stays valid for this program run;
    // the value is copied at once.
    let entry = unsafe { *entry_ptr };
    let reply = entry.flags & ct_flags::REPLY != 0;
    if replies_only && !reply {
        return None;
    }
    let (config, now) = clock();
    let lifetime = conntrack::lifetime_s(packet.proto, entry.flags, &config);
    if conntrack::expired(now, entry.last_seen_ns, lifetime) {
        return None;
    }
    // A flow whose backend is gone starts afresh rather than talk to an address nobody serves.
    if !reply && BACKENDS_V4.get_ptr(entry.backend_id).is_none() {
        return None;
    }
    let closing = packet.tcp_flags & (TCP_FIN | TCP_RST) != 0 && entry.flags & ct_flags::CLOSING == 0;
    if closing || now.saturating_sub(entry.last_seen_ns) > conntrack::REFRESH_NS {
        // SAFETY: as above; a racing writer can at worst lose one timestamp or flag update,
        // which the next packet repeats.
        unsafe {
            (*entry_ptr).last_seen_ns = now;
            if closing {
                (*entry_ptr).flags |= ct_flags::CLOSING;
            }
        }
    }
    if rewrite(ctx, packet, &entry).is_err() {
        return Some(SHOT);
    }
    bump(Counter::TcTracked);
    // At ingress, a reply now comes from a frontend and a SNATed packet from the node: both
    // must bypass the stack's input checks. Egress is past them.
    if !replies_only && (reply || entry.flags & ct_flags::SNAT != 0) {
        return Some(route::forward(ctx, &entry, packet.proto));
    }
    Some(OK)
}

/// The first packet of a flow to an external frontend: pick a backend, record the flow and its
/// reply, translate.
#[inline(always)]
fn new_flow(ctx: &TcContext, packet: &Packet) -> i32 {
    let mut key = ServiceKey::frontend(packet.daddr, packet.dport, packet.proto, scope::ALL);
    let Some(mut frontend) = copy_of(SERVICES_V4.get_ptr(key)) else {
        return OK;
    };
    if frontend.flags & svc_flags::EXTERNAL == 0 {
        return OK;
    }
    let (config, now) = clock();
    if frontend.flags & svc_flags::SOURCE_RANGES != 0 {
        let range = Key::new(
            SourceRange::<AddrV4>::prefix_len(32),
            SourceRange::new(frontend.rev_nat_id, packet.saddr),
        );
        if SOURCE_RANGES_V4.get(&range).is_none() {
            bump(Counter::TcDropSourceRange);
            return SHOT;
        }
    }
    let external_local = frontend.flags & svc_flags::EXT_LOCAL != 0;
    if external_local {
        key.scope = scope::EXTERNAL_LOCAL;
        // No local view means no local endpoint: reject, as for an empty one.
        frontend = copy_of(SERVICES_V4.get_ptr(key)).unwrap_or_default();
    }
    let client = || Client {
        id: [u32::from_ne_bytes(packet.saddr), 0, 0, 0],
        kind: affinity_client::IPV4,
    };
    let selected = match lb::choose::<V4>(&key, &frontend, client) {
        Ok(selected) => selected,
        Err(Reason::NoBackend) => {
            bump(Counter::TcRejectNoBackend);
            return reject::refuse(ctx, packet);
        }
        Err(Reason::BackendMissing) => {
            bump(Counter::TcBackendMissing);
            return SHOT;
        }
    };
    let backend = selected.backend;
    let snat = !external_local && backend.flags & backend_flags::LOCAL == 0;
    let (source, source_port) = if snat {
        match snat_source(packet, &backend.addr, backend.port, &config, now) {
            Some(source) => source,
            None => {
                bump(Counter::TcSnatFailed);
                return SHOT;
            }
        }
    } else {
        (packet.saddr, packet.sport)
    };
    let flags = if snat { ct_flags::SNAT } else { 0 };
    let forward = CtValue {
        last_seen_ns: now,
        saddr: source,
        daddr: backend.addr,
        sport: source_port,
        dport: backend.port,
        rev_nat_id: selected.rev_nat_id,
        backend_id: selected.backend_id,
        flags,
        _pad: [0; 3],
    };
    let reply_key = forward.reverse_key(packet.proto);
    let reply = CtValue {
        saddr: packet.daddr,
        daddr: packet.saddr,
        sport: packet.dport,
        dport: packet.sport,
        flags: flags | ct_flags::REPLY,
        ..forward
    };
    // The reply entry first: a reply can never race ahead of the entry that translates it.
    if CONNTRACK_V4.insert(reply_key, reply, 0).is_err()
        || CONNTRACK_V4.insert(packet.ct_key(), forward, 0).is_err()
    {
        bump(Counter::TcCtUpdateFailed);
        return SHOT;
    }
    if rewrite(ctx, packet, &forward).is_err() {
        return SHOT;
    }
    bump(Counter::TcNewFlow);
    if snat {
        return route::forward(ctx, &forward, packet.proto);
    }
    OK
}

/// The node address and a source port whose reply tuple no live flow holds: the client's own
/// port when free (most flows keep their port), else a few random ones.
#[inline(always)]
fn snat_source(
    packet: &Packet,
    backend: &AddrV4,
    backend_port: u16,
    config: &NodeConfig,
    now: u64,
) -> Option<(AddrV4, u16)> {
    let source = config.snat_v4;
    if source == [0; 4] {
        return None;
    }
    let mut port = packet.sport;
    for _ in 0..SNAT_ATTEMPTS {
        let reply_key = CtKey::new(*backend, source, backend_port, port, packet.proto);
        let free = match copy_of(CONNTRACK_V4.get_ptr(reply_key)) {
            None => true,
            Some(entry) => {
                let lifetime = conntrack::lifetime_s(packet.proto, entry.flags, config);
                conntrack::expired(now, entry.last_seen_ns, lifetime)
            }
        };
        if free {
            return Some((source, port));
        }
        // SAFETY: bpf_get_prandom_u32 takes no arguments and has no preconditions.
        port = conntrack::snat_port(unsafe { bpf_get_prandom_u32() });
    }
    None
}

/// Rewrites the packet's addresses and ports to `to`'s, fixing the IPv4 and L4 checksums
/// incrementally (a UDP checksum of zero, "none", stays zero).
#[inline(always)]
fn rewrite(ctx: &TcContext, packet: &Packet, to: &CtValue<AddrV4>) -> Result<(), i64> {
    let csum = packet.l4_csum();
    let mangled = if packet.proto == proto::UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    for (offset, from, new) in [
        (IP_SADDR, packet.saddr, to.saddr),
        (IP_DADDR, packet.daddr, to.daddr),
    ] {
        if from != new {
            let (old, new_word) = (u32::from_ne_bytes(from), u32::from_ne_bytes(new));
            ctx.l4_csum_replace(
                csum,
                u64::from(old),
                u64::from(new_word),
                u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
            )?;
            ctx.l3_csum_replace(IP_CSUM, u64::from(old), u64::from(new_word), 4)?;
            ctx.store(offset, &new, 0)?;
        }
    }
    for (offset, from, new) in [
        (packet.l4, packet.sport, to.sport),
        (packet.l4 + 2, packet.dport, to.dport),
    ] {
        if from != new {
            ctx.l4_csum_replace(csum, u64::from(from.to_be()), u64::from(new.to_be()), mangled | 2)?;
            ctx.store(offset, &new.to_be(), 0)?;
        }
    }
    Ok(())
}
