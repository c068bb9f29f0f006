//! What the translating hooks need to know of each family's packets: where the headers are,
//! how an address rewrite fixes the checksums, how routing is asked, how a refusal is built.
//! The translation itself (`tc`) is written once over this trait, and once over the hook
//! (`frame::Frame`: tc or XDP).

use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, bpf_fib_lookup as FibParams},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use proxy_common::{
    maps::{AddrV4, AddrV6, CtKey, CtValue, NodeConfig, affinity_client},
    proto,
};

use crate::{
    family::{Family, V4, V6},
    frame::Frame,
    reject,
};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IP_HLEN: usize = 20;

/// Where a device's packets start at tc. Ethernet-like devices give the frame; devices without
/// a link-layer header (IPIP `tunl0`, WireGuard, `ip6tnl`, TUN) give the IP packet itself.
#[derive(Clone, Copy, PartialEq)]
pub enum Link {
    Ethernet,
    /// No link-layer header: the packet starts at the IP header.
    Ip,
}

impl Link {
    /// Offset of the IP header.
    #[inline(always)]
    pub const fn l3(self) -> usize {
        match self {
            Self::Ethernet => ETH_HLEN,
            Self::Ip => 0,
        }
    }
}

/// The link-layer header (left zero on a device without one) and a minimal IPv4 header: what
/// the programs read first, in one load.
#[repr(C)]
#[derive(Default)]
pub struct Head {
    pub eth: [u8; ETH_HLEN],
    pub ip: [u8; IP_HLEN],
}

impl Head {
    /// Reads the head of the packet: one load for most packets, which need no more.
    #[inline(always)]
    pub fn load<C: Frame>(ctx: &C, link: Link) -> Result<Self, i64> {
        let mut head = Self::default();
        match link {
            Link::Ethernet => ctx.load_into(0, &mut head)?,
            Link::Ip => ctx.load_into(0, &mut head.ip)?,
        }
        Ok(head)
    }

    /// The EtherType of the packet, from its Ethernet header or, without one, from the IP
    /// version (which is all the stack looks at there too).
    #[inline(always)]
    pub fn ether_type(&self, link: Link) -> u16 {
        match link {
            Link::Ethernet => u16::from_be_bytes([self.eth[12], self.eth[13]]),
            Link::Ip => match self.ip[0] >> 4 {
                4 => ETH_P_IP,
                6 => ETH_P_IPV6,
                _ => 0,
            },
        }
    }
}

const TCP_FLAGS: usize = 13;

/// The fields of a TCP/UDP packet the programs translate.
#[derive(Default)]
pub struct Packet<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Offset of the IP header: where the device's packets put it (see [`Link`]).
    pub l3: u8,
    /// Offset of the L4 header.
    pub l4: usize,
    pub tcp_flags: u8,
}

impl<A: Copy> Packet<A> {
    pub fn ct_key(&self) -> CtKey<A> {
        CtKey::new(self.saddr, self.daddr, self.sport, self.dport, self.proto)
    }

    pub fn l4_csum(&self) -> usize {
        self.l4 + if self.proto == proto::TCP { 16 } else { 6 }
    }
}

impl<A> Packet<A> {
    /// The packet offset of `offset` into the IP header.
    #[inline(always)]
    pub fn ip(&self, offset: usize) -> usize {
        usize::from(self.l3) + offset
    }

    /// Whether the packet came with an Ethernet header.
    #[inline(always)]
    pub fn has_ethernet(&self) -> bool {
        usize::from(self.l3) == ETH_HLEN
    }
}

/// What a packet turned out to be.
pub enum Parsed {
    /// TCP or UDP, its fields read.
    Packet,
    /// A fragment (IPv4: not the first; IPv6: any): no ports to translate by.
    Fragment,
    /// Not TCP/UDP of this family: none of our business.
    Other,
}

pub trait TcFamily: Family {
    const ETHER_TYPE: u16;
    /// Bits of an address: the full-length prefix of a source-range lookup.
    const ADDR_BITS: u8;
    const AFFINITY_CLIENT: u8;
    /// Offsets of the addresses in the IP header.
    const SADDR: usize;
    const DADDR: usize;
    /// Extra `l4_csum_replace` flags for an address change.
    const PSEUDO_FLAGS: u64;

    /// Reads the packet's fields into `out` (filled only for `Parsed::Packet`). An out
    /// parameter, because moving an IPv6 packet's fields costs stack the verifier counts.
    fn parse<C: Frame>(ctx: &C, link: Link, head: &Head, out: &mut Packet<Self::Addr>)
    -> Result<Parsed, i64>;
    fn client_id(addr: &Self::Addr) -> [u32; 4];
    /// The node's source address for SNAT; the default (all zero) when it has none.
    fn snat_address(config: &NodeConfig) -> Self::Addr;
    /// Folds a checksum difference for changed addresses into the IP header's own checksum.
    fn fix_ip_checksum<C: Frame>(ctx: &C, packet: &Packet<Self::Addr>, diff: u32) -> Result<(), i64>;
    /// Fills the family and addresses of a route lookup towards `to.daddr`.
    fn route_params(params: &mut FibParams, to: &CtValue<Self::Addr>);
    /// Answers the packet with a TCP RST or an ICMP port unreachable.
    fn refuse(ctx: &TcContext, packet: &Packet<Self::Addr>) -> i32;
}

