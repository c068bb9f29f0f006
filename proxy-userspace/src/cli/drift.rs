//! What `explain` reports: a Service's desired datapath state beside what the pinned maps hold,
//! and every difference named. Pure, so the comparison is unit-tested without maps.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde::Serialize;

use bpf_kube_proxy::{
    datapath::reader::FrontendView,
    pipeline::model::{BackendKey, BackendState, FrontendKey, ServiceEntry},
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Drift {
    /// The source wants this frontend; the maps lack it.
    MissingFrontend { frontend: FrontendKey },
    /// The maps hold this frontend for the Service; the source no longer wants it.
    UnexpectedFrontend { frontend: FrontendKey },
    MissingBackend {
        frontend: FrontendKey,
        backend: BackendKey,
    },
    UnexpectedBackend {
        frontend: FrontendKey,
        backend: BackendKey,
    },
    /// A slot names a backend id the backends map does not hold.
    DanglingSlot { frontend: FrontendKey, backend_id: u32 },
    BackendState {
        frontend: FrontendKey,
        backend: BackendKey,
        desired: (bool, bool),
        programmed: (bool, bool),
    },
    /// Datapath flags (kind, policy, source ranges) or the source ranges themselves differ.
    Settings {
        frontend: FrontendKey,
        desired: (u32, Vec<IpNet>),
        programmed: (u32, Vec<IpNet>),
    },
    Affinity {
        frontend: FrontendKey,
        desired: Option<u32>,
        programmed: Option<u32>,
    },
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MissingFrontend { frontend } => write!(f, "{frontend}: wanted, not in the maps"),
            Self::UnexpectedFrontend { frontend } => write!(f, "{frontend}: in the maps, not wanted"),
            Self::MissingBackend { frontend, backend } => {
                write!(f, "{frontend}: backend {backend} wanted, not in the maps")
            }
            Self::UnexpectedBackend { frontend, backend } => {
                write!(f, "{frontend}: backend {backend} in the maps, not wanted")
            }
            Self::DanglingSlot { frontend, backend_id } => {
                write!(
                    f,
                    "{frontend}: a slot names backend id {backend_id}, which does not exist"
                )
            }
            Self::BackendState {
                frontend,
                backend,
                desired,
                programmed,
            } => write!(
                f,
                "{frontend}: backend {backend} (terminating, local) wanted {desired:?}, programmed {programmed:?}"
            ),
            Self::Settings {
                frontend,
                desired,
                programmed,
            } => write!(
                f,
                "{frontend}: flags and source ranges wanted {desired:?}, programmed {programmed:?}"
            ),
            Self::Affinity {
                frontend,
                desired,
                programmed,
            } => write!(
                f,
                "{frontend}: affinity timeout wanted {desired:?}, programmed {programmed:?}"
            ),
        }
    }
}

fn pair(state: BackendState) -> (bool, bool) {
    (state.terminating, state.local)
}

