//! The backends the tc path reaches by SNAT, per Service: a flow from outside the node to a
//! backend on another node leaves with the node's address as its source, so its replies come
//! back to the node and are translated on the device they arrive on. The agent checks that
//! those devices carry the tc programs (`node::reply_routes`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use proxy_common::maps::svc_flags;

use crate::pipeline::model::{Scope, ServiceEntry, ServiceName};

/// The addresses of a Service's backends that the tc path SNATs to: those of its frontends
/// reachable from outside (NodePort, LoadBalancer IP, externalIP), for every client
/// (externalTrafficPolicy Local keeps the client's address and uses local backends only),
/// that are not on this node. Sorted, each once.
pub(crate) fn snat_backends(entry: &ServiceEntry) -> Vec<IpAddr> {
    let mut addrs: Vec<IpAddr> = entry
        .frontends
        .iter()
        .filter(|f| f.kind.is_external() && f.key.scope == Scope::All && f.flags & svc_flags::EXT_LOCAL == 0)
        .flat_map(|f| &f.backends)
        .filter(|b| !b.state.local)
        .map(|b| b.key.addr)
        .collect();
    addrs.sort_unstable();
    addrs.dedup();
    addrs
}

/// [`snat_backends`] of every Service planned, kept as syncs go; Services without any are not
/// kept, so a cluster of ClusterIPs costs nothing here.
#[derive(Debug, Default)]
pub(crate) struct ReplyTargets {
    by_service: BTreeMap<ServiceName, Vec<IpAddr>>,
    /// Services whose addresses changed since [`ReplyTargets::take_changed`], so that a check
    /// after an endpoint change looks at that Service alone.
    changed: BTreeSet<ServiceName>,
}

impl ReplyTargets {
    /// Takes a Service's desired state (`None`: it is gone).
    pub(crate) fn record(&mut self, name: &ServiceName, desired: Option<&ServiceEntry>) {
        let addrs = desired.map(snat_backends).unwrap_or_default();
        let changed = if addrs.is_empty() {
            self.by_service.remove(name).is_some()
        } else if self.by_service.get(name) == Some(&addrs) {
            false
        } else {
            self.by_service.insert(name.clone(), addrs);
            true
        };
        if changed {
            self.changed.insert(name.clone());
        }
    }

    /// The Services whose addresses changed since the last call, each with its addresses now
    /// (empty: it has none left).
    pub(crate) fn take_changed(&mut self) -> Vec<(ServiceName, Vec<IpAddr>)> {
        std::mem::take(&mut self.changed)
            .into_iter()
            .map(|name| {
                let addrs = self.by_service.get(&name).cloned().unwrap_or_default();
                (name, addrs)
            })
            .collect()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&ServiceName, &[IpAddr])> {
        self.by_service.iter().map(|(k, v)| (k, v.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::model::{
        BackendKey, BackendState, Frontend, FrontendBackend, FrontendKey, FrontendKind, Protocol,
    };

    fn frontend(kind: FrontendKind, scope: Scope, flags: u32, backends: &[(&str, bool)]) -> Frontend {
        Frontend {
            key: FrontendKey {
                scope,
                ..FrontendKey::new("10.96.0.1".parse().unwrap(), 80, Protocol::Tcp)
            },
            kind,
            port_name: String::new(),
            backends: backends
                .iter()
                .map(|(addr, local)| FrontendBackend {
                    key: BackendKey {
                        addr: addr.parse().unwrap(),
                        port: 8080,
                        protocol: Protocol::Tcp,
                    },
                    state: BackendState {
                        terminating: false,
                        local: *local,
                    },
                })
                .collect(),
            affinity_timeout: None,
            flags: flags | kind.flag(),
            source_ranges: Vec::new(),
        }
    }

    #[test]
    fn only_remote_backends_of_frontends_from_outside_for_every_client_are_snated() {
        let entry = ServiceEntry {
            frontends: vec![
                // Reached through the socket hooks only: no SNAT.
                frontend(FrontendKind::ClusterIp, Scope::All, 0, &[("10.1.0.1", false)]),
                frontend(
                    FrontendKind::NodePort,
                    Scope::All,
                    0,
                    &[("10.2.0.1", false), ("10.2.0.2", true), ("10.2.0.3", false)],
                ),
                frontend(FrontendKind::LoadBalancer, Scope::All, 0, &[("10.2.0.1", false)]),
                // externalTrafficPolicy Local: the tc path keeps the client's address.
                frontend(
                    FrontendKind::ExternalIp,
                    Scope::All,
                    svc_flags::EXT_LOCAL,
                    &[("10.3.0.1", false)],
                ),
                frontend(
                    FrontendKind::ExternalIp,
                    Scope::ExternalLocal,
                    0,
                    &[("10.3.0.2", true)],
                ),
            ],
        };
        let want: Vec<IpAddr> = vec!["10.2.0.1".parse().unwrap(), "10.2.0.3".parse().unwrap()];
        assert_eq!(snat_backends(&entry), want);

        let mut targets = ReplyTargets::default();
        let name = ServiceName::new("test", "web");
        targets.record(&name, Some(&entry));
        assert_eq!(targets.take_changed(), [(name.clone(), want.clone())]);
        targets.record(&name, Some(&entry));
        assert!(
            targets.take_changed().is_empty(),
            "the same addresses are no change"
        );
        assert_eq!(targets.iter().count(), 1);
        targets.record(&name, None);
        assert_eq!(targets.take_changed(), [(name.clone(), Vec::new())]);
        assert_eq!(targets.iter().count(), 0);
        targets.record(&name, Some(&ServiceEntry::default()));
        assert!(targets.take_changed().is_empty(), "none before, none now");
    }
}
