//! The sync core: Kubernetes objects in, plans out. It owns the inventory and the planner and
//! hands plans to a [`PlanSink`] (the BPF map writer in production, a recorder in tests), so
//! every rule here is unit-tested without root. It is also the reconciler: a repair pass
//! reads the maps back and rewrites whatever differs from the planner's state, after a failed
//! write (with backoff) and on every periodic sync.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use foldhash::{HashMap, HashMapExt as _, HashSet};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use crate::{
    health::proxy::Health,
    pipeline::inventory::Inventory,
    pipeline::model::{
        FrontendKey, FrontendKind, Protocol, ServiceEntry, ServiceInfo, ServiceName, SliceInfo, TrafficPolicy,
    },
    pipeline::plan::{Capacity, Op, Outcome, Plan, PlanIssue, PlanSink, Planner, Usage, WriteFailure},
    pipeline::reply_targets::ReplyTargets,
    pipeline::translate::{self, ItemIssue, ServiceOutcome, TranslateError, TranslateOptions},
    source::{
        Change, Listed, Object, ObjectKind,
        meta::{ANNOTATION_TRIGGER_TIME, TAINT_TO_BE_DELETED, namespace_or_default},
    },
    sync::repair::{RepairReport, Schedule},
    telemetry::metrics::{KindLabel, Metrics, PolicyLabel},
};

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub services: usize,
    pub ops: usize,
    pub failed: Vec<WriteFailure>,
    /// The writer thread panicked: which of its writes landed is unknown.
    pub writer_lost: bool,
    pub issues: Vec<PlanIssue>,
    /// Services not programmed because a map would overflow (kept pending).
    pub refused: usize,
}

pub struct Proxier<S> {
    inventory: Inventory,
    planner: Planner,
    sink: S,
    opts: TranslateOptions,
    dirty: BTreeSet<ServiceName>,
    /// EndpointSlice change times (`endpoints.kubernetes.io/last-change-trigger-time`) not yet
    /// programmed, for kube-proxy's network programming latency.
    triggers: BTreeMap<ServiceName, Vec<SystemTime>>,
    /// The last trigger time seen per slice (namespace, name), so a relist or reload does not
    /// count an old change again.
    seen_triggers: HashMap<(String, String), SystemTime>,
    started: SystemTime,
    /// Service ports per Service with internalTrafficPolicy Local and no local endpoint.
    no_local: BTreeMap<ServiceName, usize>,
    /// The backends the tc path SNATs to, per Service, for the agent's reply-device check;
    /// kept only when asked for ([`Proxier::with_reply_targets`]), since without tc devices
    /// nothing reads them.
    reply_targets: Option<ReplyTargets>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    repair: Schedule,
}

/// kube-proxy's default sync period, the longest a failed write waits for its next retry
/// unless [`Proxier::with_sync_period`] says otherwise.
const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);

fn trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let value = slice
        .metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_TRIGGER_TIME)?;
    humantime::parse_rfc3339_weak(value).ok()
}

/// kube-proxy stops reporting a node healthy once it is being removed, so that load balancers
/// drain it first.
fn node_eligible(node: &Node) -> bool {
    let deleting = node.metadata.deletion_timestamp.is_some();
    let autoscaler = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TAINT_TO_BE_DELETED));
    !deleting && !autoscaler
}

