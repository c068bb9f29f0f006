//! The long-running agent: loads the datapath, adopts what pinned maps already hold, keeps the
//! maps in sync with the source, and leaves everything in place when it stops.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt as _;
use proxy_common::maps as names;
use tokio::signal::unix::SignalKind;

use crate::{
    config::{AgentOptions, SourceConfig},
    datapath::{
        conntrack::Conntrack,
        external::{self, Attached, Attachment},
        features::{TcMode, XdpAttach},
        loader::{Datapath, LoadError, MapSizes},
        maps::{OpenError, PinnedMaps},
        reader::{ReadError, Snapshot},
        readings::PinnedReadings,
        report::{probe_kernel, report_attachments, report_programs, report_recreated, report_replies},
        sink::DatapathSink,
        sizing::{self, Growable},
        sockets::StaleSockets,
        sys, walker,
        writer::Writer,
    },
    health::{self, proxy::Health, services::HealthCheckServers},
    node::{
        devices::Devices,
        external::{ExternalError, ExternalSide},
        link_events::LinkEvents,
        reply_routes::ReplyCheck,
    },
    pipeline::{
        model::ServiceName,
        plan::{Planner, Usage},
    },
    source::{
        files::{FileWatch, WatchError},
        kube::{self as kube_source, KubeEvent, KubeSourceError, WatchHealth, Watches},
        manifests::ManifestSet,
    },
    sync::{
        proxier::{Proxier, SyncReport},
        report::{finish_sync, release_free_memory},
    },
    telemetry::metrics::{KindLabel, Metrics},
    telemetry::serve,
};

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
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error(transparent)]
    External(#[from] ExternalError),
    #[error("starting the map walker thread: {0}")]
    Walker(std::io::Error),
    #[error("subscribing to the node's link notifications: {0}")]
    LinkEvents(std::io::Error),
    #[error("growing map {map}: {source}")]
    Grow {
        map: &'static str,
        source: std::io::Error,
    },
}

/// The datapath, loaded and with its pinned state adopted, but not attached yet.
struct Prepared {
    datapath: Datapath,
    proxier: Proxier<DatapathSink>,
    external: ExternalSide,
    tc_mode: TcMode,
    xdp: XdpAttach,
    health_checks: HealthCheckServers,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// tc programs that did not load (for `/healthz`).
    degraded: Vec<String>,
    /// `--devices`, selected again whenever the node's links or addresses change.
    devices: Devices,
    /// The devices the tc programs were last attached to, with their ifindexes.
    present: BTreeMap<String, u32>,
    attachments: Vec<Attachment>,
    /// Where the replies of the backends the tc path SNATs to arrive, per Service (`None`
    /// without tc devices).
    reply_check: Option<ReplyCheck<ServiceName>>,
    /// Under `auto`: the devices those replies arrive on, selected too.
    reply_devices: BTreeSet<String>,
    live: bool,
    pin_dir: PathBuf,
    /// The capacities the datapath is loaded with.
    sizes: MapSizes,
    /// Which of the maps the agent writes may grow.
    growable: Growable,
}