/// The one's-complement checksum difference of replacing `from` by `to` (each a whole
/// number of 32-bit words), added to `seed`: what `l3/l4_csum_replace` take with size 0.
/// The helper reads both values where they are, so nothing is copied onto the stack.
#[inline(always)]
pub fn csum_diff<T>(from: &T, to: &T, seed: u32) -> Result<u32, i64> {
    let size = size_of::<T>() as u32;
    // SAFETY: both pointers are to live values of `size` bytes; the helper only reads them.
    let diff = unsafe {
        bpf_csum_diff(
            core::ptr::from_ref::<T>(from) as *mut u32,
            size,
            core::ptr::from_ref::<T>(to) as *mut u32,
            size,
            seed,
        )
    };
    if diff < 0 { Err(diff) } else { Ok(diff as u32) }
}

/// The one's-complement sum of `value` (a whole number of 32-bit words) in the kernel's
/// little-endian word order, added to `seed` (see `proxy_common::checksum::le_seed`).
#[inline(always)]
pub fn csum_of<T>(value: &T, seed: u32) -> Result<u32, i64> {
    // SAFETY: `value` is a live value of the size passed; the helper only reads it, and a
    // null "from" buffer of size 0 is the documented way to sum one buffer.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            core::ptr::from_ref::<T>(value) as *mut u32,
            size_of::<T>() as u32,
            seed,
        )
    };
    if sum < 0 { Err(sum) } else { Ok(sum as u32) }
}

/// Reads the ports, then (TCP only) the flags, in one load.
#[inline(always)]
fn ports<C: Frame>(ctx: &C, l4: usize, protocol: u8) -> Result<(u16, u16, u8), i64> {
    if protocol == proto::TCP {
        let tcp: [u8; TCP_FLAGS + 1] = ctx.read(l4)?;
        Ok((
            u16::from_be_bytes([tcp[0], tcp[1]]),
            u16::from_be_bytes([tcp[2], tcp[3]]),
            tcp[TCP_FLAGS],
        ))
    } else {
        let udp: [u8; 4] = ctx.read(l4)?;
        Ok((
            u16::from_be_bytes([udp[0], udp[1]]),
            u16::from_be_bytes([udp[2], udp[3]]),
            0,
        ))
    }
}

#[inline(always)]
fn is_ours(protocol: u8) -> bool {
    protocol == proto::TCP || protocol == proto::UDP
}

// Offsets in the IPv4 header.
const IP_FRAG: usize = 6;
const IP_PROTO: usize = 9;
const IP_CSUM: usize = 10;
const IP_SADDR: usize = 12;
/// Fragment offset bits of the IPv4 flags/offset field.
const IP_OFFSET_MASK: u16 = 0x1fff;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

impl TcFamily for V4 {
    const ETHER_TYPE: u16 = ETH_P_IP;
    const ADDR_BITS: u8 = 32;
    const AFFINITY_CLIENT: u8 = affinity_client::IPV4;
    const SADDR: usize = IP_SADDR;
    const DADDR: usize = IP_SADDR + 4;
    const PSEUDO_FLAGS: u64 = BPF_F_PSEUDO_HDR as u64;

    #[inline(always)]
    fn parse<C: Frame>(ctx: &C, link: Link, head: &Head, out: &mut Packet<AddrV4>) -> Result<Parsed, i64> {
        let ip = &head.ip;
        let version_ihl = ip[0];
        let ihl = usize::from(version_ihl & 0x0f) * 4;
        let protocol = ip[IP_PROTO];
        if version_ihl >> 4 != 4 || ihl < IP_HLEN || !is_ours(protocol) {
            return Ok(Parsed::Other);
        }
        if u16::from_be_bytes([ip[IP_FRAG], ip[IP_FRAG + 1]]) & IP_OFFSET_MASK != 0 {
            return Ok(Parsed::Fragment);
        }
        let l4 = link.l3() + ihl;
        (out.sport, out.dport, out.tcp_flags) = ports(ctx, l4, protocol)?;
        let addr = |at: usize| [ip[at], ip[at + 1], ip[at + 2], ip[at + 3]];
        out.saddr = addr(IP_SADDR);
        out.daddr = addr(IP_SADDR + 4);
        out.proto = protocol;
        out.l3 = link.l3() as u8;
        out.l4 = l4;
        Ok(Parsed::Packet)
    }

