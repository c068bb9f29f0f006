//! The Kubernetes names every stage agrees on: well-known labels, annotations and taints, and
//! the namespace of an object that names none.

/// Joins an EndpointSlice to its Service.
pub(crate) const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// A Service with this label belongs to the proxy it names.
pub(crate) const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// A Service with this label is not proxied.
pub(crate) const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Node label with the node's zone.
pub(crate) const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// A Service's backend choice for traffic from outside the node, `random` or `maglev`
/// (Cilium's `service.cilium.io/lb-algorithm` under our own prefix).
pub(crate) const ANNOTATION_LB_ALGORITHM: &str = "bpf-kube-proxy.io/lb-algorithm";
/// The annotation the EndpointSlice controller sets to the time of the change it reflects.
pub(crate) const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// The taint the cluster autoscaler puts on a node it is about to remove.
pub(crate) const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// The API server puts a namespaced object created without a namespace into "default"; manifest
/// files often leave it out for the same reason.
pub(crate) fn namespace_or_default(namespace: Option<&str>) -> String {
    namespace.unwrap_or("default").to_string()
}
