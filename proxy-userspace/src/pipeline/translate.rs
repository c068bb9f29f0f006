//! Kubernetes objects → the validated model, with kube-proxy's rules for what to skip.
//!
//! Errors come in two sizes. An object-level error (no name, no usable cluster IP, an
//! EndpointSlice without its service label) rejects the whole object; the caller keeps the last
//! good version. An item-level problem (one bad port, address or CIDR) drops that item only and
//! is reported as an [`ItemIssue`], so one typo does not take a working Service down.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::{
    core::v1::{Node, Service, ServiceSpec},
    discovery::v1::EndpointSlice,
};

use crate::pipeline::model::{
    Hints, LbAlgorithm, NodeInfo, Protocol, ServiceInfo, ServiceName, ServicePort, SliceEndpoint, SliceInfo,
    SlicePort, TrafficPolicy,
};
use crate::source::meta::{
    ANNOTATION_LB_ALGORITHM, LABEL_HEADLESS, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME, LABEL_ZONE,
    namespace_or_default,
};

/// Default sessionAffinityConfig.clientIP.timeoutSeconds.
pub(crate) const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// Upper bound the API server enforces on the affinity timeout (one day).
pub(crate) const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

/// An object that cannot be used at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TranslateError {
    #[error("{kind} has no metadata.name")]
    MissingName { kind: &'static str },
    #[error("Service {service}: {field} {value:?} is not a valid IP address")]
    InvalidClusterIp {
        service: ServiceName,
        field: &'static str,
        value: String,
    },
    #[error("Service {service}: spec.clusterIPs has two addresses of the same family")]
    DuplicateClusterIpFamily { service: ServiceName },
    #[error("Service {service}: no usable port in spec.ports")]
    NoUsablePort { service: ServiceName },
    #[error("EndpointSlice {namespace}/{name}: missing label {LABEL_SERVICE_NAME}")]
    SliceWithoutService { namespace: String, name: String },
    #[error("EndpointSlice {namespace}/{name}: unsupported addressType {value:?}")]
    UnsupportedAddressType {
        namespace: String,
        name: String,
        value: String,
    },
}

impl TranslateError {
    /// An EndpointSlice made for another consumer (no service label, FQDN addresses): not
    /// ours, so not an error to report.
    pub(crate) fn is_foreign(&self) -> bool {
        matches!(
            self,
            Self::SliceWithoutService { .. } | Self::UnsupportedAddressType { .. }
        )
    }
}

/// A dropped item inside an otherwise usable object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemIssue {
    /// `Service ns/name` or `EndpointSlice ns/name`.
    pub object: String,
    /// JSON-path-like field, e.g. `spec.ports[1].port`.
    pub field: String,
    pub(crate) problem: String,
}

impl std::fmt::Display for ItemIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}: {} (item skipped)",
            self.object, self.field, self.problem
        )
    }
}

/// Why a Service is deliberately not proxied (kube-proxy's ShouldSkipService and label filters).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SkipReason {
    Headless,
    ExternalName,
    NoClusterIp,
    HeadlessLabel,
    OtherProxy(String),
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Headless => f.write_str("headless (clusterIP None)"),
            Self::ExternalName => f.write_str("type ExternalName"),
            Self::NoClusterIp => f.write_str("no clusterIP set"),
            Self::HeadlessLabel => write!(f, "label {LABEL_HEADLESS}"),
            Self::OtherProxy(name) => write!(f, "label {LABEL_SERVICE_PROXY_NAME}={name}"),
        }
    }
}

/// The outcome of translating a Service.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ServiceOutcome {
    Proxied(ServiceInfo),
    Skipped(ServiceName, SkipReason),
}

/// Options that change which Services are ours.
#[derive(Clone, Debug, Default)]
pub struct TranslateOptions {
    /// Services labelled `service.kubernetes.io/service-proxy-name` with this value are served;
    /// any other value means another proxy owns the Service.
    pub service_proxy_name: Option<String>,
    /// The backend choice for traffic from outside the node of a Service that does not name
    /// one in its annotation.
    pub lb_algorithm: LbAlgorithm,
}

fn port_number(value: i32) -> Result<u16, String> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{value} is outside 1-65535"))
}

/// Item issues of one object, which is named once for all of them.
struct Issues<'a> {
    object: String,
    out: &'a mut Vec<ItemIssue>,
}

