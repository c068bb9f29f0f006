//! Which endpoints a frontend may use: upstream kube-proxy's CategorizeEndpoints
//! (pkg/proxy/topology.go), rule for rule. Pure functions over the model.

use crate::model::{Endpoint, NodeInfo, ServiceInfo, TrafficPolicy};

/// Topology hints kube-proxy follows, strongest first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TopologyMode {
    #[default]
    None,
    /// forNodes hints (trafficDistribution PreferSameNode).
    NodeHints,
    /// forZones hints (PreferClose / PreferSameZone / topology-mode Auto).
    ZoneHints,
}

/// The endpoint sets of one service port, as kube-proxy computes them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Categorized<'a> {
    /// Endpoints for traffic policy Cluster: ready ones (topology-filtered), else
    /// serving+terminating ones.
    pub cluster: Vec<&'a Endpoint>,
    /// Endpoints for traffic policy Local: local ready ones, else local serving+terminating.
    pub local: Vec<&'a Endpoint>,
    /// Whether any usable endpoint exists anywhere (decides REJECT vs. DROP upstream).
    pub has_any: bool,
    pub topology: TopologyMode,
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
pub fn topology_mode(endpoints: &[Endpoint], node: &NodeInfo) -> TopologyMode {
    let mut all_node_hints = true;
    let mut node_hit = false;
    let mut all_zone_hints = true;
    let mut zone_hit = false;
    let mut any_ready = false;
    for ep in endpoints.iter().filter(|e| e.ready) {
        any_ready = true;
        if ep.node_hints.is_empty() {
            all_node_hints = false;
        } else if ep.node_hints.contains(&node.name) {
            node_hit = true;
        }
        if ep.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if node
            .zone
            .as_ref()
            .is_some_and(|z| ep.zone_hints.contains(z))
        {
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
        TopologyMode::NodeHints => ep.node_hints.contains(&node.name),
        TopologyMode::ZoneHints => node
            .zone
            .as_ref()
            .is_some_and(|z| ep.zone_hints.contains(z)),
    }
}

pub fn categorize<'a>(
    svc: &ServiceInfo,
    endpoints: &'a [Endpoint],
    node: &NodeInfo,
) -> Categorized<'a> {
    let mut out = Categorized::default();
    if uses_cluster(svc) {
        out.topology = topology_mode(endpoints, node);
        out.cluster = endpoints
            .iter()
            .filter(|e| e.ready && available_for_topology(e, out.topology, node))
            .collect();
        // No ready endpoint anywhere (topology would have been dropped if the zone had none):
        // fall back to endpoints that still serve while terminating.
        if out.cluster.is_empty() {
            out.cluster = endpoints
                .iter()
                .filter(|e| e.serving && e.terminating)
                .collect();
        }
        out.has_any = !out.cluster.is_empty();
    }
    if !uses_local(svc) {
        return out;
    }
    let usable = |e: &&Endpoint| e.ready || (e.serving && e.terminating);
    out.has_any |= endpoints.iter().any(|e| usable(&e));
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
