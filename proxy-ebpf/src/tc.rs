//! tc (TCX) programs on the node's external devices: NodePort, LoadBalancer IP and externalIP
//! traffic from outside the node, IPv4 and IPv6. Ingress translates a new flow to a backend
//! (DNAT, plus SNAT to the node address when the backend is on another node under
//! externalTrafficPolicy Cluster) and records both directions in conntrack; later packets of
//! the flow, and replies arriving from a remote backend, are translated from conntrack alone.
//! Egress translates replies of local backends on their way back to the client.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST},
    btf_maps::lpm_trie::Key,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::{TcContext, XdpContext},
};
use proxy_common::{
    conntrack,
    counters::Counter,
    maglev,
    maps::{CtKey, CtValue, NodeConfig, ServiceKey, SourceRange, backend_flags, ct_flags, scope, svc_flags},
    proto,
};

use crate::{
    NODE,
    counters::bump,
    family::{V4, V6},
    frame::Frame,
    lb::{self, Client, Draw, Reason, Selected, copy_of},
    packet::{Head, Link, Packet, Parsed, TcFamily, csum_diff},
    route::{self, Route},
};

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
/// How many SNAT ports a new flow tries before giving up (the client's own, then random ones).
const SNAT_ATTEMPTS: u32 = 4;

/// Which hook a packet is at: ingress translates every tracked packet and starts new flows,
/// egress only translates replies of local backends.
#[derive(Clone, Copy, PartialEq)]
enum Hook {
    Ingress,
    Egress,
}

/// Reads the link-layer header and a minimal IPv4 header in one load (most packets need no
/// more), then hands the packet to its family.
#[inline(always)]
fn on_packet<C: Frame>(ctx: &C, link: Link, hook: Hook) -> i32 {
    let Ok(head) = Head::load(ctx, link) else {
        return C::PASS;
    };
    match head.ether_type(link) {
        t if t == V4::ETHER_TYPE => translate::<C, V4>(ctx, link, &head, hook),
        t if t == V6::ETHER_TYPE => translate::<C, V6>(ctx, link, &head, hook),
        _ => C::PASS,
    }
}

/// One family's path. The stages it calls are separate BPF functions rather than one inlined
/// body: the verifier limits the stack of a whole call chain to 512 bytes, and IPv6's keys,
/// values and answers are large, so each stage's frame exists only while it runs (the
/// program's own frame holds just the packet's fields and the chosen backend).
#[inline(always)]
fn translate<C: Frame, F: TcFamily>(ctx: &C, link: Link, head: &Head, hook: Hook) -> i32 {
    let mut packet = Packet::default();
    match F::parse(ctx, link, head, &mut packet) {
        Ok(Parsed::Packet) => {}
        Ok(Parsed::Fragment) => {
            // Counted once, by tc, which every fragment XDP passes meets next.
            if hook == Hook::Ingress && !C::BEFORE_TC {
                bump(Counter::TcFragment);
            }
            return C::PASS;
        }
        Ok(Parsed::Other) | Err(_) => return C::PASS,
    }
    if let Some(verdict) = tracked::<C, F>(ctx, &packet, hook, false) {
        return verdict;
    }
    if hook == Hook::Egress {
        return C::PASS;
    }
    let mut selected = Selected::default();
    // (SNAT, source port): a pair rather than an Option, whose payload a BPF call would pass
    // uninitialised (which the verifier refuses) when it is None.
    let (snat, snat_port) = match new_flow::<F>(&packet, &mut selected) {
        Start::Pass => return C::PASS,
        Start::Drop => return C::DROP,
        Start::Refuse => return ctx.refuse::<F>(&packet),
        Start::Open => (false, 0),
        // Called from here, not from `open_flow`: nested, the two frames would take the IPv6
        // chain past Linux 6.1's stack bound (it rounds each frame up to 32 bytes). The claim
        // inserts the flow's reply entry; `open_flow` then adds the original direction.
        Start::OpenSnat => match claim_snat::<F>(&packet, &selected) {
            Some(port) => (true, port),
            None => {
                bump(Counter::TcSnatFailed);
                return C::DROP;
            }
        },
    };
    // The first packet is translated by the entries just made, as every later one is: one
    // more lookup, but the translation lives in one place and off the recording's frame.
    if open_flow::<F>(&packet, &selected, snat, snat_port) {
        tracked::<C, F>(ctx, &packet, hook, true).unwrap_or(C::DROP)
    } else {
        C::DROP
    }
}

