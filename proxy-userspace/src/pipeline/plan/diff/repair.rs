//! The repair pass's diff: what the planner holds (the desired datapath) against what the maps
//! were read back to hold. A write that failed, or an entry someone changed or deleted with
//! bpftool, shows up here as a difference, and the plan returned rewrites exactly those
//! entries, in the writer's usual phase order.

use foldhash::{HashMap, HashMapExt as _, HashSet};

use super::Planner;
use crate::pipeline::{
    model::{BackendKey, BackendState, FrontendKey, Protocol},
    plan::ops::{
        BackendId, FrontendWrite, MaglevWrite, Plan, Programmed, ProgrammedFrontend, RevNatId, RevNatWrite,
        SlotWrite,
    },
};

impl Planner {
    /// The plan that takes `actual` back to the planner's state. Empty when they agree.
    pub(crate) fn repair(&self, actual: &Programmed) -> Plan {
        let mut plan = Plan::default();
        self.repair_backends(actual, &mut plan);
        let wanted_rev_nats: HashSet<RevNatId> = self.frontends.values().map(|f| f.rev_nat_id).collect();
        for (key, wanted) in &self.frontends {
            let have = actual
                .frontends
                .get(key)
                .filter(|h| h.rev_nat_id == wanted.rev_nat_id);
            repair_frontend(
                key,
                wanted,
                have,
                actual.rev_nats.get(&wanted.rev_nat_id),
                &mut plan,
            );
            self.repair_table(key, wanted, have, &mut plan);
        }
        let wanted_tables: HashSet<RevNatId> = self
            .frontends
            .values()
            .filter(|f| f.maglev)
            .map(|f| f.rev_nat_id)
            .collect();
        for id in actual
            .maglev_tables
            .iter()
            .filter(|id| !wanted_tables.contains(id))
        {
            // The writer deletes a table with its frontend's family: any address of it will do.
            let (addr, port) = actual
                .rev_nats
                .get(id)
                .copied()
                .unwrap_or((std::net::Ipv4Addr::UNSPECIFIED.into(), 0));
            plan.delete_maglev
                .push((*id, FrontendKey::new(addr, port, Protocol::Any)));
        }
        for (key, extra) in &actual.frontends {
            if !wanted_rev_nats.contains(&extra.rev_nat_id) {
                plan.delete_source_ranges
                    .extend(extra.source_ranges.iter().map(|r| (extra.rev_nat_id, *r)));
            }
            if !self.frontends.contains_key(key) {
                plan.delete_frontends.push(*key);
                plan.delete_slots
                    .extend((1..=extra.slots.len()).map(|slot| (*key, slot as u16)));
            }
        }
        for (id, (addr, port)) in &actual.rev_nats {
            if !wanted_rev_nats.contains(id) {
                // The writer picks the family by address; the protocol is not part of the entry.
                plan.delete_rev_nats
                    .push((*id, FrontendKey::new(*addr, *port, Protocol::Any)));
            }
        }
        plan
    }

    /// A table the frontend should have and the maps lack is built again; its content is not
    /// compared (that would read every table on every pass), only whether it is there.
    fn repair_table(
        &self,
        key: &FrontendKey,
        wanted: &ProgrammedFrontend,
        have: Option<&ProgrammedFrontend>,
        plan: &mut Plan,
    ) {
        if wanted.maglev && !have.is_some_and(|h| h.maglev) {
            plan.upsert_maglev.push(MaglevWrite {
                rev_nat_id: wanted.rev_nat_id,
                frontend: *key,
                backends: self.keyed(&wanted.slots),
            });
        }
    }

    fn repair_backends(&self, actual: &Programmed, plan: &mut Plan) {
        let mut have: HashMap<BackendId, (BackendKey, BackendState)> =
            HashMap::with_capacity(actual.backends.len());
        for (key, b) in &actual.backends {
            have.insert(b.id, (*key, b.state));
        }
        for (key, b) in &self.backends {
            if have.get(&b.id) != Some(&(*key, b.state)) {
                plan.upsert_backends.push((b.id, *key, b.state));
            }
        }
        plan.delete_backends.extend(
            have.iter()
                .filter(|(id, _)| !self.backend_keys.contains_key(id))
                .map(|(id, (key, _))| (*id, *key)),
        );
    }
}