impl Prepared {
    fn load(opts: &AgentOptions, metrics: Arc<Metrics>, health: Arc<Health>) -> Result<Self, AgentError> {
        let external = ExternalSide::resolve(&opts.external)?;
        let tc_mode = probe_kernel(opts.tc_attach, &metrics);
        let (sizes, growable) = choose_sizes(opts);
        let datapath = Datapath::load(&opts.pin_dir, sizes)?;
        report_recreated(datapath.recreated(), &metrics);
        let degraded = report_programs(datapath.tc_programs(), opts.xdp, &metrics);
        health.set_degraded(degraded.clone(), false);
        external::write_node_config(&opts.pin_dir, &external.config)?;
        let conntrack = Conntrack::open(&opts.pin_dir, external.config)?;
        let readings = PinnedReadings::open(&opts.pin_dir)?;
        let walker = walker::spawn(
            conntrack,
            readings.fill_cache(),
            opts.pin_dir.clone(),
            metrics.clone(),
        )
        .map_err(AgentError::Walker)?;
        metrics.attach_datapath(Box::new(readings));
        let maps = PinnedMaps::open(&opts.pin_dir)?;
        let existing = Snapshot::read(&maps)?;
        if !existing.frontends.is_empty() {
            tracing::info!(
                frontends = existing.frontends.len(),
                "adopting datapath state from pinned maps"
            );
        }
        let planner = Planner::adopt(existing.programmed()).with_capacity(sizing::capacity(sizes));
        let metrics_for_checks = metrics.clone();
        let metrics_for_prepared = metrics.clone();
        let proxier = Proxier::new(
            &opts.node_name,
            external.node_port_addresses.clone(),
            opts.translate.clone(),
            planner,
            DatapathSink::new(
                Writer::new(maps),
                StaleSockets::open(&opts.pin_dir, &opts.cgroup)?,
                metrics.clone(),
                walker,
            ),
            metrics,
            health.clone(),
        )
        .with_sync_period(opts.sync_period);
        let reply_check = open_reply_check(&opts.external.devices);
        let proxier = if reply_check.is_some() {
            proxier.with_reply_targets()
        } else {
            proxier
        };
        Ok(Self {
            datapath,
            proxier,
            external,
            tc_mode,
            xdp: opts.xdp,
            health_checks: HealthCheckServers::new(metrics_for_checks, health.clone()),
            metrics: metrics_for_prepared,
            health,
            degraded,
            devices: opts.external.devices.clone(),
            present: BTreeMap::new(),
            attachments: Vec::new(),
            reply_check,
            reply_devices: BTreeSet::new(),
            live: false,
            pin_dir: opts.pin_dir.clone(),
            sizes,
            growable,
        })
    }

    /// Logs a sync; when it refused Services for want of room in maps that may grow, grows
    /// them and syncs again.
    fn synced(&mut self, what: &str, mut report: SyncReport, cgroup: &Path) -> Result<(), AgentError> {
        finish_sync(what, &report);
        // Each growth at least doubles a map that was short: a few rounds at most.
        for _ in 0..4 {
            if report.refused == 0
                || !self.grow(
                    self.proxier.planner().needed(),
                    "Services refused for room",
                    cgroup,
                )?
            {
                break;
            }
            report = self.proxier.sync();
            finish_sync(what, &report);
        }
        Ok(())
    }

