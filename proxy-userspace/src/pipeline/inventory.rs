//! The latest validated Services and EndpointSlices, and the desired frontends of each Service.
//!
//! Every mutation returns the Services it touched, so a sync recomputes and re-plans only those
//! (an endpoint change at 10 000 Services costs one Service's work, not 10 000).

use std::{collections::BTreeSet, net::IpAddr};

use foldhash::{HashMap, HashSet};

use crate::{
    pipeline::model::{
        BackendKey, BackendState, Endpoint, Frontend, FrontendBackend, FrontendKey, FrontendKind,
        LbAlgorithm, NodeInfo, Protocol, Scope, ServiceEntry, ServiceInfo, ServiceName, ServicePort,
        SliceInfo, TrafficPolicy,
    },
    pipeline::policy,
};
use ipnet::IpNet;
use proxy_common::maps::svc_flags;

#[derive(Debug, Default)]
pub(crate) struct Inventory {
    services: HashMap<ServiceName, ServiceInfo>,
    /// Slices by the Service they name, sorted by slice name so merging is stable. A Service has
    /// a slice or a few: a sorted Vec holds them without a B-tree node per Service.
    slices: HashMap<ServiceName, Vec<SliceInfo>>,
    /// Which Service each slice (namespace, name) currently names: a relabelled slice moves.
    slice_owner: HashMap<(String, String), ServiceName>,
    /// Services that serve a healthCheckNodePort, so that each sync visits only those.
    health_checked: BTreeSet<ServiceName>,
    node: NodeInfo,
}

