//! What the maps can hold, and what the planner refuses to do. A plan writes all of its
//! additions before any deletion, so a Service is admitted only if the sync's peak, not its
//! end state, fits: a Service that does not fit is refused whole and keeps what it had.

use std::net::IpAddr;

use crate::pipeline::{
    model::{FrontendKey, ServiceName},
    plan::ops::MAX_SLOTS,
};

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
    TooManyBackends { frontend: FrontendKey, wanted: usize },
    /// Programming the Service would overflow a map: nothing of the change is written and the
    /// Service keeps what it had, so it is never half programmed.
    MapFull {
        service: ServiceName,
        map: &'static str,
        needed: u64,
        capacity: u32,
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
            Self::MapFull {
                service,
                map,
                needed,
                capacity,
            } => write!(
                f,
                "Service {service} could not be programmed: map {map} would need {needed} entries, \
                 its capacity is {capacity}; its previous state stays"
            ),
            Self::TooManyBackends { frontend, wanted } => {
                write!(
                    f,
                    "frontend {frontend}: {wanted} backends, only the first {MAX_SLOTS} are used"
                )
            }
        }
    }
}

/// Entries each family's maps can hold: the agent's map sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub services: u32,
    pub backends: u32,
    pub rev_nat: u32,
}

impl Capacity {
    pub(crate) const UNLIMITED: Self = Self {
        services: u32::MAX,
        backends: u32::MAX,
        rev_nat: u32::MAX,
    };
}

/// Map entries of one family, counted or about to be written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub services: u64,
    pub backends: u64,
    pub rev_nat: u64,
}

impl Usage {
    pub(super) fn add(&mut self, other: Usage) {
        self.services += other.services;
        self.backends += other.backends;
        self.rev_nat += other.rev_nat;
    }
}

/// Per map kind, the larger family of `a + b` (both maps of a kind share one capacity).
fn larger_family(a: [Usage; 2], b: [Usage; 2]) -> Usage {
    let [mut v4, mut v6] = a;
    v4.add(b[V4]);
    v6.add(b[V6]);
    Usage {
        services: v4.services.max(v6.services),
        backends: v4.backends.max(v6.backends),
        rev_nat: v4.rev_nat.max(v6.rev_nat),
    }
}

const V4: usize = 0;
const V6: usize = 1;

/// The index of `addr`'s family in a per-family `[Usage; 2]`.
pub(super) fn family(addr: IpAddr) -> usize {
    if addr.is_ipv4() { V4 } else { V6 }
}

/// The entries the programmed state holds per family, weighed against the maps' capacity.
#[derive(Debug)]
pub(super) struct Ledger {
    capacity: Capacity,
    /// Per family: the map entries the programmed state holds, kept in step with every
    /// insertion and removal so that a sync need not count them (at 10 000 Services a recount
    /// cost more than programming one endpoint change).
    held: [Usage; 2],
    /// Per family: entries held when the current sync began, plus those its plans add so far.
    /// A plan writes all additions before any deletion, so this is the sync's peak.
    peak: [Usage; 2],
    /// Per family: what the current sync's refused Services would have added to `peak`.
    refused: [Usage; 2],
}

impl Ledger {
    pub(super) fn new() -> Self {
        Self {
            capacity: Capacity::UNLIMITED,
            held: [Usage::default(); 2],
            peak: [Usage::default(); 2],
            refused: [Usage::default(); 2],
        }
    }

    pub(super) fn set_capacity(&mut self, capacity: Capacity) {
        self.capacity = capacity;
    }

    pub(super) fn begin_sync(&mut self) {
        self.peak = self.held;
        self.refused = [Usage::default(); 2];
    }

    /// The capacity the current sync would have needed to refuse nothing: per map kind, the
    /// larger family's peak plus what its refused Services would have added.
    pub(super) fn needed(&self) -> Usage {
        larger_family(self.peak, self.refused)
    }

