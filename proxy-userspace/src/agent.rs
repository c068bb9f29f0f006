//! The long-running agent: loads the datapath, adopts what pinned maps already hold, keeps the
//! maps in sync with the source, and leaves everything in place when it stops.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::runtime::watcher;
use notify::{RecursiveMode, Watcher as _};
use proxy_common::maps::NodeConfig;
use tokio::{signal::unix::SignalKind, sync::mpsc};

use crate::{
    datapath::{
        conntrack::Conntrack,
        external::{self, Attachment, ProgramState},
        features::{KernelFeatures, TcAttach, TcMode},
        loader::{Datapath, LoadError, MapSizes},
        maps::{OpenError, PinnedMaps},
        reader::{ReadError, Snapshot},
        readings::PinnedReadings,
        sockets::StaleSockets,
        writer::Writer,
    },
    health::{self, proxy::Health, services::HealthCheckServers},
    node::{
        devices::{self, Devices},
        nodeport::NodePortAddresses,
    },
    pipeline::model::ServiceName,
    pipeline::plan::{Capacity, Plan, PlanSink, Planner},
    pipeline::translate::TranslateOptions,
    source::{
        ObjectKind,
        kube::{self as kube_source, KubeEvent, KubeSourceError},
        manifests::ManifestSet,
        meta::namespace_or_default,
    },
    sync::proxier::{Proxier, SyncReport},
    telemetry::metrics::{AttachmentLabel, FeatureLabel, KindLabel, Metrics, ProgramLabel},
    telemetry::serve,
};

/// Where Services and EndpointSlices come from.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// YAML/JSON files, watched for changes.
    Manifests(PathBuf),
    /// The API server: `--kubeconfig`, else in-cluster config, else the usual kubeconfig.
    Kubernetes { kubeconfig: Option<PathBuf> },
}

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
    pub node_name: String,
    pub source: SourceConfig,
    pub map_sizes: MapSizes,
    pub translate: TranslateOptions,
    /// Manifests: re-read at least this often, in case a file event was missed.
    pub resync_period: Duration,
    /// kube-proxy's `--sync-period`: a full sync at least this often; `/healthz` fails when a
    /// change waits twice as long.
    pub sync_period: Duration,
    pub healthz_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub external: ExternalOptions,
}

/// NodePort, LoadBalancer and externalIP traffic from outside the node (the tc path).
#[derive(Debug, Clone)]
pub struct ExternalOptions {
    pub devices: Devices,
    pub tc_attach: TcAttach,
    pub node_port_addresses: NodePortAddresses,
    /// `--node-ip`: the node's primary addresses (SNAT source), if not the devices' first.
    pub node_ips: Vec<IpAddr>,
    pub ct_tcp_timeout: Duration,
    pub ct_udp_timeout: Duration,
}

/// kube-proxy's default for conntrack.tcpEstablishedTimeout.
pub const DEFAULT_CT_TCP_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// The kernel's nf_conntrack_udp_timeout_stream, which kube-proxy leaves in place by default.
pub const DEFAULT_CT_UDP_TIMEOUT: Duration = Duration::from_secs(120);
/// A TCP flow that saw FIN or RST lingers this long for the last segments (Cilium's default).
const CT_TCP_CLOSING_TIMEOUT_S: u32 = 10;

/// The node's external side, resolved from [`ExternalOptions`] at start.
struct ExternalSide {
    devices: Vec<String>,
    node_port_addresses: Vec<IpAddr>,
    config: NodeConfig,
}