/// Rewrites what of one frontend differs. `have`: the maps' entry, if it has the same rev-NAT
/// id (one with another id is rewritten whole).
fn repair_frontend(
    key: &FrontendKey,
    wanted: &ProgrammedFrontend,
    have: Option<&ProgrammedFrontend>,
    have_rev_nat: Option<&(std::net::IpAddr, u16)>,
    plan: &mut Plan,
) {
    let rev_nat_id = wanted.rev_nat_id;
    if have_rev_nat != Some(&(key.addr, key.port)) || have.is_none_or(|h| h.label != wanted.label) {
        plan.upsert_rev_nats.push(RevNatWrite {
            id: rev_nat_id,
            frontend: *key,
            label: wanted.label.clone(),
        });
    }
    let have_slots = have.map_or(&[][..], |h| &h.slots);
    for (i, id) in wanted.slots.iter().enumerate() {
        if have_slots.get(i) != Some(id) {
            plan.upsert_slots.push(SlotWrite {
                frontend: *key,
                slot: (i + 1) as u16,
                backend_id: *id,
                rev_nat_id,
            });
        }
    }
    let have_ranges = have.map_or(&[][..], |h| &h.source_ranges);
    plan.upsert_source_ranges.extend(
        wanted
            .source_ranges
            .iter()
            .filter(|r| !have_ranges.contains(r))
            .map(|r| (rev_nat_id, *r)),
    );
    plan.delete_source_ranges.extend(
        have_ranges
            .iter()
            .filter(|r| !wanted.source_ranges.contains(r))
            .map(|r| (rev_nat_id, *r)),
    );
    let settings_differ = have.is_none_or(|h| {
        h.slots.len() != wanted.slots.len()
            || h.affinity_timeout != wanted.affinity_timeout
            || h.flags != wanted.flags
    });
    if settings_differ {
        plan.upsert_frontends.push(FrontendWrite {
            frontend: *key,
            count: wanted.slots.len() as u16,
            rev_nat_id,
            affinity_timeout: wanted.affinity_timeout,
            flags: wanted.flags,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::plan::{diff::tests::programmed_of, fixtures::*, ops::ProgrammedBackend};

    fn planned() -> Planner {
        let mut p = Planner::new();
        p.plan_service(
            &svc("web"),
            Some(&entry(&[("10.96.0.10", 80, &["10.0.0.1", "10.0.0.2"])])),
        );
        p
    }

    #[test]
    fn a_missing_maglev_table_is_built_again_and_one_nobody_wants_is_deleted() {
        let mut p = Planner::new();
        let mut e = entry(&[("192.168.1.10", 30080, &["10.0.0.1", "10.0.0.2"])]);
        e.frontends[0].flags =
            proxy_common::maps::svc_flags::NODE_PORT | proxy_common::maps::svc_flags::MAGLEV;
        p.plan_service(&svc("np"), Some(&e));
        let key = fkey("192.168.1.10", 30080);
        let id = p.frontend(&key).unwrap().rev_nat_id;
        let mut actual = programmed_of(&p);
        assert!(p.repair(&actual).is_empty());

        actual.maglev_tables.clear();
        actual.frontends.get_mut(&key).unwrap().maglev = false;
        actual.maglev_tables.push(999);
        let repair = p.repair(&actual);
        assert_eq!(repair.upsert_maglev.len(), 1);
        assert_eq!(repair.upsert_maglev[0].rev_nat_id, id);
        assert_eq!(repair.upsert_maglev[0].backends.len(), 2);
        assert_eq!(
            repair.delete_maglev.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            [999]
        );
        assert_eq!(repair.op_count(), 2, "nothing else: {repair:?}");
    }

    #[test]
    fn maps_that_match_need_no_repair() {
        let p = planned();
        assert!(p.repair(&programmed_of(&p)).is_empty());
    }

    #[test]
    fn each_kind_of_difference_is_rewritten_and_nothing_else() {
        let p = planned();
        let key = fkey("10.96.0.10", 80);
        let mut actual = programmed_of(&p);
        // A slot points elsewhere, the flags were changed, a backend was edited.
        let frontend = actual.frontends.get_mut(&key).unwrap();
        frontend.slots.swap(0, 1);
        frontend.flags = 0x40;
        let (backend, state) = {
            let (k, b) = actual.backends.iter_mut().next().unwrap();
            b.state.terminating = true;
            (*k, p.backends[k].state)
        };
        let repair = p.repair(&actual);
        assert_eq!(repair.upsert_slots.len(), 2, "{repair:?}");
        assert_eq!(repair.upsert_frontends.len(), 1);
        assert_eq!(repair.upsert_frontends[0].flags, p.frontends[&key].flags);
        let id = p.backends[&backend].id;
        assert_eq!(repair.upsert_backends, vec![(id, backend, state)]);
        assert!(repair.upsert_rev_nats.is_empty() && repair.delete_frontends.is_empty());
    }

    #[test]
    fn what_nobody_wants_is_removed_and_what_is_missing_is_written_whole() {
        let p = planned();
        let key = fkey("10.96.0.10", 80);
        let stray = fkey("10.96.7.7", 80);
        let mut actual = programmed_of(&p);
        let wanted = actual.frontends.remove(&key).unwrap();
        actual.rev_nats.clear();
        actual.frontends.insert(
            stray,
            ProgrammedFrontend {
                rev_nat_id: 99,
                ..wanted.clone()
            },
        );
        actual.rev_nats.insert(99, (stray.addr, stray.port));
        let orphan = BackendKey {
            addr: "10.0.0.9".parse().unwrap(),
            ..*actual.backends.keys().next().unwrap()
        };
        actual.backends.insert(
            orphan,
            ProgrammedBackend {
                id: 77,
                state: BackendState::default(),
            },
        );
        let repair = p.repair(&actual);
        assert_eq!(repair.upsert_rev_nats.len(), 1, "the lost frontend's rev-NAT");
        assert_eq!(repair.upsert_slots.len(), wanted.slots.len());
        assert_eq!(repair.upsert_frontends.len(), 1);
        assert_eq!(repair.delete_frontends, vec![stray]);
        assert_eq!(repair.delete_slots.len(), wanted.slots.len());
        assert_eq!(repair.delete_rev_nats.len(), 1);
        assert_eq!(repair.delete_rev_nats[0].0, 99);
        assert_eq!(repair.delete_backends, vec![(77, orphan)]);
    }
}
