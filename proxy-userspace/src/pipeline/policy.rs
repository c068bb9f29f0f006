//! Which endpoints a frontend may use: upstream kube-proxy's CategorizeEndpoints
//! (pkg/proxy/topology.go), rule for rule. Pure functions over the model.

use crate::pipeline::model::{Endpoint, NodeInfo, ServiceInfo, TrafficPolicy};

/// Topology hints kube-proxy follows, strongest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TopologyMode {
    None,
    /// forNodes hints (trafficDistribution PreferSameNode).
    NodeHints,
    /// forZones hints (PreferClose / PreferSameZone / topology-mode Auto).
    ZoneHints,
}

/// The endpoint sets of one service port, as kube-proxy computes them.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Categorized<'a> {
    /// Endpoints for traffic policy Cluster: ready ones (topology-filtered), else
    /// serving+terminating ones.
    pub cluster: Vec<&'a Endpoint>,
    /// Endpoints for traffic policy Local: local ready ones, else local serving+terminating.
    pub local: Vec<&'a Endpoint>,
}

fn uses_cluster(svc: &ServiceInfo) -> bool {
    svc.internal_policy == TrafficPolicy::Cluster
        || (svc.externally_accessible() && svc.external_policy == TrafficPolicy::Cluster)
}

fn uses_local(svc: &ServiceInfo) -> bool {
    svc.internal_policy == TrafficPolicy::Local
        || (svc.externally_accessible() && svc.external_policy == TrafficPolicy::Local)
}

/// Upstream topologyModeFromHints: hints are used only when every ready endpoint carries them
/// and at least one is meant for this node (or its zone); otherwise they are ignored entirely,
/// so a half-hinted Service never narrows to nothing.
pub(crate) fn topology_mode(endpoints: &[Endpoint], node: &NodeInfo) -> TopologyMode {
    let mut all_node_hints = true;
    let mut node_hit = false;
    let mut all_zone_hints = true;
    let mut zone_hit = false;
    let mut any_ready = false;
    for ep in endpoints.iter().filter(|e| e.ready) {
        any_ready = true;
        if ep.hints.nodes().is_empty() {
            all_node_hints = false;
        } else if ep.hints.nodes().contains(&node.name) {
            node_hit = true;
        }
        if ep.hints.zones().is_empty() {
            all_zone_hints = false;
        } else if node.zone.as_ref().is_some_and(|z| ep.hints.zones().contains(z)) {
            zone_hit = true;
        }
    }
    if !any_ready {
        TopologyMode::None
    } else if all_node_hints && node_hit {
        TopologyMode::NodeHints
    } else if all_zone_hints && zone_hit {
        TopologyMode::ZoneHints
    } else {
        TopologyMode::None
    }
}

fn available_for_topology(ep: &Endpoint, mode: TopologyMode, node: &NodeInfo) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::NodeHints => ep.hints.nodes().contains(&node.name),
        TopologyMode::ZoneHints => node.zone.as_ref().is_some_and(|z| ep.hints.zones().contains(z)),
    }
}