impl ExternalSide {
    fn resolve(opts: &ExternalOptions) -> Result<Self, AgentError> {
        let interfaces = devices::interface_addresses().map_err(AgentError::Interfaces)?;
        let devices = opts.devices.resolve(&interfaces);
        if let Some(missing) = devices.iter().find(|d| !interfaces.contains_key(*d)) {
            return Err(AgentError::Device(missing.clone()));
        }
        let primary = devices::primary_addresses(&opts.node_ips, &devices, &interfaces);
        let all: Vec<IpAddr> = interfaces.values().flatten().copied().collect();
        let node_port_addresses = opts.node_port_addresses.select(&all, &primary);
        let seconds = |d: Duration| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
        let mut config = NodeConfig {
            ct_tcp_timeout_s: seconds(opts.ct_tcp_timeout),
            ct_tcp_closing_timeout_s: CT_TCP_CLOSING_TIMEOUT_S,
            ct_udp_timeout_s: seconds(opts.ct_udp_timeout),
            ..Default::default()
        };
        for ip in &primary {
            match ip {
                IpAddr::V4(a) => config.snat_v4 = a.octets(),
                IpAddr::V6(a) => config.snat_v6 = a.octets(),
            }
        }
        tracing::info!(
            devices = ?devices,
            node_port_addresses = ?node_port_addresses,
            primary = ?primary,
            "external traffic (NodePort, LoadBalancer, externalIP)"
        );
        if devices.is_empty() {
            tracing::info!(
                "no --devices: NodePorts are served to this node's own sockets only; \
                 pass --devices auto (or a list) for traffic from outside"
            );
        }
        Ok(Self {
            devices,
            node_port_addresses,
            config,
        })
    }

    /// How often dead conntrack entries are collected: often enough that a UDP flow is gone
    /// soon after its timeout, rarely enough to cost nothing.
    fn gc_period(&self) -> Duration {
        Duration::from_secs(u64::from(self.config.ct_udp_timeout_s).clamp(1, 30))
    }
}

