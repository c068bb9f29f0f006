//! bpf-kube-proxy datapath. This file holds only the maps and thin program entry points; the
//! logic lives in one module per concern.
#![no_std]
#![no_main]
// aya's program macros hand each entry point its context by value; backend selection takes its
// small `Client` the same way (by value or by reference is the same code in BPF).
#![allow(clippy::needless_pass_by_value)]

mod counters;
mod family;
mod frame;
mod lb;
mod packet;
mod reject;
mod route;
mod sock;
mod tc;

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, DevMapHash, HashMap, HashOfMaps, LpmTrie, LruHashMap, PerCpuArray, SkStorage},
    macros::{btf_map, cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use proxy_common::{
    counters::Counter,
    maps::{
        AddrV4, AddrV6, AffinityKey, AffinityValue, CtKey, CtValue, NodeConfig, ServiceLabel, SockFrontend,
        SockRevKey, SockRevValue, SourceRange, capacity,
    },
};

use crate::{
    family::{Backends, ON_DEMAND, RevNats, Services, V4, V6},
    packet::Link,
};

// Map sizes here are defaults: the agent overrides max_entries at load time.
//
// The maps the agent writes are not preallocated: their entries cost memory as they are
// written, and their capacity only 16 bytes a bucket, so the agent can size them with room to
// grow (proxy_common::sizing). The programs only read them, so the allocation on update never
// happens in a program.

#[btf_map(name = "bkp_svc_v4")]
static SERVICES_V4: Services<AddrV4> = HashMap::new();
#[btf_map(name = "bkp_svc_v6")]
static SERVICES_V6: Services<AddrV6> = HashMap::new();

#[btf_map(name = "bkp_be_v4")]
static BACKENDS_V4: Backends<AddrV4> = HashMap::new();
#[btf_map(name = "bkp_be_v6")]
static BACKENDS_V6: Backends<AddrV6> = HashMap::new();

#[btf_map(name = "bkp_revnat_v4")]
static REV_NAT_V4: RevNats<AddrV4> = HashMap::new();
#[btf_map(name = "bkp_revnat_v6")]
static REV_NAT_V6: RevNats<AddrV6> = HashMap::new();

#[btf_map(name = "bkp_sockrev_v4")]
static SOCK_REV_V4: LruHashMap<SockRevKey<AddrV4>, SockRevValue<AddrV4>, { capacity::SOCK_REV as usize }> =
    LruHashMap::new();
#[btf_map(name = "bkp_sockrev_v6")]
static SOCK_REV_V6: LruHashMap<SockRevKey<AddrV6>, SockRevValue<AddrV6>, { capacity::SOCK_REV as usize }> =
    LruHashMap::new();

// Per socket, freed with it: no capacity to size, no LRU lock, and no live socket's entry can
// be evicted by others.
#[btf_map(name = "bkp_sockfe_v4")]
static SOCK_FRONTEND_V4: SkStorage<SockFrontend<AddrV4>> = SkStorage::new();
#[btf_map(name = "bkp_sockfe_v6")]
static SOCK_FRONTEND_V6: SkStorage<SockFrontend<AddrV6>> = SkStorage::new();

#[btf_map(name = "bkp_affinity")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { capacity::AFFINITY as usize }> = LruHashMap::new();

#[btf_map(name = "bkp_ct_v4")]
static CONNTRACK_V4: LruHashMap<CtKey<AddrV4>, CtValue<AddrV4>, { capacity::CONNTRACK as usize }> =
    LruHashMap::new();
#[btf_map(name = "bkp_ct_v6")]
static CONNTRACK_V6: LruHashMap<CtKey<AddrV6>, CtValue<AddrV6>, { capacity::CONNTRACK as usize }> =
    LruHashMap::new();

#[btf_map(name = "bkp_srcrng_v4")]
static SOURCE_RANGES_V4: LpmTrie<SourceRange<AddrV4>, u32, { capacity::SOURCE_RANGES as usize }> =
    LpmTrie::new();
#[btf_map(name = "bkp_srcrng_v6")]
static SOURCE_RANGES_V6: LpmTrie<SourceRange<AddrV6>, u32, { capacity::SOURCE_RANGES as usize }> =
    LpmTrie::new();

/// Maglev tables: one map per table size (`proxy_common::maglev::TABLE_SIZES`), since an inner
/// map's size is fixed by its template; only the configured size's map holds tables. An inner
/// array of one entry holds a whole table, so the agent swaps a table in one update, and the
/// kernel allocates it with vmalloc (Cilium keeps its tables the same way).
pub type MaglevTables<const SIZE: usize> =
    HashOfMaps<u32, Array<[u32; SIZE], 1>, { capacity::MAGLEV as usize }, ON_DEMAND>;

#[btf_map(name = "bkp_maglev_16k")]
static MAGLEV_16K: MaglevTables<16_381> = HashOfMaps::new();
#[btf_map(name = "bkp_maglev_64k")]
static MAGLEV_64K: MaglevTables<65_521> = HashOfMaps::new();
#[btf_map(name = "bkp_maglev_128k")]
static MAGLEV_128K: MaglevTables<131_071> = HashOfMaps::new();

#[btf_map(name = "bkp_node")]
static NODE: Array<NodeConfig, 1> = Array::new();

/// The devices XDP may send to (see `frame.rs`), written by the agent as it attaches.
#[btf_map(name = "bkp_xdp_devs")]
static XDP_DEVICES: DevMapHash<{ capacity::XDP_DEVICES as usize }> = DevMapHash::new();

#[btf_map(name = "bkp_counters")]
static COUNTERS: PerCpuArray<u64, { Counter::COUNT as usize }> = PerCpuArray::new();

/// Written by the agent, read by tools only; declared here so it is created, pinned and
/// described in BTF with the rest. No preallocation: it costs memory only per frontend.
#[btf_map(name = "bkp_svc_names")]
static SERVICE_LABELS: HashMap<
    u32,
    ServiceLabel,
    { capacity::SERVICE_LABELS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

#[cgroup_sock_addr(connect4)]
pub fn bkp_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect::<V4>(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn bkp_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::connect::<V4>(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn bkp_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse::<V4>(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn bkp_getpeer4(ctx: SockAddrContext) -> i32 {
    sock::peer::<V4>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn bkp_connect6(ctx: SockAddrContext) -> i32 {
    sock::connect::<V6>(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn bkp_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::connect::<V6>(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn bkp_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse::<V6>(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn bkp_getpeer6(ctx: SockAddrContext) -> i32 {
    sock::peer::<V6>(&ctx)
}

#[classifier]
pub fn bkp_tc_ingress(ctx: TcContext) -> i32 {
    tc::ingress(&ctx, Link::Ethernet)
}

#[classifier]
pub fn bkp_tc_egress(ctx: TcContext) -> i32 {
    tc::egress(&ctx, Link::Ethernet)
}

/// For devices without a link-layer header (IPIP, WireGuard, ip6tnl, TUN): the agent attaches
/// these instead, by device type.
#[classifier]
pub fn bkp_tc_ingress_l3(ctx: TcContext) -> i32 {
    tc::ingress(&ctx, Link::Ip)
}

#[classifier]
pub fn bkp_tc_egress_l3(ctx: TcContext) -> i32 {
    tc::egress(&ctx, Link::Ip)
}

/// XDP on Ethernet devices with a native driver (or generic, when asked): NodePort and
/// friends before an skb is built; the tc pair stays attached and finishes the rest.
#[xdp]
pub fn bkp_xdp(ctx: XdpContext) -> u32 {
    tc::xdp(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never entered at run time.
    loop {}
}

// GPL-compatible, so that GPL-only helpers and kfuncs stay available to the datapath.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
