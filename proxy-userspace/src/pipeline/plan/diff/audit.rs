//! The planner's invariants, checked from scratch against an in-memory datapath: what the
//! property tests and the fuzz targets assert after every step of a random sequence of
//! changes. Each check recounts rather than trusting the planner's own bookkeeping.

use std::collections::{BTreeMap, BTreeSet};

use foldhash::HashMap;

use super::Planner;
use crate::pipeline::{
    model::{BackendKey, Frontend, FrontendKey, ServiceEntry, ServiceName},
    plan::{
        capacity::{Usage, family},
        memory::MemoryMaps,
        ops::{BackendId, Plan, PlanSink, Programmed, ReadBackError, RevNatId, WriteFailure},
    },
};

/// What a connect() or a packet racing the writer could find wrong in `maps`: a frontend
/// entry whose slots `1..=count` are not all there or name a missing backend, whose reverse-NAT
/// entry is missing or names another address, or whose source-ranges flag is set before any
/// of its ranges is written (the tc path would drop every client). `None`: nothing.
pub(crate) fn torn(maps: &MemoryMaps) -> Option<String> {
    for (key, f) in &maps.frontends {
        for slot in 1..=f.count {
            match maps.slots.get(&(*key, slot)) {
                None => return Some(format!("frontend {key}: slot {slot} of {} missing", f.count)),
                Some(id) if !maps.backends.contains_key(id) => {
                    return Some(format!("frontend {key}: slot {slot} names missing backend {id}"));
                }
                Some(_) => {}
            }
        }
        match maps.rev_nats.get(&f.rev_nat_id) {
            Some((owner, _)) if (owner.addr, owner.port) == (key.addr, key.port) => {}
            other => {
                return Some(format!(
                    "frontend {key}: rev-NAT {} holds {other:?}",
                    f.rev_nat_id
                ));
            }
        }
        let ranged = f.flags & proxy_common::maps::svc_flags::SOURCE_RANGES != 0;
        if ranged && !maps.ranges.iter().any(|(id, _)| *id == f.rev_nat_id) {
            return Some(format!("frontend {key}: source-ranges flag without a range"));
        }
        // The programs fall back to a random draw without a table, but a table is always
        // written before the flag that sends new flows to it.
        if f.flags & proxy_common::maps::svc_flags::MAGLEV != 0 && f.count > 0 {
            match maps.tables.get(&f.rev_nat_id) {
                None => return Some(format!("frontend {key}: Maglev flag without its table")),
                Some(ids) => {
                    if let Some(id) = ids.iter().find(|id| !maps.backends.contains_key(id)) {
                        return Some(format!("frontend {key}: Maglev table names missing backend {id}"));
                    }
                }
            }
        }
    }
    None
}

/// In-memory maps that apply a plan one operation at a time, in the writer's phase order,
/// checking after each that readers see no half-written Service ([`torn`]). Only maps known
/// to hold the planner's state are held to that: a failed write may leave any state, for the
/// repair pass to mend, and the planner plans from what it believes was written.
#[derive(Debug)]
pub(crate) struct WatchedMaps {
    pub maps: MemoryMaps,
    /// No write has failed since the maps were last known to match the planner: the caller
    /// sets it again once a repair pass has mended them.
    pub whole: bool,
    /// The first torn state seen.
    pub torn: Option<String>,
    /// A write has failed at some point.
    pub failed_ever: bool,
}

impl Default for WatchedMaps {
    fn default() -> Self {
        Self {
            maps: MemoryMaps::default(),
            whole: true,
            torn: None,
            failed_ever: false,
        }
    }
}

impl PlanSink for WatchedMaps {
    fn apply(&mut self, plan: &Plan) -> Vec<WriteFailure> {
        let mut failed = Vec::new();
        for (op, step) in plan.ops().zip(single_ops(plan)) {
            failed.extend(self.maps.apply(&step));
            self.whole &= failed.is_empty();
            self.failed_ever |= !failed.is_empty();
            if self.whole && self.torn.is_none() {
                self.torn = torn(&self.maps).map(|t| format!("after {op}: {t}"));
            }
        }
        failed
    }

    fn read_back(&mut self) -> Result<Programmed, ReadBackError> {
        self.maps.read_back()
    }
}

