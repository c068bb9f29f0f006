//! Property tests of the planner: random sequences of Service changes, deletions, failed
//! writes, repair passes and restarts, applied to an in-memory datapath one operation at a
//! time. After every operation no reader sees a half-written Service; after every step
//! that ends with whole maps, the planner's counts equal a recount, nothing stray is left, a
//! repair pass finds nothing, and the maps hold what the Services want. The fuzz target
//! `planner` runs the same checks on Services and EndpointSlices through the proxier.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use proptest::{prelude::*, sample::subsequence};
use proxy_common::maps::svc_flags;

use crate::pipeline::{
    model::{
        BackendKey, BackendState, Frontend, FrontendBackend, FrontendKey, FrontendKind, Protocol,
        ServiceEntry, ServiceName,
    },
    plan::{
        PlanSink as _, Planner,
        audit::{WatchedMaps, audit, reaches},
        ops::Plan,
    },
};

/// Few Services over few addresses, so that they share backends and fight over frontends.
const SERVICES: usize = 3;
const FRONTEND_ADDRS: [&str; 3] = ["10.96.0.1", "10.96.0.2", "fd00::1"];
const BACKEND_ADDRS: [&str; 5] = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::a", "fd00::b"];
const RANGES: [&str; 2] = ["192.0.2.0/24", "2001:db8::/32"];

#[derive(Clone, Debug)]
enum Step {
    Put(usize, ServiceEntry),
    Remove(usize),
    /// The next this many map writes fail.
    Fail(usize),
    Repair,
    /// A new planner adopts what the maps hold, plans every Service and releases the rest.
    Restart,
}

fn name(i: usize) -> ServiceName {
    ServiceName::new("default", format!("s{i}"))
}

fn frontend() -> impl Strategy<Value = Frontend> {
    let backend = (prop::sample::select(&BACKEND_ADDRS[..]), any::<bool>());
    (
        prop::sample::select(&FRONTEND_ADDRS[..]),
        prop::sample::select(&[80_u16, 53][..]),
        prop::sample::select(&[Protocol::Tcp, Protocol::Udp][..]),
        prop::sample::select(&[FrontendKind::ClusterIp, FrontendKind::LoadBalancer][..]),
        prop::collection::vec(backend, 0..5),
        prop::option::of(Just(10_800_u32)),
        subsequence(&RANGES[..], 0..=2),
        any::<bool>(),
    )
        .prop_map(
            |(addr, port, protocol, kind, backends, affinity_timeout, ranges, maglev)| {
                let mut seen = BTreeSet::new();
                let backends = backends
                    .into_iter()
                    // The inventory hands each backend once per frontend.
                    .filter(|(addr, _)| seen.insert(*addr))
                    .map(|(addr, terminating)| FrontendBackend {
                        key: BackendKey {
                            addr: addr.parse::<IpAddr>().unwrap(),
                            port: 8080,
                            protocol,
                        },
                        // A pod runs on one node: every slice agrees where an address is.
                        state: BackendState {
                            terminating,
                            local: addr.ends_with('1') || addr.ends_with('a'),
                        },
                    })
                    .collect();
                let source_ranges: Vec<IpNet> = ranges.iter().map(|r| r.parse().unwrap()).collect();
                let mut flags = kind.flag();
                if !source_ranges.is_empty() {
                    flags |= svc_flags::SOURCE_RANGES;
                }
                if maglev && kind.is_external() {
                    flags |= svc_flags::MAGLEV;
                }
                Frontend {
                    key: FrontendKey::new(addr.parse().unwrap(), port, protocol),
                    kind,
                    port_name: format!("p{port}"),
                    backends,
                    affinity_timeout,
                    flags: flags | affinity_timeout.map_or(0, |_| svc_flags::AFFINITY),
                    source_ranges,
                }
            },
        )
}

fn step() -> impl Strategy<Value = Step> {
    let entry = prop::collection::vec(frontend(), 0..4).prop_map(|frontends| ServiceEntry { frontends });
    prop_oneof![
        6 => (0..SERVICES, entry).prop_map(|(i, e)| Step::Put(i, e)),
        2 => (0..SERVICES).prop_map(Step::Remove),
        1 => (1..4_usize).prop_map(Step::Fail),
        1 => Just(Step::Repair),
        1 => Just(Step::Restart),
    ]
}

