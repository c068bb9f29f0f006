//! Prometheus metrics: kube-proxy's own names (`kubeproxy_*`) where a kube-proxy metric means
//! the same thing, `bpf_kube_proxy_*` for what only this proxy has.

use std::sync::{Arc, atomic::AtomicU64};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

impl KindLabel {
    pub fn new(kind: &str) -> Self {
        Self { kind: kind.into() }
    }
}

/// kube-proxy's sync buckets: 1 ms doubling up to ~16 s.
fn sync_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15)
}

pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub sync_full_duration: Histogram,
    pub sync_partial_duration: Histogram,
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    pub service_changes: Counter,
    pub endpoint_changes: Counter,
    pub invalid_objects: Family<KindLabel, Counter>,
    pub skipped_items: Family<KindLabel, Counter>,
    pub map_write_errors: Counter,
    pub frontend_conflicts: Counter,
    pub source_errors: Family<KindLabel, Counter>,
    pub stale_udp_sockets_destroyed: Counter,
    pub stale_udp_failures: Counter,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let m = Self {
            sync_duration: Histogram::new(sync_buckets()),
            sync_full_duration: Histogram::new(sync_buckets()),
            sync_partial_duration: Histogram::new(sync_buckets()),
            last_sync_timestamp: Gauge::default(),
            service_changes: Counter::default(),
            endpoint_changes: Counter::default(),
            invalid_objects: Family::default(),
            skipped_items: Family::default(),
            map_write_errors: Counter::default(),
            frontend_conflicts: Counter::default(),
            source_errors: Family::default(),
            stale_udp_sockets_destroyed: Counter::default(),
            stale_udp_failures: Counter::default(),
            registry: Registry::default(),
        };
        {
            let kp = registry.sub_registry_with_prefix("kubeproxy");
            kp.register(
                "sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
                m.sync_duration.clone(),
            );
            kp.register(
                "sync_full_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for full resyncs",
                m.sync_full_duration.clone(),
            );
            kp.register(
                "sync_partial_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for partial resyncs",
                m.sync_partial_duration.clone(),
            );
            kp.register(
                "sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced",
                m.last_sync_timestamp.clone(),
            );
            kp.register(
                "sync_proxy_rules_service_changes",
                "Cumulative proxy rules Service changes",
                m.service_changes.clone(),
            );
            kp.register(
                "sync_proxy_rules_endpoint_changes",
                "Cumulative proxy rules Endpoint changes",
                m.endpoint_changes.clone(),
            );
        }
        {
            let own = registry.sub_registry_with_prefix("bpf_kube_proxy");
            own.register(
                "invalid_objects",
                "Objects rejected as a whole (their last good version stays programmed)",
                m.invalid_objects.clone(),
            );
            own.register(
                "skipped_items",
                "Items (ports, addresses, CIDRs) dropped from otherwise valid objects",
                m.skipped_items.clone(),
            );
            own.register(
                "map_write_errors",
                "BPF map operations that failed",
                m.map_write_errors.clone(),
            );
            own.register(
                "frontend_conflicts",
                "Frontends claimed by a second Service and not programmed for it",
                m.frontend_conflicts.clone(),
            );
            own.register(
                "source_errors",
                "Failed list/watch attempts against the API server (each is retried with backoff)",
                m.source_errors.clone(),
            );
            own.register(
                "stale_udp_sockets_destroyed",
                "Connected UDP sockets destroyed because their backend left the Service",
                m.stale_udp_sockets_destroyed.clone(),
            );
            own.register(
                "stale_udp_failures",
                "Network namespaces or sockets where stale UDP sockets could not be destroyed",
                m.stale_udp_failures.clone(),
            );
        }
        Arc::new(Self { registry, ..m })
    }

    pub fn set_last_sync_now(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.last_sync_timestamp.set(now);
    }

    /// Prometheus/OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