    /// Replaces the maps the agent writes that are smaller than `needed` with bigger ones:
    /// a new datapath is loaded against new maps, the entries are copied over, the writer
    /// turns to the new maps, and (once live) the pinned links switch to the new programs, as
    /// on every agent restart. Until the switch the old programs serve from the old maps,
    /// which nothing writes meanwhile; the LRU maps are the same before and after. `false`
    /// when no map may or needs to grow.
    fn grow(&mut self, needed: Usage, why: &str, cgroup: &Path) -> Result<bool, AgentError> {
        let Some(next) = sizing::grown(self.sizes, self.growable, needed) else {
            return Ok(false);
        };
        let mut maps = Vec::new();
        if next.services != self.sizes.services {
            maps.extend([names::SERVICES_V4, names::SERVICES_V6]);
        }
        if next.backends != self.sizes.backends {
            maps.extend([names::BACKENDS_V4, names::BACKENDS_V6]);
        }
        if next.rev_nat != self.sizes.rev_nat {
            maps.extend([names::REV_NAT_V4, names::REV_NAT_V6, names::SERVICE_LABELS]);
        }
        // Hold the maps being replaced: the loader unpins them to make the bigger ones.
        let grow_err = |map| move |source| AgentError::Grow { map, source };
        let mut old = Vec::new();
        for map in &maps {
            let path = self.pin_dir.join(map);
            let info = sys::pinned_map_info(&path).map_err(grow_err(map))?;
            let fd = sys::obj_get(&path).map_err(grow_err(map))?;
            old.push((*map, fd, info.key_size as usize, info.value_size as usize));
        }
        let mut datapath = Datapath::load(&self.pin_dir, next)?;
        let mut copied = 0;
        for (map, fd, key_size, value_size) in &old {
            let new = sys::obj_get(&self.pin_dir.join(map)).map_err(grow_err(map))?;
            copied +=
                sys::copy_entries(fd.as_fd(), new.as_fd(), *key_size, *value_size).map_err(grow_err(map))?;
        }
        self.proxier.sink_mut().reopen(PinnedMaps::open(&self.pin_dir)?);
        self.proxier.set_capacity(sizing::capacity(next));
        if self.live {
            datapath.attach(cgroup)?;
        }
        self.datapath = datapath;
        if self.live {
            // The tc programs too: they read the same maps.
            self.attach_devices(Ok(self.present.clone()));
        }
        tracing::info!(
            services = %format!("{} -> {}", self.sizes.services, next.services),
            backends = %format!("{} -> {}", self.sizes.backends, next.backends),
            rev_nat = %format!("{} -> {}", self.sizes.rev_nat, next.rev_nat),
            needed_services = needed.services,
            needed_backends = needed.backends,
            needed_rev_nat = needed.rev_nat,
            copied,
            why,
            "maps grew"
        );
        self.metrics.maps_grown.inc();
        self.sizes = next;
        Ok(true)
    }

    /// Attaches the tc programs to `present` (the devices `--devices` selects now), reports
    /// the attachments and updates `/healthz`.
    fn attach_devices(&mut self, present: std::io::Result<BTreeMap<String, u32>>) {
        let attached = present
            .map_err(|e| format!("listing the node's devices: {e}"))
            .and_then(|present| {
                let names: Vec<String> = present.keys().cloned().collect();
                let attachments = self
                    .datapath
                    .attach_devices(&names, self.tc_mode, self.xdp)
                    .map_err(|e| e.to_string())?;
                Ok((present, attachments))
            });
        let tc_problems = match attached {
            Ok((present, attachments)) => {
                let problems = report_attachments(&self.attachments, &attachments, &self.metrics);
                self.present = present;
                self.attachments = attachments;
                problems
            }
            Err(e) => {
                // The socket programs are attached: they serve whatever happens to tc.
                tracing::error!("tc programs not attached: {e}");
                // The next link notification tries again.
                self.present.clear();
                vec![format!("tc: {e}")]
            }
        };
        let external_down = !self.external.devices.is_empty() && !tc_problems.is_empty();
        let mut problems = self.degraded.clone();
        problems.extend(tc_problems);
        self.health.set_degraded(problems, external_down);
    }

    /// After link or address notifications: attaches again when a device was deleted,
    /// recreated (a new ifindex under its name), or is now selected or no longer.
    fn follow_devices(&mut self) {
        if !self.live {
            // The first attach, still to come, selects the devices then.
            return;
        }
        let now = match self.devices.present(&self.reply_devices) {
            Ok(now) if now == self.present => return,
            Ok(now) => now,
            Err(e) => {
                tracing::warn!("listing the node's devices after a link notification: {e}");
                return;
            }
        };
        tracing::info!(was = ?self.present, now = ?now, "devices changed (name: ifindex), attaching the tc programs again");
        self.attach_devices(Ok(now));
    }

