//! An in-memory datapath for tests: applies plans to maps held as plain collections, reads
//! them back as the BPF reader does, and fails operations on request, so the sync's repair
//! rules are tested without root.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use crate::pipeline::{
    model::{BackendKey, BackendState, FrontendKey},
    plan::ops::{
        BackendId, FrontendWrite, Label, NO_BACKEND, Op, Plan, PlanSink, Programmed, ProgrammedBackend,
        ProgrammedFrontend, ReadBackError, RevNatId, WriteFailure,
    },
};

#[derive(Debug, Default)]
pub(crate) struct MemoryMaps {
    pub frontends: BTreeMap<FrontendKey, FrontendWrite>,
    pub slots: BTreeMap<(FrontendKey, u16), BackendId>,
    pub backends: BTreeMap<BackendId, (BackendKey, BackendState)>,
    pub rev_nats: BTreeMap<RevNatId, (FrontendKey, Label)>,
    pub ranges: BTreeSet<(RevNatId, IpNet)>,
    /// Maglev tables by id: the backends each was built from.
    pub tables: BTreeMap<RevNatId, Vec<BackendId>>,
    /// Every plan applied, in order.
    pub plans: Vec<Plan>,
    /// The next this many operations fail (with EIO, say).
    pub failing: usize,
}

impl MemoryMaps {
    /// Whether `op` fails; counts down [`MemoryMaps::failing`].
    fn fails(&mut self, op: &Op, failed: &mut Vec<WriteFailure>) -> bool {
        if self.failing == 0 {
            return false;
        }
        self.failing -= 1;
        failed.push(WriteFailure {
            op: op.clone(),
            reason: "Input/output error (os error 5)".into(),
        });
        true
    }
}

impl PlanSink for MemoryMaps {
    fn apply(&mut self, plan: &Plan) -> Vec<WriteFailure> {
        self.plans.push(plan.clone());
        let mut failed = Vec::new();
        for (id, key, state) in &plan.upsert_backends {
            if !self.fails(&Op::UpsertBackend(*id, *key), &mut failed) {
                self.backends.insert(*id, (*key, *state));
            }
        }
        for w in &plan.upsert_rev_nats {
            if !self.fails(&Op::UpsertRevNat(w.id, w.frontend), &mut failed) {
                self.rev_nats.insert(w.id, (w.frontend, w.label.clone()));
            }
        }
        for w in &plan.upsert_slots {
            if !self.fails(&Op::UpsertSlot(w.frontend, w.slot), &mut failed) {
                self.slots.insert((w.frontend, w.slot), w.backend_id);
            }
        }
        for (id, net) in &plan.upsert_source_ranges {
            if !self.fails(&Op::UpsertSourceRange(*id, *net), &mut failed) {
                self.ranges.insert((*id, *net));
            }
        }
        for w in &plan.upsert_maglev {
            if !self.fails(&Op::UpsertMaglev(w.rev_nat_id, w.frontend), &mut failed) {
                self.tables
                    .insert(w.rev_nat_id, w.backends.iter().map(|(id, _)| *id).collect());
            }
        }
        for w in &plan.upsert_frontends {
            if !self.fails(&Op::UpsertFrontend(w.frontend), &mut failed) {
                self.frontends.insert(w.frontend, w.clone());
            }
        }
        for key in &plan.delete_frontends {
            self.frontends.remove(key);
        }
        for range in &plan.delete_source_ranges {
            self.ranges.remove(range);
        }
        for slot in &plan.delete_slots {
            self.slots.remove(slot);
        }
        for (id, _) in &plan.delete_rev_nats {
            self.rev_nats.remove(id);
        }
        for (id, _) in &plan.delete_maglev {
            self.tables.remove(id);
        }
        for (id, _) in &plan.delete_backends {
            self.backends.remove(id);
        }
        failed
    }

    /// As the BPF reader: a missing slot reads back as [`NO_BACKEND`].
    fn read_back(&mut self) -> Result<Programmed, ReadBackError> {
        let mut programmed = Programmed::default();
        for (key, f) in &self.frontends {
            let slots: Vec<BackendId> = (1..=f.count)
                .map(|slot| self.slots.get(&(*key, slot)).copied().unwrap_or(NO_BACKEND))
                .collect();
            programmed.frontends.insert(
                *key,
                ProgrammedFrontend {
                    rev_nat_id: f.rev_nat_id,
                    slots,
                    affinity_timeout: f.affinity_timeout,
                    flags: f.flags,
                    source_ranges: self
                        .ranges
                        .iter()
                        .filter(|(id, _)| *id == f.rev_nat_id)
                        .map(|(_, net)| *net)
                        .collect(),
                    label: self
                        .rev_nats
                        .get(&f.rev_nat_id)
                        .map(|(_, label)| label.clone())
                        .unwrap_or_default(),
                    maglev: self.tables.contains_key(&f.rev_nat_id),
                },
            );
        }
        for (id, (key, state)) in &self.backends {
            programmed.backends.insert(
                *key,
                ProgrammedBackend {
                    id: *id,
                    state: *state,
                },
            );
        }
        for (id, (frontend, _)) in &self.rev_nats {
            programmed.rev_nats.insert(*id, (frontend.addr, frontend.port));
        }
        programmed.maglev_tables = self.tables.keys().copied().collect();
        Ok(programmed)
    }
}
