//! Small YAML builders for the Services and EndpointSlices tests write.

use std::fmt::Write as _;

/// A Service port: name, port, protocol.
pub type Port<'a> = (&'a str, u16, &'a str);

/// An EndpointSlice endpoint.
#[derive(Clone, Debug)]
pub struct Ep {
    pub addr: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

impl Ep {
    pub fn ready(addr: &str) -> Self {
        Self {
            addr: addr.to_string(),
            ready: true,
            serving: true,
            terminating: false,
            node: Some(crate::NODE_NAME.to_string()),
            zone_hints: vec![],
            node_hints: vec![],
        }
    }

    pub fn terminating(addr: &str) -> Self {
        Self {
            ready: false,
            terminating: true,
            ..Self::ready(addr)
        }
    }

    pub fn on_node(mut self, node: &str) -> Self {
        self.node = Some(node.to_string());
        self
    }

    /// Neither ready nor serving (a pod that is gone or failing its probe).
    pub fn not_serving(mut self) -> Self {
        self.ready = false;
        self.serving = false;
        self
    }

    pub fn for_zones(mut self, zones: &[&str]) -> Self {
        self.zone_hints = zones.iter().map(std::string::ToString::to_string).collect();
        self
    }

    pub fn for_nodes(mut self, nodes: &[&str]) -> Self {
        self.node_hints = nodes.iter().map(std::string::ToString::to_string).collect();
        self
    }
}

/// This node's Node object, in `zone`.
pub fn node(zone: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {}, labels: {{topology.kubernetes.io/zone: {zone}}}}}\n",
        crate::NODE_NAME
    )
}

/// A ClusterIP Service. `extra_spec` is appended to `spec:` (indented two spaces).
pub fn service(name: &str, cluster_ips: &[&str], ports: &[Port], extra_spec: &str) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: test\nspec:\n  clusterIP: \"{}\"\n  clusterIPs: [{}]\n  ports:\n",
        cluster_ips[0],
        cluster_ips
            .iter()
            .map(|ip| format!("\"{ip}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (port_name, port, proto) in ports {
        let _ = writeln!(
            y,
            "  - {{name: \"{port_name}\", port: {port}, protocol: {proto}}}"
        );
    }
    for line in extra_spec.lines().filter(|l| !l.trim().is_empty()) {
        let _ = writeln!(y, "  {line}");
    }
    y
}

/// An EndpointSlice for `service` with the given ports (name, port, protocol).
pub fn slice(name: &str, service: &str, ipv6: bool, ports: &[Port], endpoints: &[Ep]) -> String {
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: test\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: {}\nports:\n",
        if ipv6 { "IPv6" } else { "IPv4" }
    );
    for (port_name, port, proto) in ports {
        let _ = writeln!(y, "- {{name: \"{port_name}\", port: {port}, protocol: {proto}}}");
    }
    y.push_str("endpoints:\n");
    for ep in endpoints {
        let _ = write!(
            y,
            "- addresses: [\"{}\"]\n  conditions: {{ready: {}, serving: {}, terminating: {}}}\n",
            ep.addr, ep.ready, ep.serving, ep.terminating
        );
        if let Some(node) = &ep.node {
            let _ = writeln!(y, "  nodeName: {node}");
        }
        if !ep.zone_hints.is_empty() || !ep.node_hints.is_empty() {
            let zones: Vec<String> = ep.zone_hints.iter().map(|z| format!("{{name: {z}}}")).collect();
            let nodes: Vec<String> = ep.node_hints.iter().map(|n| format!("{{name: {n}}}")).collect();
            let _ = writeln!(
                y,
                "  hints: {{forZones: [{}], forNodes: [{}]}}",
                zones.join(", "),
                nodes.join(", ")
            );
        }
    }
    y
}

/// Joins documents into one multi-document file.
pub fn docs(parts: &[String]) -> String {
    parts.join("---\n")
}