    /// Syncs; the first time, once the source has listed everything, also drops state no
    /// Service claims and only then attaches (or switches over) the programs.
    /// `periodic`: kube-proxy's sync-period tick, which syncs (and so reports health) even
    /// when nothing changed, and compares every map with the desired state.
    fn sync(&mut self, cgroup: &Path, periodic: bool) -> Result<(), AgentError> {
        if self.live {
            if periodic {
                self.proxier.note_periodic_sync();
            }
            if periodic || self.proxier.has_pending() {
                let report = self.proxier.sync();
                self.synced("sync", report, cgroup)?;
                self.health_checks
                    .update(self.proxier.inventory().health_checks());
            }
            let repair_due = self
                .proxier
                .repair_due()
                .is_some_and(|at| at <= std::time::Instant::now());
            if periodic || repair_due {
                self.proxier.repair();
            }
            self.check_replies(false);
            return Ok(());
        }
        // Sized before anything is written: on a cold start the maps are at their minimum,
        // and a large cluster would otherwise be mostly refused (a warning per Service), then
        // copied into bigger maps and synced a second time.
        self.grow(self.proxier.census(), "sized for the listed Services", cgroup)?;
        let report = self.proxier.sync();
        self.synced("initial sync", report, cgroup)?;
        self.health_checks
            .update(self.proxier.inventory().health_checks());
        finish_sync(
            "removed state no Service claims",
            &self.proxier.release_unclaimed(),
        );
        // A restart's first sync writes next to nothing, but reading back the pinned maps and
        // the first lists went through as much memory as a first sync: an agent that adopted
        // 10 000 Services kept 146 MiB resident instead of 60 MiB.
        release_free_memory();
        let attached = self.datapath.attach(cgroup)?;
        self.attach_devices(self.devices.present(&self.reply_devices));
        let tc_count = |how| self.attachments.iter().filter(|a| a.outcome == Ok(how)).count();
        let planner = self.proxier.planner();
        tracing::info!(
            cgroup = %cgroup.display(),
            pin_dir = %self.datapath.pin_dir().display(),
            links_updated = attached.updated,
            links_created = attached.created,
            tc_mode = self.tc_mode.as_str(),
            xdp = self.xdp.as_str(),
            xdp_devices = ?self.attachments.iter().filter(|a| a.program == external::XDP_PROGRAM && a.outcome.is_ok()).map(|a| a.device.as_str()).collect::<Vec<_>>(),
            tc_links_updated = tc_count(Attached::Updated),
            tc_links_created = tc_count(Attached::Created),
            tc_links_reattached = tc_count(Attached::Reattached),
            services = planner.service_count(),
            frontends = planner.frontend_count(),
            backends = planner.backend_count(),
            "datapath ready"
        );
        self.live = true;
        self.check_replies(false);
        Ok(())
    }

    /// After link, address or route notifications: attaches again where devices changed, then
    /// looks up again where remote backends' replies arrive.
    fn follow_node(&mut self) {
        self.follow_devices();
        self.check_replies(true);
    }

    /// Checks that the replies of every backend the tc path SNATs to arrive on a device with
    /// the tc programs: under `auto` such devices are selected too; otherwise each Service
    /// that has its replies arrive elsewhere is logged once (per change) and counted by
    /// device. Looks up only the Services changed since the last check, or every one when
    /// `routes_changed` (the node's routes, links or addresses may have moved).
    fn check_replies(&mut self, routes_changed: bool) {
        if !self.live {
            return;
        }
        let (Some(targets), Some(check)) = (self.proxier.reply_targets(), self.reply_check.as_mut()) else {
            return;
        };
        let changed = targets.take_changed();
        check.update(changed.iter().map(|(service, addrs)| (service, addrs.as_slice())));
        if routes_changed {
            check.look_up_again(targets.iter());
        }
        if self.devices == Devices::Auto {
            let needed = check.paths().devices();
            if needed != self.reply_devices {
                tracing::info!(devices = ?needed, "remote backends' replies arrive on these devices: selecting them for the tc programs");
                self.reply_devices = needed;
                self.follow_devices();
            }
        }
        let served = self
            .attachments
            .iter()
            .filter(|a| a.outcome.is_ok())
            .map(|a| a.device.clone())
            .collect();
        if let Some(check) = self.reply_check.as_mut() {
            report_replies(check.paths(), served, &self.metrics);
        }
    }
}

