//! The two hooks external traffic is translated at, behind one trait: tc (an skb, with the
//! kernel's load/store and checksum helpers) and XDP (the driver's frame, before any skb
//! exists). `tc.rs`, `packet.rs` and `route.rs` are written once over it, so both hooks share
//! one frontend lookup, one backend choice, one conntrack and one rewrite, as Cilium's
//! bpf_xdp.c and bpf_lxc.c share lb.h and nat.h.

use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_MARK_MANGLED_0, TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::{bpf_skb_load_bytes, bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    programs::{TcContext, XdpContext},
};
use proxy_common::{checksum, counters::Counter};

use crate::{
    XDP_DEVICES,
    counters::bump,
    packet::{Packet, TcFamily},
    route::{self, Route},
};

/// Calls the packet-bytes helper `$helper` (context, offset, buffer, size) with `$value`, a
/// pointer to a live, plain-data `T` whose bytes are the buffer (written by a load: any bytes
/// are a valid `T`; read by a store).
macro_rules! bytes_helper {
    ($helper:ident, $ctx:expr, $offset:expr, $value:expr) => {{
        let value = $value;
        // SAFETY: the caller passes a pointer to a live value of exactly the size given.
        let done = unsafe {
            $helper(
                $ctx,
                $offset as u32,
                value.cast::<c_void>(),
                size_of_val(&*value) as u32,
            )
        };
        if done == 0 { Ok(()) } else { Err(done) }
    }};
}

/// What a translating hook does with packet bytes, and how it ends.
pub trait Frame: EbpfContext {
    /// Hands the packet on as it is: to the stack at tc; at XDP to the stack, where the tc
    /// program on the same device sees it next.
    const PASS: i32;
    const DROP: i32;
    /// Whether a packet this hook passes untranslated meets the tc program next, which then
    /// finishes (and counts) what this hook left: true for XDP.
    const BEFORE_TC: bool;
    /// Counted for the first packet of a flow and for later ones, when translated here.
    const NEW_FLOW: Counter;
    const TRACKED: Counter;

    /// Reads `size_of::<T>()` packet bytes at `offset` straight into `dst`.
    fn load_into<T>(&self, offset: usize, dst: &mut T) -> Result<(), i64>;

    /// Reads a `T` (made of byte arrays or integers) at `offset`.
    #[inline(always)]
    fn read<T>(&self, offset: usize) -> Result<T, i64> {
        let mut value = MaybeUninit::<T>::uninit();
        self.load_into(offset, &mut value)?;
        // SAFETY: every byte was written by the load, and T is plain data.
        Ok(unsafe { value.assume_init() })
    }

    fn write<T>(&self, offset: usize, value: &T) -> Result<(), i64>;

    /// Adds `diff` (from `csum_diff`) to the IPv4 header checksum at `offset`.
    fn ip_csum_add(&self, offset: usize, diff: u32) -> Result<(), i64>;

    /// Updates the L4 checksum at `offset` as `bpf_l4_csum_replace(offset, from, to, flags)`
    /// does (`flags`: the size of `from`/`to`, 0 for a `csum_diff` in `to`, plus pseudo-header
    /// and mangled-zero flags).
    fn l4_csum_replace(&self, offset: usize, from: u64, to: u64, flags: u64) -> Result<(), i64>;

    /// Packet length and arriving device, for the route lookup.
    fn len(&self) -> u32;
    fn ifindex(&self) -> u32;

    /// Whether this hook can itself send a packet routed out of `ifindex` (`resolved`: the
    /// lookup knew the next hop's MAC). When not, the packet is passed on untouched.
    fn can_send(&self, ifindex: u32, resolved: bool) -> bool;

    /// Sends the rewritten packet out as the route lookup found.
    fn send<F: TcFamily>(&self, packet: &Packet<F::Addr>, route: &Route) -> i32;

    /// A packet to a frontend without a usable endpoint.
    fn refuse<F: TcFamily>(&self, packet: &Packet<F::Addr>) -> i32;
}

impl Frame for TcContext {
    const PASS: i32 = TC_ACT_OK;
    const DROP: i32 = TC_ACT_SHOT;
    const BEFORE_TC: bool = false;
    const NEW_FLOW: Counter = Counter::TcNewFlow;
    const TRACKED: Counter = Counter::TcTracked;

    #[inline(always)]
    fn load_into<T>(&self, offset: usize, dst: &mut T) -> Result<(), i64> {
        bytes_helper!(
            bpf_skb_load_bytes,
            self.as_ptr(),
            offset,
            core::ptr::from_mut::<T>(dst)
        )
    }

