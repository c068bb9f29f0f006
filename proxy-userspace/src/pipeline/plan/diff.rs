//! The diff: desired frontends of a Service → the [`Plan`] that takes the datapath there from
//! what it holds now, in an order that never lets a connect() see a half-written Service.

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod audit;
mod repair;

use std::collections::BTreeSet;

use proxy_common::maps::svc_flags;

// foldhash: randomly seeded like std's SipHash, so keys from the API server cannot be crafted
// to collide, at a fraction of its cost (hashing was half of planning a full sync).
use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};

use crate::pipeline::{
    model::{BackendKey, BackendState, Frontend, FrontendKey, Protocol, ServiceEntry, ServiceName},
    plan::{
        capacity::{Capacity, Ledger, PlanIssue, Usage, family},
        ids::Ids,
        ops::{
            BackendId, Departure, FrontendWrite, Label, MAX_SLOTS, MaglevWrite, Plan, Programmed,
            ProgrammedFrontend, RevNatId, RevNatWrite, SlotWrite,
        },
    },
};

/// The result of planning one Service.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub plan: Plan,
    pub issues: Vec<PlanIssue>,
    /// Services that wanted a frontend this change released: plan them again.
    pub(crate) retry: Vec<ServiceName>,
}

#[derive(Debug)]
struct BackendEntry {
    id: BackendId,
    state: BackendState,
    refs: u32,
}

/// Owns the programmed state and turns desired Services into plans.
#[derive(Debug)]
pub struct Planner {
    frontends: HashMap<FrontendKey, ProgrammedFrontend>,
    /// Frontend owner; `None` for state adopted from pinned maps and not yet claimed.
    owners: HashMap<FrontendKey, Option<ServiceName>>,
    /// A Service's frontends: a few each, so a Vec rather than a B-tree node per Service.
    by_service: HashMap<ServiceName, Vec<FrontendKey>>,
    /// Services that asked for a frontend someone else owns.
    contenders: HashMap<FrontendKey, BTreeSet<ServiceName>>,
    backends: HashMap<BackendKey, BackendEntry>,
    backend_keys: HashMap<BackendId, BackendKey>,
    backend_ids: Ids,
    rev_nat_ids: Ids,
    ledger: Ledger,
}

impl Default for Planner {
    fn default() -> Self {
        Self::new()
    }
}

impl Planner {
    pub fn new() -> Self {
        Self {
            frontends: HashMap::new(),
            owners: HashMap::new(),
            by_service: HashMap::new(),
            contenders: HashMap::new(),
            backends: HashMap::new(),
            backend_keys: HashMap::new(),
            backend_ids: Ids::new(),
            rev_nat_ids: Ids::new(),
            ledger: Ledger::new(),
        }
    }

    pub fn with_capacity(mut self, capacity: Capacity) -> Self {
        self.ledger.set_capacity(capacity);
        self
    }

    /// The capacity the maps would need for the current sync to refuse no Service: the sync's
    /// peak plus what each refused Service would have added (per map kind, the larger family).
    pub fn needed(&self) -> Usage {
        self.ledger.needed()
    }