/// The capacities to load the datapath with (logged): the LRU maps' from the node's memory,
/// the written maps' from what they are pinned with; `--map-size-*` wins.
fn choose_sizes(opts: &AgentOptions) -> (MapSizes, Growable) {
    let sizing = opts.map_sizing;
    let memory = sizing.node_memory.unwrap_or_else(|| {
        sizing::node_memory().unwrap_or_else(|e| {
            tracing::warn!("reading the node's memory: {e}; the LRU maps get their minimum sizes");
            0
        })
    });
    let (mut sizes, growable) = sizing.choose(memory, |map| sizing::pinned_capacity(&opts.pin_dir, map));
    sizes.maglev_table_size = opts.external.maglev_table_size;
    tracing::info!(
        node_memory_mib = memory >> 20,
        ratio = sizing.ratio,
        conntrack = sizes.conntrack,
        sock_rev = sizes.sock_rev,
        affinity = sizes.affinity,
        services = sizes.services,
        backends = sizes.backends,
        rev_nat = sizes.rev_nat,
        services_grow = growable.services,
        backends_grow = growable.backends,
        rev_nat_grow = growable.rev_nat,
        "map sizes (entries per family)"
    );
    (sizes, growable)
}

/// The reply-device check; none without tc devices (nothing is SNATed then). The check is
/// advice: a socket that cannot be opened is logged, and the agent serves on.
fn open_reply_check(devices: &Devices) -> Option<ReplyCheck<ServiceName>> {
    if *devices == Devices::None {
        return None;
    }
    ReplyCheck::open()
        .inspect_err(|e| tracing::warn!("route lookups for the reply-device check: {e}; it is off"))
        .ok()
}

/// kube-proxy's sync-period timer; its first tick is one period from now.
async fn periodic_sync(period: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    interval
}

/// Resolves when a repair pass is due after a failure; never while nothing is known wrong.
async fn repair_due(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Resolves on SIGTERM or SIGINT.
fn shutdown() -> Result<impl std::future::Future<Output = ()>, AgentError> {
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
    // The API server's first lists take about as long as loading the datapath (and, after a
    // restart, reading back what the pinned maps hold): they run side by side.
    let events = match &opts.source {
        SourceConfig::Manifests(_) => None,
        SourceConfig::Kubernetes {
            kubeconfig,
            watch_liveness,
        } => {
            let client = kube_source::client(kubeconfig.as_deref(), Some(*watch_liveness)).await?;
            Some(listen(client, &opts))
        }
    };
    let prepared = Prepared::load(&opts, metrics.clone(), health.clone())?;
    // Before the first attach, so that no change after it goes unseen.
    let links = match opts.external.devices {
        Devices::None => LinkEvents::none(),
        _ => LinkEvents::subscribe().map_err(AgentError::LinkEvents)?,
    };
    if let Some(addr) = opts.healthz_addr {
        health::server::start(health, metrics.clone(), addr).await?;
    }
    if let Some(addr) = opts.metrics_addr {
        serve::start(metrics.clone(), addr).await?;
    }
    let stop = shutdown()?;
    match (&opts.source, events) {
        (SourceConfig::Kubernetes { .. }, Some(events)) => {
            run_kube(events, &opts, prepared, links, metrics, stop).await?;
        }
        (SourceConfig::Manifests(path), _) => run_manifests(path, &opts, prepared, links, stop).await?,
        (SourceConfig::Kubernetes { .. }, None) => {
            unreachable!("a Kubernetes source starts its watches above")
        }
    }
    tracing::info!("stopping; the datapath stays in place (run `bpf-kube-proxy cleanup` to remove it)");
    Ok(())
}

/// Starts the watches on a task of their own, which queues their events for the agent.
fn listen(client: kube::Client, opts: &AgentOptions) -> tokio::sync::mpsc::UnboundedReceiver<KubeEvent> {
    let mut events = Box::pin(kube_source::events(
        client,
        &opts.node_name,
        opts.translate.service_proxy_name.as_deref(),
    ));
    tracing::info!(node = %opts.node_name, "watching the API server");
    let (queue, queued) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if queue.send(event).is_err() {
                // The agent has stopped.
                return;
            }
        }
    });
    queued
}

