//! Applies a [`Plan`] to the pinned maps, phase by phase, IPv4 then IPv6.

use aya::{
    Pod,
    maps::{HashMap, LpmTrie, MapData, MapError, lpm_trie::Key},
};
use ipnet::IpNet;
use proxy_common::maps::{
    Backend, RevNat, ServiceKey, ServiceLabel, ServiceValue, SourceRange, backend_flags, svc_flags,
};

use crate::{
    datapath::{
        maglev::MaglevTables,
        maps::{FamilyAddr, FamilyMaps, PinnedMaps},
        reader::read_programmed,
        sys,
    },
    pipeline::model::{BackendKey, BackendState, FrontendKey},
    pipeline::plan::{
        FrontendWrite, Label, Op, Plan, PlanSink, Programmed, ReadBackError, RevNatId, RevNatWrite,
        SlotWrite, WriteFailure,
    },
};

/// One map operation that failed; the rest of the plan is still applied.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}")]
pub struct WriteError {
    pub op: Op,
    pub source: MapError,
}

pub struct Writer {
    maps: PinnedMaps,
}

impl Writer {
    pub fn new(maps: PinnedMaps) -> Self {
        Self { maps }
    }

    pub fn apply(&mut self, plan: &Plan) -> Vec<WriteError> {
        let mut errors = Vec::new();
        let PinnedMaps {
            v4,
            v6,
            labels,
            labels_raw,
            source_ranges_v4,
            source_ranges_v6,
            maglev,
        } = &mut self.maps;
        let mut shared = Shared {
            labels,
            labels_raw,
            maglev,
        };
        let v4_ranges = SourceRangeWrites::new(source_ranges_v4, plan);
        apply_family(v4, &mut shared, plan, v4_ranges, &mut errors);
        let v6_ranges = SourceRangeWrites::new(source_ranges_v6, plan);
        apply_family(v6, &mut shared, plan, v6_ranges, &mut errors);
        errors
    }
}

impl PlanSink for Writer {
    fn apply(&mut self, plan: &Plan) -> Vec<WriteFailure> {
        Writer::apply(self, plan)
            .into_iter()
            .map(|e| WriteFailure {
                reason: e.source.to_string(),
                op: e.op,
            })
            .collect()
    }

    fn read_back(&mut self) -> Result<Programmed, ReadBackError> {
        read_programmed(&self.maps).map_err(|e| ReadBackError(e.to_string()))
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
        ServiceKey::frontend(
            addr,
            frontend.port,
            frontend.protocol.number(),
            frontend.scope.number(),
        )
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

fn record(errors: &mut Vec<WriteError>, op: impl FnOnce() -> Op, result: Result<(), MapError>) {
    match result {
        // Deleting what is already gone is the desired end state.
        Ok(()) | Err(MapError::KeyNotFound) => {}
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
        Err(source) => errors.push(WriteError { op: op(), source }),
    }
}

/// Below this many entries one syscall per entry is as cheap as a batch.
const BATCH_MIN: usize = 8;

/// Writes `entries` (key, value, the plan item it comes from) into `map`: in one batch when
/// there are many, entry by entry otherwise and for whatever a failed batch left unwritten, so
/// a failure is reported against the item that caused it (`describe` names it).
fn upsert_all<K: Pod, V: Pod, T>(
    map: &mut HashMap<MapData, K, V>,
    raw: &MapData,
    entries: Vec<(K, V, &T)>,
    describe: impl Fn(&T) -> Op,
    errors: &mut Vec<WriteError>,
) {
    let mut start = 0;
    if entries.len() >= BATCH_MIN {
        let keys: Vec<K> = entries.iter().map(|e| e.0).collect();
        let values: Vec<V> = entries.iter().map(|e| e.1).collect();
        // SAFETY: `raw` is the pinned map `map` also opens (callers pass the pair
        // `PinnedMaps` opened from one pin), and aya checked K and V against its sizes.
        match unsafe { sys::map_update_batch(raw.fd(), &keys, &values) } {
            Ok(()) => return,
            Err((done, _)) => start = done,
        }
    }
    for (key, value, item) in entries.into_iter().skip(start) {
        record(errors, || describe(item), map.insert(key, value, 0));
    }
}

/// One family's source ranges map and the plan's writes to it (each range goes to the map of
/// its own family, as each frontend's ranges are of the frontend's family).
struct SourceRangeWrites<'a, A> {
    map: &'a mut LpmTrie<MapData, SourceRange<A>, u32>,
    upserts: &'a [(RevNatId, IpNet)],
    deletes: &'a [(RevNatId, IpNet)],
}

impl<'a, A: FamilyAddr> SourceRangeWrites<'a, A>
where
    ServiceKey<A>: Pod,
    Backend<A>: Pod,
    RevNat<A>: Pod,
    SourceRange<A>: Pod,
{
    fn new(map: &'a mut LpmTrie<MapData, SourceRange<A>, u32>, plan: &'a Plan) -> Self {
        Self {
            map,
            upserts: &plan.upsert_source_ranges,
            deletes: &plan.delete_source_ranges,
        }
    }

    fn entries(
        items: &[(RevNatId, IpNet)],
    ) -> impl Iterator<Item = (Key<SourceRange<A>>, RevNatId, IpNet)> + '_ {
        items.iter().filter_map(|(id, net)| {
            let key = Key::new(
                SourceRange::<A>::prefix_len(net.prefix_len()),
                SourceRange::new(*id, A::from_ip(net.network())?),
            );
            Some((key, *id, *net))
        })
    }

