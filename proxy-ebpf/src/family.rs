//! One trait per address family so that `lb`, `sock` and `tc` are written once for IPv4 and IPv6.
//! Each accessor is `#[inline(always)]`: a map reference must compile to the map's own load
//! instruction in every program, never to a pointer kept in data.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{HashMap, LpmTrie, LruHashMap, SkStorage},
};
use proxy_common::maps::{
    AddrV4, AddrV6, Backend, CtKey, CtValue, RevNat, ServiceKey, ServiceValue, SockFrontend, SockRevKey,
    SockRevValue, SourceRange, capacity,
};

/// The maps the agent writes are not preallocated (see main.rs).
pub const ON_DEMAND: usize = BPF_F_NO_PREALLOC as usize;
pub type Services<A> = HashMap<ServiceKey<A>, ServiceValue, { capacity::SERVICES as usize }, ON_DEMAND>;
pub type Backends<A> = HashMap<u32, Backend<A>, { capacity::BACKENDS as usize }, ON_DEMAND>;
pub type RevNats<A> = HashMap<u32, RevNat<A>, { capacity::REV_NAT as usize }, ON_DEMAND>;
pub type SockRevs<A> = LruHashMap<SockRevKey<A>, SockRevValue<A>, { capacity::SOCK_REV as usize }>;
pub type SockFrontends<A> = SkStorage<SockFrontend<A>>;
pub type Conntrack<A> = LruHashMap<CtKey<A>, CtValue<A>, { capacity::CONNTRACK as usize }>;
pub type SourceRanges<A> = LpmTrie<SourceRange<A>, u32, { capacity::SOURCE_RANGES as usize }>;

pub trait Family: 'static {
    type Addr: Copy + PartialEq + Default + 'static;

    fn services() -> &'static Services<Self::Addr>;
    fn backends() -> &'static Backends<Self::Addr>;
    fn rev_nat() -> &'static RevNats<Self::Addr>;
    fn sock_rev() -> &'static SockRevs<Self::Addr>;
    fn sock_frontend() -> &'static SockFrontends<Self::Addr>;
    fn conntrack() -> &'static Conntrack<Self::Addr>;
    fn source_ranges() -> &'static SourceRanges<Self::Addr>;
}

pub struct V4;
pub struct V6;

macro_rules! family {
    ($fam:ty, $addr:ty, $svc:ident, $be:ident, $rn:ident, $sr:ident, $sf:ident, $ct:ident, $rng:ident) => {
        impl Family for $fam {
            type Addr = $addr;

            #[inline(always)]
            fn services() -> &'static Services<$addr> {
                &crate::$svc
            }
            #[inline(always)]
            fn backends() -> &'static Backends<$addr> {
                &crate::$be
            }
            #[inline(always)]
            fn rev_nat() -> &'static RevNats<$addr> {
                &crate::$rn
            }
            #[inline(always)]
            fn sock_rev() -> &'static SockRevs<$addr> {
                &crate::$sr
            }
            #[inline(always)]
            fn sock_frontend() -> &'static SockFrontends<$addr> {
                &crate::$sf
            }
            #[inline(always)]
            fn conntrack() -> &'static Conntrack<$addr> {
                &crate::$ct
            }
            #[inline(always)]
            fn source_ranges() -> &'static SourceRanges<$addr> {
                &crate::$rng
            }
        }
    };
}

family!(
    V4,
    AddrV4,
    SERVICES_V4,
    BACKENDS_V4,
    REV_NAT_V4,
    SOCK_REV_V4,
    SOCK_FRONTEND_V4,
    CONNTRACK_V4,
    SOURCE_RANGES_V4
);
family!(
    V6,
    AddrV6,
    SERVICES_V6,
    BACKENDS_V6,
    REV_NAT_V6,
    SOCK_REV_V6,
    SOCK_FRONTEND_V6,
    CONNTRACK_V6,
    SOURCE_RANGES_V6
);
