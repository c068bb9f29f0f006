//! kube-proxy's health model (pkg/proxy/healthcheck/proxy_health.go), kept free of I/O so the
//! rules are unit-tested: the proxy is healthy unless a change has been waiting longer than the
//! health timeout (2 × the sync period) for a successful sync. A periodic resync queues a change
//! every period, so a proxy whose syncs keep failing, or whose loop is stuck, turns unhealthy
//! within two periods. `/healthz` also reports unhealthy while this node is being deleted
//! (deletionTimestamp, or the cluster autoscaler's ToBeDeletedByClusterAutoscaler taint), so
//! load balancers drain it; `/livez` ignores that.
//!
//! Degraded datapath: parts the kernel refused (a tc program the verifier rejected, a device
//! the tc programs could not attach to) are listed in `/healthz`'s `degraded` field. The
//! socket programs serve ClusterIPs and the node's own clients either way, so that alone
//! keeps 200; but when `--devices` asked for the tc path and it is not attached everywhere,
//! traffic that load balancers send to this node's NodePorts is not served, so `/healthz`
//! answers 503 and they drain the node, as they do for a node being deleted. `/livez` ignores
//! it: a restart would not make the kernel accept the program.
//!
//! Unrepaired datapath: while the maps are known to differ from the desired state (a write
//! failed, or the periodic repair pass found an entry someone changed), `/healthz` answers 503
//! and names the count in `unrepaired`, until a repair pass writes every difference back.
//! `/livez` follows kube-proxy's timeout rule only: the pending change that could not be
//! written makes it fail after the health timeout, not at once.

use std::{
    sync::Mutex,
    time::{Duration, SystemTime},
};

use serde::Serialize;

#[derive(Debug)]
struct State {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<SystemTime>,
    node_eligible: bool,
    degraded: Vec<String>,
    external_down: bool,
    unrepaired: usize,
}

#[derive(Debug)]
pub struct Health {
    timeout: Duration,
    state: Mutex<State>,
}