impl Inventory {
    pub fn new(node: NodeInfo) -> Self {
        Self {
            node,
            ..Default::default()
        }
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    pub fn service(&self, name: &ServiceName) -> Option<&ServiceInfo> {
        self.services.get(name)
    }

    pub(crate) fn slices_of(&self, name: &ServiceName) -> impl Iterator<Item = &SliceInfo> {
        self.slices.get(name).into_iter().flatten()
    }

    pub(crate) fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Returns the Service if this changed it.
    pub(crate) fn upsert_service(&mut self, info: ServiceInfo) -> Option<ServiceName> {
        if self.services.get(&info.name) == Some(&info) {
            return None;
        }
        let name = info.name.clone();
        if health_check_port(&info).is_some() {
            self.health_checked.insert(name.clone());
        } else {
            self.health_checked.remove(&name);
        }
        self.services.insert(name.clone(), info);
        Some(name)
    }

    pub(crate) fn remove_service(&mut self, name: &ServiceName) -> Option<ServiceName> {
        self.health_checked.remove(name);
        self.services.remove(name).map(|_| name.clone())
    }

    /// Returns the Services whose endpoints this changed (two when a slice is relabelled).
    pub fn upsert_slice(&mut self, slice: SliceInfo) -> Vec<ServiceName> {
        let id = (slice.namespace.clone(), slice.name.clone());
        let mut touched = Vec::new();
        if let Some(previous) = self.slice_owner.get(&id)
            && *previous != slice.service
        {
            touched.extend(self.remove_slice(&id.0, &id.1));
        }
        let slices = self.slices.entry(slice.service.clone()).or_default();
        let at = slices.binary_search_by(|s| s.name.cmp(&slice.name));
        if at.is_ok_and(|at| slices[at] == slice) {
            return touched;
        }
        touched.push(slice.service.clone());
        self.slice_owner.insert(id, slice.service.clone());
        match at {
            Ok(at) => slices[at] = slice,
            Err(at) => {
                // Most Services have one slice: no room for four.
                slices.reserve_exact(1);
                slices.insert(at, slice);
            }
        }
        touched
    }

    pub(crate) fn remove_slice(&mut self, namespace: &str, name: &str) -> Option<ServiceName> {
        let owner = self
            .slice_owner
            .remove(&(namespace.to_string(), name.to_string()))?;
        if let Some(slices) = self.slices.get_mut(&owner) {
            slices.retain(|s| s.name != name);
            if slices.is_empty() {
                self.slices.remove(&owner);
            }
        }
        Some(owner)
    }

    /// A node change (name or zone) can change every Service's endpoint choice.
    pub(crate) fn set_node(&mut self, node: NodeInfo) -> Vec<ServiceName> {
        if self.node == node {
            return Vec::new();
        }
        self.node = node;
        self.services.keys().cloned().collect()
    }

    /// Replaces every Service with a complete list (a manifest reload or an API relist) and
    /// returns the Services that changed, deletions included.
    pub fn replace_services(&mut self, services: Vec<ServiceInfo>) -> BTreeSet<ServiceName> {
        let mut touched = BTreeSet::new();
        let keep: HashSet<&ServiceName> = services.iter().map(|s| &s.name).collect();
        let gone: Vec<ServiceName> = self
            .services
            .keys()
            .filter(|n| !keep.contains(n))
            .cloned()
            .collect();
        for name in gone {
            touched.extend(self.remove_service(&name));
        }
        for svc in services {
            touched.extend(self.upsert_service(svc));
        }
        touched
    }

    /// Replaces every EndpointSlice with a complete list; returns the Services affected.
    pub fn replace_slices(&mut self, slices: Vec<SliceInfo>) -> BTreeSet<ServiceName> {
        let mut touched = BTreeSet::new();
        let keep: HashSet<(&str, &str)> = slices
            .iter()
            .map(|s| (s.namespace.as_str(), s.name.as_str()))
            .collect();
        let gone: Vec<(String, String)> = self
            .slice_owner
            .keys()
            .filter(|(ns, name)| !keep.contains(&(ns.as_str(), name.as_str())))
            .cloned()
            .collect();
        for (namespace, name) in gone {
            touched.extend(self.remove_slice(&namespace, &name));
        }
        for slice in slices {
            touched.extend(self.upsert_slice(slice));
        }
        touched
    }

    /// Endpoints of one service port from every slice of the Service, matched by port name and
    /// protocol, one entry per address and port (kube-proxy dedupes by "ip:port"; the first
    /// slice in name order wins).
    pub(crate) fn endpoints_for(&self, svc: &ServiceInfo, port: &ServicePort) -> Vec<Endpoint> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for slice in self.slices_of(&svc.name) {
            let Some(slice_port) = slice
                .ports
                .iter()
                .find(|p| p.name == port.name && p.protocol == port.protocol)
            else {
                continue;
            };
            for ep in &slice.endpoints {
                if !seen.insert((ep.addr, slice_port.port)) {
                    continue;
                }
                out.push(Endpoint {
                    addr: ep.addr,
                    port: slice_port.port,
                    ready: ep.ready,
                    serving: ep.serving,
                    terminating: ep.terminating,
                    local: ep.node_name.as_deref() == Some(self.node.name.as_str()),
                    hints: ep.hints.clone(),
                });
            }
        }
        out
    }