impl<S: PlanSink> Proxier<S> {
    /// `node_port_addresses`: the node's addresses that serve NodePorts.
    pub fn new(
        node_name: &str,
        node_port_addresses: Vec<IpAddr>,
        opts: TranslateOptions,
        planner: Planner,
        sink: S,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Self {
        Self {
            inventory: Inventory::new(translate::translate_node(node_name, None, node_port_addresses)),
            planner,
            sink,
            opts,
            dirty: BTreeSet::new(),
            triggers: BTreeMap::new(),
            seen_triggers: HashMap::new(),
            started: SystemTime::now(),
            no_local: BTreeMap::new(),
            reply_targets: None,
            metrics,
            health,
            repair: Schedule::new(DEFAULT_SYNC_PERIOD),
        }
    }

    /// Failed writes are retried with a backoff capped at `period`, where the periodic repair
    /// pass comes anyway.
    #[must_use]
    pub fn with_sync_period(mut self, period: Duration) -> Self {
        self.repair = Schedule::new(period);
        self
    }

    /// Keeps the backends the tc path SNATs to, per Service, as syncs go (for the agent's
    /// reply-device check).
    #[must_use]
    pub(crate) fn with_reply_targets(mut self) -> Self {
        self.reply_targets = Some(ReplyTargets::default());
        self
    }

    /// When the next repair pass is due after a failure (`None`: nothing known to be wrong).
    pub(crate) fn repair_due(&self) -> Option<Instant> {
        self.repair.due()
    }

    /// The sink, for the fuzz targets' checks between syncs and for the agent to hand it the
    /// maps that replace those that grew.
    pub(crate) fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    /// The maps grew: Services are weighed against the new capacity from the next sync on,
    /// and those refused for room are planned again then.
    pub(crate) fn set_capacity(&mut self, capacity: Capacity) {
        self.planner.set_capacity(capacity);
    }

    /// The map capacity the Services waiting for a sync would need ([`Planner::census`]).
    pub(crate) fn census(&self) -> Usage {
        self.planner.census(
            self.dirty
                .iter()
                .filter_map(|name| Some((name, self.inventory.desired(name)?))),
        )
    }

    pub(crate) fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    pub(crate) fn planner(&self) -> &Planner {
        &self.planner
    }

    /// The backends the tc path SNATs to, per Service; `take_changed` on it drains what
    /// changed since the agent's last reply-device check.
    pub(crate) fn reply_targets(&mut self) -> Option<&mut ReplyTargets> {
        self.reply_targets.as_mut()
    }

    /// kube-proxy's periodic sync counts as a queued change for health: if it cannot
    /// complete, `/healthz` fails after the health timeout.
    pub(crate) fn note_periodic_sync(&self) {
        self.health.queued(SystemTime::now());
    }

    pub(crate) fn has_pending(&self) -> bool {
        !self.dirty.is_empty()
    }

    fn report_issues(&self, kind: &str, issues: Vec<ItemIssue>) {
        for issue in issues {
            tracing::warn!("{issue}");
            self.metrics
                .skipped_items
                .get_or_create(&KindLabel::new(kind))
                .inc();
        }
    }

    fn report_invalid(&self, kind: &str, error: &TranslateError, kept: bool) {
        if kept {
            tracing::error!("{error}; keeping its last good version");
        } else {
            tracing::error!("{error}; ignored");
        }
        self.metrics
            .invalid_objects
            .get_or_create(&KindLabel::new(kind))
            .inc();
    }

    /// `Ok(Some)`: proxy it; `Ok(None)`: not ours; `Err`: invalid (already reported).
    fn translate_service(&self, svc: &Service) -> Result<Option<ServiceInfo>, ()> {
        let mut issues = Vec::new();
        let outcome = translate::translate_service(svc, &self.opts, &mut issues);
        self.report_issues("Service", issues);
        match outcome {
            Ok(ServiceOutcome::Proxied(info)) => Ok(Some(info)),
            Ok(ServiceOutcome::Skipped(name, reason)) => {
                if self.inventory.service(&name).is_some() {
                    tracing::info!(service = %name, "no longer proxied: {reason}");
                } else {
                    tracing::debug!(service = %name, "not proxied: {reason}");
                }
                Ok(None)
            }
            Err(e) => {
                let kept = service_name(svc).is_some_and(|n| self.inventory.service(&n).is_some());
                self.report_invalid("Service", &e, kept);
                Err(())
            }
        }
    }

    fn translate_slice(&self, slice: &EndpointSlice) -> Result<SliceInfo, ()> {
        let mut issues = Vec::new();
        let outcome = translate::translate_slice(slice, &mut issues);
        self.report_issues("EndpointSlice", issues);
        outcome.map_err(|e| {
            if e.is_foreign() {
                tracing::debug!("{e}");
            } else {
                self.report_invalid("EndpointSlice", &e, false);
            }
        })
    }

    fn record_service_changes(&mut self, touched: impl IntoIterator<Item = ServiceName>) {
        for name in touched {
            self.metrics.service_changes.inc();
            self.metrics.service_changes_pending.inc();
            self.health.queued(SystemTime::now());
            self.dirty.insert(name);
        }
    }

    fn record_endpoint_changes(&mut self, touched: impl IntoIterator<Item = ServiceName>) {
        for name in touched {
            self.metrics.endpoint_changes.inc();
            self.metrics.endpoint_changes_pending.inc();
            self.health.queued(SystemTime::now());
            self.dirty.insert(name);
        }
    }

    /// Remembers a slice's change trigger time the first time it is seen, for the network
    /// programming latency of the sync that programs it.
    fn note_trigger(&mut self, slice: &SliceInfo, trigger: Option<SystemTime>) {
        let Some(trigger) = trigger else {
            return;
        };
        let key = (slice.namespace.clone(), slice.name.clone());
        // Changes from before this agent started were programmed by someone else (or by the
        // pinned state); counting them would report the downtime as programming latency.
        if self.seen_triggers.insert(key, trigger) != Some(trigger) && trigger >= self.started {
            self.triggers
                .entry(slice.service.clone())
                .or_default()
                .push(trigger);
        }
    }

    pub(crate) fn upsert_service(&mut self, svc: &Service) {
        let changed = match self.translate_service(svc) {
            Ok(Some(info)) => self.inventory.upsert_service(info),
            Ok(None) => service_name(svc).and_then(|n| self.inventory.remove_service(&n)),
            Err(()) => None,
        };
        self.record_service_changes(changed);
    }

    pub(crate) fn remove_service(&mut self, name: &ServiceName) {
        let changed = self.inventory.remove_service(name);
        self.record_service_changes(changed);
    }

    pub fn upsert_slice(&mut self, slice: &EndpointSlice) {
        if let Ok(info) = self.translate_slice(slice) {
            self.note_trigger(&info, trigger_time(slice));
            let touched = self.inventory.upsert_slice(info);
            self.record_endpoint_changes(touched);
        }
    }

    pub(crate) fn remove_slice(&mut self, namespace: &str, name: &str) {
        let owner = self.inventory.remove_slice(namespace, name);
        self.seen_triggers
            .remove(&(namespace.to_string(), name.to_string()));
        self.record_endpoint_changes(owner);
    }

    pub(crate) fn set_node(&mut self, node: Option<&Node>) {
        let current = self.inventory.node();
        let info = translate::translate_node(&current.name, node, current.node_port_addresses.clone());
        self.health.set_node_eligible(node.is_none_or(node_eligible));
        let touched = self.inventory.set_node(info);
        self.record_service_changes(touched);
    }

    /// Replaces all objects with a complete snapshot, as tests set a scene.
    #[cfg(test)]
    fn replace_all(&mut self, snap: &crate::source::Snapshot) {
        self.replace_services(&snap.services);
        self.replace_slices(&snap.slices);
        let node = self.this_node(&snap.nodes);
        self.set_node(node);
    }

    /// Only this node's object matters (its zone, its eligibility).
    fn is_this_node(&self, node: &Node) -> bool {
        node.metadata.name.as_deref() == Some(self.inventory.node().name.as_str())
    }

    fn this_node<'a>(&self, nodes: &'a [Node]) -> Option<&'a Node> {
        nodes.iter().find(|n| self.is_this_node(n))
    }

    /// One change from a source, the manifests or the API server.
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Apply(Object::Service(svc)) => self.upsert_service(&svc),
            Change::Apply(Object::Slice(slice)) => self.upsert_slice(&slice),
            Change::Apply(Object::Node(node)) => {
                if self.is_this_node(&node) {
                    self.set_node(Some(&node));
                }
            }
            Change::Delete(identity) => match identity.kind {
                ObjectKind::Service => {
                    self.remove_service(&ServiceName::new(&identity.namespace, &identity.name));
                }
                ObjectKind::EndpointSlice => self.remove_slice(&identity.namespace, &identity.name),
                ObjectKind::Node => {
                    if identity.name == self.inventory.node().name {
                        self.set_node(None);
                    }
                }
            },
            Change::Replace(Listed::Services(all)) => self.replace_services(&all),
            Change::Replace(Listed::Slices(all)) => self.replace_slices(&all),
            Change::Replace(Listed::Nodes(all)) => {
                let node = self.this_node(&all);
                self.set_node(node);
            }
        }
    }

    /// Replaces every Service with a complete list (a reload or a relist). Objects that fail
    /// validation keep their last good version instead of disappearing.
    pub fn replace_services<'a>(&mut self, services: impl IntoIterator<Item = &'a Service>) {
        let mut infos = Vec::new();
        for svc in services {
            match self.translate_service(svc) {
                Ok(Some(info)) => infos.push(info),
                Ok(None) => {}
                Err(()) => {
                    if let Some(previous) =
                        service_name(svc).and_then(|n| self.inventory.service(&n).cloned())
                    {
                        infos.push(previous);
                    }
                }
            }
        }
        let touched = self.inventory.replace_services(infos);
        self.record_service_changes(touched);
    }

    /// Replaces every EndpointSlice with a complete list.
    pub fn replace_slices<'a>(&mut self, slices: impl IntoIterator<Item = &'a EndpointSlice>) {
        let mut infos = Vec::new();
        for slice in slices {
            if let Ok(info) = self.translate_slice(slice) {
                self.note_trigger(&info, trigger_time(slice));
                infos.push(info);
            }
        }
        let listed: HashSet<(&str, &str)> = infos
            .iter()
            .map(|i| (i.namespace.as_str(), i.name.as_str()))
            .collect();
        self.seen_triggers
            .retain(|(ns, name), _| listed.contains(&(ns.as_str(), name.as_str())));
        let touched = self.inventory.replace_slices(infos);
        self.record_endpoint_changes(touched);
    }

    /// Plans and applies every Service changed since the last sync. A large sync (a first
    /// sync, a relist) is written while it is planned: the map writes of the Services planned
    /// so far run on a second thread as the next ones are planned, since the kernel's hash map
    /// updates take about as long as the planning. A small one (an endpoint change) is written
    /// in one go on this thread.
    pub fn sync(&mut self) -> SyncReport {
        let started = Instant::now();
        let full = self.dirty.len() == self.inventory.service_count() && !self.dirty.is_empty();
        let mut report = SyncReport::default();
        let queue: Vec<ServiceName> = std::mem::take(&mut self.dirty).into_iter().collect();
        self.planner.begin_sync();
        let mut planning = Planning {
            inventory: &self.inventory,
            planner: &mut self.planner,
            no_local: &mut self.no_local,
            reply_targets: self.reply_targets.as_mut(),
            planned: BTreeSet::new(),
            refused: Vec::new(),
            issues: Vec::new(),
        };
        let sink = &mut self.sink;
        let (ops, failed) = if queue.len() >= PIPELINE_MIN_SERVICES {
            std::thread::scope(|scope| {
                let (plans, received) = std::sync::mpsc::sync_channel::<Plan>(2);
                let writer = scope.spawn(move || {
                    received
                        .into_iter()
                        .flat_map(|plan| sink.apply(&plan))
                        .collect::<Vec<_>>()
                });
                let ops = planning.plan_all(queue, PIPELINE_CHUNK_OPS, |plan| {
                    // A writer that is gone has panicked; the join below reports it.
                    let _ = plans.send(plan);
                });
                drop(plans);
                let failed = writer.join().ok();
                (ops, failed)
            })
        } else {
            let mut failed = Vec::new();
            let ops = planning.plan_all(queue, usize::MAX, |plan| failed.extend(sink.apply(&plan)));
            (ops, Some(failed))
        };
        let Planning {
            planned,
            refused,
            issues,
            ..
        } = planning;
        report.services = planned.len();
        report.issues = issues;
        report.ops = ops;
        report.writer_lost = failed.is_none();
        report.failed = failed.unwrap_or_default();
        // Summed once per sync: per Service it would make a full sync quadratic.
        self.metrics
            .no_local_endpoints
            .get_or_create(&PolicyLabel {
                traffic_policy: "internal",
            })
            .set(self.no_local.values().sum::<usize>() as i64);
        self.record_outcome(&report);
        report.refused = refused.len();
        self.dirty.extend(refused);
        self.metrics.service_changes_pending.set(0);
        self.metrics.endpoint_changes_pending.set(0);
        let now = SystemTime::now();
        // A trigger whose slice changed nothing the datapath holds is dropped, not carried
        // into a later, unrelated sync.
        for (name, triggers) in std::mem::take(&mut self.triggers) {
            if planned.contains(&name) {
                for trigger in triggers {
                    let latency = now.duration_since(trigger).unwrap_or_default();
                    self.metrics
                        .network_programming_duration
                        .observe(latency.as_secs_f64());
                }
            }
        }
        if report.refused == 0 && self.repair.due().is_none() {
            self.health.updated(now);
        }
        let elapsed = started.elapsed().as_secs_f64();
        self.metrics.sync_duration.observe(elapsed);
        if full {
            self.metrics.sync_full_duration.observe(elapsed);
        } else {
            self.metrics.sync_partial_duration.observe(elapsed);
        }
        report
    }

    /// After the first complete sync following a restart: drops datapath state that no
    /// Service claimed.
    pub(crate) fn release_unclaimed(&mut self) -> SyncReport {
        let mut report = SyncReport::default();
        let Outcome { plan, issues, .. } = self.planner.release_unclaimed();
        report.issues = issues;
        report.ops = plan.op_count();
        if !plan.is_empty() {
            report.failed = self.sink.apply(&plan);
        }
        self.record_outcome(&report);
        report
    }

    /// Reads the maps back and rewrites every entry that differs from the planner's state:
    /// after a failed write (when [`Proxier::repair_due`] says), and on every periodic sync,
    /// which also catches entries someone else changed or deleted.
    pub fn repair(&mut self) -> RepairReport {
        let mut report = RepairReport::default();
        match self.sink.read_back() {
            Err(e) => report.unread = Some(e),
            Ok(actual) => {
                let plan = self.planner.repair(&actual);
                report.differences = plan.op_count();
                if !plan.is_empty() {
                    report.failed = self.sink.apply(&plan);
                }
            }
        }
        if report.differences > 0 {
            tracing::warn!(
                differences = report.differences,
                failed = report.failed.len(),
                "repairing map entries that differ from the desired state"
            );
        }
        self.metrics
            .repaired_entries
            .inc_by((report.differences - report.failed.len()) as u64);
        if let Some(e) = &report.unread {
            tracing::error!("{e}; retrying");
        }
        self.record_failures(&report.failed, false);
        if report.clean() {
            self.repair.succeeded();
            self.set_unrepaired(0);
            if self.dirty.is_empty() {
                self.health.updated(SystemTime::now());
            }
        }
        report
    }

    fn set_unrepaired(&self, count: usize) {
        self.health.set_unrepaired(count);
        self.metrics.unrepaired_entries.set(count as i64);
    }

    /// Logs each failed write with the Service it belongs to, and schedules a repair pass.
    fn record_failures(&mut self, failed: &[WriteFailure], writer_lost: bool) {
        for failure in failed {
            match self.service_of(&failure.op) {
                Some(service) => tracing::error!(%service, "map update failed: {failure}"),
                None => tracing::error!("map update failed: {failure}"),
            }
        }
        if writer_lost {
            tracing::error!("the map writer thread panicked; which of its writes landed is unknown");
        }
        self.metrics.map_write_errors.inc_by(failed.len() as u64);
        if !failed.is_empty() || writer_lost {
            self.repair.failed(Instant::now());
            self.set_unrepaired(failed.len().max(1));
        }
    }

    /// The Service a failed operation was for, when a frontend names it (backends are shared).
    fn service_of(&self, op: &Op) -> Option<&ServiceName> {
        match op {
            Op::UpsertRevNat(_, key)
            | Op::UpsertSlot(key, _)
            | Op::UpsertFrontend(key)
            | Op::DeleteFrontend(key)
            | Op::DeleteSlot(key, _)
            | Op::DeleteRevNat(_, key)
            | Op::UpsertMaglev(_, key)
            | Op::DeleteMaglev(_, key) => self.planner.owner_of(key),
            Op::UpsertSourceRange(id, _) | Op::DeleteSourceRange(id, _) => self.planner.owner_of_rev_nat(*id),
            Op::UpsertBackend(..) | Op::DeleteBackend(..) => None,
        }
    }

    fn record_outcome(&mut self, report: &SyncReport) {
        for issue in &report.issues {
            tracing::warn!("{issue}");
            match issue {
                PlanIssue::FrontendConflict { .. } => self.metrics.frontend_conflicts.inc(),
                PlanIssue::MapFull { .. } => self.metrics.map_full.inc(),
                PlanIssue::TooManyBackends { .. } => 0,
            };
        }
        self.record_failures(&report.failed, report.writer_lost);
        self.metrics.set_last_sync_now();
    }
}