/// The JSON body kube-proxy serves on `/healthz` and `/livez`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// RFC 3339; empty before the first successful sync, as kube-proxy's zero time would be
    /// meaningless.
    pub(crate) last_updated: String,
    pub(crate) current_time: String,
    pub(crate) node_eligible: bool,
    /// What of the datapath is not running, each naming the program and device (absent when
    /// everything runs, so the body is kube-proxy's).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<String>,
    /// Map entries known to differ from the desired state (absent when there are none).
    #[serde(skip_serializing_if = "is_zero")]
    pub unrepaired: usize,
    #[serde(skip)]
    pub(crate) healthy: bool,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl Health {
    /// `timeout`: kube-proxy uses 2 × its sync period.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            state: Mutex::new(State {
                last_updated: None,
                oldest_pending: None,
                node_eligible: true,
                degraded: Vec::new(),
                external_down: false,
                unrepaired: 0,
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // A panic while holding this lock cannot leave the state inconsistent (plain fields).
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut state)
    }

    /// A change arrived that a sync must still apply.
    pub(crate) fn queued(&self, now: SystemTime) {
        self.with(|s| {
            s.oldest_pending.get_or_insert(now);
        });
    }

    /// A sync applied everything pending without error.
    pub(crate) fn updated(&self, now: SystemTime) {
        self.with(|s| {
            s.last_updated = Some(now);
            s.oldest_pending = None;
        });
    }

    pub(crate) fn set_node_eligible(&self, eligible: bool) {
        self.with(|s| s.node_eligible = eligible);
    }

    /// Records what of the datapath is not running; `external_down`: traffic from outside
    /// that `--devices` asked for is not served.
    pub(crate) fn set_degraded(&self, degraded: Vec<String>, external_down: bool) {
        self.with(|s| {
            s.degraded = degraded;
            s.external_down = external_down;
        });
    }

    /// How many map entries are known to differ from the desired state.
    pub(crate) fn set_unrepaired(&self, unrepaired: usize) {
        self.with(|s| s.unrepaired = unrepaired);
    }

    /// `/healthz` when `include_node` is true, `/livez` when false.
    pub fn report(&self, now: SystemTime, include_node: bool) -> Report {
        self.with(|s| {
            let synced = s
                .oldest_pending
                .is_none_or(|since| now.duration_since(since).unwrap_or_default() < self.timeout);
            Report {
                last_updated: s.last_updated.map(rfc3339).unwrap_or_default(),
                current_time: rfc3339(now),
                node_eligible: s.node_eligible,
                degraded: s.degraded.clone(),
                unrepaired: s.unrepaired,
                healthy: synced
                    && (!include_node || (s.node_eligible && !s.external_down && s.unrepaired == 0)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERIOD: Duration = Duration::from_secs(30);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    #[test]
    fn healthy_at_start_and_while_nothing_is_pending() {
        let h = Health::new(2 * PERIOD);
        assert!(h.report(at(0), true).healthy);
        h.updated(at(1));
        // Old syncs are fine when nothing waits: kube-proxy reports healthy too.
        assert!(h.report(at(10_000), true).healthy);
    }

    #[test]
    fn unhealthy_once_a_change_waits_longer_than_twice_the_sync_period() {
        let h = Health::new(2 * PERIOD);
        h.updated(at(0));
        h.queued(at(10));
        assert!(h.report(at(69), true).healthy);
        let late = h.report(at(70), true);
        assert!(!late.healthy);
        assert!(
            !h.report(at(70), false).healthy,
            "livez too: the proxy itself is stuck"
        );
        h.updated(at(71));
        assert!(h.report(at(72), true).healthy);
    }

    #[test]
    fn the_oldest_pending_change_counts_not_the_newest() {
        let h = Health::new(2 * PERIOD);
        h.queued(at(0));
        h.queued(at(50));
        assert!(!h.report(at(61), true).healthy);
    }

    #[test]
    fn a_node_being_deleted_fails_healthz_but_not_livez() {
        let h = Health::new(2 * PERIOD);
        h.set_node_eligible(false);
        let healthz = h.report(at(0), true);
        assert!(!healthz.healthy && !healthz.node_eligible);
        assert!(h.report(at(0), false).healthy);
    }

    #[test]
    fn a_degraded_datapath_is_listed_and_fails_healthz_only_when_external_traffic_is_lost() {
        let h = Health::new(2 * PERIOD);
        let problem = "tc: program bkp_tc_ingress not loaded: stack too large".to_string();
        // No --devices: ClusterIPs and the node's own clients are all there is to serve.
        h.set_degraded(vec![problem.clone()], false);
        let report = h.report(at(0), true);
        assert!(report.healthy);
        assert_eq!(report.degraded, std::slice::from_ref(&problem));
        // --devices asked for the tc path: load balancers must stop sending NodePort traffic.
        h.set_degraded(vec![problem], true);
        assert!(!h.report(at(0), true).healthy);
        assert!(h.report(at(0), false).healthy, "livez: restarting would not help");
        let json = serde_json::to_value(h.report(at(0), true)).unwrap();
        assert_eq!(
            json["degraded"][0],
            "tc: program bkp_tc_ingress not loaded: stack too large"
        );
    }

    #[test]
    fn unrepaired_map_entries_fail_healthz_at_once_and_livez_only_after_the_timeout() {
        let h = Health::new(2 * PERIOD);
        h.updated(at(0));
        h.queued(at(1));
        h.set_unrepaired(3);
        let healthz = h.report(at(2), true);
        assert!(!healthz.healthy);
        assert_eq!(serde_json::to_value(&healthz).unwrap()["unrepaired"], 3);
        assert!(h.report(at(2), false).healthy);
        assert!(!h.report(at(61), false).healthy);
        h.set_unrepaired(0);
        h.updated(at(62));
        assert!(h.report(at(62), true).healthy);
        assert!(
            serde_json::to_value(h.report(at(62), true))
                .unwrap()
                .get("unrepaired")
                .is_none()
        );
    }

    #[test]
    fn report_serialises_like_kube_proxy() {
        let h = Health::new(2 * PERIOD);
        h.updated(at(0));
        let json = serde_json::to_value(h.report(at(5), true)).unwrap();
        assert_eq!(json["lastUpdated"], "2023-11-14T22:13:20.000Z");
        assert_eq!(json["currentTime"], "2023-11-14T22:13:25.000Z");
        assert_eq!(json["nodeEligible"], true);
        assert!(json.get("healthy").is_none());
        assert!(
            json.get("degraded").is_none(),
            "nothing degraded: kube-proxy's body"
        );
    }
}