    /// The capacity programming every Service of `desired` would need, before any is
    /// planned: the programmed state plus what each would add on its own (an upper bound: a
    /// backend two Services share counts for both). The agent sizes the maps from it before
    /// its first sync, rather than refuse most of a large cluster and grow afterwards.
    pub fn census<'a>(&self, desired: impl IntoIterator<Item = (&'a ServiceName, ServiceEntry)>) -> Usage {
        let mut adds = [Usage::default(); 2];
        for (service, entry) in desired {
            for (sum, add) in adds.iter_mut().zip(self.additions(service, &entry)) {
                sum.add(add);
            }
        }
        self.ledger.needed_with(adds)
    }

    /// The capacity the planner weighs Services against.
    pub fn capacity(&self) -> Capacity {
        self.ledger.capacity()
    }

    /// New map capacities (the maps grew).
    pub(crate) fn set_capacity(&mut self, capacity: Capacity) {
        self.ledger.set_capacity(capacity);
    }

    /// Counts what the maps hold now; call before planning a sync's Services.
    pub(crate) fn begin_sync(&mut self) {
        self.ledger.begin_sync();
    }

    /// Inserts or replaces a frontend, keeping the ledger in step.
    fn put_frontend(&mut self, key: FrontendKey, frontend: ProgrammedFrontend) {
        self.ledger.add_frontend(key.addr, frontend.slots.len());
        if let Some(old) = self.frontends.insert(key, frontend) {
            self.ledger.remove_frontend(key.addr, old.slots.len());
        }
    }

    /// Removes a frontend, keeping the ledger in step.
    fn take_frontend(&mut self, key: &FrontendKey) -> Option<ProgrammedFrontend> {
        let old = self.frontends.remove(key)?;
        self.ledger.remove_frontend(key.addr, old.slots.len());
        Some(old)
    }

    /// Inserts a backend, keeping the ledger in step.
    fn put_backend(&mut self, key: BackendKey, entry: BackendEntry) {
        if self.backends.insert(key, entry).is_none() {
            self.ledger.add_backend(key.addr);
        }
    }

    /// Removes a backend, keeping the ledger in step.
    fn take_backend(&mut self, key: &BackendKey) -> Option<BackendEntry> {
        let old = self.backends.remove(key)?;
        self.ledger.remove_backend(key.addr);
        Some(old)
    }

    /// Entries planning `desired` for `service` would add, per family.
    fn additions(&self, service: &ServiceName, desired: &ServiceEntry) -> [Usage; 2] {
        let mut adds = [Usage::default(); 2];
        let mut new_backends = HashSet::new();
        for f in &desired.frontends {
            if matches!(self.owners.get(&f.key), Some(Some(owner)) if owner != service) {
                continue;
            }
            let u = &mut adds[family(f.key.addr)];
            let wanted = f.backends.len().min(MAX_SLOTS) as u64;
            match self.frontends.get(&f.key) {
                Some(p) => u.services += wanted.saturating_sub(p.slots.len() as u64),
                None => {
                    u.services += 1 + wanted;
                    u.rev_nat += 1;
                }
            }
            for b in f.backends.iter().take(MAX_SLOTS) {
                if !self.backends.contains_key(&b.key) && new_backends.insert(b.key) {
                    adds[family(b.key.addr)].backends += 1;
                }
            }
        }
        adds
    }

    /// Starts from what pinned maps already hold, so the first sync after a restart changes
    /// only what really changed. Adopted frontends have no owner until a Service claims them;
    /// [`Planner::release_unclaimed`] removes the rest once the source has listed everything.
    pub(crate) fn adopt(programmed: Programmed) -> Self {
        let mut planner = Self::new();
        for (key, backend) in programmed.backends {
            planner.backend_ids.adopt(backend.id);
            planner.backend_keys.insert(backend.id, key);
            planner.put_backend(
                key,
                BackendEntry {
                    id: backend.id,
                    state: backend.state,
                    refs: 0,
                },
            );
        }
        for (key, mut frontend) in programmed.frontends {
            // A slot naming an unknown backend cannot be served. Only the slots before it are
            // known to hold what they say; the plan rewrites it and those after it. (Dropping
            // it alone shifted the later slots down a place, so a plan that wanted them wrote
            // nothing and the slot naming nothing stayed in the count.)
            if let Some(gap) = frontend
                .slots
                .iter()
                .position(|id| !planner.backend_keys.contains_key(id))
            {
                frontend.slots.truncate(gap);
            }
            for id in &frontend.slots {
                if let Some(b) = planner
                    .backend_keys
                    .get(id)
                    .and_then(|k| planner.backends.get_mut(k))
                {
                    b.refs += 1;
                }
            }
            planner.rev_nat_ids.adopt(frontend.rev_nat_id);
            planner.owners.insert(key, None);
            planner.put_frontend(key, frontend);
        }
        planner
    }

    // Only tests look into the planner's state: the agent and the tools read the maps.
    #[cfg(test)]
    pub fn frontend(&self, key: &FrontendKey) -> Option<&ProgrammedFrontend> {
        self.frontends.get(key)
    }

    /// The Service a frontend is programmed for (`None`: adopted and not claimed yet).
    pub(crate) fn owner_of(&self, key: &FrontendKey) -> Option<&ServiceName> {
        self.owners.get(key).and_then(Option::as_ref)
    }

    /// The Service whose frontend holds rev-NAT `id`; a scan, for naming failures only.
    pub(crate) fn owner_of_rev_nat(&self, id: RevNatId) -> Option<&ServiceName> {
        let key = self.frontends.iter().find(|(_, f)| f.rev_nat_id == id)?.0;
        self.owner_of(key)
    }

    pub(crate) fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    pub(crate) fn service_count(&self) -> usize {
        self.by_service.len()
    }

    /// Moves `service` to `desired` (`None`: the Service is gone or no longer proxied).
    pub(crate) fn plan_service(&mut self, service: &ServiceName, desired: Option<&ServiceEntry>) -> Outcome {
        let mut out = Outcome::default();
        if let Some(desired) = desired {
            let adds = self.additions(service, desired);
            if let Err(issue) = self.ledger.reserve(service, adds) {
                out.issues.push(issue);
                return out;
            }
        }
        let mut wanted: BTreeSet<FrontendKey> = BTreeSet::new();
        let mut backend_deltas: HashMap<BackendKey, i64> = HashMap::new();

        for frontend in desired.map(|d| d.frontends.as_slice()).unwrap_or_default() {
            match self.owners.get(&frontend.key) {
                Some(Some(owner)) if owner != service => {
                    out.issues.push(PlanIssue::FrontendConflict {
                        frontend: frontend.key,
                        owner: owner.clone(),
                        loser: service.clone(),
                    });
                    self.contenders
                        .entry(frontend.key)
                        .or_default()
                        .insert(service.clone());
                    continue;
                }
                _ => {}
            }
            if !wanted.insert(frontend.key) {
                continue;
            }
            self.owners.insert(frontend.key, Some(service.clone()));
            if let Some(c) = self.contenders.get_mut(&frontend.key) {
                c.remove(service);
            }
            let label = Label {
                service: service.to_string(),
                port: frontend.port_name.clone(),
            };
            self.plan_frontend(frontend, label, &mut out, &mut backend_deltas);
        }

        let previous = self.by_service.remove(service).unwrap_or_default();
        for gone in previous.iter().filter(|k| !wanted.contains(k)) {
            self.remove_frontend(gone, &mut out, &mut backend_deltas);
        }
        if !wanted.is_empty() {
            self.by_service
                .insert(service.clone(), wanted.into_iter().collect());
        }
        self.settle_backends(backend_deltas, &mut out.plan);
        out
    }

    /// Removes adopted frontends that no Service claimed (call after the first full sync).
    pub(crate) fn release_unclaimed(&mut self) -> Outcome {
        let mut out = Outcome::default();
        let mut deltas = HashMap::new();
        let unclaimed: Vec<FrontendKey> = self
            .owners
            .iter()
            .filter(|(_, o)| o.is_none())
            .map(|(k, _)| *k)
            .collect();
        for key in unclaimed {
            self.remove_frontend(&key, &mut out, &mut deltas);
        }
        self.settle_backends(deltas, &mut out.plan);
        // Backends adopted from the maps that no slot referenced at all.
        let orphans: Vec<BackendKey> = self
            .backends
            .iter()
            .filter(|(_, b)| b.refs == 0)
            .map(|(k, _)| *k)
            .collect();
        for key in orphans {
            self.drop_backend(key, &mut out.plan);
        }
        out
    }

    fn backend_id(&mut self, key: BackendKey, state: BackendState, plan: &mut Plan) -> BackendId {
        if let Some(b) = self.backends.get_mut(&key) {
            if b.state != state {
                b.state = state;
                plan.upsert_backends.push((b.id, key, state));
            }
            return b.id;
        }
        let id = self.backend_ids.take();
        self.put_backend(key, BackendEntry { id, state, refs: 0 });
        self.backend_keys.insert(id, key);
        plan.upsert_backends.push((id, key, state));
        id
    }

    fn plan_frontend(
        &mut self,
        frontend: &Frontend,
        label: Label,
        out: &mut Outcome,
        deltas: &mut HashMap<BackendKey, i64>,
    ) {
        let mut chosen = &frontend.backends[..];
        if chosen.len() > MAX_SLOTS {
            out.issues.push(PlanIssue::TooManyBackends {
                frontend: frontend.key,
                wanted: chosen.len(),
            });
            chosen = &chosen[..MAX_SLOTS];
        }
        let plan = &mut out.plan;
        let ids: Vec<(BackendId, BackendKey)> = chosen
            .iter()
            .map(|b| (self.backend_id(b.key, b.state, plan), b.key))
            .collect();
        let new_set: HashSet<BackendId> = ids.iter().map(|(id, _)| *id).collect();
        for (_, key) in &ids {
            *deltas.entry(*key).or_default() += 1;
        }

        let (rev_nat_id, old_slots, old_settings, old_ranges, old_maglev) =
            match self.frontends.get(&frontend.key) {
                Some(p) => {
                    if p.label != label {
                        plan.upsert_rev_nats.push(RevNatWrite {
                            id: p.rev_nat_id,
                            frontend: frontend.key,
                            label: label.clone(),
                        });
                    }
                    (
                        p.rev_nat_id,
                        p.slots.clone(),
                        Some((p.affinity_timeout, p.flags)),
                        p.source_ranges.clone(),
                        p.maglev,
                    )
                }
                None => {
                    let id = self.rev_nat_ids.take();
                    plan.upsert_rev_nats.push(RevNatWrite {
                        id,
                        frontend: frontend.key,
                        label: label.clone(),
                    });
                    (id, Vec::new(), None, Vec::new(), false)
                }
            };
        let source_ranges = frontend.written_source_ranges();
        plan.upsert_source_ranges.extend(
            source_ranges
                .iter()
                .filter(|r| old_ranges.binary_search(r).is_err())
                .map(|r| (rev_nat_id, *r)),
        );
        plan.delete_source_ranges.extend(
            old_ranges
                .iter()
                .filter(|r| source_ranges.binary_search(r).is_err())
                .map(|r| (rev_nat_id, *r)),
        );
        self.unreference(&old_slots, deltas);
        let departed = old_slots.iter().filter(|id| !new_set.contains(id));
        self.record_departures(rev_nat_id, departed, plan);

        // Keep every surviving backend in its slot; fill holes from the end, append newcomers.
        let mut slots = old_slots.clone();
        let mut i = 0;
        while i < slots.len() {
            if new_set.contains(&slots[i]) {
                i += 1;
            } else {
                slots.swap_remove(i);
            }
        }
        let present: HashSet<BackendId> = slots.iter().copied().collect();
        slots.extend(ids.iter().map(|(id, _)| *id).filter(|id| !present.contains(id)));

        for (i, id) in slots.iter().enumerate() {
            if old_slots.get(i) != Some(id) {
                plan.upsert_slots.push(SlotWrite {
                    frontend: frontend.key,
                    slot: (i + 1) as u16,
                    backend_id: *id,
                    rev_nat_id,
                });
            }
        }
        // The table before the frontend entry that points the tc path at it (phase order),
        // rebuilt whenever the backends change, since every entry may name any of them.
        let maglev = frontend.flags & svc_flags::MAGLEV != 0 && !slots.is_empty();
        if maglev && (!old_maglev || slots != old_slots) {
            plan.upsert_maglev.push(MaglevWrite {
                rev_nat_id,
                frontend: frontend.key,
                backends: self.keyed(&slots),
            });
        } else if !maglev && old_maglev {
            plan.delete_maglev.push((rev_nat_id, frontend.key));
        }
        if old_slots.len() != slots.len() || old_settings != Some((frontend.affinity_timeout, frontend.flags))
        {
            plan.upsert_frontends.push(FrontendWrite {
                frontend: frontend.key,
                count: slots.len() as u16,
                rev_nat_id,
                affinity_timeout: frontend.affinity_timeout,
                flags: frontend.flags,
            });
        }
        for slot in slots.len()..old_slots.len() {
            plan.delete_slots.push((frontend.key, (slot + 1) as u16));
        }
        self.put_frontend(
            frontend.key,
            ProgrammedFrontend {
                rev_nat_id,
                slots,
                affinity_timeout: frontend.affinity_timeout,
                flags: frontend.flags,
                source_ranges,
                label,
                maglev,
            },
        );
    }

    /// Backend ids with their keys (every id in a slot has one).
    pub(super) fn keyed(&self, ids: &[BackendId]) -> Vec<(BackendId, BackendKey)> {
        ids.iter()
            .filter_map(|id| Some((*id, *self.backend_keys.get(id)?)))
            .collect()
    }

    fn remove_frontend(
        &mut self,
        key: &FrontendKey,
        out: &mut Outcome,
        deltas: &mut HashMap<BackendKey, i64>,
    ) {
        self.owners.remove(key);
        let Some(old) = self.take_frontend(key) else {
            return;
        };
        self.unreference(&old.slots, deltas);
        let plan = &mut out.plan;
        self.record_departures(old.rev_nat_id, old.slots.iter(), plan);
        plan.delete_frontends.push(*key);
        plan.delete_slots
            .extend((1..=old.slots.len()).map(|s| (*key, s as u16)));
        plan.delete_rev_nats.push((old.rev_nat_id, *key));
        if old.maglev {
            plan.delete_maglev.push((old.rev_nat_id, *key));
        }
        plan.delete_source_ranges
            .extend(old.source_ranges.iter().map(|r| (old.rev_nat_id, *r)));
        self.rev_nat_ids.release(old.rev_nat_id);
        if let Some(waiting) = self.contenders.remove(key) {
            out.retry.extend(waiting);
        }
    }

    fn record_departures<'a>(
        &self,
        rev_nat_id: RevNatId,
        gone: impl Iterator<Item = &'a BackendId>,
        plan: &mut Plan,
    ) {
        let udp = gone
            .filter_map(|id| self.backend_keys.get(id))
            .filter(|backend| backend.protocol == Protocol::Udp);
        plan.departed.extend(udp.map(|backend| Departure {
            rev_nat_id,
            backend: *backend,
        }));
    }

    fn unreference(&self, slots: &[BackendId], deltas: &mut HashMap<BackendKey, i64>) {
        for key in slots.iter().filter_map(|id| self.backend_keys.get(id)) {
            *deltas.entry(*key).or_default() -= 1;
        }
    }

    fn settle_backends(&mut self, deltas: HashMap<BackendKey, i64>, plan: &mut Plan) {
        for (key, delta) in deltas {
            let Some(b) = self.backends.get_mut(&key) else {
                continue;
            };
            b.refs = (i64::from(b.refs) + delta).max(0) as u32;
            if b.refs == 0 {
                self.drop_backend(key, plan);
            }
        }
    }

    fn drop_backend(&mut self, key: BackendKey, plan: &mut Plan) {
        if let Some(b) = self.take_backend(&key) {
            plan.delete_backends.push((b.id, key));
            self.backend_ids.release(b.id);
            self.backend_keys.remove(&b.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use ipnet::IpNet;

    use super::audit::recount;
    use super::*;
    use crate::pipeline::plan::{
        fixtures::*,
        ops::{Op, ProgrammedBackend},
    };

    #[test]
    fn source_ranges_are_written_before_their_flag_and_diffed_on_change() {
        let mut p = Planner::new();
        let mut e = entry(&[("203.0.113.10", 80, &["10.0.0.1"])]);
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        e.frontends[0].flags = proxy_common::maps::svc_flags::SOURCE_RANGES;
        e.frontends[0].source_ranges = vec![net("192.0.2.0/24"), net("198.51.100.0/24")];
        let first = p.plan_service(&svc("lb"), Some(&e)).plan;
        let id = first.upsert_frontends[0].rev_nat_id;
        assert_eq!(
            first.upsert_frontends[0].flags,
            proxy_common::maps::svc_flags::SOURCE_RANGES
        );
        assert_eq!(
            first.upsert_source_ranges,
            [(id, net("192.0.2.0/24")), (id, net("198.51.100.0/24"))]
        );

        e.frontends[0].source_ranges = vec![net("198.51.100.0/24"), net("10.0.0.0/8")];
        let second = p.plan_service(&svc("lb"), Some(&e)).plan;
        assert_eq!(second.upsert_source_ranges, [(id, net("10.0.0.0/8"))]);
        assert_eq!(second.delete_source_ranges, [(id, net("192.0.2.0/24"))]);
        assert!(
            second.upsert_frontends.is_empty(),
            "same flags: the entry is not rewritten"
        );

        let gone = p.plan_service(&svc("lb"), None).plan;
        let mut deleted = gone.delete_source_ranges.clone();
        deleted.sort();
        assert_eq!(deleted, [(id, net("10.0.0.0/8")), (id, net("198.51.100.0/24"))]);
    }

    #[test]
    fn a_flag_change_rewrites_the_frontend_entry() {
        let mut p = Planner::new();
        let mut e = entry(&[("192.168.1.10", 30080, &["10.0.0.1"])]);
        p.plan_service(&svc("np"), Some(&e));
        e.frontends[0].flags = proxy_common::maps::svc_flags::NODE_PORT;
        let plan = p.plan_service(&svc("np"), Some(&e)).plan;
        assert_eq!(plan.upsert_frontends.len(), 1);
        assert_eq!(
            plan.upsert_frontends[0].flags,
            proxy_common::maps::svc_flags::NODE_PORT
        );
        assert!(plan.upsert_slots.is_empty());
    }

    /// Slot number → backend address, as the datapath would resolve it.
    fn slots(p: &Planner, key: &FrontendKey) -> Vec<IpAddr> {
        p.frontend(key)
            .unwrap()
            .slots
            .iter()
            .map(|id| p.backend_keys[id].addr)
            .collect()
    }

    #[test]
    fn new_service_writes_backends_then_slots_then_the_frontend() {
        let mut p = Planner::new();
        let out = p.plan_service(
            &svc("web"),
            Some(&entry(&[("10.96.0.10", 80, &["10.0.0.1", "10.0.0.2"])])),
        );
        let plan = out.plan;
        assert_eq!(plan.upsert_backends.len(), 2);
        assert_eq!(plan.upsert_rev_nats.len(), 1);
        assert_eq!(plan.upsert_rev_nats[0].label.service, "default/web");
        assert_eq!(
            plan.upsert_slots.iter().map(|s| s.slot).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(plan.upsert_frontends.len(), 1);
        assert_eq!(plan.upsert_frontends[0].count, 2);
        assert!(plan.delete_frontends.is_empty() && plan.delete_backends.is_empty());
        // Every slot names a backend the same plan creates.
        let created: HashSet<_> = plan.upsert_backends.iter().map(|(id, _, _)| *id).collect();
        assert!(plan.upsert_slots.iter().all(|s| created.contains(&s.backend_id)));
    }

    #[test]
    fn unchanged_service_plans_nothing() {
        let mut p = Planner::new();
        let e = entry(&[("10.96.0.10", 80, &["10.0.0.1", "10.0.0.2"])]);
        p.plan_service(&svc("web"), Some(&e));
        assert!(p.plan_service(&svc("web"), Some(&e)).plan.is_empty());
    }

    #[test]
    fn removing_a_backend_moves_the_last_into_its_slot_and_shrinks_count_before_deleting() {
        let mut p = Planner::new();
        let key = fkey("10.96.0.10", 80);
        p.plan_service(
            &svc("web"),
            Some(&entry(&[(
                "10.96.0.10",
                80,
                &["10.0.0.1", "10.0.0.2", "10.0.0.3"],
            )])),
        );
        let plan = p
            .plan_service(
                &svc("web"),
                Some(&entry(&[("10.96.0.10", 80, &["10.0.0.1", "10.0.0.3"])])),
            )
            .plan;
        // Slot 2 (was .2) now holds .3; slot 1 is untouched; slot 3 goes after count drops to 2.
        assert_eq!(plan.upsert_slots.len(), 1);
        assert_eq!(plan.upsert_slots[0].slot, 2);
        assert_eq!(plan.upsert_frontends[0].count, 2);
        assert_eq!(plan.delete_slots, vec![(key, 3)]);
        assert_eq!(plan.delete_backends.len(), 1);
        assert_eq!(plan.delete_backends[0].1.addr.to_string(), "10.0.0.2");
        assert_eq!(
            slots(&p, &key),
            vec!["10.0.0.1".parse::<IpAddr>().unwrap(), "10.0.0.3".parse().unwrap()]
        );
    }

    #[test]
    fn adding_a_backend_appends_one_slot() {
        let mut p = Planner::new();
        p.plan_service(&svc("web"), Some(&entry(&[("10.96.0.10", 80, &["10.0.0.1"])])));
        let plan = p
            .plan_service(
                &svc("web"),
                Some(&entry(&[("10.96.0.10", 80, &["10.0.0.1", "10.0.0.2"])])),
            )
            .plan;
        assert_eq!(plan.upsert_backends.len(), 1);
        assert_eq!(plan.upsert_slots.len(), 1);
        assert_eq!(plan.upsert_slots[0].slot, 2);
        assert_eq!(plan.upsert_frontends[0].count, 2);
        assert!(plan.delete_slots.is_empty());
    }

    #[test]
    fn backend_shared_by_two_services_is_deleted_only_when_both_drop_it() {
        let mut p = Planner::new();
        p.plan_service(&svc("a"), Some(&entry(&[("10.96.0.1", 80, &["10.0.0.1"])])));
        let plan = p
            .plan_service(&svc("b"), Some(&entry(&[("10.96.0.2", 80, &["10.0.0.1"])])))
            .plan;
        assert!(plan.upsert_backends.is_empty(), "the shared backend is reused");
        assert!(p.plan_service(&svc("a"), None).plan.delete_backends.is_empty());
        assert_eq!(p.plan_service(&svc("b"), None).plan.delete_backends.len(), 1);
        assert_eq!(p.backend_count(), 0);
    }

    #[test]
    fn deleting_a_service_removes_frontend_first_then_slots_rev_nat_and_backends() {
        let mut p = Planner::new();
        let key = fkey("10.96.0.10", 80);
        p.plan_service(
            &svc("web"),
            Some(&entry(&[("10.96.0.10", 80, &["10.0.0.1", "10.0.0.2"])])),
        );
        let plan = p.plan_service(&svc("web"), None).plan;
        assert_eq!(plan.delete_frontends, vec![key]);
        assert_eq!(plan.delete_slots, vec![(key, 1), (key, 2)]);
        assert_eq!(plan.delete_rev_nats.len(), 1);
        assert_eq!(plan.delete_backends.len(), 2);
        assert_eq!(
            (p.frontend_count(), p.backend_count(), p.service_count()),
            (0, 0, 0)
        );
    }

    #[test]
    fn no_usable_endpoint_programs_a_zero_count_frontend_that_rejects() {
        let mut p = Planner::new();
        let plan = p
            .plan_service(&svc("web"), Some(&entry(&[("10.96.0.10", 80, &[])])))
            .plan;
        assert_eq!(plan.upsert_frontends.len(), 1);
        assert_eq!(plan.upsert_frontends[0].count, 0);
        assert!(plan.upsert_slots.is_empty());
    }

    /// A NodePort frontend with backends `backends`, balanced by Maglev when `maglev`.
    fn node_port(backends: &[&str], maglev: bool) -> ServiceEntry {
        let mut e = entry(&[("192.168.1.10", 30080, backends)]);
        e.frontends[0].kind = crate::pipeline::model::FrontendKind::NodePort;
        e.frontends[0].flags = svc_flags::NODE_PORT | if maglev { svc_flags::MAGLEV } else { 0 };
        e
    }

    fn table_backends(plan: &Plan) -> Vec<Vec<String>> {
        plan.upsert_maglev
            .iter()
            .map(|w| w.backends.iter().map(|(_, k)| k.addr.to_string()).collect())
            .collect()
    }

    #[test]
    fn a_maglev_table_follows_its_frontend_s_backends_and_goes_with_it() {
        let mut p = Planner::new();
        let key = fkey("192.168.1.10", 30080);
        let first = p.plan_service(&svc("np"), Some(&node_port(&["10.0.0.1", "10.0.0.2"], true)));
        let id = first.plan.upsert_frontends[0].rev_nat_id;
        assert_eq!(table_backends(&first.plan), [["10.0.0.1", "10.0.0.2"]]);
        assert_eq!(
            first.plan.upsert_maglev[0].rev_nat_id, id,
            "keyed by the rev-NAT id"
        );
        let ops: Vec<Op> = first.plan.ops().collect();
        let at = |op: &Op| ops.iter().position(|o| o == op).unwrap();
        assert!(
            at(&Op::UpsertMaglev(id, key)) < at(&Op::UpsertFrontend(key)),
            "the table is there before the frontend entry points the tc path at it"
        );
        assert!(p.frontend(&key).unwrap().maglev);

        let same = p.plan_service(&svc("np"), Some(&node_port(&["10.0.0.1", "10.0.0.2"], true)));
        assert!(same.plan.is_empty(), "nothing changed, nothing rebuilt");
        let grown = p.plan_service(
            &svc("np"),
            Some(&node_port(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], true)),
        );
        assert_eq!(
            table_backends(&grown.plan),
            [["10.0.0.1", "10.0.0.2", "10.0.0.3"]]
        );

        let emptied = p.plan_service(&svc("np"), Some(&node_port(&[], true)));
        assert_eq!(
            emptied.plan.delete_maglev,
            [(id, key)],
            "no backends: reject, no table"
        );
        let back = p.plan_service(&svc("np"), Some(&node_port(&["10.0.0.4"], true)));
        assert_eq!(table_backends(&back.plan), [["10.0.0.4"]]);

        let random = p.plan_service(&svc("np"), Some(&node_port(&["10.0.0.4"], false)));
        assert_eq!(
            random.plan.delete_maglev,
            [(id, key)],
            "random again: the table goes"
        );
        assert!(random.plan.upsert_maglev.is_empty());
        p.plan_service(&svc("np"), Some(&node_port(&["10.0.0.4"], true)));
        let gone = p.plan_service(&svc("np"), None);
        assert_eq!(gone.plan.delete_maglev, [(id, key)], "with its frontend");
    }

    #[test]
    fn second_service_claiming_a_frontend_is_refused_then_gets_it_when_released() {
        let mut p = Planner::new();
        let key = fkey("10.96.0.10", 80);
        p.plan_service(&svc("first"), Some(&entry(&[("10.96.0.10", 80, &["10.0.0.1"])])));
        let out = p.plan_service(&svc("second"), Some(&entry(&[("10.96.0.10", 80, &["10.0.0.2"])])));
        assert!(out.plan.is_empty());
        assert!(
            matches!(&out.issues[..], [PlanIssue::FrontendConflict { loser, .. }] if *loser == svc("second"))
        );
        let released = p.plan_service(&svc("first"), None);
        assert_eq!(released.retry, vec![svc("second")]);
        p.plan_service(&svc("second"), Some(&entry(&[("10.96.0.10", 80, &["10.0.0.2"])])));
        assert_eq!(p.owner_of(&key), Some(&svc("second")));
    }

    /// What pinned maps would hold after `planner`'s plans, as the reader returns it.
    pub(super) fn programmed_of(planner: &Planner) -> Programmed {
        Programmed {
            rev_nats: planner
                .frontends
                .iter()
                .map(|(k, f)| (f.rev_nat_id, (k.addr, k.port)))
                .collect(),
            frontends: planner.frontends.clone(),
            backends: planner
                .backends
                .iter()
                .map(|(k, b)| {
                    (
                        *k,
                        ProgrammedBackend {
                            id: b.id,
                            state: b.state,
                        },
                    )
                })
                .collect(),
            maglev_tables: planner
                .frontends
                .values()
                .filter(|f| f.maglev)
                .map(|f| f.rev_nat_id)
                .collect(),
        }
    }

    #[test]
    fn held_entries_stay_equal_to_a_recount_through_changes_deletions_and_adoption() {
        let mut p = Planner::new();
        let steps: [(&str, Option<ServiceEntry>); 5] = [
            (
                "web",
                Some(entry(&[("10.96.0.10", 80, &["10.0.0.1", "10.0.0.2"])])),
            ),
            ("v6", Some(entry(&[("fd00::10", 80, &["fd00::1"])]))),
            (
                "web",
                Some(entry(&[(
                    "10.96.0.10",
                    80,
                    &["10.0.0.2", "10.0.0.3", "10.0.0.4"],
                )])),
            ),
            ("v6", None),
            ("web", Some(entry(&[("10.96.0.10", 80, &["10.0.0.4"])]))),
        ];
        for (name, desired) in &steps {
            p.plan_service(&svc(name), desired.as_ref());
            assert_eq!(p.ledger.held(), recount(&p), "after {name}: {desired:?}");
        }
        let mut adopted = Planner::adopt(programmed_of(&p));
        assert_eq!(adopted.ledger.held(), recount(&adopted));
        adopted.release_unclaimed();
        assert_eq!(
            adopted.ledger.held(),
            [Usage::default(); 2],
            "nothing claimed, nothing held"
        );
    }

    #[test]
    fn adopted_state_that_matches_plans_nothing_and_unclaimed_state_is_released() {
        let mut first = Planner::new();
        first.plan_service(
            &svc("web"),
            Some(&entry(&[("10.96.0.10", 80, &["10.0.0.1", "10.0.0.2"])])),
        );
        first.plan_service(&svc("old"), Some(&entry(&[("10.96.0.99", 80, &["10.0.0.7"])])));
        let mut restarted = Planner::adopt(programmed_of(&first));
        let plan = restarted
            .plan_service(
                &svc("web"),
                Some(&entry(&[("10.96.0.10", 80, &["10.0.0.1", "10.0.0.2"])])),
            )
            .plan;
        assert!(
            plan.is_empty(),
            "a restart must not rewrite what is already right: {plan:?}"
        );
        let released = restarted.release_unclaimed().plan;
        assert_eq!(released.delete_frontends, vec![fkey("10.96.0.99", 80)]);
        assert_eq!(released.delete_backends.len(), 1);
        assert_eq!(released.delete_backends[0].1.addr.to_string(), "10.0.0.7");
        // New ids continue after the adopted ones.
        let fresh = restarted
            .plan_service(&svc("new"), Some(&entry(&[("10.96.0.11", 80, &["10.0.0.8"])])))
            .plan;
        let adopted_max = first.backends.values().map(|b| b.id).max().unwrap();
        assert!(fresh.upsert_backends[0].0 > adopted_max);
    }

    #[test]
    fn an_adopted_slot_naming_an_unknown_backend_is_rewritten_with_those_after_it() {
        let mut first = Planner::new();
        let e = entry(&[("10.96.0.10", 80, &["10.0.0.1", "10.0.0.2"])]);
        first.plan_service(&svc("web"), Some(&e));
        // The write of the first backend failed before the agent restarted: slot 1 names an
        // id the backends map lacks.
        let mut programmed = programmed_of(&first);
        let gone = programmed
            .backends
            .remove(&e.frontends[0].backends[0].key)
            .unwrap();
        let mut restarted = Planner::adopt(programmed);
        let want = entry(&[("10.96.0.10", 80, &["10.0.0.2"])]);
        let plan = restarted.plan_service(&svc("web"), Some(&want)).plan;
        let key = fkey("10.96.0.10", 80);
        let kept = restarted.frontend(&key).unwrap().slots[0];
        assert_ne!(kept, gone.id);
        assert_eq!(
            plan.upsert_slots
                .iter()
                .map(|w| (w.slot, w.backend_id))
                .collect::<Vec<_>>(),
            [(1, kept)],
            "slot 1 still names the missing backend: {plan:?}"
        );
        assert_eq!(
            plan.upsert_frontends.iter().map(|w| w.count).collect::<Vec<_>>(),
            [1]
        );
    }

    #[test]
    fn terminating_flag_change_rewrites_only_the_backend() {
        let mut p = Planner::new();
        p.plan_service(&svc("web"), Some(&entry(&[("10.96.0.10", 80, &["10.0.0.1"])])));
        let mut e = entry(&[("10.96.0.10", 80, &["10.0.0.1"])]);
        e.frontends[0].backends[0].state.terminating = true;
        let plan = p.plan_service(&svc("web"), Some(&e)).plan;
        assert_eq!(plan.upsert_backends.len(), 1);
        assert!(plan.upsert_backends[0].2.terminating);
        assert_eq!(plan.op_count(), 1);
    }

    #[test]
    fn affinity_change_rewrites_only_the_frontend_entry() {
        let mut p = Planner::new();
        let mut e = entry(&[("10.96.0.10", 80, &["10.0.0.1"])]);
        p.plan_service(&svc("web"), Some(&e));
        e.frontends[0].affinity_timeout = Some(30);
        let plan = p.plan_service(&svc("web"), Some(&e)).plan;
        assert_eq!(plan.upsert_frontends.len(), 1);
        assert_eq!(plan.upsert_frontends[0].affinity_timeout, Some(30));
        assert_eq!(plan.op_count(), 1);
    }

    #[test]
    fn udp_backends_leaving_a_frontend_are_reported_as_departed_but_tcp_ones_are_not() {
        let udp = |mut e: ServiceEntry| {
            for f in &mut e.frontends {
                f.key.protocol = Protocol::Udp;
                for b in &mut f.backends {
                    b.key.protocol = Protocol::Udp;
                }
            }
            e
        };
        let mut p = Planner::new();
        p.plan_service(
            &svc("dns"),
            Some(&udp(entry(&[("10.96.0.10", 53, &["10.0.0.1", "10.0.0.2"])]))),
        );
        p.plan_service(
            &svc("web"),
            Some(&entry(&[("10.96.0.11", 80, &["10.0.0.1", "10.0.0.2"])])),
        );
        let rev_nat_id = p
            .frontend(&FrontendKey {
                protocol: Protocol::Udp,
                ..fkey("10.96.0.10", 53)
            })
            .unwrap()
            .rev_nat_id;

        let plan = p
            .plan_service(
                &svc("dns"),
                Some(&udp(entry(&[("10.96.0.10", 53, &["10.0.0.2"])]))),
            )
            .plan;
        let gone: Vec<(RevNatId, String)> = plan
            .departed
            .iter()
            .map(|d| (d.rev_nat_id, d.backend.addr.to_string()))
            .collect();
        assert_eq!(gone, [(rev_nat_id, "10.0.0.1".to_string())]);

        let tcp = p
            .plan_service(&svc("web"), Some(&entry(&[("10.96.0.11", 80, &["10.0.0.2"])])))
            .plan;
        assert!(tcp.departed.is_empty(), "TCP flows are left to finish");

        let deleted = p.plan_service(&svc("dns"), None).plan;
        assert_eq!(
            deleted.departed.len(),
            1,
            "deleting the Service ends its last backend's sockets"
        );
        assert_eq!(deleted.departed[0].backend.addr.to_string(), "10.0.0.2");
    }
}