    #[inline(always)]
    fn write<T>(&self, offset: usize, value: &T) -> Result<(), i64> {
        self.store(offset, value, 0)
    }

    #[inline(always)]
    fn ip_csum_add(&self, offset: usize, diff: u32) -> Result<(), i64> {
        self.l3_csum_replace(offset, 0, u64::from(diff), 0)
    }

    #[inline(always)]
    fn l4_csum_replace(&self, offset: usize, from: u64, to: u64, flags: u64) -> Result<(), i64> {
        TcContext::l4_csum_replace(self, offset, from, to, flags)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the skb pointer is this program's context; ifindex is a readable field.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn can_send(&self, _ifindex: u32, _resolved: bool) -> bool {
        // bpf_redirect_neigh resolves a next hop the lookup did not know.
        true
    }

    #[inline(always)]
    fn send<F: TcFamily>(&self, packet: &Packet<F::Addr>, route: &Route) -> i32 {
        route::redirect_skb::<F>(self, packet, route)
    }

    #[inline(always)]
    fn refuse<F: TcFamily>(&self, packet: &Packet<F::Addr>) -> i32 {
        bump(Counter::TcRejectNoBackend);
        F::refuse(self, packet)
    }
}

impl Frame for XdpContext {
    const PASS: i32 = xdp_action::XDP_PASS as i32;
    const DROP: i32 = xdp_action::XDP_DROP as i32;
    const BEFORE_TC: bool = true;
    const NEW_FLOW: Counter = Counter::XdpNewFlow;
    const TRACKED: Counter = Counter::XdpTracked;

    #[inline(always)]
    fn load_into<T>(&self, offset: usize, dst: &mut T) -> Result<(), i64> {
        bytes_helper!(
            bpf_xdp_load_bytes,
            self.ctx,
            offset,
            core::ptr::from_mut::<T>(dst)
        )
    }

    #[inline(always)]
    fn write<T>(&self, offset: usize, value: &T) -> Result<(), i64> {
        // The helper only reads through the pointer it is given.
        bytes_helper!(
            bpf_xdp_store_bytes,
            self.ctx,
            offset,
            core::ptr::from_ref::<T>(value).cast_mut()
        )
    }

    #[inline(always)]
    fn ip_csum_add(&self, offset: usize, diff: u32) -> Result<(), i64> {
        let field: u16 = self.read(offset)?;
        self.write(offset, &checksum::replace(field, diff))
    }

    #[inline(always)]
    fn l4_csum_replace(&self, offset: usize, from: u64, to: u64, flags: u64) -> Result<(), i64> {
        // A frame has no skb->csum to keep right, so the pseudo-header flags change nothing
        // here; the mangled-zero rule does (an IPv4 UDP checksum of 0 means "none").
        let mangled = flags & u64::from(BPF_F_MARK_MANGLED_0) != 0;
        let field: u16 = self.read(offset)?;
        if mangled && field == 0 {
            return Ok(());
        }
        let diff = if flags & 0xf == 4 {
            checksum::word_diff(from as u32, to as u32)
        } else {
            to as u32
        };
        let mut sum = checksum::replace(field, diff);
        if mangled && sum == 0 {
            sum = 0xffff;
        }
        self.write(offset, &sum)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn can_send(&self, ifindex: u32, resolved: bool) -> bool {
        // Only to a device the agent listed as taking frames from XDP (a driver with
        // ndo_xdp_xmit that it attached natively): anything else, or a next hop the lookup
        // does not know yet, is left to tc, which can resolve and send it.
        resolved && XDP_DEVICES.get(ifindex).is_some()
    }

    #[inline(always)]
    fn send<F: TcFamily>(&self, _packet: &Packet<F::Addr>, route: &Route) -> i32 {
        if self.write(0, &route.macs).is_err() {
            return Self::DROP;
        }
        if route.ifindex == self.ifindex() {
            return xdp_action::XDP_TX as i32;
        }
        match XDP_DEVICES.redirect(route.ifindex, 0) {
            Ok(action) | Err(action) => action as i32,
        }
    }

    #[inline(always)]
    fn refuse<F: TcFamily>(&self, _packet: &Packet<F::Addr>) -> i32 {
        // The answer is built by tc (reject.rs), which resizes the skb; tc counts it too.
        bump(Counter::XdpPass);
        Self::PASS
    }
}
