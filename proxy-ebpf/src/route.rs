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
    tc::rewrite,
};

/// What became of a packet to forward.
pub enum Forwarded {
    /// Rewritten and sent (or dropped): the hook's verdict.
    Done(i32),
    /// Left untouched: this hook cannot send it where it goes (XDP: a next hop not resolved
    /// yet, a device that takes no frames from XDP, no route); the tc program will.
    Untouched,
}

/// Rewrites `packet` as `to` says and sends it towards `to.daddr`; drops it when no route
/// leads there. The route is looked up before anything is written, so that a hook that cannot
/// send it leaves the packet as it came for the next one. Not inlined: the route lookup's
/// parameter block gets a stack frame of its own.
#[inline(never)]
pub fn forward<C: Frame, F: TcFamily>(ctx: &C, packet: &Packet<F::Addr>, to: &CtValue<F::Addr>) -> Forwarded {
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
    let resolved = found == i64::from(BPF_FIB_LKUP_RET_SUCCESS);
    let routed = resolved || found == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH);
    if !(routed && ctx.can_send(params.ifindex, resolved)) {
        return if C::BEFORE_TC {
            Forwarded::Untouched
        } else {
            Forwarded::Done(C::DROP)
        };
    }
    if rewrite::<C, F>(ctx, packet, to).is_err() {
        return Forwarded::Done(C::DROP);
    }
    Forwarded::Done(ctx.send::<F>(packet, &params, resolved))
}

/// tc: sends the rewritten skb out of the route's device, to the next hop the lookup found
/// (`resolved`) or to one the kernel resolves.
#[inline(always)]
pub fn redirect_skb<F: TcFamily>(ctx: &TcContext, packet: &Packet<F::Addr>, route: &FibParams, resolved: bool) -> i32 {
    // A packet from a device without a link-layer header gets an Ethernet one: the device it
    // leaves by may need it, and one that does not strips it again (as Cilium's add_l2_hdr).
    if !packet.has_ethernet() && add_ethernet::<F>(ctx).is_err() {
        return TC_ACT_SHOT;
    }
    if resolved {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&route.dmac);
        macs[6..].copy_from_slice(&route.smac);
        if ctx.store(0, &macs, 0).is_err() {
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
