//! The service model: Services and endpoints as kube-proxy understands them, after validation,
//! and the frontends they turn into. No Kubernetes API types, no BPF, no I/O.

use std::{collections::BTreeSet, fmt, net::IpAddr};

use ipnet::IpNet;
use proxy_common::maps::{scope, svc_flags};
use serde::Serialize;

/// `namespace/name` of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl ServiceName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    /// Every port and protocol a ClusterIP does not serve: its guard frontend (port 0), which
    /// rejects them. Never comes from Kubernetes.
    Any,
}

impl Protocol {
    /// Kubernetes spelling (`TCP`, `UDP`, `SCTP`); absent means TCP.
    pub(crate) fn from_k8s(value: Option<&str>) -> Option<Self> {
        match value.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    /// IANA protocol number.
    pub(crate) const fn number(self) -> u8 {
        match self {
            Self::Tcp => proxy_common::proto::TCP,
            Self::Udp => proxy_common::proto::UDP,
            Self::Sctp => proxy_common::proto::SCTP,
            Self::Any => proxy_common::proto::ANY,
        }
    }

    pub(crate) const fn from_number(number: u8) -> Option<Self> {
        match number {
            proxy_common::proto::TCP => Some(Self::Tcp),
            proxy_common::proto::UDP => Some(Self::Udp),
            proxy_common::proto::SCTP => Some(Self::Sctp),
            proxy_common::proto::ANY => Some(Self::Any),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
            Self::Any => "ANY",
        })
    }
}

/// internalTrafficPolicy / externalTrafficPolicy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// How the tc path picks a backend for a new flow from outside the node (`--lb-algorithm`, or
/// a Service's `bpf-kube-proxy.io/lb-algorithm` annotation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LbAlgorithm {
    /// A random backend per flow, as kube-proxy.
    #[default]
    Random,
    /// The frontend's Maglev table at the flow's hash: every node picks the same backend.
    Maglev,
}

impl LbAlgorithm {
    pub const NAMES: [&str; 2] = ["random", "maglev"];
}

impl std::str::FromStr for LbAlgorithm {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "random" => Ok(Self::Random),
            "maglev" => Ok(Self::Maglev),
            other => Err(format!(
                "{other:?} is not an algorithm (one of: {})",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// One port of a validated Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServicePort {
    /// Port name, "" for a single unnamed port; EndpointSlice ports are matched by it.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub node_port: Option<u16>,
}

/// A Service after validation: what kube-proxy's ServiceChangeTracker would hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServiceInfo {
    pub name: ServiceName,
    /// spec.clusterIPs (one per family).
    pub cluster_ips: Vec<IpAddr>,
    pub(crate) external_ips: Vec<IpAddr>,
    /// status.loadBalancer.ingress IPs, minus those with ipMode Proxy.
    pub(crate) load_balancer_ips: Vec<IpAddr>,
    pub(crate) load_balancer_source_ranges: Vec<IpNet>,
    pub ports: Vec<ServicePort>,
    /// sessionAffinity ClientIP timeout in seconds.
    pub(crate) session_affinity_timeout: Option<u32>,
    pub(crate) internal_policy: TrafficPolicy,
    pub(crate) external_policy: TrafficPolicy,
    pub(crate) health_check_node_port: Option<u16>,
    /// For traffic from outside the node: the annotation's, else the node's default.
    pub(crate) lb_algorithm: LbAlgorithm,
}

impl ServiceInfo {
    /// kube-proxy's ExternallyAccessible: NodePort, LoadBalancer IPs or externalIPs.
    pub(crate) fn externally_accessible(&self) -> bool {
        !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
            || self.ports.iter().any(|p| p.node_port.is_some())
    }
}

/// A port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SlicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// An endpoint of an EndpointSlice (one address: kube-proxy uses the first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SliceEndpoint {
    pub addr: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub(crate) node_name: Option<String>,
    // The endpoint's own zone is not kept: kube-proxy routes by the hints, never by it.
    pub hints: Hints,
}

/// An endpoint's topology hints (forZones, forNodes). Most endpoints have none, so both sets
/// sit behind one pointer: 100 000 endpoints would otherwise carry 48 bytes of empty sets each.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Hints(Option<Box<HintSets>>);

#[derive(Clone, Debug, PartialEq, Eq)]
struct HintSets {
    zones: BTreeSet<String>,
    nodes: BTreeSet<String>,
}

static NO_HINTS: BTreeSet<String> = BTreeSet::new();