    fn upsert(&mut self, errors: &mut Vec<WriteError>) {
        for (key, id, net) in Self::entries(self.upserts) {
            record(
                errors,
                || Op::UpsertSourceRange(id, net),
                self.map.insert(&key, 1, 0),
            );
        }
    }

    fn delete(&mut self, errors: &mut Vec<WriteError>) {
        for (key, id, net) in Self::entries(self.deletes) {
            record(errors, || Op::DeleteSourceRange(id, net), self.map.remove(&key));
        }
    }
}

/// The maps both families write: labels and Maglev tables are keyed by rev-NAT id, which is
/// unique across families.
struct Shared<'a> {
    labels: &'a mut HashMap<MapData, u32, ServiceLabel>,
    labels_raw: &'a MapData,
    maglev: &'a mut MaglevTables,
}

impl Shared<'_> {
    /// The plan's new tables of family `A`'s frontends.
    fn write_tables<A: FamilyAddr>(&mut self, plan: &Plan, errors: &mut Vec<WriteError>)
    where
        ServiceKey<A>: Pod,
        Backend<A>: Pod,
        RevNat<A>: Pod,
    {
        for w in plan
            .upsert_maglev
            .iter()
            .filter(|w| A::from_ip(w.frontend.addr).is_some())
        {
            record(
                errors,
                || Op::UpsertMaglev(w.rev_nat_id, w.frontend),
                self.maglev.write(w.rev_nat_id, &w.backends),
            );
        }
    }

    /// The plan's table deletions for family `A`'s frontends.
    fn delete_tables<A: FamilyAddr>(&mut self, plan: &Plan, errors: &mut Vec<WriteError>)
    where
        ServiceKey<A>: Pod,
        Backend<A>: Pod,
        RevNat<A>: Pod,
    {
        for (id, frontend) in &plan.delete_maglev {
            if A::from_ip(frontend.addr).is_some() {
                record(
                    errors,
                    || Op::DeleteMaglev(*id, *frontend),
                    self.maglev.remove(*id),
                );
            }
        }
    }
}

