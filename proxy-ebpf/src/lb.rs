//! Frontend lookup and backend choice, shared by every hook (as Cilium's lb.h serves both its
//! socket and tc paths).

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use proxy_common::{
    counters::Counter,
    maglev,
    maps::{AffinityKey, AffinityValue, Backend, ServiceKey, ServiceValue, svc_flags},
    select,
};

use crate::{AFFINITY, MAGLEV_16K, MAGLEV_64K, MAGLEV_128K, MaglevTables, counters::bump, family::Family};

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// Why a frontend could not be served.
#[derive(Clone, Copy)]
pub enum Reason {
    /// The frontend exists but has no usable endpoint (kube-proxy REJECT).
    NoBackend,
    /// A slot or backend entry the frontend points at is missing.
    BackendMissing,
}

/// The chosen backend and the frontend's reverse-NAT id.
#[derive(Default)]
pub struct Selected<A> {
    pub backend: Backend<A>,
    pub backend_id: u32,
    pub rev_nat_id: u32,
}

/// Where a backend is drawn from when no affinity entry decides.
#[derive(Clone, Copy)]
pub enum Draw {
    /// A fresh random number: each connection or flow is balanced on its own.
    Random,
    /// A hash of this socket's cookie: every datagram of one unconnected UDP socket reaches
    /// the same backend while the frontend's backends stay the same, as kube-proxy's
    /// conntrack keeps one 5-tuple on one backend (Cilium's sock_select_slot does the same).
    Socket(u64),
    /// The frontend's Maglev table, at this hash of the flow (or of the client's address,
    /// which is how a Maglev frontend keeps ClientIP affinity: on every node, with no state).
    /// Falls back to a random draw when the table is missing or names a backend that is gone.
    Maglev { hash: u32, table_size: u32 },
}

/// Who a client is for ClientIP affinity: an `AffinityKey` without its frontend.
pub struct Client {
    pub id: [u32; 4],
    pub kind: u8,
}

/// A backend as found through one slot of a frontend.
struct Choice<A> {
    slot: u16,
    backend_id: u32,
    backend: Backend<A>,
}

/// Copies a map value out at once, so that a concurrent update by the agent is seen as its
/// old or its new value and nothing holds the pointer afterwards.
///
/// # Safety
/// `map_get` must be the result of a map lookup (`get_ptr`) made in this run of the program:
/// such a pointer stays valid until the run ends (RCU).
#[inline(always)]
pub unsafe fn copy_of<V: Copy>(map_get: Option<*const V>) -> Option<V> {
    // SAFETY: a live map value (caller).
    map_get.map(|ptr| unsafe { *ptr })
}

/// Looks `key` (a slot-0 frontend key) up and picks one of its backends: the client's previous
/// one under ClientIP affinity, else one drawn as `draw` says. `client` names the client for
/// affinity and is only called when the frontend has it. `Ok(None)` means the address is not
/// a frontend and must be left alone.
#[inline(always)]
pub fn select<F: Family>(
    key: &ServiceKey<F::Addr>,
    client: impl FnOnce() -> Client,
    draw: Draw,
) -> Result<Option<Selected<F::Addr>>, Reason> {
    // SAFETY: the pointer comes from this lookup.
    let Some(frontend) = (unsafe { copy_of(F::services().get_ptr(key)) }) else {
        return Ok(None);
    };
    choose::<F>(key, &frontend, client, draw).map(Some)
}

/// Picks a backend of the frontend entry `frontend`, found at `key`.
#[inline(always)]
pub fn choose<F: Family>(
    key: &ServiceKey<F::Addr>,
    frontend: &ServiceValue,
    client: impl FnOnce() -> Client,
    draw: Draw,
) -> Result<Selected<F::Addr>, Reason> {
    if frontend.count == 0 {
        return Err(Reason::NoBackend);
    }
    let choice = match draw {
        Draw::Maglev { hash, table_size } => match in_table::<F>(frontend, hash, table_size) {
            Some(choice) => choice,
            None => {
                bump(Counter::TcMaglevMiss);
                drawn::<F>(key, frontend, Draw::Random)?
            }
        },
        _ if frontend.flags & svc_flags::AFFINITY != 0 => affine::<F>(key, frontend, client(), draw)?,
        _ => drawn::<F>(key, frontend, draw)?,
    };
    Ok(Selected {
        backend: choice.backend,
        backend_id: choice.backend_id,
        rev_nat_id: frontend.rev_nat_id,
    })
}