/// Collects dead conntrack entries forever.
async fn collect_conntrack(mut conntrack: Conntrack, period: Duration, metrics: Arc<Metrics>) {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let collected = conntrack.collect();
        metrics.conntrack_collected.inc_by(collected as u64);
        if collected > 0 {
            tracing::debug!(collected, "removed expired conntrack entries");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Kube(#[from] KubeSourceError),
    #[error("installing the SIGTERM handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Serve(#[from] serve::BindError),
    #[error("watching {path}: {source}")]
    Watch { path: PathBuf, source: notify::Error },
    #[error("listing the node's addresses: {0}")]
    Interfaces(std::io::Error),
    #[error("--devices names {0:?}, which this network namespace does not have")]
    Device(String),
}

/// The real datapath behind the proxier: map writes, then the sockets they left stale.
struct DatapathSink {
    writer: Writer,
    stale: StaleSockets,
    metrics: Arc<Metrics>,
}

impl PlanSink for DatapathSink {
    fn apply(&mut self, plan: &Plan) -> Vec<String> {
        let failed = PlanSink::apply(&mut self.writer, plan);
        if !plan.departed.is_empty() {
            let done = self.stale.terminate(&plan.departed);
            self.metrics
                .stale_udp_sockets_destroyed
                .inc_by(done.destroyed as u64);
            self.metrics.stale_udp_failures.inc_by(done.failures.len() as u64);
            for failure in &done.failures {
                tracing::warn!(%failure, "could not destroy stale UDP sockets");
            }
            if done.destroyed > 0 {
                tracing::info!(
                    destroyed = done.destroyed,
                    namespaces = done.namespaces,
                    "destroyed connected UDP sockets of departed backends"
                );
            }
        }
        failed
    }
}

/// Logs a sync and, after a large one, hands the memory it went through back to the kernel.
fn finish_sync(what: &str, report: &SyncReport) {
    if report.ops > 0 || !report.failed.is_empty() {
        tracing::info!(
            services = report.services,
            map_ops = report.ops,
            failed = report.failed.len(),
            "{what}"
        );
    }
    if report.ops >= LARGE_SYNC_OPS {
        release_free_memory();
    }
}

/// A sync this large (a first sync, a reload of many Services) went through megabytes of
/// short-lived memory: parsed documents, the plan, the batch arrays.
const LARGE_SYNC_OPS: usize = 10_000;

/// Hands the allocator's free pages back to the kernel. glibc only returns the top of its heap
/// by itself, so without this the agent's RSS would stay at the peak of its largest sync
/// (about 20 MiB above what it holds at 10 000 Services) for the rest of its life.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own free lists; no pointer of ours is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The datapath, loaded and with its pinned state adopted, but not attached yet.
struct Prepared {
    datapath: Datapath,
    proxier: Proxier<DatapathSink>,
    external: ExternalSide,
    tc_mode: TcMode,
    health_checks: HealthCheckServers,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// tc programs that did not load (for `/healthz`).
    degraded: Vec<String>,
    live: bool,
}

/// Probes the kernel once, logs the one line and exports it; returns the tc attach mode.
fn probe_kernel(tc_attach: TcAttach, metrics: &Metrics) -> TcMode {
    let kernel = KernelFeatures::probe();
    let mode = tc_attach.mode(kernel.tcx);
    kernel.log(mode);
    for feature in kernel.list() {
        if let Some(available) = feature.available {
            metrics
                .kernel_features
                .get_or_create(&FeatureLabel {
                    feature: feature.name,
                })
                .set(i64::from(available));
        }
    }
    mode
}

/// Exports the tc programs' load states; returns the problems, for `/healthz`.
fn report_programs(programs: &[(&'static str, ProgramState)], metrics: &Metrics) -> Vec<String> {
    let mut problems = Vec::new();
    for (program, state) in programs {
        let state = match state {
            ProgramState::Loaded => "loaded",
            ProgramState::Failed(reason) => {
                problems.push(format!("tc: program {program} not loaded: {reason}"));
                "failed"
            }
        };
        metrics
            .datapath_programs
            .get_or_create(&ProgramLabel {
                program: program.to_string(),
                state,
            })
            .set(1);
    }
    problems
}

/// Logs and exports the tc attachments; returns the problems, for `/healthz`.
fn report_attachments(attachments: &[Attachment], metrics: &Metrics) -> Vec<String> {
    let mut problems = Vec::new();
    for a in attachments {
        let state = match &a.outcome {
            Ok(_) => "attached",
            Err(e) => {
                tracing::error!(
                    device = %a.device,
                    program = a.program,
                    mode = a.mode.as_str(),
                    "tc program not attached; traffic from outside arriving on this device is not served: {e}"
                );
                problems.push(format!("tc: {e}"));
                "failed"
            }
        };
        metrics
            .tc_attachments
            .get_or_create(&AttachmentLabel {
                device: a.device.clone(),
                program: a.program.to_string(),
                mode: a.mode.as_str(),
                state,
            })
            .set(1);
    }
    problems
}

impl Prepared {
    fn load(opts: &AgentOptions, metrics: Arc<Metrics>, health: Arc<Health>) -> Result<Self, AgentError> {
        let external = ExternalSide::resolve(&opts.external)?;
        let tc_mode = probe_kernel(opts.external.tc_attach, &metrics);
        let datapath = Datapath::load(&opts.pin_dir, opts.map_sizes)?;
        let degraded = report_programs(datapath.tc_programs(), &metrics);
        health.set_degraded(degraded.clone(), false);
        external::write_node_config(&opts.pin_dir, &external.config)?;
        let conntrack = Conntrack::open(&opts.pin_dir, external.config)?;
        tokio::spawn(collect_conntrack(
            conntrack,
            external.gc_period(),
            metrics.clone(),
        ));
        let maps = PinnedMaps::open(&opts.pin_dir)?;
        let existing = Snapshot::read(&maps)?;
        if !existing.frontends.is_empty() {
            tracing::info!(
                frontends = existing.frontends.len(),
                "adopting datapath state from pinned maps"
            );
        }
        let sizes = opts.map_sizes;
        let planner = Planner::adopt(existing.programmed()).with_capacity(Capacity {
            services: sizes.services,
            backends: sizes.backends,
            rev_nat: sizes.rev_nat,
        });
        let metrics_for_checks = metrics.clone();
        let metrics_for_prepared = metrics.clone();
        let proxier = Proxier::new(
            &opts.node_name,
            external.node_port_addresses.clone(),
            opts.translate.clone(),
            planner,
            DatapathSink {
                writer: Writer::new(maps),
                stale: StaleSockets::open(&opts.pin_dir, &opts.cgroup)?,
                metrics: metrics.clone(),
            },
            metrics,
            health.clone(),
        );
        Ok(Self {
            datapath,
            proxier,
            external,
            tc_mode,
            health_checks: HealthCheckServers::new(metrics_for_checks, health.clone()),
            metrics: metrics_for_prepared,
            health,
            degraded,
            live: false,
        })
    }

    /// Syncs; the first time, once the source has listed everything, also drops state no
    /// Service claims and only then attaches (or switches over) the programs.
    /// `periodic`: kube-proxy's sync-period tick, which syncs (and so reports health) even
    /// when nothing changed.
    fn sync(&mut self, cgroup: &Path, periodic: bool) -> Result<(), AgentError> {
        if self.live {
            if periodic {
                self.proxier.note_periodic_sync();
            }
            if periodic || self.proxier.has_pending() {
                finish_sync("sync", &self.proxier.sync());
                self.health_checks
                    .update(self.proxier.inventory().health_checks());
            }
            return Ok(());
        }
        finish_sync("initial sync", &self.proxier.sync());
        self.health_checks
            .update(self.proxier.inventory().health_checks());
        finish_sync(
            "removed state no Service claims",
            &self.proxier.release_unclaimed(),
        );
        let attached = self.datapath.attach(cgroup)?;
        let (attachments, mut tc_problems) =
            match self.datapath.attach_devices(&self.external.devices, self.tc_mode) {
                Ok(attachments) => (attachments, Vec::new()),
                Err(e) => {
                    // The socket programs are attached: they serve whatever happens to tc.
                    tracing::error!("tc programs not attached: {e}");
                    (Vec::new(), vec![format!("tc: {e}")])
                }
            };
        tc_problems.extend(report_attachments(&attachments, &self.metrics));
        let external_down = !self.external.devices.is_empty() && !tc_problems.is_empty();
        let mut problems = self.degraded.clone();
        problems.extend(tc_problems);
        self.health.set_degraded(problems, external_down);
        let tc_updated = attachments.iter().filter(|a| a.outcome == Ok(true)).count();
        let tc_created = attachments.iter().filter(|a| a.outcome == Ok(false)).count();
        let planner = self.proxier.planner();
        tracing::info!(
            cgroup = %cgroup.display(),
            pin_dir = %self.datapath.pin_dir().display(),
            links_updated = attached.updated,
            links_created = attached.created,
            tc_mode = self.tc_mode.as_str(),
            tc_links_updated = tc_updated,
            tc_links_created = tc_created,
            services = planner.service_count(),
            frontends = planner.frontend_count(),
            backends = planner.backend_count(),
            "datapath ready"
        );
        self.live = true;
        Ok(())
    }
}

/// kube-proxy's sync-period timer; its first tick is one period from now.
async fn periodic_sync(period: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    interval
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown() -> Result<impl std::future::Future<Output = ()>, AgentError> {
    let mut term = tokio::signal::unix::signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

pub async fn run(opts: AgentOptions, metrics: Arc<Metrics>) -> Result<(), AgentError> {
    // kube-proxy's health timeout: a change may wait two sync periods before `/healthz` fails.
    let health = Arc::new(Health::new(2 * opts.sync_period));
    let prepared = Prepared::load(&opts, metrics.clone(), health.clone())?;
    metrics.attach_datapath(Box::new(PinnedReadings::open(&opts.pin_dir)?));
    if let Some(addr) = opts.healthz_addr {
        health::server::start(health, metrics.clone(), addr).await?;
    }
    if let Some(addr) = opts.metrics_addr {
        serve::start(metrics.clone(), addr).await?;
    }
    let stop = shutdown().await?;
    match &opts.source {
        SourceConfig::Manifests(path) => run_manifests(path, &opts, prepared, stop).await?,
        SourceConfig::Kubernetes { kubeconfig } => {
            let client = kube_source::client(kubeconfig.as_deref()).await?;
            run_kube(client, &opts, prepared, metrics, stop).await?;
        }
    }
    tracing::info!("stopping; the datapath stays in place (run `bpf-kube-proxy cleanup` to remove it)");
    Ok(())
}

/// Watches the manifest path (its parent when it is a file, since editors replace files by
/// renaming) and nudges `tx` on any change.
fn watch_files(path: &Path, tx: mpsc::Sender<()>) -> Result<notify::RecommendedWatcher, AgentError> {
    let err = |source| AgentError::Watch {
        path: path.to_path_buf(),
        source,
    };
    let mut watcher = notify::recommended_watcher(move |_event| {
        // A full channel means a reload is already pending.
        let _ = tx.try_send(());
    })
    .map_err(err)?;
    let (target, mode) = if path.is_dir() {
        (path, RecursiveMode::Recursive)
    } else {
        (
            path.parent().unwrap_or(Path::new(".")),
            RecursiveMode::NonRecursive,
        )
    };
    watcher.watch(target, mode).map_err(err)?;
    Ok(watcher)
}

fn reload(manifests: &mut ManifestSet, proxier: &mut Proxier<DatapathSink>) {
    for e in manifests.reload(proxier) {
        tracing::error!("{e}");
    }
}

async fn run_manifests(
    path: &Path,
    opts: &AgentOptions,
    mut prepared: Prepared,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let (tx, mut rx) = mpsc::channel(1);
    let _watcher = watch_files(path, tx)?;
    let mut manifests = ManifestSet::new(path);
    reload(&mut manifests, &mut prepared.proxier);
    prepared.sync(&opts.cgroup, false)?;

    let mut resync = tokio::time::interval(opts.resync_period);
    resync.tick().await;
    let mut periodic = periodic_sync(opts.sync_period).await;
    tokio::pin!(stop);
    loop {
        let mut full = false;
        tokio::select! {
            Some(()) = rx.recv() => {
                // Let a burst of writes (an editor's save, a `cp -r`) settle into one reload.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while rx.try_recv().is_ok() {}
                reload(&mut manifests, &mut prepared.proxier);
            }
            _ = resync.tick() => reload(&mut manifests, &mut prepared.proxier),
            _ = periodic.tick() => full = true,
            _ = &mut stop => return Ok(()),
        }
        prepared.sync(&opts.cgroup, full)?;
    }
}

/// What one watch delivered, once its relist buffering is resolved.
enum Change<K> {
    /// A complete list (the watch's initial list or a relist).
    Replace(Vec<K>),
    Apply(K),
    Delete(K),
}

/// Buffers one watch's relist so that it lands as a single replacement.
struct Relist<K> {
    buffer: Option<Vec<K>>,
    listed: bool,
}

impl<K> Relist<K> {
    fn new() -> Self {
        Self {
            buffer: None,
            listed: false,
        }
    }

    fn feed(&mut self, event: watcher::Event<K>) -> Option<Change<K>> {
        match event {
            watcher::Event::Init => {
                self.buffer = Some(Vec::new());
                None
            }
            watcher::Event::InitApply(obj) => {
                self.buffer.get_or_insert_with(Vec::new).push(obj);
                None
            }
            watcher::Event::InitDone => {
                self.listed = true;
                Some(Change::Replace(self.buffer.take().unwrap_or_default()))
            }
            watcher::Event::Apply(obj) => Some(Change::Apply(obj)),
            watcher::Event::Delete(obj) => Some(Change::Delete(obj)),
        }
    }
}

fn namespaced(meta: &ObjectMeta) -> Option<(String, String)> {
    Some((
        namespace_or_default(meta.namespace.as_deref()),
        meta.name.clone()?,
    ))
}

struct Watches {
    services: Relist<Service>,
    slices: Relist<EndpointSlice>,
    nodes: Relist<Node>,
    failing: BTreeSet<ObjectKind>,
}

impl Watches {
    fn listed(&self) -> bool {
        self.services.listed && self.slices.listed && self.nodes.listed
    }

    fn apply(&mut self, event: KubeEvent, proxier: &mut Proxier<DatapathSink>, metrics: &Metrics) {
        let kind = match &event {
            KubeEvent::Service(_) => ObjectKind::Service,
            KubeEvent::Slice(_) => ObjectKind::EndpointSlice,
            KubeEvent::Node(_) => ObjectKind::Node,
            KubeEvent::Error { kind, .. } => *kind,
        };
        match event {
            KubeEvent::Service(e) => match self.services.feed(*e) {
                Some(Change::Replace(all)) => proxier.replace_services(&all),
                Some(Change::Apply(svc)) => proxier.upsert_service(&svc),
                Some(Change::Delete(svc)) => {
                    if let Some((ns, name)) = namespaced(&svc.metadata) {
                        proxier.remove_service(&ServiceName::new(ns, name));
                    }
                }
                None => {}
            },
            KubeEvent::Slice(e) => match self.slices.feed(*e) {
                Some(Change::Replace(all)) => proxier.replace_slices(&all),
                Some(Change::Apply(slice)) => proxier.upsert_slice(&slice),
                Some(Change::Delete(slice)) => {
                    if let Some((ns, name)) = namespaced(&slice.metadata) {
                        proxier.remove_slice(&ns, &name);
                    }
                }
                None => {}
            },
            KubeEvent::Node(e) => match self.nodes.feed(*e) {
                Some(Change::Replace(all)) => proxier.set_node(all.first()),
                Some(Change::Apply(node)) => proxier.set_node(Some(&node)),
                Some(Change::Delete(_)) => proxier.set_node(None),
                None => {}
            },
            KubeEvent::Error { kind, error } => {
                // The watcher backs off and retries; the datapath keeps its last state.
                if self.failing.insert(kind) {
                    tracing::warn!(%kind, "watch failed, retrying with backoff: {error}");
                } else {
                    tracing::debug!(%kind, "watch still failing: {error}");
                }
                metrics
                    .source_errors
                    .get_or_create(&KindLabel::new(kind.as_str()))
                    .inc();
                return;
            }
        }
        if self.failing.remove(&kind) {
            tracing::info!(%kind, "watch recovered");
        }
    }
}

async fn run_kube(
    client: kube::Client,
    opts: &AgentOptions,
    mut prepared: Prepared,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let mut events = kube_source::events(
        client,
        &opts.node_name,
        opts.translate.service_proxy_name.as_deref(),
    );
    let mut watches = Watches {
        services: Relist::new(),
        slices: Relist::new(),
        nodes: Relist::new(),
        failing: BTreeSet::new(),
    };
    tracing::info!(node = %opts.node_name, "watching the API server");
    let mut periodic = periodic_sync(opts.sync_period).await;
    tokio::pin!(stop);
    loop {
        let mut full = false;
        tokio::select! {
            _ = periodic.tick() => full = true,
            event = events.next() => {
                let Some(event) = event else { return Ok(()) };
                watches.apply(event, &mut prepared.proxier, &metrics);
                // Take everything already queued before syncing: one sync per burst.
                while let Some(Some(event)) = events.next().now_or_never() {
                    watches.apply(event, &mut prepared.proxier, &metrics);
                }
            }
            _ = &mut stop => return Ok(()),
        }
        if watches.listed() {
            prepared.sync(&opts.cgroup, full)?;
        }
    }
}