impl Issues<'_> {
    fn push(&mut self, field: String, problem: String) {
        self.out.push(ItemIssue {
            object: self.object.clone(),
            field,
            problem,
        });
    }
}

/// kube-proxy's rules for one Service, in its order: whether it is ours at all, its cluster
/// IPs, its ports, the addresses it is reachable on from outside, session affinity and the
/// traffic policies.
pub(crate) fn translate_service(
    svc: &Service,
    opts: &TranslateOptions,
    issues: &mut Vec<ItemIssue>,
) -> Result<ServiceOutcome, TranslateError> {
    let name = ServiceName::new(
        namespace_or_default(svc.metadata.namespace.as_deref()),
        svc.metadata
            .name
            .clone()
            .ok_or(TranslateError::MissingName { kind: "Service" })?,
    );
    let spec = match proxied_spec(svc, opts) {
        Ok(spec) => spec,
        Err(reason) => return Ok(ServiceOutcome::Skipped(name, reason)),
    };
    let cluster_ips = cluster_ips(&name, spec)?;
    let mut issues = Issues {
        object: format!("Service {name}"),
        out: issues,
    };
    let ports = service_ports(spec, &mut issues);
    if ports.is_empty() {
        return Err(TranslateError::NoUsablePort { service: name });
    }
    let external_ips = parse_ips(
        "spec.externalIPs",
        spec.external_ips.iter().flatten(),
        &mut issues,
    );
    let load_balancer_ips = load_balancer_ips(svc, &mut issues);
    let load_balancer_source_ranges = source_ranges(spec, &mut issues);
    let session_affinity_timeout = affinity_timeout(spec, &mut issues);
    let mut info = ServiceInfo {
        name,
        cluster_ips,
        external_ips,
        load_balancer_ips,
        load_balancer_source_ranges,
        ports,
        session_affinity_timeout,
        internal_policy: traffic_policy(spec.internal_traffic_policy.as_deref()),
        external_policy: TrafficPolicy::Cluster,
        health_check_node_port: spec.health_check_node_port.and_then(|p| port_number(p).ok()),
        lb_algorithm: lb_algorithm(svc, opts, &mut issues),
    };
    // kube-proxy ignores externalTrafficPolicy on a Service nothing outside can reach.
    if info.externally_accessible() {
        info.external_policy = traffic_policy(spec.external_traffic_policy.as_deref());
    }
    Ok(ServiceOutcome::Proxied(info))
}

/// The label filters (service-proxy-name, headless) and kube-proxy's ShouldSkipService: the
/// spec of a Service to proxy, or why it is not proxied.
fn proxied_spec<'a>(svc: &'a Service, opts: &TranslateOptions) -> Result<&'a ServiceSpec, SkipReason> {
    let labels = svc.metadata.labels.as_ref();
    if let Some(proxy) = labels.and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME))
        && opts.service_proxy_name.as_deref() != Some(proxy.as_str())
    {
        return Err(SkipReason::OtherProxy(proxy.clone()));
    }
    if labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
        return Err(SkipReason::HeadlessLabel);
    }
    let spec = svc.spec.as_ref().ok_or(SkipReason::NoClusterIp)?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return Err(SkipReason::ExternalName);
    }
    match cluster_ip_fields(spec).first() {
        None => Err(SkipReason::NoClusterIp),
        Some((_, ip)) if ip.is_empty() => Err(SkipReason::NoClusterIp),
        Some((_, ip)) if ip.as_str() == "None" => Err(SkipReason::Headless),
        _ => Ok(spec),
    }
}

/// spec.clusterIPs, or spec.clusterIP where clusterIPs is unset, each with its field name.
fn cluster_ip_fields(spec: &ServiceSpec) -> Vec<(&'static str, &String)> {
    match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(|ip| ("spec.clusterIPs", ip)).collect(),
        _ => spec.cluster_ip.iter().map(|ip| ("spec.clusterIP", ip)).collect(),
    }
}