#[inline(always)]
fn drawn<F: Family>(
    key: &ServiceKey<F::Addr>,
    frontend: &ServiceValue,
    draw: Draw,
) -> Result<Choice<F::Addr>, Reason> {
    let value = match draw {
        // SAFETY: bpf_get_prandom_u32 takes no arguments and has no preconditions.
        Draw::Random | Draw::Maglev { .. } => unsafe { bpf_get_prandom_u32() },
        Draw::Socket(cookie) => select::by_socket(cookie, frontend.rev_nat_id),
    };
    through_slot::<F>(key, select::slot(value, frontend.count))
}

#[inline(always)]
fn through_slot<F: Family>(key: &ServiceKey<F::Addr>, slot: u16) -> Result<Choice<F::Addr>, Reason> {
    // SAFETY: each pointer comes from the lookup beside it.
    let entry =
        unsafe { copy_of(F::services().get_ptr(key.with_slot(slot))) }.ok_or(Reason::BackendMissing)?;
    let backend =
        unsafe { copy_of(F::backends().get_ptr(entry.backend_id)) }.ok_or(Reason::BackendMissing)?;
    Ok(Choice {
        slot,
        backend_id: entry.backend_id,
        backend,
    })
}

/// The backend the frontend's Maglev table holds for `hash`, in the map of `table_size`.
#[inline(always)]
fn in_table<F: Family>(frontend: &ServiceValue, hash: u32, table_size: u32) -> Option<Choice<F::Addr>> {
    let id = frontend.rev_nat_id;
    let backend_id = match table_size {
        16_381 => table_entry(&MAGLEV_16K, id, hash),
        65_521 => table_entry(&MAGLEV_64K, id, hash),
        131_071 => table_entry(&MAGLEV_128K, id, hash),
        _ => None,
    }?;
    // SAFETY: the pointer comes from this lookup.
    let backend = unsafe { copy_of(F::backends().get_ptr(backend_id)) }?;
    Some(Choice {
        // Not a slot: a Maglev frontend never keeps an affinity entry that would need one.
        slot: 0,
        backend_id,
        backend,
    })
}

#[inline(always)]
fn table_entry<const SIZE: usize>(tables: &MaglevTables<SIZE>, rev_nat_id: u32, hash: u32) -> Option<u32> {
    // SAFETY: the inner map's one entry is the whole table, valid for this program run (RCU);
    // it is read once, here.
    let table = unsafe { tables.get_value(&rev_nat_id, &0) }?;
    let index = maglev::index(hash, SIZE as u32);
    // Read back through the stack so the bounds check below stays a check of the index: LLVM
    // otherwise folds index and scaling into `(hash * SIZE >> 30) & !3`, whose upper bound the
    // verifier does not narrow by the cleared low bits, and rejects the access as up to 3
    // bytes past the table.
    // SAFETY: a read of a local that is live and initialised.
    let index = unsafe { core::ptr::read_volatile(&raw const index) };
    table.get(index as usize).copied()
}

/// ClientIP affinity: reuse the client's backend while it is recent and still in the same slot
/// of this frontend, otherwise pick afresh; either way refresh the entry, so the timeout runs
/// from the last connection as with kube-proxy's `recent --rcheck --seconds --reap`.
#[inline(always)]
fn affine<F: Family>(
    key: &ServiceKey<F::Addr>,
    frontend: &ServiceValue,
    client: Client,
    draw: Draw,
) -> Result<Choice<F::Addr>, Reason> {
    // SAFETY: bpf_ktime_get_ns takes no arguments and has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let affinity_key = AffinityKey::new(client.id, client.kind, frontend.rev_nat_id);
    let timeout = u64::from(frontend.affinity_timeout_s) * NANOS_PER_SECOND;
    // SAFETY: the pointer comes from this lookup.
    let previous = unsafe { copy_of(AFFINITY.get_ptr(affinity_key)) }
        .filter(|p| now.saturating_sub(p.last_used_ns) <= timeout)
        .filter(|p| p.slot >= 1 && u32::from(p.slot) <= frontend.count)
        .and_then(|p| {
            through_slot::<F>(key, p.slot)
                .ok()
                .filter(|c| c.backend_id == p.backend_id)
        });
    let choice = match previous {
        Some(choice) => {
            bump(Counter::AffinityHit);
            choice
        }
        None => drawn::<F>(key, frontend, draw)?,
    };
    let value = AffinityValue {
        last_used_ns: now,
        backend_id: choice.backend_id,
        slot: choice.slot,
        _pad: 0,
    };
    if AFFINITY.insert(affinity_key, value, 0).is_err() {
        bump(Counter::AffinityUpdateFailed);
    }
    Ok(choice)
}
