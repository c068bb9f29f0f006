//! The planner: desired frontends of a Service → the map operations that take the datapath
//! there, in an order that never lets a connect() see a half-written Service.
//!
//! Ordering (the writer applies the phases of a [`Plan`] in field order):
//! 1. new and changed backends, 2. reverse-NAT entries, 3. backend slots, 4. frontend entries
//! (the slot count last, so a grown Service is complete before it is visible), 5. frontend
//! deletions, 6. slot deletions beyond the new count, 7. reverse-NAT deletions, 8. backends no
//! longer referenced. Ids only grow, so a freed id is never reused while a reader may still
//! hold it.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::model::{BackendKey, BackendState, Frontend, FrontendKey, ServiceEntry, ServiceName};

pub type BackendId = u32;
pub type RevNatId = u32;

/// The datapath stores at most this many backend slots per frontend (slot numbers are u16).
pub const MAX_SLOTS: usize = u16::MAX as usize;

/// Which Service port a frontend belongs to, as stored for tools beside the rev-NAT entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Label {
    /// `namespace/name`.
    pub service: String,
    pub port: String,
}

/// What the datapath holds for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgrammedFrontend {
    pub rev_nat_id: RevNatId,
    /// `slots[i]` is the backend in slot `i + 1`.
    pub slots: Vec<BackendId>,
    pub affinity_timeout: Option<u32>,
    pub label: Label,
}

/// What the datapath holds for one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgrammedBackend {
    pub id: BackendId,
    pub state: BackendState,
}

/// Datapath contents read back from pinned maps after a restart.
#[derive(Clone, Debug, Default)]
pub struct Programmed {
    pub frontends: HashMap<FrontendKey, ProgrammedFrontend>,
    pub backends: HashMap<BackendKey, ProgrammedBackend>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevNatWrite {
    pub id: RevNatId,
    pub frontend: FrontendKey,
    pub label: Label,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotWrite {
    pub frontend: FrontendKey,
    pub slot: u16,
    pub backend_id: BackendId,
    pub rev_nat_id: RevNatId,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendWrite {
    pub frontend: FrontendKey,
    pub count: u16,
    pub rev_nat_id: RevNatId,
    pub affinity_timeout: Option<u32>,
}

/// Ordered map operations. Fields are phases, applied top to bottom.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub upsert_backends: Vec<(BackendId, BackendKey, BackendState)>,
    pub upsert_rev_nats: Vec<RevNatWrite>,
    pub upsert_slots: Vec<SlotWrite>,
    pub upsert_frontends: Vec<FrontendWrite>,
    pub delete_frontends: Vec<FrontendKey>,
    pub delete_slots: Vec<(FrontendKey, u16)>,
    pub delete_rev_nats: Vec<(RevNatId, FrontendKey)>,
    pub delete_backends: Vec<(BackendId, BackendKey)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.op_count() == 0
    }

    pub fn op_count(&self) -> usize {
        self.upsert_backends.len()
            + self.upsert_rev_nats.len()
            + self.upsert_slots.len()
            + self.upsert_frontends.len()
            + self.delete_frontends.len()
            + self.delete_slots.len()
            + self.delete_rev_nats.len()
            + self.delete_backends.len()
    }

    pub fn extend(&mut self, other: Plan) {
        self.upsert_backends.extend(other.upsert_backends);
        self.upsert_rev_nats.extend(other.upsert_rev_nats);
        self.upsert_slots.extend(other.upsert_slots);
        self.upsert_frontends.extend(other.upsert_frontends);
        self.delete_frontends.extend(other.delete_frontends);
        self.delete_slots.extend(other.delete_slots);
        self.delete_rev_nats.extend(other.delete_rev_nats);
        self.delete_backends.extend(other.delete_backends);
    }
}

/// Something the planner could not do as asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanIssue {
    /// Two Services claim the same frontend; the first one keeps it.
    FrontendConflict {
        frontend: FrontendKey,
        owner: ServiceName,
        loser: ServiceName,
    },
    /// More backends than slots; the rest are left out.
    TooManyBackends {
        frontend: FrontendKey,
        wanted: usize,
    },
}

impl std::fmt::Display for PlanIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::FrontendConflict {
                frontend,
                owner,
                loser,
            } => {
                write!(
                    f,
                    "Service {loser}: frontend {frontend} already belongs to {owner}; not programmed"
                )
            }
            Self::TooManyBackends { frontend, wanted } => {
                write!(
                    f,
                    "frontend {frontend}: {wanted} backends, only the first {MAX_SLOTS} are used"
                )
            }
        }
    }
}

/// The result of planning one Service.
#[derive(Debug, Default)]
pub struct Outcome {
    pub plan: Plan,
    pub issues: Vec<PlanIssue>,
    /// Services that wanted a frontend this change released: plan them again.
    pub retry: Vec<ServiceName>,
}

#[derive(Debug)]
struct BackendEntry {
    id: BackendId,
    state: BackendState,
    refs: u32,
}

/// Monotonic id source that skips ids still in use once it wraps.
#[derive(Debug)]
struct Ids {
    next: u32,
    used: HashSet<u32>,
}

impl Ids {
    fn new() -> Self {
        Self {
            next: 1,
            used: HashSet::new(),
        }
    }

    fn take(&mut self) -> u32 {
        loop {
            let id = self.next;
            self.next = self.next.checked_add(1).unwrap_or(1);
            if id != 0 && self.used.insert(id) {
                return id;
            }
        }
    }

    fn adopt(&mut self, id: u32) {
        self.used.insert(id);
        if id >= self.next {
            self.next = id.checked_add(1).unwrap_or(1);
        }
    }

