//! Applies a [`Plan`] to the pinned maps, phase by phase, IPv4 then IPv6.

use aya::{
    Pod,
    maps::{HashMap, MapData, MapError},
};
use proxy_common::maps::{
    Backend, RevNat, ServiceKey, ServiceLabel, ServiceValue, backend_flags, scope, svc_flags,
};

use crate::{
    datapath::maps::{FamilyAddr, FamilyMaps, PinnedMaps},
    model::{BackendState, FrontendKey},
    plan::{Label, Plan},
    proxier::PlanSink,
};

/// One map operation that failed; the rest of the plan is still applied.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct WriteError {
    pub what: String,
    pub source: MapError,
}

pub struct Writer {
    maps: PinnedMaps,
}

impl Writer {
    pub fn new(maps: PinnedMaps) -> Self {
        Self { maps }
    }

    pub fn maps(&self) -> &PinnedMaps {
        &self.maps
    }

    pub fn apply(&mut self, plan: &Plan) -> Vec<WriteError> {
        let mut errors = Vec::new();
        let PinnedMaps { v4, v6, labels, .. } = &mut self.maps;
        apply_family(v4, labels, plan, &mut errors);
        apply_family(v6, labels, plan, &mut errors);
        errors
    }
}

impl PlanSink for Writer {
    fn apply(&mut self, plan: &Plan) -> Vec<String> {
        Writer::apply(self, plan).into_iter().map(|e| e.to_string()).collect()
    }
}

pub(crate) fn frontend_key<A: FamilyAddr>(frontend: &FrontendKey, slot: u16) -> Option<ServiceKey<A>>
where
    ServiceKey<A>: Pod,
    Backend<A>: Pod,
    RevNat<A>: Pod,
{
    let addr = A::from_ip(frontend.addr)?;
    Some(
        ServiceKey::frontend(addr, frontend.port, frontend.protocol.number(), scope::EXTERNAL)
            .with_slot(slot),
    )
}

fn backend_flags_of(state: BackendState) -> u8 {
    let mut flags = 0;
    if state.terminating {
        flags |= backend_flags::TERMINATING;
    }
    if state.local {
        flags |= backend_flags::LOCAL;
    }
    flags
}

fn copy_padded<const N: usize>(text: &str) -> [u8; N] {
    let mut out = [0u8; N];
    // Truncate on a char boundary so tools always read valid UTF-8.
    let mut end = text.len().min(N);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&text.as_bytes()[..end]);
    out
}

fn service_label(label: &Label) -> ServiceLabel {
    ServiceLabel {
        service: copy_padded(&label.service),
        port: copy_padded(&label.port),
    }
}

fn record(errors: &mut Vec<WriteError>, what: impl FnOnce() -> String, result: Result<(), MapError>) {
    match result {
        Ok(()) => {}
        // Deleting what is already gone is the desired end state.
        Err(MapError::KeyNotFound) => {}
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
        Err(source) => errors.push(WriteError { what: what(), source }),
    }
}

fn apply_family<A: FamilyAddr>(
    maps: &mut FamilyMaps<A>,
    labels: &mut HashMap<MapData, u32, ServiceLabel>,
    plan: &Plan,
    errors: &mut Vec<WriteError>,
) where
    ServiceKey<A>: Pod,
    Backend<A>: Pod,
    RevNat<A>: Pod,
{
    for (id, key, state) in &plan.upsert_backends {
        let Some(addr) = A::from_ip(key.addr) else {
            continue;
        };
        let value = Backend {
            addr,
            port: key.port,
            proto: key.protocol.number(),
            flags: backend_flags_of(*state),
        };
        record(
            errors,
            || format!("backend {id} ({key})"),
            maps.backends.insert(id, value, 0),
        );
    }
    for write in &plan.upsert_rev_nats {
        let Some(addr) = A::from_ip(write.frontend.addr) else {
            continue;
        };
        let value = RevNat {
            addr,
            port: write.frontend.port,
            _pad: 0,
        };
        let what = || format!("rev-NAT {} ({})", write.id, write.frontend);
        record(errors, what, maps.rev_nat.insert(write.id, value, 0));
        record(
            errors,
            what,
            labels.insert(write.id, service_label(&write.label), 0),
        );
    }
    for write in &plan.upsert_slots {
        let Some(key) = frontend_key::<A>(&write.frontend, write.slot) else {
            continue;
        };
        let value = ServiceValue {
            backend_id: write.backend_id,
            rev_nat_id: write.rev_nat_id,
            ..Default::default()
        };
        let what = || format!("frontend {} slot {}", write.frontend, write.slot);
        record(errors, what, maps.services.insert(key, value, 0));
    }
    for write in &plan.upsert_frontends {
        let Some(key) = frontend_key::<A>(&write.frontend, 0) else {
            continue;
        };
        let value = ServiceValue {
            count: u32::from(write.count),
            rev_nat_id: write.rev_nat_id,
            flags: if write.affinity_timeout.is_some() {
                svc_flags::AFFINITY
            } else {
                0
            },
            affinity_timeout_s: write.affinity_timeout.unwrap_or(0),
            ..Default::default()
        };
        record(
            errors,
            || format!("frontend {}", write.frontend),
            maps.services.insert(key, value, 0),
        );
    }
    for frontend in &plan.delete_frontends {
        let Some(key) = frontend_key::<A>(frontend, 0) else {
            continue;
        };
        record(
            errors,
            || format!("delete frontend {frontend}"),
            maps.services.remove(&key),
        );
    }
    for (frontend, slot) in &plan.delete_slots {
        let Some(key) = frontend_key::<A>(frontend, *slot) else {
            continue;
        };
        record(
            errors,
            || format!("delete frontend {frontend} slot {slot}"),
            maps.services.remove(&key),
        );
    }
    for (id, frontend) in &plan.delete_rev_nats {
        if A::from_ip(frontend.addr).is_none() {
            continue;
        }
        let what = || format!("delete rev-NAT {id} ({frontend})");
        record(errors, what, maps.rev_nat.remove(id));
        record(errors, what, labels.remove(id));
    }
    for (id, key) in &plan.delete_backends {
        if A::from_ip(key.addr).is_none() {
            continue;
        }
        record(
            errors,
            || format!("delete backend {id} ({key})"),
            maps.backends.remove(id),
        );
    }
}
