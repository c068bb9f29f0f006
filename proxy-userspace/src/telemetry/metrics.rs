//! Prometheus metrics: kube-proxy's own names (`kubeproxy_*`) where a kube-proxy metric means
//! the same thing, `bpf_kube_proxy_*` for what only this proxy has.

use std::sync::{Arc, OnceLock, atomic::AtomicU64};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _, text::encode},
    metrics::{
        MetricType, counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge, gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabel {
    pub kind: String,
}

impl KindLabel {
    pub fn new(kind: &str) -> Self {
        Self { kind: kind.into() }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CodeLabel {
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PolicyLabel {
    pub(crate) traffic_policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ProgramLabel {
    pub program: String,
    /// `loaded` or `failed`.
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct AttachmentLabel {
    pub device: String,
    pub program: String,
    /// `tcx` or `netlink`.
    pub mode: &'static str,
    /// `attached`, `failed`, or `absent` (the device went away).
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DeviceLabel {
    pub device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DeviceProgramLabel {
    pub device: String,
    pub program: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RecreatedLabel {
    pub map: String,
    /// `shape`, `layout` or `unreadable`.
    pub mismatch: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct FeatureLabel {
    pub feature: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: &'static str,
}

/// One pinned map's fill level and cost.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: u64,
    /// max_entries.
    pub capacity: u64,
    /// Kernel memory, bytes (`memlock`); `None` where the kernel did not say.
    pub memory: Option<u64>,
}

impl MapFill {
    /// At least 90 % full: an LRU map evicts its oldest entries from there on (flows,
    /// sockets or clients forgotten), a map the agent writes is about to grow or, with a
    /// fixed size, to refuse Services. Arrays are always full and never reported.
    pub fn near_full(&self) -> bool {
        !matches!(self.map, proxy_common::maps::COUNTERS | proxy_common::maps::NODE)
            && proxy_common::sizing::near_full(self.entries, self.capacity)
    }
}

/// Figures from the datapath itself: its per-CPU counters, read at scrape time, and how full
/// its maps are, as last counted off the scrape path (a count reads every entry).
pub trait DatapathReadings: Send + Sync {
    /// `(reason, total over CPUs)`, reasons in `Counter::ALL` order.
    fn counters(&self) -> Vec<(&'static str, u64)>;
    /// Entries per map at the last count.
    fn map_fill(&self) -> Vec<MapFill>;
}

/// Encodes the datapath's readings once the datapath is loaded (nothing before).
#[derive(Default)]
struct DatapathCollector(Arc<OnceLock<Box<dyn DatapathReadings>>>);

impl std::fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatapathCollector")
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(readings) = self.0.get() else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(
            "bpf_kube_proxy_datapath_events",
            "Socket program decisions by reason, summed over CPUs (from the bkp_counters map)",
            None,
            MetricType::Counter,
        )?;
        for (reason, total) in readings.counters() {
            ConstCounter::new(total).encode(family.encode_family(&ReasonLabel { reason })?)?;
        }
        let fill = readings.map_fill();
        for (name, help, value) in [
            (
                "bpf_kube_proxy_map_entries",
                "Entries in each pinned map",
                (|f: &MapFill| f.entries) as fn(&MapFill) -> u64,
            ),
            (
                "bpf_kube_proxy_map_capacity",
                "max_entries of each pinned map",
                |f| f.capacity,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for f in &fill {
                ConstGauge::new(value(f) as i64).encode(family.encode_family(&MapLabel { map: f.map })?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "bpf_kube_proxy_map_near_full",
            "1 when a pinned map holds at least 90% of its capacity (an LRU map evicts from there on)",
            None,
            MetricType::Gauge,
        )?;
        for f in &fill {
            ConstGauge::new(i64::from(f.near_full()))
                .encode(family.encode_family(&MapLabel { map: f.map })?)?;
        }
        let mut family = encoder.encode_descriptor(
            "bpf_kube_proxy_map_memory_bytes",
            "Kernel memory of each pinned map (its memlock charge; preallocated maps are charged in full)",
            None,
            MetricType::Gauge,
        )?;
        for f in &fill {
            if let Some(bytes) = f.memory {
                ConstGauge::new(i64::try_from(bytes).unwrap_or(i64::MAX))
                    .encode(family.encode_family(&MapLabel { map: f.map })?)?;
            }
        }
        Ok(())
    }
}

/// kube-proxy's sync buckets: 1 ms doubling up to ~16 s.
fn sync_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15)
}

pub struct Metrics {
    registry: Registry,
    datapath: Arc<OnceLock<Box<dyn DatapathReadings>>>,
    pub(crate) network_programming_duration: Histogram,
    pub(crate) service_changes_pending: Gauge,
    pub(crate) endpoint_changes_pending: Gauge,
    pub(crate) no_local_endpoints: Family<PolicyLabel, Gauge>,
    pub(crate) healthz_requests: Family<CodeLabel, Counter>,
    pub(crate) livez_requests: Family<CodeLabel, Counter>,
    pub(crate) map_full: Counter,
    pub(crate) maps_grown: Counter,
    pub(crate) sync_duration: Histogram,
    pub(crate) sync_full_duration: Histogram,
    pub(crate) sync_partial_duration: Histogram,
    pub(crate) last_sync_timestamp: Gauge<f64, AtomicU64>,
    pub(crate) service_changes: Counter,
    pub(crate) endpoint_changes: Counter,
    pub(crate) invalid_objects: Family<KindLabel, Counter>,
    pub(crate) skipped_items: Family<KindLabel, Counter>,
    pub(crate) map_write_errors: Counter,
    pub(crate) repaired_entries: Counter,
    pub(crate) unrepaired_entries: Gauge,
    pub(crate) frontend_conflicts: Counter,
    pub(crate) source_errors: Family<KindLabel, Counter>,
    pub(crate) watch_silent_restarts: Family<KindLabel, Counter>,
    pub(crate) stale_udp_sockets_destroyed: Counter,
    pub(crate) stale_udp_failures: Counter,
    pub(crate) conntrack_collected: Counter,
    pub(crate) health_check_bind_failures: Counter,
    pub(crate) datapath_programs: Family<ProgramLabel, Gauge>,
    pub(crate) tc_attachments: Family<AttachmentLabel, Gauge>,
    pub(crate) tc_reattached: Family<DeviceProgramLabel, Counter>,
    pub(crate) reply_device_unserved: Family<DeviceLabel, Gauge>,
    pub(crate) kernel_features: Family<FeatureLabel, Gauge>,
    pub(crate) maps_recreated: Family<RecreatedLabel, Counter>,
}

impl Metrics {
    #[expect(clippy::too_many_lines, reason = "one registration per metric, nothing else")]
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let collector = DatapathCollector::default();
        let datapath = collector.0.clone();
        registry.register_collector(Box::new(collector));
        let m = Self {
            datapath,
            network_programming_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 20),
            ),
            service_changes_pending: Gauge::default(),
            endpoint_changes_pending: Gauge::default(),
            no_local_endpoints: Family::default(),
            healthz_requests: Family::default(),
            livez_requests: Family::default(),
            map_full: Counter::default(),
            maps_grown: Counter::default(),
            sync_duration: Histogram::new(sync_buckets()),
            sync_full_duration: Histogram::new(sync_buckets()),
            sync_partial_duration: Histogram::new(sync_buckets()),
            last_sync_timestamp: Gauge::default(),
            service_changes: Counter::default(),
            endpoint_changes: Counter::default(),
            invalid_objects: Family::default(),
            skipped_items: Family::default(),
            map_write_errors: Counter::default(),
            repaired_entries: Counter::default(),
            unrepaired_entries: Gauge::default(),
            frontend_conflicts: Counter::default(),
            source_errors: Family::default(),
            watch_silent_restarts: Family::default(),
            stale_udp_sockets_destroyed: Counter::default(),
            stale_udp_failures: Counter::default(),
            conntrack_collected: Counter::default(),
            health_check_bind_failures: Counter::default(),
            datapath_programs: Family::default(),
            tc_attachments: Family::default(),
            tc_reattached: Family::default(),
            reply_device_unserved: Family::default(),
            kernel_features: Family::default(),
            maps_recreated: Family::default(),
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
            kp.register(
                "sync_proxy_rules_service_changes_pending",
                "Pending proxy rules Service changes",
                m.service_changes_pending.clone(),
            );
            kp.register(
                "sync_proxy_rules_endpoint_changes_pending",
                "Pending proxy rules Endpoint changes",
                m.endpoint_changes_pending.clone(),
            );
            kp.register(
                "network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
                m.network_programming_duration.clone(),
            );
            kp.register(
                "sync_proxy_rules_no_local_endpoints_total",
                "Number of services with a Local traffic policy and no endpoints",
                m.no_local_endpoints.clone(),
            );
            kp.register(
                "proxy_healthz",
                "Cumulative proxy healthz HTTP status",
                m.healthz_requests.clone(),
            );
            kp.register(
                "proxy_livez",
                "Cumulative proxy livez HTTP status",
                m.livez_requests.clone(),
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
                "datapath_repaired_entries",
                "Map entries the repair pass rewrote or removed because they differed from the desired state",
                m.repaired_entries.clone(),
            );
            own.register(
                "datapath_unrepaired_entries",
                "Map entries known to differ from the desired state and not repaired yet",
                m.unrepaired_entries.clone(),
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
                "watch_silent_restarts",
                "Watches restarted because they showed nothing, not even a bookmark, for --watch-liveness-timeout",
                m.watch_silent_restarts.clone(),
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
            own.register(
                "conntrack_collected",
                "Expired tc conntrack entries removed by the agent",
                m.conntrack_collected.clone(),
            );
            own.register(
                "health_check_bind_failures",
                "healthCheckNodePort servers that could not bind their port",
                m.health_check_bind_failures.clone(),
            );
            own.register(
                "datapath_programs",
                "tc programs by load state (1 for the state each is in); the socket programs always load",
                m.datapath_programs.clone(),
            );
            own.register(
                "tc_attachments",
                "tc programs on --devices by device, attach mode and state (1 for the state each is in)",
                m.tc_attachments.clone(),
            );
            own.register(
                "tc_reattached",
                "tc programs attached afresh because their device had been deleted (a severed pinned link, a filter gone with its device)",
                m.tc_reattached.clone(),
            );
            own.register(
                "reply_device_unserved",
                "Services whose remote backends' replies (SNATed flows from outside the node) arrive on this device, which has no tc programs: those connections hang",
                m.reply_device_unserved.clone(),
            );
            own.register(
                "kernel_feature",
                "Kernel features probed at start (1 present, 0 absent; unprobed ones are not listed)",
                m.kernel_features.clone(),
            );
            own.register(
                "maps_recreated",
                "Pinned maps replaced by empty ones at start because they did not match this build",
                m.maps_recreated.clone(),
            );
            own.register(
                "map_full",
                "Service changes not programmed because a map would have overflowed",
                m.map_full.clone(),
            );
            own.register(
                "maps_grown",
                "Times the maps the agent writes were replaced by bigger ones (their entries copied) so that a sync's Services fit",
                m.maps_grown.clone(),
            );
        }
        Arc::new(Self { registry, ..m })
    }

    pub(crate) fn set_last_sync_now(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_sync_timestamp.set(now);
    }

    /// Starts reporting the datapath's own counters and map fill (once, when it is loaded).
    pub(crate) fn attach_datapath(&self, readings: Box<dyn DatapathReadings>) {
        let _ = self.datapath.set(readings);
    }

    /// Prometheus/OpenMetrics text exposition.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
