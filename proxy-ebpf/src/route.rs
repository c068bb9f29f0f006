//! Sending a packet translated at tc ingress straight out of the device its new destination
//! routes through. Needed whenever the new source is one of the node's own addresses (a
//! SNATed flow, or a reply now coming from a NodePort): the stack would drop such a packet on
//! input as a martian, so it must not see it on the way in (Cilium forwards these the same way).

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_SHOT, bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use proxy_common::maps::CtValue;

use crate::packet::{ETH_HLEN, TcFamily};

/// Redirects the (already rewritten) packet towards `to.daddr`; drops it when no route leads
/// there. Not inlined: the route lookup's parameter block gets a stack frame of its own.
#[inline(never)]
pub fn forward<F: TcFamily>(ctx: &TcContext, to: &CtValue<F::Addr>, protocol: u8) -> i32 {
    // SAFETY: bpf_fib_lookup is a C struct of integers and byte arrays: all zeroes is valid.
    let mut params: FibParams = unsafe { zeroed() };
    F::route_params(&mut params, to);
    params.l4_protocol = protocol;
    params.sport = to.sport.to_be();
    params.dport = to.dport.to_be();
    params.__bindgen_anon_1.tot_len = ctx.len().saturating_sub(ETH_HLEN as u32) as u16;
    // SAFETY: the skb pointer is this program's context; ifindex is a readable field.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: `params` is a valid, initialised struct of the size passed, owned by this frame.
    let found = unsafe { bpf_fib_lookup(ctx.as_ptr(), &mut params, size_of::<FibParams>() as i32, 0) };
    if found == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&params.dmac);
        macs[6..].copy_from_slice(&params.smac);
        if ctx.store(0, &macs, 0).is_err() {
            return TC_ACT_SHOT;
        }
        // SAFETY: bpf_redirect only records the target device; the kernel acts on return.
        unsafe { bpf_redirect(params.ifindex, 0) as i32 }
    } else if found == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        // SAFETY: a null parameter block asks the kernel to resolve the next hop itself.
        unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
    } else {
        TC_ACT_SHOT
    }
}