    /// The capacity the programmed state plus `adds` (per family) needs: per map kind, the
    /// larger family.
    pub(super) fn needed_with(&self, adds: [Usage; 2]) -> Usage {
        larger_family(self.held, adds)
    }

    pub(super) fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// A frontend entry with `slots` slot entries, and its rev-NAT entry.
    pub(super) fn add_frontend(&mut self, addr: IpAddr, slots: usize) {
        let held = &mut self.held[family(addr)];
        held.services += 1 + slots as u64;
        held.rev_nat += 1;
    }

    pub(super) fn remove_frontend(&mut self, addr: IpAddr, slots: usize) {
        let held = &mut self.held[family(addr)];
        held.services -= 1 + slots as u64;
        held.rev_nat -= 1;
    }

    pub(super) fn add_backend(&mut self, addr: IpAddr) {
        self.held[family(addr)].backends += 1;
    }

    pub(super) fn remove_backend(&mut self, addr: IpAddr) {
        self.held[family(addr)].backends -= 1;
    }

    /// Counts `adds` into the sync's peak, or refuses `service` with the first map they would
    /// overflow.
    pub(super) fn reserve(&mut self, service: &ServiceName, adds: [Usage; 2]) -> Result<(), PlanIssue> {
        use proxy_common::maps as names;
        let cap = self.capacity;
        for (fam, maps) in [
            (V4, [names::SERVICES_V4, names::BACKENDS_V4, names::REV_NAT_V4]),
            (V6, [names::SERVICES_V6, names::BACKENDS_V6, names::REV_NAT_V6]),
        ] {
            let (peak, add) = (self.peak[fam], adds[fam]);
            let checks = [
                (maps[0], peak.services + add.services, cap.services),
                (maps[1], peak.backends + add.backends, cap.backends),
                (maps[2], peak.rev_nat + add.rev_nat, cap.rev_nat),
            ];
            if let Some((map, needed, capacity)) = checks.into_iter().find(|(_, n, c)| *n > u64::from(*c)) {
                for (refused, add) in self.refused.iter_mut().zip(adds) {
                    refused.add(add);
                }
                return Err(PlanIssue::MapFull {
                    service: service.clone(),
                    map,
                    needed,
                    capacity,
                });
            }
        }
        for (peak, add) in self.peak.iter_mut().zip(adds) {
            peak.add(add);
        }
        Ok(())
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub(super) fn held(&self) -> [Usage; 2] {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::plan::{Planner, fixtures::*};

    #[test]
    fn a_sync_reports_the_capacity_it_needed_to_refuse_nothing() {
        let mut p = Planner::new().with_capacity(Capacity {
            services: 6,
            ..Capacity::UNLIMITED
        });
        p.begin_sync();
        let web = entry(&[("10.96.0.10", 80, &["10.0.0.1", "10.0.0.2"])]);
        let db = entry(&[("fd00::12", 80, &["fd00::1:7"])]);
        assert!(p.plan_service(&svc("web"), Some(&web)).issues.is_empty());
        assert!(p.plan_service(&svc("db"), Some(&db)).issues.is_empty());
        let before = p.needed();
        assert_eq!(before.backends, 2, "the v4 family's 2, more than v6's 1");
        // api needs a frontend and 4 slots more than the 6 entries: refused, and counted.
        let api = entry(&[(
            "10.96.0.11",
            80,
            &["10.0.0.7", "10.0.0.8", "10.0.0.9", "10.0.0.10"],
        )]);
        assert!(!p.plan_service(&svc("api"), Some(&api)).issues.is_empty());
        let needed = p.needed();
        assert!(needed.services >= before.services + 5, "{before:?} {needed:?}");
        assert!(needed.services > 6, "{needed:?}");
        assert_eq!(needed.backends, 6, "web's 2 and api's 4");
        // A new sync starts counting again, from what is held.
        p.begin_sync();
        assert_eq!(p.needed(), before);
    }

    /// The census before a sync is what the sync then needs with room to spare: every
    /// Service fits maps sized from it, and none is refused.
    #[test]
    fn a_census_before_the_first_sync_sizes_maps_that_refuse_nothing() {
        let web = entry(&[("10.96.0.10", 80, &["10.0.0.1", "10.0.0.2"])]);
        let api = entry(&[("10.96.0.11", 80, &["10.0.0.2", "10.0.0.3", "10.0.0.4"])]);
        let db = entry(&[("fd00::12", 80, &["fd00::1:7"])]);
        let services = [(svc("web"), web), (svc("api"), api), (svc("db"), db)];
        let census = Planner::new().census(services.iter().map(|(n, e)| (n, e.clone())));
        // v4: 2 frontends (3 and 4 entries), 2 rev-NAT ids; backends 2 + 3, the shared
        // 10.0.0.2 counted for each Service (an upper bound).
        assert_eq!(
            census,
            Usage {
                services: 7,
                backends: 5,
                rev_nat: 2
            }
        );
        let mut p = Planner::new().with_capacity(Capacity {
            services: census.services as u32,
            backends: census.backends as u32,
            rev_nat: census.rev_nat as u32,
        });
        p.begin_sync();
        for (name, entry) in &services {
            assert!(p.plan_service(name, Some(entry)).issues.is_empty(), "{name}");
        }
        assert!(p.needed().services <= census.services && p.needed().backends <= census.backends);
        // Counted on top of what is programmed: planned again, nothing is added.
        assert_eq!(p.census(services.iter().map(|(n, e)| (n, e.clone()))), p.needed());
    }

    #[test]
    fn a_service_that_would_overflow_a_map_is_refused_whole_and_keeps_its_previous_state() {
        // Room for 2 frontends with 2 slots each in the services map.
        let mut p = Planner::new().with_capacity(Capacity {
            services: 6,
            ..Capacity::UNLIMITED
        });
        p.begin_sync();
        let web = entry(&[("10.96.0.10", 80, &["10.0.0.1", "10.0.0.2"])]);
        assert!(p.plan_service(&svc("web"), Some(&web)).issues.is_empty());

        // Growing web to 4 backends needs 2 more entries: fits (3 + 2 <= 6).
        p.begin_sync();
        let bigger = entry(&[("10.96.0.10", 80, &["10.0.0.1", "10.0.0.2", "10.0.0.3"])]);
        assert!(p.plan_service(&svc("web"), Some(&bigger)).issues.is_empty());

        // A second Service needing 3 entries does not (4 + 3 > 6): nothing of it is planned.
        p.begin_sync();
        let api = entry(&[("10.96.0.11", 80, &["10.0.0.7", "10.0.0.8"])]);
        let out = p.plan_service(&svc("api"), Some(&api));
        assert!(out.plan.is_empty(), "no half-programmed Service: {:?}", out.plan);
        assert!(
            matches!(
                &out.issues[..],
                [PlanIssue::MapFull {
                    map: "bkp_svc_v4",
                    needed: 7,
                    capacity: 6,
                    ..
                }]
            ),
            "{:?}",
            out.issues
        );
        assert!(p.frontend(&fkey("10.96.0.11", 80)).is_none());
        assert_eq!(p.backend_count(), 3, "its backends were not allocated either");

        // Within one sync, additions count before deletions: shrinking web and adding api in
        // the same sync would briefly need both, so api waits for the next sync.
        p.begin_sync();
        let smaller = entry(&[("10.96.0.10", 80, &["10.0.0.1"])]);
        assert!(p.plan_service(&svc("web"), Some(&smaller)).issues.is_empty());
        assert!(!p.plan_service(&svc("api"), Some(&api)).issues.is_empty());
        p.begin_sync();
        assert!(p.plan_service(&svc("api"), Some(&api)).issues.is_empty());
    }
}
