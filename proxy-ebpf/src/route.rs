//! Sending a packet translated at tc ingress or XDP straight out of the device its new
//! destination routes through. Needed whenever the new source is one of the node's own addresses (a
//! SNATed flow, or a reply now coming from a NodePort): the stack would drop such a packet on
//! input as a martian, so it must not see it on the way in (Cilium forwards these the same way).

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_SHOT,
        bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_head},
    programs::TcContext,
};
use proxy_common::maps::CtValue;

use crate::{
    frame::Frame,
    packet::{ETH_HLEN, Packet, TcFamily},
};

/// Where the route lookup sends a packet: out of `ifindex`, to the next hop and from the
/// device whose MACs `macs` holds (destination then source, as the Ethernet header does) when
/// `resolved`. Small, so the caller keeps it while the lookup's parameter block is gone.
#[derive(Default)]
pub struct Route {
    pub macs: [u8; 12],
    pub ifindex: u32,
    pub resolved: bool,
}

/// Looks up the route towards `to.daddr` (the packet as `to` will make it) into `route`;
/// false when there is none or this hook cannot send the packet there itself (tc then drops
/// it; XDP leaves it untouched for tc). Asked before the packet is rewritten, so that XDP can
/// still pass it on as it came. Not inlined: the lookup's parameter block gets a stack frame
/// of its own.
#[inline(never)]
pub fn lookup<C: Frame, F: TcFamily>(
    ctx: &C,
    packet: &Packet<F::Addr>,
    to: &CtValue<F::Addr>,
    route: &mut Route,
) -> bool {
    // SAFETY: bpf_fib_lookup is a C struct of integers and byte arrays: all zeroes is valid.
    let mut params: FibParams = unsafe { zeroed() };
    F::route_params(&mut params, to);
    params.l4_protocol = packet.proto;
    params.sport = to.sport.to_be();
    params.dport = to.dport.to_be();
    params.__bindgen_anon_1.tot_len = ctx.len().saturating_sub(u32::from(packet.l3)) as u16;
    params.ifindex = ctx.ifindex();
    // SAFETY: `params` is a valid, initialised struct of the size passed, owned by this frame.
    let found = unsafe { bpf_fib_lookup(ctx.as_ptr(), &raw mut params, size_of::<FibParams>() as i32, 0) };
    route.resolved = found == i64::from(BPF_FIB_LKUP_RET_SUCCESS);
    route.ifindex = params.ifindex;
    route.macs[..6].copy_from_slice(&params.dmac);
    route.macs[6..].copy_from_slice(&params.smac);
    (route.resolved || found == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH))
        && ctx.can_send(route.ifindex, route.resolved)
}

/// tc: sends the rewritten skb out of the route's device, to the next hop the lookup found
/// (`resolved`) or to one the kernel resolves.
#[inline(always)]
pub fn redirect_skb<F: TcFamily>(ctx: &TcContext, packet: &Packet<F::Addr>, route: &Route) -> i32 {
    // A packet from a device without a link-layer header gets an Ethernet one: the device it
    // leaves by may need it, and one that does not strips it again (as Cilium's add_l2_hdr).
    if !packet.has_ethernet() && add_ethernet::<F>(ctx).is_err() {
        return TC_ACT_SHOT;
    }
    if route.resolved {
        if ctx.store(0, &route.macs, 0).is_err() {
            return TC_ACT_SHOT;
        }
        // SAFETY: bpf_redirect only records the target device; the kernel acts on return.
        unsafe { bpf_redirect(route.ifindex, 0) as i32 }
    } else {
        // SAFETY: a null parameter block asks the kernel to resolve the next hop itself.
        unsafe { bpf_redirect_neigh(route.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
    }
}
/// Makes room for an Ethernet header in front of the packet and fills in its EtherType (the
/// addresses stay zero until the route lookup's are written).
#[inline(always)]
fn add_ethernet<F: TcFamily>(ctx: &TcContext) -> Result<(), i64> {
    // `.cast::<__sk_buff>()` made forward() 18 BPF instructions longer than this `as` does.
    #[expect(clippy::ptr_as_ptr, reason = "the `as` cast compiles to shorter BPF here")]
    // SAFETY: the context is this program's own skb; the helper only grows its headroom.
    let grown = unsafe { bpf_skb_change_head(ctx.as_ptr() as *mut __sk_buff, ETH_HLEN as u32, 0) };
    if grown != 0 {
        return Err(grown);
    }
    ctx.store(ETH_HLEN - 2, &F::ETHER_TYPE.to_be_bytes(), 0)
}