fn apply_family<A: FamilyAddr>(
    maps: &mut FamilyMaps<A>,
    shared: &mut Shared<'_>,
    plan: &Plan,
    mut ranges: SourceRangeWrites<'_, A>,
    errors: &mut Vec<WriteError>,
) where
    ServiceKey<A>: Pod,
    Backend<A>: Pod,
    RevNat<A>: Pod,
    SourceRange<A>: Pod,
{
    let backends = plan
        .upsert_backends
        .iter()
        .filter_map(|item| {
            let (id, key, state) = item;
            let value = Backend {
                addr: A::from_ip(key.addr)?,
                port: key.port,
                proto: key.protocol.number(),
                flags: backend_flags_of(*state),
            };
            Some((*id, value, item))
        })
        .collect();
    let describe = |(id, key, _): &(u32, BackendKey, BackendState)| Op::UpsertBackend(*id, *key);
    upsert_all(&mut maps.backends, &maps.raw.backends, backends, describe, errors);

    let rev_nats: Vec<_> = plan
        .upsert_rev_nats
        .iter()
        .filter_map(|w| {
            let value = RevNat {
                addr: A::from_ip(w.frontend.addr)?,
                port: w.frontend.port,
                _pad: 0,
            };
            Some((w.id, value, w))
        })
        .collect();
    let service_labels = rev_nats
        .iter()
        .map(|(id, _, w)| (*id, service_label(&w.label), *w))
        .collect();
    let describe = |w: &RevNatWrite| Op::UpsertRevNat(w.id, w.frontend);
    upsert_all(&mut maps.rev_nat, &maps.raw.rev_nat, rev_nats, describe, errors);
    upsert_all(shared.labels, shared.labels_raw, service_labels, describe, errors);

    let slots = plan
        .upsert_slots
        .iter()
        .filter_map(|w| {
            let value = ServiceValue {
                backend_id: w.backend_id,
                rev_nat_id: w.rev_nat_id,
                ..Default::default()
            };
            Some((frontend_key::<A>(&w.frontend, w.slot)?, value, w))
        })
        .collect();
    let describe = |w: &SlotWrite| Op::UpsertSlot(w.frontend, w.slot);
    upsert_all(&mut maps.services, &maps.raw.services, slots, describe, errors);
    ranges.upsert(errors);
    shared.write_tables::<A>(plan, errors);

    // Frontend entries last among the upserts: a count only grows once its slots exist.
    let frontends = plan
        .upsert_frontends
        .iter()
        .filter_map(|w| {
            let value = ServiceValue {
                count: u32::from(w.count),
                rev_nat_id: w.rev_nat_id,
                flags: w.flags
                    | if w.affinity_timeout.is_some() {
                        svc_flags::AFFINITY
                    } else {
                        0
                    },
                affinity_timeout_s: w.affinity_timeout.unwrap_or(0),
                ..Default::default()
            };
            Some((frontend_key::<A>(&w.frontend, 0)?, value, w))
        })
        .collect();
    let describe = |w: &FrontendWrite| Op::UpsertFrontend(w.frontend);
    upsert_all(
        &mut maps.services,
        &maps.raw.services,
        frontends,
        describe,
        errors,
    );

    for frontend in &plan.delete_frontends {
        let Some(key) = frontend_key::<A>(frontend, 0) else {
            continue;
        };
        record(
            errors,
            || Op::DeleteFrontend(*frontend),
            maps.services.remove(&key),
        );
    }
    ranges.delete(errors);
    for (frontend, slot) in &plan.delete_slots {
        let Some(key) = frontend_key::<A>(frontend, *slot) else {
            continue;
        };
        record(
            errors,
            || Op::DeleteSlot(*frontend, *slot),
            maps.services.remove(&key),
        );
    }
    for (id, frontend) in &plan.delete_rev_nats {
        if A::from_ip(frontend.addr).is_none() {
            continue;
        }
        let what = || Op::DeleteRevNat(*id, *frontend);
        record(errors, what, maps.rev_nat.remove(id));
        record(errors, what, shared.labels.remove(id));
    }
    shared.delete_tables::<A>(plan, errors);
    for (id, key) in &plan.delete_backends {
        if A::from_ip(key.addr).is_none() {
            continue;
        }
        record(errors, || Op::DeleteBackend(*id, *key), maps.backends.remove(id));
    }
}