/// What the first packet of a flow gets. Stage results are small values and out parameters:
/// a BPF function may not return a pointer to its own stack, which a returned struct is.
enum Start {
    /// Not for an external frontend: left to the stack.
    Pass,
    Drop,
    /// An external frontend without a usable endpoint.
    Refuse,
    /// A backend was chosen.
    Open,
    /// A backend was chosen, and the flow must come from the node.
    OpenSnat,
}

/// tc ingress on an external device whose packets start as `link` says.
#[inline(always)]
pub fn ingress(ctx: &TcContext, link: Link) -> i32 {
    on_packet(ctx, link, Hook::Ingress)
}

/// tc egress on an external device: replies of local backends.
#[inline(always)]
pub fn egress(ctx: &TcContext, link: Link) -> i32 {
    on_packet(ctx, link, Hook::Egress)
}

/// XDP on an external Ethernet device: what tc ingress does, before an skb exists. What it
/// cannot finish (a refusal, a next hop not resolved yet, a device XDP cannot send to, a
/// fragment, IPv6 extension headers beyond the parser's) it passes untouched to the stack,
/// where the tc program on the same device handles it from the same maps. A packet it
/// translated and passed (DNAT to a backend behind a local bridge) is no frontend's and
/// matches no conntrack key any more, so tc leaves it alone.
#[inline(always)]
pub fn xdp(ctx: &XdpContext) -> u32 {
    on_packet(ctx, Link::Ethernet, Hook::Ingress) as u32
}

/// The node settings and the time, read only once a packet turns out to be ours: most
/// packets on a device belong to no flow and no frontend. The settings are used in place, not
/// copied: a copy of the IPv6 address in them would be spilled across every helper call.
#[inline(always)]
fn clock() -> Option<(&'static NodeConfig, u64)> {
    let config = NODE.get(0)?;
    // SAFETY: bpf_ktime_get_ns takes no arguments and has no preconditions.
    Some((config, unsafe { bpf_ktime_get_ns() }))
}

/// Translates a packet of a known flow (`first`: the packet that opened it); `None` when
/// conntrack has no live entry for it (or, at egress, none for a reply).
#[inline(never)]
fn tracked<C: Frame, F: TcFamily>(ctx: &C, packet: &Packet<F::Addr>, hook: Hook, first: bool) -> Option<i32> {
    let entry_ptr = F::conntrack().get_ptr_mut(packet.ct_key())?;
    // SAFETY: the pointer comes from a successful lookup and stays valid for this program run
    // (RCU). The entry is used in place rather than copied, to spare IPv6's stack: its
    // addresses, ports and ids are never written after insertion, and the two fields other
    // CPUs do write (time, flags) are read once here.
    let entry = unsafe { &*entry_ptr };
    let (flags, last_seen_ns) = (entry.flags, entry.last_seen_ns);
    let reply = flags & ct_flags::REPLY != 0;
    if hook == Hook::Egress && !reply {
        return None;
    }
    // The opening packet's entries were written a moment ago, for a backend just chosen and
    // with its FIN or RST already marked: nothing to check or refresh.
    if !first {
        let (config, now) = clock()?;
        let lifetime = conntrack::lifetime_s(packet.proto, flags, config);
        if conntrack::expired(now, last_seen_ns, lifetime) {
            return None;
        }
        // A flow whose backend is gone starts afresh rather than talk to an address nobody serves.
        if !reply && F::backends().get_ptr(entry.backend_id).is_none() {
            return None;
        }
        let closing = packet.tcp_flags & (TCP_FIN | TCP_RST) != 0 && flags & ct_flags::CLOSING == 0;
        if closing || now.saturating_sub(last_seen_ns) > conntrack::REFRESH_NS {
            // SAFETY: as above; a racing writer can at worst lose one timestamp or flag update,
            // which the next packet repeats.
            unsafe {
                (*entry_ptr).last_seen_ns = now;
                if closing {
                    (*entry_ptr).flags |= ct_flags::CLOSING;
                }
            }
        }
    }
    let translated = if first { C::NEW_FLOW } else { C::TRACKED };
    // At ingress, a reply now comes from a frontend and a SNATed packet from the node: both
    // must bypass the stack's input checks, so they are sent out from here. Egress is past them.
    let forwarded = hook == Hook::Ingress && (reply || flags & ct_flags::SNAT != 0);
    let mut route = Route::default();
    if forwarded && !route::lookup::<C, F>(ctx, packet, entry, &mut route) {
        if !C::BEFORE_TC {
            return Some(C::DROP);
        }
        // Opened here all the same: tc finds the entries and finishes the packet.
        if first {
            bump(translated);
        }
        bump(Counter::XdpPass);
        return Some(C::PASS);
    }
    if rewrite::<C, F>(ctx, packet, entry).is_err() {
        return Some(C::DROP);
    }
    bump(translated);
    Some(if forwarded {
        ctx.send::<F>(packet, &route)
    } else {
        C::PASS
    })
}