/// Services per sync from which planning and map writes overlap.
const PIPELINE_MIN_SERVICES: usize = 1_000;
/// Map operations per plan handed to the writer thread: big enough that the batched writes
/// stay batched, small enough that writing starts early.
const PIPELINE_CHUNK_OPS: usize = 16_384;

/// One sync's planning, holding the parts of the [`Proxier`] it needs, so that the sink can
/// be lent to the writer thread meanwhile.
struct Planning<'a> {
    inventory: &'a Inventory,
    planner: &'a mut Planner,
    no_local: &'a mut BTreeMap<ServiceName, usize>,
    reply_targets: Option<&'a mut ReplyTargets>,
    planned: BTreeSet<ServiceName>,
    refused: Vec<ServiceName>,
    issues: Vec<PlanIssue>,
}

impl Planning<'_> {
    /// Plans every Service of `queue` (and those a released frontend lets in), handing `emit`
    /// the plan so far whenever it holds `chunk_ops` operations, and the rest at the end.
    /// Returns the number of operations emitted.
    fn plan_all(
        &mut self,
        mut queue: Vec<ServiceName>,
        chunk_ops: usize,
        mut emit: impl FnMut(Plan),
    ) -> usize {
        let mut plan = Plan::default();
        // The frontends `plan` deletes.
        let mut released: HashSet<FrontendKey> = HashSet::default();
        let mut ops = 0;
        let mut flush = |plan: &mut Plan, released: &mut HashSet<FrontendKey>| {
            released.clear();
            if !plan.is_empty() {
                ops += plan.op_count();
                emit(std::mem::take(plan));
            }
        };
        while let Some(name) = queue.pop() {
            let desired = self.inventory.desired(&name);
            let Outcome {
                plan: p,
                issues,
                retry,
            } = self.planner.plan_service(&name, desired.as_ref());
            self.count_no_local(&name, desired.as_ref());
            if let Some(targets) = self.reply_targets.as_deref_mut() {
                targets.record(&name, desired.as_ref());
            }
            if issues.iter().any(|i| matches!(i, PlanIssue::MapFull { .. })) {
                // Retried on the next sync, when room may have been freed.
                self.refused.push(name.clone());
            }
            self.planned.insert(name);
            // A frontend one Service released in this plan and this one takes (a Service that
            // waited for it, or one that simply moved onto it in the same sync): the deletion
            // is written first, since in one plan the deletions come after the additions and
            // would remove the new owner's entries for the same keys.
            let takes_released = p
                .upsert_frontends
                .iter()
                .map(|w| &w.frontend)
                .chain(p.upsert_slots.iter().map(|w| &w.frontend))
                .any(|key| released.contains(key));
            if takes_released {
                flush(&mut plan, &mut released);
            }
            released.extend(p.delete_frontends.iter().copied());
            plan.extend(p);
            self.issues.extend(issues);
            // A released frontend goes to a Service that wanted it, in this same sync. One
            // planned already in this sync was refused it: plan it again. Those still queued
            // get it when their turn comes.
            let waiting: Vec<ServiceName> = retry.into_iter().filter(|r| !queue.contains(r)).collect();
            queue.extend(waiting);
            if plan.op_count() >= chunk_ops {
                flush(&mut plan, &mut released);
            }
        }
        flush(&mut plan, &mut released);
        ops
    }

    /// kube-proxy's `sync_proxy_rules_no_local_endpoints_total{traffic_policy="internal"}`:
    /// service ports with internalTrafficPolicy Local and no endpoint on this node.
    fn count_no_local(&mut self, name: &ServiceName, desired: Option<&ServiceEntry>) {
        let local_policy = self
            .inventory
            .service(name)
            .is_some_and(|s| s.internal_policy == TrafficPolicy::Local);
        let empty = desired.filter(|_| local_policy).map_or(0, |d| {
            d.frontends
                .iter()
                .filter(|f| f.kind == FrontendKind::ClusterIp && f.key.protocol != Protocol::Any)
                .filter(|f| f.backends.is_empty())
                .count()
        });
        if empty == 0 {
            self.no_local.remove(name);
        } else {
            self.no_local.insert(name.clone(), empty);
        }
    }
}