/// Differences between `desired` (`None`: the Service should not be programmed) and the
/// frontends the maps label with this Service.
pub fn drift(desired: Option<&ServiceEntry>, programmed: &[&FrontendView]) -> Vec<Drift> {
    let mut out = Vec::new();
    let have: BTreeMap<FrontendKey, &FrontendView> = programmed.iter().map(|f| (f.frontend, *f)).collect();
    let wanted = desired.map(|d| d.frontends.as_slice()).unwrap_or_default();
    let wanted_keys: BTreeSet<FrontendKey> = wanted.iter().map(|f| f.key).collect();
    for f in wanted {
        let Some(view) = have.get(&f.key) else {
            out.push(Drift::MissingFrontend { frontend: f.key });
            continue;
        };
        // The plan writes each range once, in either family: both tc paths read them.
        let ranges = f.written_source_ranges();
        if (view.flags, &view.source_ranges) != (f.flags, &ranges) {
            out.push(Drift::Settings {
                frontend: f.key,
                desired: (f.flags, ranges),
                programmed: (view.flags, view.source_ranges.clone()),
            });
        }
        if view.affinity_timeout != f.affinity_timeout {
            out.push(Drift::Affinity {
                frontend: f.key,
                desired: f.affinity_timeout,
                programmed: view.affinity_timeout,
            });
        }
        let mut seen = BTreeMap::new();
        for b in &view.backends {
            match b.addr {
                Some(key) => {
                    seen.insert(
                        key,
                        BackendState {
                            terminating: b.terminating,
                            local: b.local,
                        },
                    );
                }
                None => out.push(Drift::DanglingSlot {
                    frontend: f.key,
                    backend_id: b.id,
                }),
            }
        }
        for b in &f.backends {
            match seen.remove(&b.key) {
                None => out.push(Drift::MissingBackend {
                    frontend: f.key,
                    backend: b.key,
                }),
                Some(state) if state != b.state => out.push(Drift::BackendState {
                    frontend: f.key,
                    backend: b.key,
                    desired: pair(b.state),
                    programmed: pair(state),
                }),
                Some(_) => {}
            }
        }
        out.extend(seen.into_keys().map(|backend| Drift::UnexpectedBackend {
            frontend: f.key,
            backend,
        }));
    }
    out.extend(
        have.keys()
            .filter(|k| !wanted_keys.contains(k))
            .map(|frontend| Drift::UnexpectedFrontend { frontend: *frontend }),
    );
    out
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use bpf_kube_proxy::{
        datapath::reader::BackendView,
        pipeline::model::{Frontend, FrontendBackend, FrontendKind, Protocol},
    };

    fn fkey(port: u16) -> FrontendKey {
        FrontendKey::new("10.96.0.10".parse().unwrap(), port, Protocol::Tcp)
    }

    fn bkey(addr: &str) -> BackendKey {
        BackendKey {
            addr: addr.parse::<IpAddr>().unwrap(),
            port: 8080,
            protocol: Protocol::Tcp,
        }
    }

    fn wanted(port: u16, backends: &[&str]) -> Frontend {
        Frontend {
            key: fkey(port),
            kind: FrontendKind::ClusterIp,
            port_name: "http".into(),
            backends: backends
                .iter()
                .map(|b| FrontendBackend {
                    key: bkey(b),
                    state: BackendState::default(),
                })
                .collect(),
            affinity_timeout: None,
            flags: 0,
            source_ranges: Vec::new(),
        }
    }

    fn view(port: u16, backends: &[Option<&str>]) -> FrontendView {
        FrontendView {
            frontend: fkey(port),
            service: "ns/web".into(),
            port_name: "http".into(),
            rev_nat_id: 1,
            affinity_timeout: None,
            flags: 0,
            source_ranges: Vec::new(),
            backends: backends
                .iter()
                .enumerate()
                .map(|(i, b)| BackendView {
                    id: i as u32 + 1,
                    addr: b.map(bkey),
                    terminating: false,
                    local: false,
                })
                .collect(),
            missing_slots: vec![],
            maglev: false,
        }
    }

    #[test]
    fn identical_state_has_no_drift() {
        let entry = ServiceEntry {
            frontends: vec![wanted(80, &["10.0.0.1", "10.0.0.2"])],
        };
        let v = view(80, &[Some("10.0.0.2"), Some("10.0.0.1")]);
        assert!(
            drift(Some(&entry), &[&v]).is_empty(),
            "slot order does not matter"
        );
    }

    #[test]
    fn every_kind_of_difference_is_named() {
        let mut affine = wanted(80, &["10.0.0.1", "10.0.0.2"]);
        affine.affinity_timeout = Some(30);
        affine.backends[0].state.terminating = true;
        let entry = ServiceEntry {
            frontends: vec![affine, wanted(81, &["10.0.0.1"])],
        };
        let v80 = view(80, &[Some("10.0.0.1"), Some("10.0.0.3"), None]);
        let v82 = view(82, &[]);
        let found = drift(Some(&entry), &[&v80, &v82]);
        let text: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "10.96.0.10:80/TCP: affinity timeout wanted Some(30), programmed None",
                "10.96.0.10:80/TCP: a slot names backend id 3, which does not exist",
                "10.96.0.10:80/TCP: backend 10.0.0.1:8080/TCP (terminating, local) wanted (true, false), programmed (false, false)",
                "10.96.0.10:80/TCP: backend 10.0.0.2:8080/TCP wanted, not in the maps",
                "10.96.0.10:80/TCP: backend 10.0.0.3:8080/TCP in the maps, not wanted",
                "10.96.0.10:81/TCP: wanted, not in the maps",
                "10.96.0.10:82/TCP: in the maps, not wanted",
            ]
        );
    }

    #[test]
    fn an_ipv6_load_balancer_frontend_compares_its_ipv6_source_ranges() {
        use proxy_common::maps::svc_flags;
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let key = FrontendKey::new("2001:db8::10".parse().unwrap(), 80, Protocol::Tcp);
        let flags = svc_flags::LOAD_BALANCER | svc_flags::SOURCE_RANGES;
        let mut desired = wanted(80, &["10.0.0.1"]);
        desired.key = key;
        desired.kind = FrontendKind::LoadBalancer;
        desired.flags = flags;
        // Unsorted, with a duplicate: the plan writes each range once.
        desired.source_ranges = vec![
            net("2001:db8:2::/48"),
            net("2001:db8:1::/48"),
            net("2001:db8:2::/48"),
        ];
        let entry = ServiceEntry {
            frontends: vec![desired],
        };
        let mut programmed = view(80, &[Some("10.0.0.1")]);
        programmed.frontend = key;
        programmed.flags = flags;
        programmed.source_ranges = vec![net("2001:db8:1::/48"), net("2001:db8:2::/48")];
        assert_eq!(
            drift(Some(&entry), &[&programmed]),
            [],
            "the IPv6 tc path reads these ranges, so the agent writes them"
        );
        programmed.source_ranges.pop();
        assert_eq!(
            drift(Some(&entry), &[&programmed]),
            [Drift::Settings {
                frontend: key,
                desired: (flags, vec![net("2001:db8:1::/48"), net("2001:db8:2::/48")]),
                programmed: (flags, vec![net("2001:db8:1::/48")]),
            }]
        );
    }

    #[test]
    fn a_service_that_should_not_exist_drifts_by_each_frontend_it_still_has() {
        let v = view(80, &[Some("10.0.0.1")]);
        assert_eq!(
            drift(None, &[&v]),
            [Drift::UnexpectedFrontend { frontend: fkey(80) }]
        );
    }
}