/// The first packet of a flow: is it for an external frontend, may the client use it, and
/// which backend serves it (into `selected`).
#[inline(never)]
fn new_flow<F: TcFamily>(packet: &Packet<F::Addr>, selected: &mut Selected<F::Addr>) -> Start {
    let mut key = ServiceKey::frontend(packet.daddr, packet.dport, packet.proto, scope::ALL);
    // SAFETY: the pointer comes from this lookup.
    let Some(mut frontend) = (unsafe { copy_of(F::services().get_ptr(key)) }) else {
        return Start::Pass;
    };
    if frontend.flags & svc_flags::EXTERNAL == 0 {
        return Start::Pass;
    }
    if frontend.flags & svc_flags::SOURCE_RANGES != 0 {
        let range = Key::new(
            SourceRange::<F::Addr>::prefix_len(F::ADDR_BITS),
            SourceRange::new(frontend.rev_nat_id, packet.saddr),
        );
        if F::source_ranges().get(&range).is_none() {
            bump(Counter::TcDropSourceRange);
            return Start::Drop;
        }
    }
    let external_local = frontend.flags & svc_flags::EXT_LOCAL != 0;
    if external_local {
        key.scope = scope::EXTERNAL_LOCAL;
        // No local view means no local endpoint: reject, as for an empty one.
        // SAFETY: the pointer comes from this lookup.
        frontend = unsafe { copy_of(F::services().get_ptr(key)) }.unwrap_or_default();
    }
    let client = || Client {
        id: F::client_id(&packet.saddr),
        kind: F::AFFINITY_CLIENT,
    };
    let draw = if frontend.flags & svc_flags::MAGLEV != 0 {
        maglev_draw::<F>(packet, frontend.flags)
    } else {
        Draw::Random
    };
    match lb::choose::<F>(&key, &frontend, client, draw) {
        Ok(chosen) => {
            *selected = chosen;
            if !external_local && selected.backend.flags & backend_flags::LOCAL == 0 {
                Start::OpenSnat
            } else {
                Start::Open
            }
        }
        // Counted where it is answered (`Frame::refuse`).
        Err(Reason::NoBackend) => Start::Refuse,
        Err(Reason::BackendMissing) => {
            bump(Counter::TcBackendMissing);
            Start::Drop
        }
    }
}