/// `plan` cut into one-operation plans, in the order of [`Plan::ops`].
fn single_ops(plan: &Plan) -> Vec<Plan> {
    let mut out = Vec::with_capacity(plan.op_count());
    let mut each = |fill: &mut dyn FnMut(&mut Plan)| {
        let mut one = Plan::default();
        fill(&mut one);
        out.push(one);
    };
    for x in &plan.upsert_backends {
        each(&mut |p| p.upsert_backends.push(*x));
    }
    for x in &plan.upsert_rev_nats {
        each(&mut |p| p.upsert_rev_nats.push(x.clone()));
    }
    for x in &plan.upsert_slots {
        each(&mut |p| p.upsert_slots.push(x.clone()));
    }
    for x in &plan.upsert_source_ranges {
        each(&mut |p| p.upsert_source_ranges.push(*x));
    }
    for x in &plan.upsert_maglev {
        each(&mut |p| p.upsert_maglev.push(x.clone()));
    }
    for x in &plan.upsert_frontends {
        each(&mut |p| p.upsert_frontends.push(x.clone()));
    }
    for x in &plan.delete_frontends {
        each(&mut |p| p.delete_frontends.push(*x));
    }
    for x in &plan.delete_source_ranges {
        each(&mut |p| p.delete_source_ranges.push(*x));
    }
    for x in &plan.delete_slots {
        each(&mut |p| p.delete_slots.push(*x));
    }
    for x in &plan.delete_rev_nats {
        each(&mut |p| p.delete_rev_nats.push(*x));
    }
    for x in &plan.delete_maglev {
        each(&mut |p| p.delete_maglev.push(*x));
    }
    for x in &plan.delete_backends {
        each(&mut |p| p.delete_backends.push(*x));
    }
    out
}

/// The entries `planner` holds, counted from scratch.
pub(super) fn recount(planner: &Planner) -> [Usage; 2] {
    let mut used = [Usage::default(); 2];
    for (key, f) in &planner.frontends {
        let u = &mut used[family(key.addr)];
        u.services += 1 + f.slots.len() as u64;
        u.rev_nat += 1;
    }
    for key in planner.backends.keys() {
        used[family(key.addr)].backends += 1;
    }
    used
}

/// Everything that must hold once a sync's plans have all been written without failure (or
/// a repair pass has mended a failure): the maps are whole and hold nothing stray, the
/// planner's reference counts and ledger equal a recount, and a repair pass finds nothing to
/// rewrite. Returns each violation found; empty when all hold.
///
/// `strict`: no write has ever failed, so no slot may be left beyond its frontend's count
/// (or without a frontend). After a failure such a slot may stay, unreachable for the
/// datapath: neither a restarted planner nor the repair pass sees it, as slots beyond a
/// count are not read back.
pub(crate) fn audit(planner: &Planner, maps: &mut MemoryMaps, strict: bool) -> Vec<String> {
    let mut problems: Vec<String> = torn(maps).into_iter().collect();
    problems.extend(strays(maps, strict));
    problems.extend(bookkeeping(planner));
    match maps.read_back() {
        Ok(actual) => {
            let repair = planner.repair(&actual);
            if !repair.is_empty() {
                problems.push(format!(
                    "a repair pass would rewrite: {}",
                    repair
                        .ops()
                        .map(|op| op.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                ));
            }
        }
        Err(e) => problems.push(e.to_string()),
    }
    problems
}

/// Entries no frontend leads to: slots beyond a count or of no frontend, backends no slot
/// names, reverse-NAT entries and source ranges of no frontend, one rev-NAT id for two.
fn strays(maps: &MemoryMaps, strict: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let mut rev_nats: BTreeMap<RevNatId, usize> = BTreeMap::new();
    for f in maps.frontends.values() {
        *rev_nats.entry(f.rev_nat_id).or_default() += 1;
    }
    problems.extend(
        rev_nats
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, n)| format!("rev-NAT {id} serves {n} frontends")),
    );
    for (key, slot) in maps.slots.keys() {
        if strict && maps.frontends.get(key).is_none_or(|f| *slot > f.count) {
            problems.push(format!("slot {slot} of {key} is beyond its frontend's count"));
        }
    }
    let named: BTreeSet<BackendId> = maps
        .slots
        .iter()
        .filter(|((key, slot), _)| maps.frontends.get(key).is_some_and(|f| *slot <= f.count))
        .map(|(_, id)| *id)
        .collect();
    problems.extend(
        maps.backends
            .iter()
            .filter(|(id, _)| !named.contains(id))
            .map(|(id, (key, _))| format!("backend {id} ({key}) is in no slot")),
    );
    problems.extend(
        maps.rev_nats
            .iter()
            .filter(|(id, _)| !rev_nats.contains_key(id))
            .map(|(id, (key, _))| format!("rev-NAT {id} ({key}) has no frontend")),
    );
    problems.extend(
        maps.ranges
            .iter()
            .filter(|(id, _)| !rev_nats.contains_key(id))
            .map(|(id, net)| format!("source range {net} of rev-NAT {id} has no frontend")),
    );
    problems
}