/// One cluster IP per family; a bad one rejects the Service, which cannot work without it.
fn cluster_ips(name: &ServiceName, spec: &ServiceSpec) -> Result<Vec<IpAddr>, TranslateError> {
    let mut cluster_ips = Vec::new();
    for (field, ip) in cluster_ip_fields(spec) {
        let addr: IpAddr = ip.parse().map_err(|_| TranslateError::InvalidClusterIp {
            service: name.clone(),
            field,
            value: ip.clone(),
        })?;
        if cluster_ips.iter().any(|a: &IpAddr| a.is_ipv4() == addr.is_ipv4()) {
            return Err(TranslateError::DuplicateClusterIpFamily {
                service: name.clone(),
            });
        }
        cluster_ips.push(addr);
    }
    Ok(cluster_ips)
}

/// spec.ports, less those with a bad protocol or number and duplicates of an earlier one.
fn service_ports(spec: &ServiceSpec, issues: &mut Issues) -> Vec<ServicePort> {
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let Some(protocol) = Protocol::from_k8s(p.protocol.as_deref()) else {
            issues.push(
                format!("spec.ports[{i}].protocol"),
                format!("unknown protocol {:?}", p.protocol.as_deref().unwrap_or_default()),
            );
            continue;
        };
        let port = match port_number(p.port) {
            Ok(port) => port,
            Err(problem) => {
                issues.push(format!("spec.ports[{i}].port"), problem);
                continue;
            }
        };
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => match port_number(n) {
                Ok(n) => Some(n),
                Err(problem) => {
                    issues.push(format!("spec.ports[{i}].nodePort"), problem);
                    None
                }
            },
        };
        let port_name = p.name.clone().unwrap_or_default();
        if ports
            .iter()
            .any(|q: &ServicePort| q.port == port && q.protocol == protocol)
        {
            issues.push(
                format!("spec.ports[{i}]"),
                format!("duplicate of port {port}/{protocol}"),
            );
            continue;
        }
        ports.push(ServicePort {
            name: port_name,
            port,
            protocol,
            node_port,
        });
    }
    ports
}

fn parse_ips<'a>(field: &str, values: impl Iterator<Item = &'a String>, issues: &mut Issues) -> Vec<IpAddr> {
    values
        .enumerate()
        .filter_map(|(i, v)| match v.parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                issues.push(format!("{field}[{i}]"), format!("{v:?} is not an IP address"));
                None
            }
        })
        .collect()
}

/// status.loadBalancer.ingress IPs. ipMode Proxy means the load balancer delivers to the node
/// with its own address as destination, so the node must not short-circuit the LB IP
/// (upstream KEP-1860).
fn load_balancer_ips(svc: &Service, issues: &mut Issues) -> Vec<IpAddr> {
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    parse_ips(
        "status.loadBalancer.ingress[].ip",
        ingress
            .into_iter()
            .flatten()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip.as_ref()),
        issues,
    )
}

/// spec.loadBalancerSourceRanges, with host bits cleared.
fn source_ranges(spec: &ServiceSpec, issues: &mut Issues) -> Vec<IpNet> {
    spec.load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, cidr)| match cidr.trim().parse::<IpNet>() {
            Ok(net) => Some(net.trunc()),
            Err(_) => {
                issues.push(
                    format!("spec.loadBalancerSourceRanges[{i}]"),
                    format!("{cidr:?} is not a CIDR"),
                );
                None
            }
        })
        .collect()
}

/// sessionAffinity ClientIP's timeout; `None` without affinity.
fn affinity_timeout(spec: &ServiceSpec, issues: &mut Issues) -> Option<u32> {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let configured = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    Some(match configured {
        None => DEFAULT_AFFINITY_TIMEOUT,
        Some(t) if (1..=MAX_AFFINITY_TIMEOUT as i32).contains(&t) => t as u32,
        Some(t) => {
            issues.push(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                format!("{t} is outside 1-{MAX_AFFINITY_TIMEOUT}, using {DEFAULT_AFFINITY_TIMEOUT}"),
            );
            DEFAULT_AFFINITY_TIMEOUT
        }
    })
}

/// The annotation's algorithm; an unknown one is reported and the node's default used.
fn lb_algorithm(svc: &Service, opts: &TranslateOptions, issues: &mut Issues) -> LbAlgorithm {
    let Some(value) = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_LB_ALGORITHM))
    else {
        return opts.lb_algorithm;
    };
    value.parse().unwrap_or_else(|problem| {
        issues.push(
            format!("metadata.annotations[{ANNOTATION_LB_ALGORITHM}]"),
            problem,
        );
        opts.lb_algorithm
    })
}