    /// The desired datapath state of one Service; `None` when it is not (or no longer) proxied.
    pub fn desired(&self, name: &ServiceName) -> Option<ServiceEntry> {
        let svc = self.services.get(name)?;
        let mut frontends = Vec::new();
        for port in &svc.ports {
            let endpoints = self.endpoints_for(svc, port);
            for family_v4 in [true, false] {
                let family: Vec<Endpoint> = endpoints
                    .iter()
                    .filter(|e| e.addr.is_ipv4() == family_v4)
                    .cloned()
                    .collect();
                let cat = policy::categorize(svc, &family, &self.node);
                let to_backends = |eps: &[&Endpoint]| -> Vec<FrontendBackend> {
                    eps.iter()
                        .map(|e| FrontendBackend {
                            key: BackendKey {
                                addr: e.addr,
                                port: e.port,
                                protocol: port.protocol,
                            },
                            state: BackendState {
                                terminating: e.terminating,
                                local: e.local,
                            },
                        })
                        .collect()
                };
                let internal = match svc.internal_policy {
                    TrafficPolicy::Cluster => to_backends(&cat.cluster),
                    TrafficPolicy::Local => to_backends(&cat.local),
                };
                // Traffic that starts on this node and targets an external address is served
                // by the cluster-wide endpoints, as kube-proxy's "short-circuit" rules do; only
                // traffic from outside is narrowed by externalTrafficPolicy Local.
                let cluster = to_backends(&cat.cluster);
                let external_local = svc.external_policy == TrafficPolicy::Local;
                let node_ports = port.node_port.into_iter().flat_map(|node_port| {
                    self.node
                        .node_port_addresses
                        .iter()
                        .map(move |a| (*a, node_port, FrontendKind::NodePort))
                });
                let addrs = svc
                    .cluster_ips
                    .iter()
                    .map(|a| (*a, port.port, FrontendKind::ClusterIp))
                    .chain(
                        svc.external_ips
                            .iter()
                            .map(|a| (*a, port.port, FrontendKind::ExternalIp)),
                    )
                    .chain(
                        svc.load_balancer_ips
                            .iter()
                            .map(|a| (*a, port.port, FrontendKind::LoadBalancer)),
                    )
                    .chain(node_ports)
                    .filter(|(a, _, _)| a.is_ipv4() == family_v4);
                for (addr, frontend_port, kind) in addrs {
                    let key = FrontendKey::new(addr, frontend_port, port.protocol);
                    // Each family's frontends take that family's ranges; a family with none
                    // is not restricted, as kube-proxy filters the ranges per family.
                    let source_ranges: Vec<IpNet> = if kind == FrontendKind::LoadBalancer {
                        svc.load_balancer_source_ranges
                            .iter()
                            .filter(|r| r.addr().is_ipv4() == family_v4)
                            .copied()
                            .collect()
                    } else {
                        Vec::new()
                    };
                    let mut flags = kind.flag();
                    if !source_ranges.is_empty() {
                        flags |= svc_flags::SOURCE_RANGES;
                    }
                    let local_view = kind.is_external() && external_local;
                    if local_view {
                        flags |= svc_flags::EXT_LOCAL;
                    }
                    // The entry the tc path picks from for traffic from outside: the local view
                    // under externalTrafficPolicy Local, else this one.
                    let maglev = maglev_flag(svc, kind, addr);
                    if !local_view {
                        flags |= maglev;
                    }
                    frontends.push(Frontend {
                        key,
                        kind,
                        port_name: port.name.clone(),
                        backends: if kind == FrontendKind::ClusterIp {
                            internal.clone()
                        } else {
                            cluster.clone()
                        },
                        affinity_timeout: svc.session_affinity_timeout,
                        flags,
                        source_ranges,
                    });
                    if local_view {
                        frontends.push(Frontend {
                            key: FrontendKey {
                                scope: Scope::ExternalLocal,
                                ..key
                            },
                            kind,
                            port_name: port.name.clone(),
                            backends: to_backends(&cat.local),
                            affinity_timeout: svc.session_affinity_timeout,
                            flags: kind.flag() | maglev,
                            source_ranges: Vec::new(),
                        });
                    }
                }
            }
        }
        // One guard per ClusterIP: ports and protocols the Service does not serve are refused
        // rather than sent to an address nobody answers (kube-proxy rejects them too).
        frontends.extend(svc.cluster_ips.iter().map(|addr| Frontend {
            key: FrontendKey::new(*addr, 0, Protocol::Any),
            kind: FrontendKind::ClusterIp,
            port_name: GUARD_PORT_NAME.to_string(),
            backends: Vec::new(),
            affinity_timeout: None,
            flags: 0,
            source_ranges: Vec::new(),
        }));
        Some(ServiceEntry { frontends })
    }
}

/// A healthCheckNodePort this node must serve, and what it answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HealthCheck {
    pub port: u16,
    pub service: ServiceName,
    /// Ready endpoints on this node, counted as kube-proxy's LocalReadyEndpoints does: distinct
    /// addresses over all of the Service's ports, so a multi-port endpoint counts once.
    pub(crate) local_endpoints: usize,
}