/// The planner's own counts against a recount of its state.
fn bookkeeping(planner: &Planner) -> Vec<String> {
    let mut problems = Vec::new();
    let mut refs: HashMap<BackendId, u32> = HashMap::default();
    for (key, f) in &planner.frontends {
        for id in &f.slots {
            *refs.entry(*id).or_default() += 1;
            if !planner.backend_keys.contains_key(id) {
                problems.push(format!("planner: frontend {key} names unknown backend {id}"));
            }
        }
        let distinct: BTreeSet<&BackendId> = f.slots.iter().collect();
        if distinct.len() != f.slots.len() {
            problems.push(format!(
                "planner: frontend {key} holds a backend twice: {:?}",
                f.slots
            ));
        }
    }
    for (key, b) in &planner.backends {
        let counted = refs.get(&b.id).copied().unwrap_or(0);
        if b.refs != counted || counted == 0 {
            problems.push(format!(
                "planner: backend {} ({key}) has refs {}, slots naming it {counted}",
                b.id, b.refs
            ));
        }
        if planner.backend_keys.get(&b.id) != Some(key) {
            problems.push(format!("planner: backend {} ({key}) not indexed by its id", b.id));
        }
    }
    if planner.backend_keys.len() != planner.backends.len() {
        problems.push(format!(
            "planner: {} backend ids for {} backends",
            planner.backend_keys.len(),
            planner.backends.len()
        ));
    }
    for (key, owner) in &planner.owners {
        if !planner.frontends.contains_key(key) {
            problems.push(format!("planner: {key} owned by {owner:?} but not programmed"));
        }
    }
    for (key, owner) in planner.owners.iter().filter_map(|(k, o)| Some((k, o.as_ref()?))) {
        if !planner
            .by_service
            .get(owner)
            .is_some_and(|keys| keys.contains(key))
        {
            problems.push(format!("planner: {key} owned by {owner}, who does not list it"));
        }
    }
    for (service, keys) in &planner.by_service {
        for key in keys {
            if planner.owners.get(key) != Some(&Some(service.clone())) {
                problems.push(format!(
                    "planner: {service} lists {key}, owned by {:?}",
                    planner.owners.get(key)
                ));
            }
        }
    }
    if planner.ledger.held() != recount(planner) {
        problems.push(format!(
            "planner: ledger holds {:?}, a recount {:?}",
            planner.ledger.held(),
            recount(planner)
        ));
    }
    problems
}

/// Whether the planner holds what `desired` asks: every frontend some Service wants is
/// programmed for one of the Services that want it (a conflict leaves it with the one that
/// asked first), with that Service's backends, settings and source ranges, and nothing else
/// is programmed. A backend's local flag, which the tc path's SNAT choice reads, is the one
/// its frontends want. (Its terminating flag is not checked: only tools read it, and two
/// Services whose slices disagree on it leave it as the last one planned said.)
pub(crate) fn reaches(planner: &Planner, desired: &BTreeMap<ServiceName, ServiceEntry>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut wanted: BTreeMap<FrontendKey, BTreeMap<&ServiceName, &Frontend>> = BTreeMap::new();
    for (service, entry) in desired {
        for f in &entry.frontends {
            wanted.entry(f.key).or_default().entry(service).or_insert(f);
        }
    }
    let mut locality: BTreeMap<BackendKey, BTreeSet<bool>> = BTreeMap::new();
    for (key, wanters) in &wanted {
        let Some(owner) = planner.owner_of(key) else {
            problems.push(format!(
                "{key}: wanted by {:?}, programmed for none",
                wanters.keys()
            ));
            continue;
        };
        let (Some(f), Some(p)) = (wanters.get(owner), planner.frontends.get(key)) else {
            problems.push(format!("{key}: programmed for {owner}, who does not want it"));
            continue;
        };
        let have: BTreeSet<BackendKey> = p
            .slots
            .iter()
            .filter_map(|id| planner.backend_keys.get(id).copied())
            .collect();
        let want: BTreeSet<BackendKey> = f.backends.iter().map(|b| b.key).collect();
        if have != want || p.slots.len() != want.len() {
            problems.push(format!(
                "{key}: backends {have:?} in {} slots, {owner} wants {want:?}",
                p.slots.len()
            ));
        }
        if (p.affinity_timeout, p.flags, &p.source_ranges)
            != (f.affinity_timeout, f.flags, &f.written_source_ranges())
        {
            problems.push(format!("{key}: programmed {p:?}, {owner} wants {f:?}"));
        }
        if p.label.service != owner.to_string() || p.label.port != f.port_name {
            problems.push(format!(
                "{key}: labelled {:?} for {owner} port {}",
                p.label, f.port_name
            ));
        }
        for b in &f.backends {
            locality.entry(b.key).or_default().insert(b.state.local);
        }
    }
    problems.extend(
        planner
            .frontends
            .keys()
            .filter(|key| !wanted.contains_key(key))
            .map(|key| format!("{key}: programmed, wanted by no Service")),
    );
    for (key, wanted) in locality {
        let [local] = wanted.into_iter().collect::<Vec<_>>()[..] else {
            continue;
        };
        let state = planner.backends.get(&key).map(|b| b.state);
        if state.is_none_or(|s| s.local != local) {
            problems.push(format!("backend {key}: state {state:?}, wanted local {local}"));
        }
    }
    problems
}