    fn release(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

/// Owns the programmed state and turns desired Services into plans.
#[derive(Debug)]
pub struct Planner {
    frontends: HashMap<FrontendKey, ProgrammedFrontend>,
    /// Frontend owner; `None` for state adopted from pinned maps and not yet claimed.
    owners: HashMap<FrontendKey, Option<ServiceName>>,
    by_service: HashMap<ServiceName, BTreeSet<FrontendKey>>,
    /// Services that asked for a frontend someone else owns.
    contenders: HashMap<FrontendKey, BTreeSet<ServiceName>>,
    backends: HashMap<BackendKey, BackendEntry>,
    backend_keys: HashMap<BackendId, BackendKey>,
    backend_ids: Ids,
    rev_nat_ids: Ids,
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
        }
    }

    /// Starts from what pinned maps already hold, so the first sync after a restart changes
    /// only what really changed. Adopted frontends have no owner until a Service claims them;
    /// [`Planner::release_unclaimed`] removes the rest once the source has listed everything.
    pub fn adopt(programmed: Programmed) -> Self {
        let mut planner = Self::new();
        for (key, backend) in programmed.backends {
            planner.backend_ids.adopt(backend.id);
            planner.backend_keys.insert(backend.id, key);
            planner.backends.insert(
                key,
                BackendEntry {
                    id: backend.id,
                    state: backend.state,
                    refs: 0,
                },
            );
        }
        for (key, mut frontend) in programmed.frontends {
            // A slot naming an unknown backend cannot be served: drop it so the next plan for
            // this frontend rewrites the slot list.
            frontend
                .slots
                .retain(|id| planner.backend_keys.contains_key(id));
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
            planner.frontends.insert(key, frontend);
        }
        planner
    }

    pub fn frontend(&self, key: &FrontendKey) -> Option<&ProgrammedFrontend> {
        self.frontends.get(key)
    }

    pub fn owner(&self, key: &FrontendKey) -> Option<&ServiceName> {
        self.owners.get(key).and_then(Option::as_ref)
    }

    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    pub fn service_count(&self) -> usize {
        self.by_service.len()
    }

    /// Moves `service` to `desired` (`None`: the Service is gone or no longer proxied).
    pub fn plan_service(
        &mut self,
        service: &ServiceName,
        desired: Option<&ServiceEntry>,
    ) -> Outcome {
        let mut out = Outcome::default();
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
        for gone in previous.difference(&wanted) {
            self.remove_frontend(gone, &mut out, &mut backend_deltas);
        }
        if !wanted.is_empty() {
            self.by_service.insert(service.clone(), wanted);
        }
        self.settle_backends(backend_deltas, &mut out.plan);
        out
    }

    /// Removes adopted frontends that no Service claimed (call after the first full sync).
    pub fn release_unclaimed(&mut self) -> Outcome {
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
        self.backends
            .insert(key, BackendEntry { id, state, refs: 0 });
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

        let (rev_nat_id, old_slots, old_affinity) = match self.frontends.get(&frontend.key) {
            Some(p) => {
                if p.label != label {
                    plan.upsert_rev_nats.push(RevNatWrite {
                        id: p.rev_nat_id,
                        frontend: frontend.key,
                        label: label.clone(),
                    });
                }
                (p.rev_nat_id, p.slots.clone(), Some(p.affinity_timeout))
            }
            None => {
                let id = self.rev_nat_ids.take();
                plan.upsert_rev_nats.push(RevNatWrite {
                    id,
                    frontend: frontend.key,
                    label: label.clone(),
                });
                (id, Vec::new(), None)
            }
        };
        self.unreference(&old_slots, deltas);

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
        slots.extend(
            ids.iter()
                .map(|(id, _)| *id)
                .filter(|id| !present.contains(id)),
        );

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
        if old_slots.len() != slots.len() || old_affinity != Some(frontend.affinity_timeout) {
            plan.upsert_frontends.push(FrontendWrite {
                frontend: frontend.key,
                count: slots.len() as u16,
                rev_nat_id,
                affinity_timeout: frontend.affinity_timeout,
            });
        }
        for slot in slots.len()..old_slots.len() {
            plan.delete_slots.push((frontend.key, (slot + 1) as u16));
        }
        self.frontends.insert(
            frontend.key,
            ProgrammedFrontend {
                rev_nat_id,
                slots,
                affinity_timeout: frontend.affinity_timeout,
                label,
            },
        );
    }

    fn remove_frontend(
        &mut self,
        key: &FrontendKey,
        out: &mut Outcome,
        deltas: &mut HashMap<BackendKey, i64>,
    ) {
        self.owners.remove(key);
        let Some(old) = self.frontends.remove(key) else {
            return;
        };
        self.unreference(&old.slots, deltas);
        let plan = &mut out.plan;
        plan.delete_frontends.push(*key);
        plan.delete_slots
            .extend((1..=old.slots.len()).map(|s| (*key, s as u16)));
        plan.delete_rev_nats.push((old.rev_nat_id, *key));
        self.rev_nat_ids.release(old.rev_nat_id);
        if let Some(waiting) = self.contenders.remove(key) {
            out.retry.extend(waiting);
        }
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
            b.refs = (b.refs as i64 + delta).max(0) as u32;
            if b.refs == 0 {
                self.drop_backend(key, plan);
            }
        }
    }

    fn drop_backend(&mut self, key: BackendKey, plan: &mut Plan) {
        if let Some(b) = self.backends.remove(&key) {
            plan.delete_backends.push((b.id, key));
            self.backend_ids.release(b.id);
            self.backend_keys.remove(&b.id);
        }
    }
}