    #[inline(always)]
    fn client_id(addr: &AddrV4) -> [u32; 4] {
        [u32::from_ne_bytes(*addr), 0, 0, 0]
    }

    #[inline(always)]
    fn snat_address(config: &NodeConfig) -> AddrV4 {
        config.snat_v4
    }

    #[inline(always)]
    fn fix_ip_checksum<C: Frame>(ctx: &C, packet: &Packet<AddrV4>, diff: u32) -> Result<(), i64> {
        ctx.ip_csum_add(packet.ip(IP_CSUM), diff)
    }

    #[inline(always)]
    fn route_params(params: &mut FibParams, to: &CtValue<AddrV4>) {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(to.saddr);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(to.daddr);
    }

    #[inline(always)]
    fn refuse(ctx: &TcContext, packet: &Packet<AddrV4>) -> i32 {
        reject::refuse_v4(ctx, packet)
    }
}

const IP6_HLEN: usize = 40;
// Offsets in the IPv6 header.
const IP6_NEXT: usize = 6;
const IP6_SADDR: usize = 8;
const IP6_HOP_BY_HOP: u8 = 0;
const IP6_ROUTING: u8 = 43;
const IP6_FRAGMENT: u8 = 44;
const IP6_DEST_OPTS: u8 = 60;
/// Extension headers skipped before giving up on finding TCP/UDP (bounds the loop).
const IP6_MAX_EXT: usize = 4;
/// `l4_csum_replace`: the change is to an IPv6 pseudo-header, so skb->csum of a
/// CHECKSUM_COMPLETE packet must stay (the address bytes and the L4 checksum change cancel).
/// Linux 6.16+; older kernels refuse the flag and get a retry without it.
const BPF_F_IPV6: u64 = 1 << 7;

impl TcFamily for V6 {
    const ETHER_TYPE: u16 = ETH_P_IPV6;
    const ADDR_BITS: u8 = 128;
    const AFFINITY_CLIENT: u8 = affinity_client::IPV6;
    const SADDR: usize = IP6_SADDR;
    const DADDR: usize = IP6_SADDR + 16;
    const PSEUDO_FLAGS: u64 = BPF_F_PSEUDO_HDR as u64 | BPF_F_IPV6;

    #[inline(always)]
    fn parse<C: Frame>(ctx: &C, link: Link, head: &Head, out: &mut Packet<AddrV6>) -> Result<Parsed, i64> {
        // Version and traffic class, flow label, payload length, next header, hop limit: all
        // within the head already read.
        let fixed = &head.ip;
        if fixed[0] >> 4 != 6 {
            return Ok(Parsed::Other);
        }
        let l3 = link.l3();
        let mut next = fixed[IP6_NEXT];
        let mut l4 = l3 + IP6_HLEN;
        for _ in 0..IP6_MAX_EXT {
            match next {
                IP6_HOP_BY_HOP | IP6_ROUTING | IP6_DEST_OPTS => {
                    let ext: [u8; 2] = ctx.read(l4)?;
                    next = ext[0];
                    l4 += (usize::from(ext[1]) + 1) * 8;
                }
                IP6_FRAGMENT => return Ok(Parsed::Fragment),
                _ => break,
            }
        }
        if !is_ours(next) {
            return Ok(Parsed::Other);
        }
        (out.sport, out.dport, out.tcp_flags) = ports(ctx, l4, next)?;
        ctx.load_into(l3 + IP6_SADDR, &mut out.saddr)?;
        ctx.load_into(l3 + IP6_SADDR + 16, &mut out.daddr)?;
        out.proto = next;
        out.l3 = l3 as u8;
        out.l4 = l4;
        Ok(Parsed::Packet)
    }

    #[inline(always)]
    fn client_id(addr: &AddrV6) -> [u32; 4] {
        words(addr)
    }

    #[inline(always)]
    fn snat_address(config: &NodeConfig) -> AddrV6 {
        config.snat_v6
    }

    #[inline(always)]
    fn fix_ip_checksum<C: Frame>(_ctx: &C, _packet: &Packet<AddrV6>, _diff: u32) -> Result<(), i64> {
        Ok(())
    }

    #[inline(always)]
    fn route_params(params: &mut FibParams, to: &CtValue<AddrV6>) {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = words(&to.saddr);
        params.__bindgen_anon_4.ipv6_dst = words(&to.daddr);
    }

    #[inline(always)]
    fn refuse(ctx: &TcContext, packet: &Packet<AddrV6>) -> i32 {
        reject::refuse_v6(ctx, packet)
    }
}

/// An IPv6 address as the four network-order words the kernel's structures hold.
#[inline(always)]
fn words(addr: &AddrV6) -> [u32; 4] {
    // SAFETY: [u8; 16] and [u32; 4] have the same size and every bit pattern is valid.
    unsafe { core::mem::transmute::<AddrV6, [u32; 4]>(*addr) }
}