impl Inventory {
    /// The healthCheckNodePorts of Services with externalTrafficPolicy Local, by port.
    pub(crate) fn health_checks(&self) -> Vec<HealthCheck> {
        let mut out: Vec<HealthCheck> = self
            .health_checked
            .iter()
            .filter_map(|name| self.services.get(name))
            .filter_map(|svc| {
                let local_endpoints = svc
                    .ports
                    .iter()
                    .flat_map(|port| self.endpoints_for(svc, port))
                    .filter(|e| e.local && e.ready)
                    .map(|e| e.addr)
                    .collect::<BTreeSet<_>>()
                    .len();
                Some(HealthCheck {
                    port: health_check_port(svc)?,
                    service: svc.name.clone(),
                    local_endpoints,
                })
            })
            .collect();
        out.sort_by_key(|c| c.port);
        out
    }
}

/// The healthCheckNodePort this node serves for `svc`: only under externalTrafficPolicy Local.
fn health_check_port(svc: &ServiceInfo) -> Option<u16> {
    (svc.external_policy == TrafficPolicy::Local && svc.externally_accessible())
        .then_some(svc.health_check_node_port)
        .flatten()
}

/// Port name shown for a ClusterIP's guard frontend (real port names cannot contain `*`).
pub(crate) const GUARD_PORT_NAME: &str = "*";