fn service_name(svc: &Service) -> Option<ServiceName> {
    Some(ServiceName::new(
        namespace_or_default(svc.metadata.namespace.as_deref()),
        svc.metadata.name.clone()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{pipeline::plan::memory::MemoryMaps, source::Snapshot};

    fn proxier() -> Proxier<MemoryMaps> {
        Proxier::new(
            "n1",
            vec!["192.168.1.10".parse().unwrap()],
            TranslateOptions::default(),
            Planner::new(),
            MemoryMaps::default(),
            Metrics::new(),
            Arc::new(Health::new(std::time::Duration::from_secs(60))),
        )
        .with_sync_period(Duration::from_secs(2))
    }

    fn service(name: &str, ip: &str) -> Service {
        serde_saphyr::from_str(&format!(
            "metadata: {{name: {name}, namespace: ns}}\nspec: {{clusterIP: \"{ip}\", ports: [{{name: http, port: 80}}]}}"
        ))
        .unwrap()
    }

    fn slice(name: &str, service: &str, addrs: &[&str]) -> EndpointSlice {
        let eps: Vec<String> = addrs
            .iter()
            .map(|a| format!("{{addresses: [\"{a}\"]}}"))
            .collect();
        serde_saphyr::from_str(&format!(
            "metadata: {{name: {name}, namespace: ns, labels: {{kubernetes.io/service-name: {service}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]",
            eps.join(", ")
        ))
        .unwrap()
    }

    fn backends_of(p: &Proxier<MemoryMaps>, vip: &str) -> usize {
        let key = crate::pipeline::model::FrontendKey::new(
            vip.parse().unwrap(),
            80,
            crate::pipeline::model::Protocol::Tcp,
        );
        p.planner().frontend(&key).map_or(0, |f| f.slots.len())
    }

    #[test]
    fn invalid_update_keeps_the_last_good_version_programmed() {
        let mut p = proxier();
        p.upsert_service(&service("web", "10.96.0.10"));
        p.upsert_slice(&slice("web-a", "web", &["10.0.0.1"]));
        p.sync();
        p.upsert_service(&service("web", "10.96.0.999"));
        assert!(!p.has_pending(), "a rejected object changes nothing");
        assert_eq!(p.sync().ops, 0);
        assert_eq!(backends_of(&p, "10.96.0.10"), 1);
        assert_eq!(
            p.metrics
                .invalid_objects
                .get_or_create(&KindLabel::new("Service"))
                .get(),
            1
        );
    }

    #[test]
    fn snapshot_with_an_invalid_object_keeps_it_and_applies_the_rest() {
        let mut p = proxier();
        p.replace_all(&Snapshot {
            services: vec![service("web", "10.96.0.10"), service("api", "10.96.0.11")],
            slices: vec![
                slice("web-a", "web", &["10.0.0.1"]),
                slice("api-a", "api", &["10.0.0.2"]),
            ],
            nodes: vec![],
        });
        p.sync();
        p.replace_all(&Snapshot {
            services: vec![service("web", "not-an-ip"), service("api", "10.96.0.11")],
            slices: vec![
                slice("web-a", "web", &["10.0.0.1"]),
                slice("api-a", "api", &["10.0.0.2", "10.0.0.3"]),
            ],
            nodes: vec![],
        });
        p.sync();
        assert_eq!(backends_of(&p, "10.96.0.10"), 1, "web survives its broken update");
        assert_eq!(backends_of(&p, "10.96.0.11"), 2, "api's change is applied");
    }

    /// The services map's keys (frontend, slot) after the recorded plans, written in order
    /// and each in the writer's phase order (all additions, then all deletions).
    fn services_map_after(plans: &[Plan]) -> BTreeSet<(crate::pipeline::model::FrontendKey, u16)> {
        let mut keys = BTreeSet::new();
        for plan in plans {
            keys.extend(plan.upsert_slots.iter().map(|w| (w.frontend, w.slot)));
            keys.extend(plan.upsert_frontends.iter().map(|w| (w.frontend, 0)));
            for key in &plan.delete_frontends {
                keys.remove(&(*key, 0));
            }
            for key in &plan.delete_slots {
                keys.remove(key);
            }
        }
        keys
    }

    #[test]
    fn a_large_sync_is_written_in_chunks_while_it_is_planned_with_the_same_result() {
        let mut p = proxier();
        let n = PIPELINE_MIN_SERVICES + 500;
        for i in 0..n {
            let name = format!("s{i}");
            p.upsert_service(&service(&name, &format!("10.96.{}.{}", i / 250, i % 250 + 1)));
            let backends: Vec<String> = (0..10)
                .map(|e| format!("10.{}.{}.{}", 1 + i / 250, i % 250, e + 1))
                .collect();
            let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
            p.upsert_slice(&slice(&format!("{name}-a"), &name, &backends));
        }
        let report = p.sync();
        assert!(report.failed.is_empty() && report.issues.is_empty());
        assert!(p.sink.plans.len() > 1, "written in more than one plan");
        let written: usize = p.sink.plans.iter().map(Plan::op_count).sum();
        assert_eq!(report.ops, written);
        // Every Service: its ClusterIP frontend, its guard and ten slots.
        let keys = services_map_after(&p.sink.plans);
        assert_eq!(keys.len(), n * (1 + 1 + 10));
        assert_eq!(p.planner().backend_count(), n * 10);
        for i in [0, n / 2, n - 1] {
            assert_eq!(backends_of(&p, &format!("10.96.{}.{}", i / 250, i % 250 + 1)), 10);
        }
    }

    #[test]
    fn labelling_a_service_for_another_proxy_removes_it() {
        let mut p = proxier();
        p.upsert_service(&service("web", "10.96.0.10"));
        p.sync();
        let mut labelled = service("web", "10.96.0.10");
        labelled.metadata.labels = Some(
            [(
                crate::source::meta::LABEL_SERVICE_PROXY_NAME.to_string(),
                "other".to_string(),
            )]
            .into_iter()
            .collect(),
        );
        p.upsert_service(&labelled);
        let report = p.sync();
        // Its port and its ClusterIP's guard.
        assert_eq!(p.sink.plans.last().unwrap().delete_frontends.len(), 2);
        assert_eq!(report.services, 1);
    }

    #[test]
    fn a_frontend_freed_by_one_service_goes_to_the_one_waiting_for_it_in_the_same_sync() {
        let mut p = proxier();
        p.upsert_service(&service("a", "10.96.0.10"));
        p.upsert_slice(&slice("a-1", "a", &["10.0.0.1"]));
        p.upsert_service(&service("b", "10.96.0.10"));
        p.upsert_slice(&slice("b-1", "b", &["10.0.0.2"]));
        let report = p.sync();
        assert_eq!(
            report.issues.len(),
            2,
            "the second claimant is refused its port and its ClusterIP guard: {:?}",
            report.issues
        );
        let key = crate::pipeline::model::FrontendKey::new(
            "10.96.0.10".parse().unwrap(),
            80,
            crate::pipeline::model::Protocol::Tcp,
        );
        let owner = p.planner().owner_of(&key).cloned().expect("an owner");
        let waiting = if owner.name == "a" { "b" } else { "a" };
        p.remove_service(&owner);
        p.sync();
        assert_eq!(p.planner().owner_of(&key).map(|n| n.name.as_str()), Some(waiting));
        let keys = services_map_after(&p.sink.plans);
        assert!(
            keys.contains(&(key, 0)) && keys.contains(&(key, 1)),
            "the new owner's frontend and slot survive the old owner's deletion of the same keys: {keys:?}"
        );
    }

    #[test]
    fn a_frontend_freed_in_a_sync_goes_to_a_service_refused_it_earlier_in_that_sync() {
        let mut p = proxier();
        p.upsert_service(&service("a", "10.96.0.10"));
        p.upsert_slice(&slice("a-1", "a", &["10.0.0.1"]));
        p.sync();
        // One sync: "b" (planned first: the queue is taken from the end) asks for a's
        // ClusterIP and is refused; then "a" moves away from it.
        p.upsert_service(&service("b", "10.96.0.10"));
        p.upsert_slice(&slice("b-1", "b", &["10.0.0.2"]));
        p.upsert_service(&service("a", "10.96.0.11"));
        p.sync();
        let key = crate::pipeline::model::FrontendKey::new(
            "10.96.0.10".parse().unwrap(),
            80,
            crate::pipeline::model::Protocol::Tcp,
        );
        assert_eq!(p.planner().owner_of(&key).map(|n| n.name.as_str()), Some("b"));
        assert_eq!(backends_of(&p, "10.96.0.10"), 1);
        assert_eq!(backends_of(&p, "10.96.0.11"), 1);
    }

    #[test]
    fn a_frontend_one_service_leaves_and_another_takes_in_one_sync_keeps_the_new_owners_entries() {
        let mut p = proxier();
        p.upsert_service(&service("b", "10.96.0.10"));
        p.upsert_slice(&slice("b-1", "b", &["10.0.0.1"]));
        p.sync();
        // One sync: "b" (planned first: the queue is taken from the end) is deleted, and "a",
        // which never asked for the ClusterIP while b held it, takes it.
        p.remove_service(&crate::pipeline::model::ServiceName::new("ns", "b"));
        p.upsert_service(&service("a", "10.96.0.10"));
        p.upsert_slice(&slice("a-1", "a", &["10.0.0.2"]));
        p.sync();
        let key = crate::pipeline::model::FrontendKey::new(
            "10.96.0.10".parse().unwrap(),
            80,
            crate::pipeline::model::Protocol::Tcp,
        );
        let keys = services_map_after(&p.sink.plans);
        assert!(
            keys.contains(&(key, 0)) && keys.contains(&(key, 1)),
            "b's deletion removed a's frontend and slot: {keys:?}"
        );
        assert!(maps_match(&mut p));
    }

    #[test]
    fn only_changed_services_are_planned() {
        let mut p = proxier();
        for i in 0..50 {
            p.upsert_service(&service(&format!("s{i}"), &format!("10.96.1.{i}")));
        }
        assert_eq!(p.sync().services, 50);
        p.upsert_slice(&slice("s7-a", "s7", &["10.0.0.1"]));
        let report = p.sync();
        assert_eq!(report.services, 1);
        assert_eq!(backends_of(&p, "10.96.1.7"), 1);
    }

    fn healthz(p: &Proxier<MemoryMaps>) -> crate::health::proxy::Report {
        p.health.report(SystemTime::now(), true)
    }

    /// The repair pass a proxier would run next finds nothing to do.
    fn maps_match(p: &mut Proxier<MemoryMaps>) -> bool {
        let actual = p.sink.read_back().unwrap();
        p.planner.repair(&actual).is_empty()
    }

    #[test]
    fn a_failed_write_is_retried_with_backoff_and_healthz_fails_until_it_lands() {
        let mut p = proxier();
        p.upsert_service(&service("web", "10.96.0.10"));
        p.upsert_slice(&slice("web-a", "web", &["10.0.0.1", "10.0.0.2"]));
        p.sink.failing = 1;
        let report = p.sync();
        assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
        assert!(!maps_match(&mut p), "the failed write left the maps behind");
        let first_retry = p.repair_due().expect("a retry is scheduled");
        let report = healthz(&p);
        assert!(!report.healthy && report.unrepaired == 1, "{report:?}");

        // The retry fails too: still unhealthy, and the next retry waits longer.
        p.sink.failing = 1;
        assert_eq!(p.repair().failed.len(), 1);
        assert!(!healthz(&p).healthy);
        let second_retry = p.repair_due().expect("still scheduled");
        assert!(
            second_retry - first_retry >= Duration::from_millis(200),
            "backs off: 200 ms, then 400 ms"
        );

        let report = p.repair();
        assert!(report.clean() && report.differences >= 1, "{report:?}");
        assert!(maps_match(&mut p));
        assert_eq!(p.repair_due(), None);
        let report = healthz(&p);
        assert!(report.healthy && report.unrepaired == 0, "{report:?}");
        assert_eq!(p.metrics.map_write_errors.get(), 2);
        assert_eq!(p.metrics.unrepaired_entries.get(), 0);
    }

    #[test]
    fn a_failed_write_of_a_frontend_left_without_backends_is_repaired() {
        let mut p = proxier();
        p.upsert_service(&service("web", "10.96.0.10"));
        p.upsert_slice(&slice("web-a", "web", &["10.0.0.1"]));
        p.sync();
        // The frontend's new count (0: reject) fails to land; its slot is deleted all the same,
        // so the entry still counts a slot the map no longer has.
        p.upsert_slice(&slice("web-a", "web", &[]));
        p.sink.failing = 1;
        assert_eq!(p.sync().failed.len(), 1);
        let key = crate::pipeline::model::FrontendKey::new(
            "10.96.0.10".parse().unwrap(),
            80,
            crate::pipeline::model::Protocol::Tcp,
        );
        assert_eq!(p.sink.frontends[&key].count, 1);
        let report = p.repair();
        assert!(report.clean() && report.differences > 0, "{report:?}");
        assert_eq!(p.sink.frontends[&key].count, 0, "the repair pass left the count");
        assert!(maps_match(&mut p));
    }

    #[test]
    fn the_periodic_repair_rewrites_an_entry_deleted_behind_the_agents_back() {
        let mut p = proxier();
        p.upsert_service(&service("web", "10.96.0.10"));
        p.upsert_slice(&slice("web-a", "web", &["10.0.0.1", "10.0.0.2", "10.0.0.3"]));
        p.sync();
        assert!(maps_match(&mut p));
        let key = crate::pipeline::model::FrontendKey::new(
            "10.96.0.10".parse().unwrap(),
            80,
            crate::pipeline::model::Protocol::Tcp,
        );
        let slot = p.sink.slots.remove(&(key, 2)).expect("slot 2 was written");
        let stray = crate::pipeline::model::FrontendKey::new(
            "10.96.9.9".parse().unwrap(),
            80,
            crate::pipeline::model::Protocol::Tcp,
        );
        let mut foreign = p.sink.frontends[&key].clone();
        foreign.frontend = stray;
        p.sink.frontends.insert(stray, foreign);

        // Nothing changed in the cluster: an ordinary sync plans nothing.
        assert_eq!(p.sync().ops, 0);
        let report = p.repair();
        assert!(report.clean() && report.differences > 0, "{report:?}");
        assert_eq!(p.sink.slots.get(&(key, 2)), Some(&slot));
        assert!(
            !p.sink.frontends.contains_key(&stray),
            "a frontend nobody wants is removed"
        );
        assert!(maps_match(&mut p));
        assert_eq!(p.repair().differences, 0, "a second pass finds nothing");
        assert_eq!(p.metrics.repaired_entries.get(), report.differences as u64);
    }
}
