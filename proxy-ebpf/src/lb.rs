//! Frontend lookup and backend choice, shared by every hook (as Cilium's lb.h serves both its
//! socket and tc paths).

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{
    maps::{Backend, ServiceKey},
    select,
};

use crate::family::Family;

/// Why a frontend could not be served.
#[derive(Clone, Copy)]
pub enum Reason {
    /// The frontend exists but has no usable endpoint (kube-proxy REJECT).
    NoBackend,
    /// A slot or backend entry the frontend points at is missing.
    BackendMissing,
}

/// The chosen backend and the frontend's reverse-NAT id.
pub struct Selected<A> {
    pub backend: Backend<A>,
    pub rev_nat_id: u32,
}

#[inline(always)]
pub fn copy_of<V: Copy>(map_get: Option<*const V>) -> Option<V> {
    // SAFETY: the pointer comes from a successful map lookup and stays valid for the rest of
    // this program run (RCU); the value is copied at once so a concurrent update by the agent
    // can at worst be seen as its old or new value, never dangle.
    map_get.map(|ptr| unsafe { *ptr })
}

/// Looks `key` (a slot-0 frontend key) up and picks one of its backends at random.
/// `Ok(None)` means the address is not a frontend and must be left alone.
#[inline(always)]
pub fn select<F: Family>(key: &ServiceKey<F::Addr>) -> Result<Option<Selected<F::Addr>>, Reason> {
    let Some(frontend) = copy_of(F::services().get_ptr(key)) else {
        return Ok(None);
    };
    if frontend.count == 0 {
        return Err(Reason::NoBackend);
    }
    // SAFETY: bpf_get_prandom_u32 takes no arguments and has no preconditions.
    let entropy = unsafe { bpf_get_prandom_u32() };
    let slot_key = key.with_slot(select::slot(entropy, frontend.count));
    let slot = copy_of(F::services().get_ptr(slot_key)).ok_or(Reason::BackendMissing)?;
    let backend = copy_of(F::backends().get_ptr(slot.backend_id)).ok_or(Reason::BackendMissing)?;
    Ok(Some(Selected {
        backend,
        rev_nat_id: frontend.rev_nat_id,
    }))
}