fn traffic_policy(value: Option<&str>) -> TrafficPolicy {
    match value {
        Some("Local") => TrafficPolicy::Local,
        _ => TrafficPolicy::Cluster,
    }
}

pub(crate) fn translate_slice(
    slice: &EndpointSlice,
    issues: &mut Vec<ItemIssue>,
) -> Result<SliceInfo, TranslateError> {
    let meta = &slice.metadata;
    let namespace = namespace_or_default(meta.namespace.as_deref());
    let name = meta.name.clone().ok_or(TranslateError::MissingName {
        kind: "EndpointSlice",
    })?;
    let Some(service) = meta.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) else {
        return Err(TranslateError::SliceWithoutService { namespace, name });
    };
    let want_v4 = match slice.address_type.as_str() {
        "IPv4" => true,
        "IPv6" => false,
        other => {
            return Err(TranslateError::UnsupportedAddressType {
                namespace,
                name,
                value: other.to_string(),
            });
        }
    };
    let mut issues = Issues {
        object: format!("EndpointSlice {namespace}/{name}"),
        out: issues,
    };

    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let Some(protocol) = Protocol::from_k8s(p.protocol.as_deref()) else {
            issues.push(
                format!("ports[{i}].protocol"),
                format!("unknown protocol {:?}", p.protocol.as_deref().unwrap_or_default()),
            );
            continue;
        };
        // A nil port means "all ports" for selector-less uses; kube-proxy skips it.
        let Some(number) = p.port else { continue };
        match port_number(number) {
            Ok(port) => ports.push(SlicePort {
                name: p.name.clone().unwrap_or_default(),
                port,
                protocol,
            }),
            Err(problem) => issues.push(format!("ports[{i}].port"), problem),
        }
    }

    // Sized once: doubling would leave up to half of each slice's endpoint list unused, which at
    // 100 000 endpoints is megabytes of the agent's memory.
    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for (i, ep) in slice.endpoints.iter().enumerate() {
        // kube-proxy uses the first address only (the API allows exactly one today).
        let Some(raw) = ep.addresses.first() else {
            issues.push(format!("endpoints[{i}].addresses"), "empty".into());
            continue;
        };
        let addr: IpAddr = match raw.parse() {
            Ok(a) => a,
            Err(_) => {
                issues.push(
                    format!("endpoints[{i}].addresses[0]"),
                    format!("{raw:?} is not an IP address"),
                );
                continue;
            }
        };
        if addr.is_ipv4() != want_v4 {
            issues.push(
                format!("endpoints[{i}].addresses[0]"),
                format!("{addr} does not match addressType {}", slice.address_type),
            );
            continue;
        }
        let cond = ep.conditions.as_ref();
        // As upstream's EndpointSliceCache: nil ready and nil serving mean true, nil
        // terminating means false.
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(true);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        let hints = ep.hints.as_ref();
        endpoints.push(SliceEndpoint {
            addr,
            ready,
            serving,
            terminating,
            node_name: ep.node_name.clone(),
            hints: Hints::new(
                hints
                    .and_then(|h| h.for_zones.as_ref())
                    .map(|z| z.iter().map(|z| z.name.clone()).collect())
                    .unwrap_or_default(),
                hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .map(|n| n.iter().map(|n| n.name.clone()).collect())
                    .unwrap_or_default(),
            ),
        });
    }

    Ok(SliceInfo {
        service: ServiceName::new(namespace.clone(), service.clone()),
        namespace,
        name,
        ports,
        endpoints,
    })
}