/// A Maglev frontend's draw: the hash of the flow, or of the client's address alone under
/// ClientIP affinity. Random when the node settings are missing.
#[inline(always)]
fn maglev_draw<F: TcFamily>(packet: &Packet<F::Addr>, flags: u32) -> Draw {
    let Some(config) = NODE.get(0) else {
        return Draw::Random;
    };
    let client = F::client_id(&packet.saddr);
    let hash = if flags & svc_flags::AFFINITY != 0 {
        maglev::hash(&client, config.maglev_seed)
    } else {
        maglev::flow_hash(
            &client,
            &F::client_id(&packet.daddr),
            packet.sport,
            packet.dport,
            packet.proto,
            config.maglev_seed,
        )
    };
    Draw::Maglev {
        hash,
        table_size: config.maglev_table_size,
    }
}

/// Records a new flow to `selected` and its reply in conntrack, the original direction coming
/// from the node's address and `snat_port` when `snat`; false (counted) when it cannot.
#[inline(never)]
// By reference: passed by value, each key and value gets one more stack copy, which takes the
// IPv6 call chain past the verifier's 512 bytes.
#[allow(clippy::needless_borrows_for_generic_args)]
fn open_flow<F: TcFamily>(
    packet: &Packet<F::Addr>,
    selected: &Selected<F::Addr>,
    snat: bool,
    snat_port: u16,
) -> bool {
    let Some((config, now)) = clock() else {
        return false;
    };
    let flags = if snat { ct_flags::SNAT } else { 0 };
    // One key and one value, each turned from one direction into the other, keep this frame
    // small enough for IPv6. First the reply direction.
    let mut key = CtKey::default();
    let mut entry = CtValue::default();
    if snat {
        reply_entry::<F>(
            packet,
            selected,
            &F::snat_address(config),
            snat_port,
            flags,
            now,
            &mut key,
            &mut entry,
        );
    } else {
        reply_entry::<F>(
            packet,
            selected,
            &packet.saddr,
            packet.sport,
            flags,
            now,
            &mut key,
            &mut entry,
        );
    }
    // The reply entry first: a reply can never race ahead of the entry that translates it.
    // A SNATed flow's was inserted when its port was claimed.
    let recorded = (snat || F::conntrack().insert(&key, &entry, 0).is_ok()) && {
        entry.saddr = key.daddr;
        entry.daddr = key.saddr;
        entry.sport = key.dport;
        entry.dport = key.sport;
        // A flow opened by a FIN or RST is closing from its first packet, as a later FIN or
        // RST marks it in `tracked`.
        entry.flags = flags
            | if packet.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                ct_flags::CLOSING
            } else {
                0
            };
        key = packet.ct_key();
        F::conntrack().insert(&key, &entry, 0).is_ok()
    };
    if !recorded {
        // Give the claimed port back rather than hold it until the agent's GC: nobody else
        // can have taken it while this entry existed.
        if snat {
            let _ = F::conntrack().remove(&entry.reverse_key(packet.proto));
        }
        bump(Counter::TcCtUpdateFailed);
    }
    recorded
}

/// Fills in a new flow's reply entry: replies from the backend to (`source`, `source_port`)
/// (the client, or the node's SNAT address and port) are rewritten to come from the frontend
/// and go to the client. Out parameters, so the caller's one key and value are reused.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn reply_entry<F: TcFamily>(
    packet: &Packet<F::Addr>,
    selected: &Selected<F::Addr>,
    source: &F::Addr,
    source_port: u16,
    flags: u8,
    now: u64,
    key: &mut CtKey<F::Addr>,
    entry: &mut CtValue<F::Addr>,
) {
    let backend = &selected.backend;
    *key = CtKey::new(backend.addr, *source, backend.port, source_port, packet.proto);
    *entry = CtValue {
        last_seen_ns: now,
        saddr: packet.daddr,
        daddr: packet.saddr,
        sport: packet.dport,
        dport: packet.sport,
        rev_nat_id: selected.rev_nat_id,
        backend_id: selected.backend_id,
        flags: flags | ct_flags::REPLY,
        _pad: [0; 3],
    };
}