/// [`svc_flags::MAGLEV`] for an external frontend of a Maglev Service (loopback never arrives
/// on a device, so its frontends need no table).
fn maglev_flag(svc: &ServiceInfo, kind: FrontendKind, addr: IpAddr) -> u32 {
    if kind.is_external() && svc.lb_algorithm == LbAlgorithm::Maglev && !addr.is_loopback() {
        svc_flags::MAGLEV
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use ipnet::IpNet;

    use super::*;
    use crate::pipeline::model::{SliceEndpoint, SlicePort};

    fn service(name: &str, ips: &[&str], ports: &[(&str, u16, Protocol)]) -> ServiceInfo {
        ServiceInfo {
            name: ServiceName::new("ns", name),
            cluster_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            external_ips: vec![],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: vec![],
            ports: ports
                .iter()
                .map(|(n, p, proto)| ServicePort {
                    name: n.to_string(),
                    port: *p,
                    protocol: *proto,
                    node_port: None,
                })
                .collect(),
            session_affinity_timeout: None,
            internal_policy: TrafficPolicy::Cluster,
            external_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
            lb_algorithm: LbAlgorithm::Random,
        }
    }

    fn slice(name: &str, service: &str, ports: &[(&str, u16, Protocol)], addrs: &[&str]) -> SliceInfo {
        SliceInfo {
            namespace: "ns".into(),
            name: name.into(),
            service: ServiceName::new("ns", service),
            ports: ports
                .iter()
                .map(|(n, p, proto)| SlicePort {
                    name: n.to_string(),
                    port: *p,
                    protocol: *proto,
                })
                .collect(),
            endpoints: addrs
                .iter()
                .map(|a| SliceEndpoint {
                    addr: a.parse().unwrap(),
                    ready: true,
                    serving: true,
                    terminating: false,
                    node_name: Some("n1".into()),
                    hints: crate::pipeline::model::Hints::default(),
                })
                .collect(),
        }
    }

    fn backends(entry: &ServiceEntry, frontend: &str, port: u16, protocol: Protocol) -> Vec<String> {
        let addr: IpAddr = frontend.parse().unwrap();
        let f = entry
            .frontends
            .iter()
            .find(|f| f.key.addr == addr && f.key.port == port && f.key.protocol == protocol)
            .unwrap_or_else(|| panic!("no frontend {frontend}:{port}/{protocol}"));
        f.backends
            .iter()
            .map(|b| format!("{}:{}", b.key.addr, b.key.port))
            .collect()
    }

    fn inventory() -> Inventory {
        Inventory::new(NodeInfo {
            name: "n1".into(),
            zone: None,
            node_port_addresses: vec!["192.168.1.10".parse().unwrap()],
        })
    }

    const TCP: Protocol = Protocol::Tcp;
    const UDP: Protocol = Protocol::Udp;

    #[test]
    fn slices_are_joined_by_service_name_and_merged_without_duplicates() {
        let mut inv = inventory();
        inv.upsert_service(service("web", &["10.96.0.10"], &[("http", 80, TCP)]));
        inv.upsert_slice(slice(
            "web-a",
            "web",
            &[("http", 8080, TCP)],
            &["10.0.0.1", "10.0.0.2"],
        ));
        inv.upsert_slice(slice(
            "web-b",
            "web",
            &[("http", 8080, TCP)],
            &["10.0.0.2", "10.0.0.3"],
        ));
        inv.upsert_slice(slice("other", "api", &[("http", 8080, TCP)], &["10.0.0.9"]));
        let entry = inv.desired(&ServiceName::new("ns", "web")).unwrap();
        assert_eq!(
            backends(&entry, "10.96.0.10", 80, TCP),
            ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]
        );
    }

    #[test]
    fn multiport_service_matches_slice_ports_by_name_and_protocol() {
        let mut inv = inventory();
        inv.upsert_service(service(
            "web",
            &["10.96.0.10"],
            &[
                ("http", 80, TCP),
                ("metrics", 9090, TCP),
                ("dns", 53, UDP),
                ("dns-tcp", 53, TCP),
            ],
        ));
        inv.upsert_slice(slice(
            "web-a",
            "web",
            &[
                ("http", 8080, TCP),
                ("metrics", 9100, TCP),
                ("dns", 5353, UDP),
                ("dns-tcp", 5354, TCP),
            ],
            &["10.0.0.1"],
        ));
        let e = inv.desired(&ServiceName::new("ns", "web")).unwrap();
        assert_eq!(backends(&e, "10.96.0.10", 80, TCP), ["10.0.0.1:8080"]);
        assert_eq!(backends(&e, "10.96.0.10", 9090, TCP), ["10.0.0.1:9100"]);
        assert_eq!(backends(&e, "10.96.0.10", 53, UDP), ["10.0.0.1:5353"]);
        assert_eq!(backends(&e, "10.96.0.10", 53, TCP), ["10.0.0.1:5354"]);
    }

    #[test]
    fn unknown_ports_of_each_cluster_ip_are_rejected_but_external_ips_are_not_guarded() {
        let mut inv = inventory();
        let mut svc = service("web", &["10.96.0.10", "fd00::10"], &[("http", 80, TCP)]);
        svc.external_ips = vec!["192.0.2.1".parse().unwrap()];
        inv.upsert_service(svc);
        let e = inv.desired(&ServiceName::new("ns", "web")).unwrap();
        let guards: Vec<String> = e
            .frontends
            .iter()
            .filter(|f| f.key.protocol == Protocol::Any)
            .map(|f| {
                assert!(f.backends.is_empty(), "a guard only rejects");
                assert_eq!(f.key.port, 0);
                f.key.addr.to_string()
            })
            .collect();
        assert_eq!(guards, ["10.96.0.10", "fd00::10"]);
    }

    #[test]
    fn a_port_with_no_matching_slice_port_has_no_backends() {
        let mut inv = inventory();
        inv.upsert_service(service("web", &["10.96.0.10"], &[("http", 80, TCP)]));
        inv.upsert_slice(slice("web-a", "web", &[("other", 8080, TCP)], &["10.0.0.1"]));
        let e = inv.desired(&ServiceName::new("ns", "web")).unwrap();
        assert!(backends(&e, "10.96.0.10", 80, TCP).is_empty());
    }

    #[test]
    fn each_cluster_ip_family_uses_only_endpoints_of_its_family() {
        let mut inv = inventory();
        inv.upsert_service(service("web", &["10.96.0.10", "fd00::10"], &[("", 80, TCP)]));
        inv.upsert_slice(slice("v4", "web", &[("", 8080, TCP)], &["10.0.0.1"]));
        inv.upsert_slice(slice("v6", "web", &[("", 8080, TCP)], &["fd00::1"]));
        let e = inv.desired(&ServiceName::new("ns", "web")).unwrap();
        assert_eq!(backends(&e, "10.96.0.10", 80, TCP), ["10.0.0.1:8080"]);
        assert_eq!(backends(&e, "fd00::10", 80, TCP), ["fd00::1:8080"]);
    }

    #[test]
    fn internal_traffic_policy_local_applies_to_cluster_ip_but_not_to_external_ips() {
        let mut inv = inventory();
        let mut svc = service("web", &["10.96.0.10"], &[("", 80, TCP)]);
        svc.internal_policy = TrafficPolicy::Local;
        svc.external_ips = vec!["192.0.2.1".parse().unwrap()];
        inv.upsert_service(svc);
        let mut s = slice("a", "web", &[("", 8080, TCP)], &["10.0.0.1", "10.0.0.2"]);
        s.endpoints[1].node_name = Some("n2".into());
        inv.upsert_slice(s);
        let e = inv.desired(&ServiceName::new("ns", "web")).unwrap();
        assert_eq!(backends(&e, "10.96.0.10", 80, TCP), ["10.0.0.1:8080"]);
        assert_eq!(
            backends(&e, "192.0.2.1", 80, TCP),
            ["10.0.0.1:8080", "10.0.0.2:8080"]
        );
    }

    fn external_service(policy: TrafficPolicy) -> ServiceInfo {
        let mut svc = service("web", &["10.96.0.10"], &[("", 80, TCP)]);
        svc.ports[0].node_port = Some(30080);
        svc.load_balancer_ips = vec!["203.0.113.10".parse().unwrap()];
        svc.load_balancer_source_ranges = vec!["192.0.2.0/24".parse().unwrap()];
        svc.external_policy = policy;
        svc.health_check_node_port = Some(32000);
        svc
    }

    fn local_and_remote() -> SliceInfo {
        let mut s = slice("a", "web", &[("", 8080, TCP)], &["10.0.0.1", "10.0.0.2"]);
        s.endpoints[1].node_name = Some("n2".into());
        s
    }

    fn find<'a>(e: &'a ServiceEntry, addr: &str, port: u16, scope: Scope) -> &'a Frontend {
        let addr: IpAddr = addr.parse().unwrap();
        e.frontends
            .iter()
            .find(|f| f.key.addr == addr && f.key.port == port && f.key.scope == scope)
            .unwrap_or_else(|| panic!("no frontend {addr}:{port} {scope:?}"))
    }

    #[test]
    fn node_ports_are_served_on_every_node_port_address_with_kind_flags() {
        let mut inv = inventory();
        inv.upsert_service(external_service(TrafficPolicy::Cluster));
        inv.upsert_slice(local_and_remote());
        let e = inv.desired(&ServiceName::new("ns", "web")).unwrap();
        let node_port = find(&e, "192.168.1.10", 30080, Scope::All);
        assert_eq!(node_port.kind, FrontendKind::NodePort);
        assert_eq!(node_port.flags, svc_flags::NODE_PORT);
        assert_eq!(node_port.backends.len(), 2);
        let lb = find(&e, "203.0.113.10", 80, Scope::All);
        assert_eq!(lb.flags, svc_flags::LOAD_BALANCER | svc_flags::SOURCE_RANGES);
        assert_eq!(lb.source_ranges, vec!["192.0.2.0/24".parse::<IpNet>().unwrap()]);
        assert!(
            node_port.source_ranges.is_empty(),
            "source ranges apply to LoadBalancer IPs only"
        );
        assert_eq!(
            find(&e, "10.96.0.10", 80, Scope::All).flags,
            0,
            "ClusterIPs are socket-only"
        );
        assert!(
            e.frontends.iter().all(|f| f.key.scope == Scope::All),
            "no local view"
        );
    }

    #[test]
    fn maglev_marks_the_entries_the_tc_path_picks_from_and_no_other() {
        let mut inv = Inventory::new(NodeInfo {
            node_port_addresses: vec!["192.168.1.10".parse().unwrap(), "127.0.0.1".parse().unwrap()],
            ..inventory().node().clone()
        });
        let mut svc = external_service(TrafficPolicy::Cluster);
        svc.external_ips = vec!["198.51.100.7".parse().unwrap()];
        svc.lb_algorithm = LbAlgorithm::Maglev;
        inv.upsert_service(svc.clone());
        inv.upsert_slice(local_and_remote());
        let e = inv.desired(&ServiceName::new("ns", "web")).unwrap();
        let maglev = |addr, port, scope| find(&e, addr, port, scope).flags & svc_flags::MAGLEV != 0;
        assert!(maglev("192.168.1.10", 30080, Scope::All), "NodePort");
        assert!(maglev("203.0.113.10", 80, Scope::All), "LoadBalancer");
        assert!(maglev("198.51.100.7", 80, Scope::All), "externalIP");
        assert!(
            !maglev("10.96.0.10", 80, Scope::All),
            "a ClusterIP is socket-only"
        );
        assert!(
            !maglev("127.0.0.1", 30080, Scope::All),
            "loopback never reaches a device"
        );

        svc.external_policy = TrafficPolicy::Local;
        inv.upsert_service(svc);
        let e = inv.desired(&ServiceName::new("ns", "web")).unwrap();
        let flags = |scope| find(&e, "192.168.1.10", 30080, scope).flags & svc_flags::MAGLEV;
        assert_eq!(
            flags(Scope::All),
            0,
            "under Local the tc path picks from the local view"
        );
        assert_ne!(flags(Scope::ExternalLocal), 0);
    }

    #[test]
    fn each_family_takes_its_own_source_ranges_and_is_open_without_any() {
        let mut inv = inventory();
        let mut svc = external_service(TrafficPolicy::Cluster);
        svc.load_balancer_ips.push("2001:db8::10".parse().unwrap());
        inv.upsert_service(svc.clone());
        let e = inv.desired(&ServiceName::new("ns", "web")).unwrap();
        let v6 = find(&e, "2001:db8::10", 80, Scope::All);
        assert_eq!(v6.flags, svc_flags::LOAD_BALANCER, "no IPv6 range: IPv6 is open");
        assert!(v6.source_ranges.is_empty());

        svc.load_balancer_source_ranges
            .push("2001:db8:1::/48".parse().unwrap());
        inv.upsert_service(svc);
        let e = inv.desired(&ServiceName::new("ns", "web")).unwrap();
        let v6 = find(&e, "2001:db8::10", 80, Scope::All);
        assert_eq!(v6.flags, svc_flags::LOAD_BALANCER | svc_flags::SOURCE_RANGES);
        assert_eq!(
            v6.source_ranges,
            vec!["2001:db8:1::/48".parse::<IpNet>().unwrap()]
        );
        let v4 = find(&e, "203.0.113.10", 80, Scope::All);
        assert_eq!(v4.source_ranges, vec!["192.0.2.0/24".parse::<IpNet>().unwrap()]);
    }

    #[test]
    fn external_policy_local_adds_a_local_view_and_keeps_the_cluster_view_for_the_node() {
        let mut inv = inventory();
        inv.upsert_service(external_service(TrafficPolicy::Local));
        inv.upsert_slice(local_and_remote());
        let e = inv.desired(&ServiceName::new("ns", "web")).unwrap();
        for (addr, port) in [("192.168.1.10", 30080), ("203.0.113.10", 80)] {
            let all = find(&e, addr, port, Scope::All);
            assert_ne!(all.flags & svc_flags::EXT_LOCAL, 0);
            assert_eq!(all.backends.len(), 2, "the node's own clients use every endpoint");
            let local = find(&e, addr, port, Scope::ExternalLocal);
            let local_addrs: Vec<String> = local.backends.iter().map(|b| b.key.addr.to_string()).collect();
            assert_eq!(
                local_addrs,
                ["10.0.0.1"],
                "outside clients use this node's endpoint"
            );
        }
        assert_eq!(
            inv.health_checks(),
            [HealthCheck {
                port: 32000,
                service: ServiceName::new("ns", "web"),
                local_endpoints: 1,
            }]
        );
    }

    #[test]
    fn only_ready_local_endpoints_count_for_the_health_check() {
        let mut inv = inventory();
        inv.upsert_service(external_service(TrafficPolicy::Local));
        let mut s = local_and_remote();
        s.endpoints[0].ready = false;
        s.endpoints[0].terminating = true;
        inv.upsert_slice(s);
        assert_eq!(inv.health_checks()[0].local_endpoints, 0);
        inv.upsert_service(external_service(TrafficPolicy::Cluster));
        assert!(
            inv.health_checks().is_empty(),
            "no health check under policy Cluster"
        );
    }

    /// Upstream LocalReadyEndpoints (pkg/proxy/endpointschangetracker.go) squashes a Service's
    /// endpoints by IP over all its ports: 10.0.0.1:8080 and 10.0.0.1:8443 are one endpoint.
    #[test]
    fn local_ready_endpoints_count_each_endpoint_once_over_all_service_ports() {
        let mut inv = inventory();
        let mut svc = external_service(TrafficPolicy::Local);
        svc.ports = vec![
            ServicePort {
                name: "http".into(),
                port: 80,
                protocol: TCP,
                node_port: Some(30080),
            },
            ServicePort {
                name: "https".into(),
                port: 443,
                protocol: TCP,
                node_port: Some(30443),
            },
        ];
        inv.upsert_service(svc);
        let mut s = slice(
            "a",
            "web",
            &[("http", 8080, TCP), ("https", 8443, TCP)],
            &["10.0.0.1", "10.0.0.2", "10.0.0.3"],
        );
        s.endpoints[2].node_name = Some("n2".into());
        inv.upsert_slice(s);
        assert_eq!(inv.health_checks()[0].local_endpoints, 2);
    }

    #[test]
    fn mutations_report_the_services_they_touch() {
        let mut inv = inventory();
        let web = ServiceName::new("ns", "web");
        let api = ServiceName::new("ns", "api");
        assert_eq!(
            inv.upsert_service(service("web", &["10.96.0.10"], &[("", 80, TCP)])),
            Some(web.clone())
        );
        assert_eq!(
            inv.upsert_service(service("web", &["10.96.0.10"], &[("", 80, TCP)])),
            None,
            "no change"
        );
        assert_eq!(
            inv.upsert_slice(slice("s", "web", &[("", 8080, TCP)], &["10.0.0.1"])),
            vec![web.clone()]
        );
        // Relabelling a slice to another Service touches both.
        assert_eq!(
            inv.upsert_slice(slice("s", "api", &[("", 8080, TCP)], &["10.0.0.1"])),
            vec![web.clone(), api.clone()]
        );
        assert_eq!(inv.remove_slice("ns", "s"), Some(api));
        assert_eq!(inv.remove_service(&web), Some(web.clone()));
        assert!(inv.desired(&web).is_none());
    }

    #[test]
    fn replacing_everything_reports_additions_changes_and_deletions() {
        let mut inv = inventory();
        inv.replace_services(vec![
            service("a", &["10.96.0.1"], &[("", 80, TCP)]),
            service("b", &["10.96.0.2"], &[("", 80, TCP)]),
        ]);
        inv.replace_slices(vec![slice("a1", "a", &[("", 8080, TCP)], &["10.0.0.1"])]);
        let mut touched = inv.replace_services(vec![
            service("a", &["10.96.0.1"], &[("", 80, TCP)]),
            service("c", &["10.96.0.3"], &[("", 80, TCP)]),
        ]);
        touched.extend(inv.replace_slices(vec![slice("a1", "a", &[("", 8080, TCP)], &["10.0.0.2"])]));
        let names: Vec<String> = touched.iter().map(|n| n.name.clone()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert!(inv.replace_slices(vec![]).contains(&ServiceName::new("ns", "a")));
    }
}