/// The planner, the maps it writes, and what each Service wants.
#[derive(Default)]
struct World {
    planner: Planner,
    sink: WatchedMaps,
    desired: BTreeMap<ServiceName, ServiceEntry>,
}

impl World {
    fn write(&mut self, plan: &Plan) -> Result<(), TestCaseError> {
        self.sink.apply(plan);
        match self.sink.torn.take() {
            Some(torn) => Err(TestCaseError::fail(torn)),
            None => Ok(()),
        }
    }

    /// Plans `service` and those a frontend it released lets in, as a sync does: each
    /// Service's plan written before the next is planned.
    fn plan(&mut self, service: ServiceName) -> Result<(), TestCaseError> {
        let mut queue = vec![service];
        while let Some(name) = queue.pop() {
            let out = self.planner.plan_service(&name, self.desired.get(&name));
            self.write(&out.plan)?;
            queue.extend(out.retry);
        }
        Ok(())
    }

    fn step(&mut self, step: Step) -> Result<(), TestCaseError> {
        self.planner.begin_sync();
        match step {
            Step::Put(i, entry) => {
                self.desired.insert(name(i), entry);
                self.plan(name(i))?;
            }
            Step::Remove(i) => {
                self.desired.remove(&name(i));
                self.plan(name(i))?;
            }
            Step::Fail(n) => self.sink.maps.failing = n,
            Step::Repair => {
                let actual = self.sink.maps.read_back().unwrap();
                let failing = self.sink.maps.failing;
                self.write(&self.planner.repair(&actual))?;
                self.sink.whole = failing == 0;
            }
            Step::Restart => {
                let whole = self.sink.whole && self.sink.maps.failing == 0;
                self.planner = Planner::adopt(self.sink.maps.read_back().unwrap());
                let ops_before = self.sink.maps.plans.len();
                let names: Vec<ServiceName> = self.desired.keys().cloned().collect();
                for name in names {
                    self.plan(name)?;
                }
                let released = self.planner.release_unclaimed();
                self.write(&released.plan)?;
                // Backend entries excepted: a state two Services' slices disagreed on stays as
                // the last one planned said, and the restart plans the remaining one's.
                let rewritten: Vec<&Plan> = self.sink.maps.plans[ops_before..]
                    .iter()
                    .filter(|p| p.upsert_backends.is_empty())
                    .collect();
                if whole && !self.contested() {
                    prop_assert!(
                        rewritten.is_empty(),
                        "a restart over whole maps rewrote {rewritten:?}"
                    );
                }
                // Entries the adopting planner never saw (a stray rev-NAT entry) wait for
                // the repair pass, as in the agent.
                self.sink.whole &= whole;
            }
        }
        Ok(())
    }

    /// Two Services want one frontend: which keeps it depends on the order they are planned
    /// in, which a restart does not remember.
    fn contested(&self) -> bool {
        let mut claims: BTreeMap<FrontendKey, BTreeSet<&ServiceName>> = BTreeMap::new();
        for (name, entry) in &self.desired {
            for f in &entry.frontends {
                claims.entry(f.key).or_default().insert(name);
            }
        }
        claims.values().any(|c| c.len() > 1)
    }

    fn check(&mut self) -> Result<(), TestCaseError> {
        if !self.sink.whole {
            return Ok(());
        }
        let mut problems = audit(&self.planner, &mut self.sink.maps, !self.sink.failed_ever);
        problems.extend(reaches(&self.planner, &self.desired));
        prop_assert!(problems.is_empty(), "{}", problems.join("\n"));
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1024,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn plans_leave_whole_maps_equal_to_a_recount_and_to_what_services_want(
        steps in prop::collection::vec(step(), 1..40)
    ) {
        let mut world = World::default();
        for step in steps {
            world.step(step)?;
            world.check()?;
        }
    }
}