/// Claims a source port for a flow to `selected` SNATed to the node's address, by inserting
/// the flow's reply entry only where none exists (BPF_NOEXIST): two CPUs opening flows at once
/// can never both take one reply tuple, as they could when a lookup chose and a later insert
/// took (Cilium's `__snat_create` claims the same way). The client's own port first (most
/// flows keep their port), then a few random ones. A tuple held by an expired entry stays
/// taken until the agent's GC or the LRU frees it: deleting it here could delete another CPU's
/// fresh claim. `None` when the node has no address of this family or every try is taken.
#[inline(never)]
// By reference, as in `open_flow`: by value, the key and value each get another stack copy.
#[allow(clippy::needless_borrows_for_generic_args)]
fn claim_snat<F: TcFamily>(packet: &Packet<F::Addr>, selected: &Selected<F::Addr>) -> Option<u16> {
    let (config, now) = clock()?;
    let source = F::snat_address(config);
    if source == F::Addr::default() {
        return None;
    }
    let mut key = CtKey::default();
    let mut entry = CtValue::default();
    reply_entry::<F>(
        packet,
        selected,
        &source,
        packet.sport,
        ct_flags::SNAT,
        now,
        &mut key,
        &mut entry,
    );
    for _ in 0..SNAT_ATTEMPTS {
        if F::conntrack()
            .insert(&key, &entry, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return Some(key.dport);
        }
        // SAFETY: bpf_get_prandom_u32 takes no arguments and has no preconditions.
        key.dport = conntrack::snat_port(unsafe { bpf_get_prandom_u32() });
    }
    None
}

/// Rewrites the packet's addresses and ports to `to`'s, fixing the IP and L4 checksums
/// incrementally (a UDP checksum of zero, "none" in IPv4, stays zero). Which addresses change
/// follows from the entry's direction: the destination of an original packet (frontend to
/// backend), the source of a reply (backend to frontend), and with SNAT the other one too.
#[inline(always)]
fn rewrite<C: Frame, F: TcFamily>(
    ctx: &C,
    packet: &Packet<F::Addr>,
    to: &CtValue<F::Addr>,
) -> Result<(), i64> {
    let csum = packet.l4_csum();
    let mangled = if packet.proto == proto::UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let reply = to.flags & ct_flags::REPLY != 0;
    let snat = to.flags & ct_flags::SNAT != 0;
    let mut diff = 0;
    if reply || snat {
        diff = csum_diff(&packet.saddr, &to.saddr, diff)?;
        ctx.write(packet.ip(F::SADDR), &to.saddr)?;
    }
    if !reply || snat {
        diff = csum_diff(&packet.daddr, &to.daddr, diff)?;
        ctx.write(packet.ip(F::DADDR), &to.daddr)?;
    }
    F::fix_ip_checksum(ctx, packet, diff)?;
    let diff = u64::from(diff);
    if ctx
        .l4_csum_replace(csum, 0, diff, F::PSEUDO_FLAGS | mangled)
        .is_err()
    {
        // A kernel older than BPF_F_IPV6 (6.16) refuses it. Without it, only the skb->csum
        // of a CHECKSUM_COMPLETE IPv6 packet goes stale, and the stack then verifies the L4
        // checksum in software (with a "hw csum failure" warning) rather than drop it.
        ctx.l4_csum_replace(csum, 0, diff, u64::from(BPF_F_PSEUDO_HDR) | mangled)?;
    }
    if (packet.sport, packet.dport) != (to.sport, to.dport) {
        let (old, new) = (
            ports_word(packet.sport, packet.dport),
            ports_word(to.sport, to.dport),
        );
        ctx.l4_csum_replace(csum, u64::from(old), u64::from(new), mangled | 4)?;
        ctx.write(packet.l4, &new)?;
    }
    Ok(())
}

/// Both ports as the 32-bit word they make in the L4 header, in memory order.
#[inline(always)]
fn ports_word(source: u16, destination: u16) -> u32 {
    let (s, d) = (source.to_be_bytes(), destination.to_be_bytes());
    u32::from_ne_bytes([s[0], s[1], d[0], d[1]])
}