pub(crate) fn categorize<'a>(
    svc: &ServiceInfo,
    endpoints: &'a [Endpoint],
    node: &NodeInfo,
) -> Categorized<'a> {
    let mut out = Categorized::default();
    if uses_cluster(svc) {
        let topology = topology_mode(endpoints, node);
        out.cluster = endpoints
            .iter()
            .filter(|e| e.ready && available_for_topology(e, topology, node))
            .collect();
        // No ready endpoint anywhere (topology would have been dropped if the zone had none):
        // fall back to endpoints that still serve while terminating.
        if out.cluster.is_empty() {
            out.cluster = endpoints.iter().filter(|e| e.serving && e.terminating).collect();
        }
    }
    if !uses_local(svc) {
        return out;
    }
    let local_ready = endpoints.iter().any(|e| e.local && e.ready);
    out.local = endpoints
        .iter()
        .filter(|e| {
            e.local
                && if local_ready {
                    e.ready
                } else {
                    e.serving && e.terminating
                }
        })
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::pipeline::model::{Hints, LbAlgorithm, Protocol, ServiceName, ServicePort};

    fn svc(internal: TrafficPolicy, external: TrafficPolicy, node_port: bool) -> ServiceInfo {
        ServiceInfo {
            name: ServiceName::new("ns", "s"),
            cluster_ips: vec!["10.96.0.1".parse().unwrap()],
            external_ips: vec![],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: vec![],
            ports: vec![ServicePort {
                name: String::new(),
                port: 80,
                protocol: Protocol::Tcp,
                node_port: node_port.then_some(30080),
            }],
            session_affinity_timeout: None,
            internal_policy: internal,
            external_policy: external,
            health_check_node_port: None,
            lb_algorithm: LbAlgorithm::Random,
        }
    }

    /// `spec`: one letter per condition: R ready, S serving, T terminating, L local;
    /// `zones`/`nodes`: comma-separated hints.
    fn ep(last_octet: u8, spec: &str, zones: &str, nodes: &str) -> Endpoint {
        let set = |s: &str| -> BTreeSet<String> {
            s.split(',').filter(|x| !x.is_empty()).map(String::from).collect()
        };
        Endpoint {
            addr: format!("10.0.0.{last_octet}").parse().unwrap(),
            port: 8080,
            ready: spec.contains('R'),
            serving: spec.contains('S') || spec.contains('R'),
            terminating: spec.contains('T'),
            local: spec.contains('L'),
            hints: Hints::new(set(zones), set(nodes)),
        }
    }

    fn octets(eps: &[&Endpoint]) -> Vec<u8> {
        eps.iter()
            .map(|e| match e.addr {
                std::net::IpAddr::V4(a) => a.octets()[3],
                std::net::IpAddr::V6(_) => 0,
            })
            .collect()
    }

    fn node(zone: Option<&str>) -> NodeInfo {
        NodeInfo {
            name: "n1".into(),
            zone: zone.map(String::from),
            node_port_addresses: Vec::new(),
        }
    }

    const CLUSTER: TrafficPolicy = TrafficPolicy::Cluster;
    const LOCAL: TrafficPolicy = TrafficPolicy::Local;

    #[test]
    fn cluster_policy_uses_ready_endpoints_only() {
        let eps = [ep(1, "R", "", ""), ep(2, "", "", ""), ep(3, "STR", "", "")];
        let c = categorize(&svc(CLUSTER, CLUSTER, false), &eps, &node(None));
        assert_eq!(octets(&c.cluster), [1, 3]);
    }

    #[test]
    fn fallback_to_serving_terminating_endpoints_only_when_none_is_ready() {
        let eps = [ep(1, "ST", "", ""), ep(2, "T", "", ""), ep(3, "", "", "")];
        let c = categorize(&svc(CLUSTER, CLUSTER, false), &eps, &node(None));
        assert_eq!(
            octets(&c.cluster),
            [1],
            "terminating but not serving is never used"
        );
        let eps = [ep(1, "ST", "", ""), ep(2, "R", "", "")];
        let c = categorize(&svc(CLUSTER, CLUSTER, false), &eps, &node(None));
        assert_eq!(octets(&c.cluster), [2]);
    }

    #[test]
    fn no_endpoints_means_nothing_to_use() {
        let c = categorize(&svc(CLUSTER, CLUSTER, false), &[], &node(None));
        assert!(c.cluster.is_empty() && c.local.is_empty());
    }

    #[test]
    fn internal_traffic_policy_local_uses_only_local_endpoints() {
        let eps = [ep(1, "RL", "", ""), ep(2, "R", "", "")];
        let c = categorize(&svc(LOCAL, CLUSTER, false), &eps, &node(None));
        assert_eq!(octets(&c.local), [1]);
    }

    /// Upstream's CategorizeEndpoints (pkg/proxy/topology.go) also returns hasAnyEndpoints, and
    /// its proxiers DROP internalTrafficPolicy Local traffic when the Service has endpoints but
    /// none on this node, keeping REJECT for a Service without any. Ours rejects both: a drop
    /// in a socket hook leaves connect() hanging until the SYN times out, where a reject fails
    /// it at once with ECONNREFUSED, and the tc path answers the same way. The model cannot
    /// tell the two apart: both are an empty local set, a frontend without backends.
    #[test]
    fn internal_local_with_only_remote_endpoints_is_rejected_where_upstream_drops() {
        let remote_only = [ep(2, "R", "", ""), ep(3, "ST", "", "")];
        let c = categorize(&svc(LOCAL, CLUSTER, false), &remote_only, &node(None));
        assert!(c.local.is_empty() && c.cluster.is_empty(), "{c:?}");
        assert_eq!(
            c,
            categorize(&svc(LOCAL, CLUSTER, false), &[], &node(None)),
            "the same outcome as a Service without endpoints: reject"
        );
    }

    #[test]
    fn local_policy_falls_back_to_local_serving_terminating_endpoints() {
        let eps = [ep(1, "STL", "", ""), ep(2, "R", "", ""), ep(3, "TL", "", "")];
        let c = categorize(&svc(LOCAL, CLUSTER, false), &eps, &node(None));
        assert_eq!(octets(&c.local), [1]);
    }

    #[test]
    fn external_policy_local_on_node_port_computes_both_sets() {
        let eps = [ep(1, "RL", "", ""), ep(2, "R", "", "")];
        let c = categorize(&svc(CLUSTER, LOCAL, true), &eps, &node(None));
        assert_eq!(octets(&c.cluster), [1, 2]);
        assert_eq!(octets(&c.local), [1]);
    }

    #[test]
    fn topology_zone_hints_are_used_when_every_endpoint_has_them_and_one_matches() {
        let eps = [ep(1, "R", "z1", ""), ep(2, "R", "z2", "")];
        let c = categorize(&svc(CLUSTER, CLUSTER, false), &eps, &node(Some("z1")));
        assert_eq!(topology_mode(&eps, &node(Some("z1"))), TopologyMode::ZoneHints);
        assert_eq!(octets(&c.cluster), [1]);
    }

    #[test]
    fn topology_hints_are_ignored_when_one_endpoint_lacks_them() {
        let eps = [ep(1, "R", "z1", ""), ep(2, "R", "", "")];
        let c = categorize(&svc(CLUSTER, CLUSTER, false), &eps, &node(Some("z1")));
        assert_eq!(topology_mode(&eps, &node(Some("z1"))), TopologyMode::None);
        assert_eq!(octets(&c.cluster), [1, 2]);
    }

    #[test]
    fn topology_hints_are_ignored_when_none_is_for_this_zone_or_the_node_has_no_zone() {
        let eps = [ep(1, "R", "z2", ""), ep(2, "R", "z3", "")];
        assert_eq!(topology_mode(&eps, &node(Some("z1"))), TopologyMode::None);
        assert_eq!(topology_mode(&eps, &node(None)), TopologyMode::None);
    }

    #[test]
    fn prefer_same_node_hints_win_over_zone_hints() {
        let eps = [ep(1, "R", "z1", "n1"), ep(2, "R", "z1", "n2")];
        let c = categorize(&svc(CLUSTER, CLUSTER, false), &eps, &node(Some("z1")));
        assert_eq!(topology_mode(&eps, &node(Some("z1"))), TopologyMode::NodeHints);
        assert_eq!(octets(&c.cluster), [1]);
    }

    #[test]
    fn hints_on_terminating_endpoints_do_not_count() {
        // Only ready endpoints decide whether hints are usable.
        let eps = [ep(1, "R", "z1", ""), ep(2, "ST", "", "")];
        assert_eq!(topology_mode(&eps, &node(Some("z1"))), TopologyMode::ZoneHints);
    }
}