/// This node as the pipeline sees it; `node`: its Node object, once known.
pub(crate) fn translate_node(
    node_name: &str,
    node: Option<&Node>,
    node_port_addresses: Vec<IpAddr>,
) -> NodeInfo {
    NodeInfo {
        name: node_name.to_string(),
        zone: node
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|l| l.get(LABEL_ZONE))
            .cloned(),
        node_port_addresses,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> Service {
        serde_saphyr::from_str(yaml).expect("test manifest parses")
    }

    fn slice(yaml: &str) -> EndpointSlice {
        serde_saphyr::from_str(yaml).expect("test manifest parses")
    }

    fn proxied(svc: &Service) -> (ServiceInfo, Vec<ItemIssue>) {
        proxied_with(svc, &TranslateOptions::default())
    }

    fn proxied_with(svc: &Service, opts: &TranslateOptions) -> (ServiceInfo, Vec<ItemIssue>) {
        let mut issues = Vec::new();
        match translate_service(svc, opts, &mut issues) {
            Ok(ServiceOutcome::Proxied(info)) => (info, issues),
            other => panic!("expected a proxied service, got {other:?}"),
        }
    }

    fn skip_reason(svc: &Service, opts: &TranslateOptions) -> SkipReason {
        match translate_service(svc, opts, &mut Vec::new()) {
            Ok(ServiceOutcome::Skipped(_, reason)) => reason,
            other => panic!("expected a skipped service, got {other:?}"),
        }
    }

    const BASIC: &str = "
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
";

    #[test]
    fn the_lb_algorithm_annotation_wins_over_the_node_default_and_a_bad_one_is_reported() {
        let annotated = |value: &str| {
            service(&BASIC.replace(
                "metadata: {name: web, namespace: shop}",
                &format!("metadata: {{name: web, namespace: shop, annotations: {{bpf-kube-proxy.io/lb-algorithm: {value}}}}}"),
            ))
        };
        let maglev_node = TranslateOptions {
            lb_algorithm: LbAlgorithm::Maglev,
            ..TranslateOptions::default()
        };
        assert_eq!(proxied(&service(BASIC)).0.lb_algorithm, LbAlgorithm::Random);
        assert_eq!(
            proxied_with(&service(BASIC), &maglev_node).0.lb_algorithm,
            LbAlgorithm::Maglev
        );
        assert_eq!(proxied(&annotated("maglev")).0.lb_algorithm, LbAlgorithm::Maglev);
        assert_eq!(
            proxied_with(&annotated("random"), &maglev_node).0.lb_algorithm,
            LbAlgorithm::Random
        );
        let (info, issues) = proxied_with(&annotated("roundrobin"), &maglev_node);
        assert_eq!(info.lb_algorithm, LbAlgorithm::Maglev, "the node's default stays");
        assert_eq!(issues.len(), 1);
        assert_eq!(
            issues[0].field,
            "metadata.annotations[bpf-kube-proxy.io/lb-algorithm]"
        );
        assert!(issues[0].problem.contains("roundrobin"), "{}", issues[0].problem);
    }

    #[test]
    fn basic_service_port_defaults_to_tcp() {
        let (info, issues) = proxied(&service(BASIC));
        assert!(issues.is_empty());
        assert_eq!(info.name.to_string(), "shop/web");
        assert_eq!(info.cluster_ips, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            info.ports,
            vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
                node_port: None
            }]
        );
        assert_eq!(info.session_affinity_timeout, None);
        assert_eq!(info.internal_policy, TrafficPolicy::Cluster);
    }

    #[test]
    fn should_skip_service_rules() {
        let opts = TranslateOptions::default();
        let cases = [
            (
                "clusterIP None (headless)",
                "spec: {clusterIP: None, ports: [{port: 80}]}",
                SkipReason::Headless,
            ),
            (
                "no clusterIP",
                "spec: {ports: [{port: 80}]}",
                SkipReason::NoClusterIp,
            ),
            (
                "type ExternalName",
                "spec: {type: ExternalName, externalName: example.com, clusterIP: 10.96.0.1, ports: [{port: 80}]}",
                SkipReason::ExternalName,
            ),
        ];
        for (what, spec, want) in cases {
            let svc = service(&format!("metadata: {{name: s}}\n{spec}"));
            assert_eq!(skip_reason(&svc, &opts), want, "{what}");
        }
    }

    #[test]
    fn service_proxy_name_label_means_another_proxy_unless_it_names_us() {
        let labelled = service(&BASIC.replace(
            "metadata: {name: web, namespace: shop}",
            "metadata: {name: web, namespace: shop, labels: {service.kubernetes.io/service-proxy-name: other}}",
        ));
        assert_eq!(
            skip_reason(&labelled, &TranslateOptions::default()),
            SkipReason::OtherProxy("other".into())
        );
        let ours = TranslateOptions {
            service_proxy_name: Some("other".into()),
            ..TranslateOptions::default()
        };
        proxied_with(&labelled, &ours);
    }

    #[test]
    fn headless_label_skips_the_service() {
        let svc = service(&BASIC.replace(
            "metadata: {name: web, namespace: shop}",
            "metadata: {name: web, namespace: shop, labels: {service.kubernetes.io/headless: \"\"}}",
        ));
        assert_eq!(
            skip_reason(&svc, &TranslateOptions::default()),
            SkipReason::HeadlessLabel
        );
    }

    #[test]
    fn invalid_cluster_ip_rejects_the_service_naming_object_and_field() {
        let svc = service(&BASIC.replace("10.96.0.10", "10.96.0.300"));
        let err = translate_service(&svc, &TranslateOptions::default(), &mut Vec::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Service shop/web: spec.clusterIP \"10.96.0.300\" is not a valid IP address"
        );
    }

    #[test]
    fn dual_stack_cluster_ips_are_both_served() {
        let svc = service(&BASIC.replace(
            "clusterIP: 10.96.0.10",
            "clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, \"fd00::10\"]",
        ));
        let (info, _) = proxied(&svc);
        assert_eq!(info.cluster_ips.len(), 2);
        assert!(info.cluster_ips[1].is_ipv6());
    }

    #[test]
    fn bad_ports_are_dropped_one_by_one_and_named() {
        let svc = service(
            "
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: ok, port: 80}
  - {name: big, port: 70000}
  - {name: zero, port: 0}
  - {name: weird, port: 81, protocol: QUIC}
  - {name: dup, port: 80, protocol: TCP}
  - {name: dns, port: 80, protocol: UDP}
",
        );
        let (info, issues) = proxied(&svc);
        let names: Vec<_> = info.ports.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["ok", "dns"],
            "same port with another protocol is a separate port"
        );
        let fields: Vec<_> = issues.iter().map(|i| i.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.ports[1].port",
                "spec.ports[2].port",
                "spec.ports[3].protocol",
                "spec.ports[4]"
            ]
        );
        assert!(
            issues[0]
                .to_string()
                .starts_with("Service shop/web: spec.ports[1].port: 70000 is outside 1-65535")
        );
    }

    #[test]
    fn service_with_no_usable_port_is_rejected() {
        let svc = service("metadata: {name: s}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 99999}]}");
        assert!(matches!(
            translate_service(&svc, &TranslateOptions::default(), &mut Vec::new()),
            Err(TranslateError::NoUsablePort { .. })
        ));
    }

    #[test]
    fn session_affinity_client_ip_defaults_to_10800_seconds() {
        let svc = service(&BASIC.replace(
            "clusterIP: 10.96.0.10",
            "clusterIP: 10.96.0.10\n  sessionAffinity: ClientIP",
        ));
        assert_eq!(proxied(&svc).0.session_affinity_timeout, Some(10_800));
        let svc = service(&BASIC.replace(
            "clusterIP: 10.96.0.10",
            "clusterIP: 10.96.0.10\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}",
        ));
        assert_eq!(proxied(&svc).0.session_affinity_timeout, Some(30));
        let svc = service(&BASIC.replace(
            "clusterIP: 10.96.0.10",
            "clusterIP: 10.96.0.10\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}",
        ));
        let (info, issues) = proxied(&svc);
        assert_eq!(info.session_affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT));
        assert_eq!(issues.len(), 1);
    }

    #[test]
    fn external_traffic_policy_only_applies_to_externally_accessible_services() {
        let cluster_only = service(&BASIC.replace(
            "clusterIP: 10.96.0.10",
            "clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local",
        ));
        let (info, _) = proxied(&cluster_only);
        assert_eq!(info.external_policy, TrafficPolicy::Cluster);
        assert_eq!(info.internal_policy, TrafficPolicy::Local);
        let node_port = service(
            "
metadata: {name: np}
spec:
  type: NodePort
  clusterIP: 10.96.0.11
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{port: 80, nodePort: 30080}]
",
        );
        let (info, _) = proxied(&node_port);
        assert_eq!(info.external_policy, TrafficPolicy::Local);
        assert_eq!(info.ports[0].node_port, Some(30080));
        assert_eq!(info.health_check_node_port, Some(32000));
    }

    #[test]
    fn load_balancer_ingress_with_ip_mode_proxy_is_not_short_circuited() {
        let svc = service(
            "
metadata: {name: lb}
spec: {type: LoadBalancer, clusterIP: 10.96.0.12, ports: [{port: 443, nodePort: 30443}]}
status:
  loadBalancer:
    ingress:
    - {ip: 192.0.2.10}
    - {ip: 192.0.2.11, ipMode: VIP}
    - {ip: 192.0.2.12, ipMode: Proxy}
    - {hostname: lb.example.com}
",
        );
        let (info, _) = proxied(&svc);
        let ips: Vec<String> = info.load_balancer_ips.iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["192.0.2.10", "192.0.2.11"]);
    }

    #[test]
    fn invalid_external_ips_and_source_ranges_are_dropped_with_an_issue() {
        let svc = service(
            "
metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.12
  externalIPs: [192.0.2.1, not-an-ip]
  loadBalancerSourceRanges: [\"203.0.113.0/24\", \"198.51.100.7/33\", \" 10.1.2.3/8 \"]
  ports: [{port: 443}]
",
        );
        let (info, issues) = proxied(&svc);
        assert_eq!(info.external_ips.len(), 1);
        let ranges: Vec<String> = info
            .load_balancer_source_ranges
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ranges, ["203.0.113.0/24", "10.0.0.0/8"], "host bits are cleared");
        let fields: Vec<_> = issues.iter().map(|i| i.field.as_str()).collect();
        assert_eq!(
            fields,
            ["spec.externalIPs[1]", "spec.loadBalancerSourceRanges[1]"]
        );
    }

    const SLICE: &str = "
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.0.0.1], nodeName: n1, zone: z1}
- {addresses: [10.0.0.2], conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.0.0.3], conditions: {ready: false}}
- {addresses: [\"fd00::1\"]}
- {addresses: [bogus]}
- {addresses: [10.0.0.4], hints: {forZones: [{name: z1}], forNodes: [{name: n1}]}}
";

    #[test]
    fn endpoint_conditions_follow_api_defaults() {
        let mut issues = Vec::new();
        let info = translate_slice(&slice(SLICE), &mut issues).unwrap();
        assert_eq!(info.service, ServiceName::new("shop", "web"));
        let conds: Vec<(String, bool, bool, bool)> = info
            .endpoints
            .iter()
            .map(|e| (e.addr.to_string(), e.ready, e.serving, e.terminating))
            .collect();
        assert_eq!(
            conds,
            [
                ("10.0.0.1".to_string(), true, true, false),
                ("10.0.0.2".to_string(), false, true, true),
                ("10.0.0.3".to_string(), false, true, false),
                ("10.0.0.4".to_string(), true, true, false),
            ],
            "nil ready and nil serving mean true, nil terminating means false"
        );
        assert_eq!(info.endpoints[0].node_name.as_deref(), Some("n1"));
        assert!(
            info.endpoints[3].hints.zones().contains("z1") && info.endpoints[3].hints.nodes().contains("n1")
        );
        let fields: Vec<_> = issues.iter().map(|i| i.field.as_str()).collect();
        assert_eq!(fields, ["endpoints[3].addresses[0]", "endpoints[4].addresses[0]"]);
    }

    #[test]
    fn slice_without_service_label_or_with_fqdn_addresses_is_not_ours() {
        let unlabelled = slice(&SLICE.replace("  labels: {kubernetes.io/service-name: web}\n", ""));
        assert!(matches!(
            translate_slice(&unlabelled, &mut Vec::new()),
            Err(TranslateError::SliceWithoutService { .. })
        ));
        let fqdn = slice(&SLICE.replace("addressType: IPv4", "addressType: FQDN"));
        assert!(matches!(
            translate_slice(&fqdn, &mut Vec::new()),
            Err(TranslateError::UnsupportedAddressType { .. })
        ));
    }

    #[test]
    fn slice_port_without_number_is_skipped_like_kube_proxy() {
        let s = slice(&SLICE.replace(
            "ports: [{name: http, port: 8080, protocol: TCP}]",
            "ports: [{name: all}, {name: http, port: 8080}]",
        ));
        let info = translate_slice(&s, &mut Vec::new()).unwrap();
        assert_eq!(info.ports.len(), 1);
        assert_eq!(info.ports[0].name, "http");
    }
}