impl Hints {
    pub fn new(zones: BTreeSet<String>, nodes: BTreeSet<String>) -> Self {
        if zones.is_empty() && nodes.is_empty() {
            return Self(None);
        }
        Self(Some(Box::new(HintSets { zones, nodes })))
    }

    pub(crate) fn zones(&self) -> &BTreeSet<String> {
        self.0.as_ref().map_or(&NO_HINTS, |h| &h.zones)
    }

    pub(crate) fn nodes(&self) -> &BTreeSet<String> {
        self.0.as_ref().map_or(&NO_HINTS, |h| &h.nodes)
    }
}

/// A validated EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SliceInfo {
    pub namespace: String,
    pub name: String,
    /// From the `kubernetes.io/service-name` label.
    pub service: ServiceName,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// One endpoint of one service port, after merging slices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Runs on this node.
    pub local: bool,
    pub hints: Hints,
}

/// What this node is, for traffic policies and topology.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct NodeInfo {
    pub name: String,
    /// `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// Addresses that serve NodePorts (kube-proxy's nodePortAddresses applied).
    pub node_port_addresses: Vec<IpAddr>,
}

/// How a frontend address came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    ExternalIp,
    LoadBalancer,
    /// A nodePort on one of the node's addresses.
    NodePort,
}

impl FrontendKind {
    /// Reachable from outside the node (served by the tc path as well as the socket hooks).
    pub(crate) const fn is_external(self) -> bool {
        !matches!(self, Self::ClusterIp)
    }

    /// The datapath flag that marks the kind.
    pub const fn flag(self) -> u32 {
        match self {
            Self::ClusterIp => 0,
            Self::ExternalIp => svc_flags::EXTERNAL_IP,
            Self::LoadBalancer => svc_flags::LOAD_BALANCER,
            Self::NodePort => svc_flags::NODE_PORT,
        }
    }
}

/// Which clients a frontend entry serves (see `proxy_common::maps::scope`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Scope {
    /// Everyone; the only entry of most frontends.
    #[default]
    All,
    /// Clients outside the node, under externalTrafficPolicy Local: this node's endpoints.
    ExternalLocal,
}

impl Scope {
    pub(crate) const fn number(self) -> u8 {
        match self {
            Self::All => scope::ALL,
            Self::ExternalLocal => scope::EXTERNAL_LOCAL,
        }
    }

    pub(crate) const fn from_number(number: u8) -> Option<Self> {
        match number {
            scope::ALL => Some(Self::All),
            scope::EXTERNAL_LOCAL => Some(Self::ExternalLocal),
            _ => None,
        }
    }
}

/// The address, port and protocol clients use, and which clients the entry is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FrontendKey {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl FrontendKey {
    /// The scope-`All` key clients use.
    pub const fn new(addr: IpAddr, port: u16, protocol: Protocol) -> Self {
        Self {
            addr,
            port,
            protocol,
            scope: Scope::All,
        }
    }
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol)?,
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol)?,
        }
        if self.scope == Scope::ExternalLocal {
            f.write_str(" (external, local)")?;
        }
        Ok(())
    }
}

/// A backend as the datapath stores it: shared by every frontend that uses the same
/// address, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct BackendKey {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for BackendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        FrontendKey::new(self.addr, self.port, self.protocol).fmt(f)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendState {
    pub terminating: bool,
    pub local: bool,
}

/// A chosen backend of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrontendBackend {
    pub key: BackendKey,
    pub state: BackendState,
}

/// The desired datapath state of one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub key: FrontendKey,
    pub kind: FrontendKind,
    /// Service port name, for display.
    pub port_name: String,
    /// The backends this frontend balances over; empty means reject.
    pub backends: Vec<FrontendBackend>,
    pub affinity_timeout: Option<u32>,
    /// Datapath flags (`proxy_common::maps::svc_flags`) other than affinity: kind, policy,
    /// source ranges.
    pub flags: u32,
    /// loadBalancerSourceRanges of a LoadBalancer frontend; empty: every client.
    pub source_ranges: Vec<IpNet>,
}

impl Frontend {
    /// The source-range map entries this frontend needs: its ranges sorted, each once.
    pub fn written_source_ranges(&self) -> Vec<IpNet> {
        let mut ranges = self.source_ranges.clone();
        ranges.sort();
        ranges.dedup();
        ranges
    }
}

/// The desired datapath state of one Service: all of its frontends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    pub frontends: Vec<Frontend>,
}