fn reload(manifests: &mut ManifestSet, prepared: &mut Prepared) {
    for e in manifests.reload(|change| prepared.proxier.apply(change)) {
        tracing::error!("{e}");
        if let Some(kind) = e.invalid_kind() {
            prepared
                .metrics
                .invalid_objects
                .get_or_create(&KindLabel::new(kind))
                .inc();
        }
    }
}

async fn run_manifests(
    path: &Path,
    opts: &AgentOptions,
    mut prepared: Prepared,
    mut links: LinkEvents,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let mut files = FileWatch::new(path)?;
    let mut manifests = ManifestSet::new(path);
    reload(&mut manifests, &mut prepared);
    prepared.sync(&opts.cgroup, false)?;

    let mut resync = tokio::time::interval(opts.resync_period);
    resync.tick().await;
    let mut periodic = periodic_sync(opts.sync_period).await;
    tokio::pin!(stop);
    loop {
        let mut full = false;
        tokio::select! {
            () = files.changed() => reload(&mut manifests, &mut prepared),
            _ = resync.tick() => reload(&mut manifests, &mut prepared),
            _ = periodic.tick() => full = true,
            () = repair_due(prepared.proxier.repair_due()) => {}
            () = links.changed() => prepared.follow_node(),
            () = &mut stop => return Ok(()),
        }
        prepared.sync(&opts.cgroup, full)?;
    }
}

/// Hands one watch event's change to the proxier; logs and counts the watch's failures.
fn apply_watch(
    watches: &mut Watches,
    event: KubeEvent,
    proxier: &mut Proxier<DatapathSink>,
    metrics: &Metrics,
) {
    let step = watches.feed(event);
    if let Some(change) = step.change {
        proxier.apply(change);
    }
    match step.health {
        Some(WatchHealth::Failed { kind, error, first }) => {
            if first {
                tracing::warn!(%kind, "watch failed, retrying with backoff: {error}");
            } else {
                tracing::debug!(%kind, "watch still failing: {error}");
            }
            metrics
                .source_errors
                .get_or_create(&KindLabel::new(kind.as_str()))
                .inc();
        }
        Some(WatchHealth::Recovered(kind)) => tracing::info!(%kind, "watch recovered"),
        Some(WatchHealth::Silent { kind, after }) => {
            tracing::warn!(%kind, "watch silent for {}s, restarting", after.as_secs());
            metrics
                .watch_silent_restarts
                .get_or_create(&KindLabel::new(kind.as_str()))
                .inc();
        }
        None => {}
    }
}

async fn run_kube(
    mut events: tokio::sync::mpsc::UnboundedReceiver<KubeEvent>,
    opts: &AgentOptions,
    mut prepared: Prepared,
    mut links: LinkEvents,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let mut watches = Watches::default();
    let mut periodic = periodic_sync(opts.sync_period).await;
    tokio::pin!(stop);
    loop {
        let mut full = false;
        tokio::select! {
            _ = periodic.tick() => full = true,
            event = events.recv() => {
                let Some(event) = event else { return Ok(()) };
                apply_watch(&mut watches, event, &mut prepared.proxier, &metrics);
                // Take everything already queued before syncing: one sync per burst.
                while let Ok(event) = events.try_recv() {
                    apply_watch(&mut watches, event, &mut prepared.proxier, &metrics);
                }
            }
            () = repair_due(prepared.proxier.repair_due()) => {}
            () = links.changed() => prepared.follow_node(),
            () = &mut stop => return Ok(()),
        }
        if watches.listed() {
            prepared.sync(&opts.cgroup, full)?;
        }
    }
}
