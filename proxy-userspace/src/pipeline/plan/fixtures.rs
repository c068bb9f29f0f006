//! Desired Services for the planner's tests.

use std::net::IpAddr;

use crate::pipeline::model::{
    BackendKey, BackendState, Frontend, FrontendBackend, FrontendKey, FrontendKind, Protocol, ServiceEntry,
    ServiceName,
};

pub(super) fn fkey(addr: &str, port: u16) -> FrontendKey {
    FrontendKey::new(addr.parse().unwrap(), port, Protocol::Tcp)
}

pub(super) fn svc(name: &str) -> ServiceName {
    ServiceName::new("default", name)
}

fn backend(addr: &str) -> FrontendBackend {
    FrontendBackend {
        key: BackendKey {
            addr: addr.parse::<IpAddr>().unwrap(),
            port: 8080,
            protocol: Protocol::Tcp,
        },
        state: BackendState::default(),
    }
}

/// One TCP ClusterIP frontend per `(address, port, backend addresses)`.
pub(super) fn entry(frontends: &[(&str, u16, &[&str])]) -> ServiceEntry {
    ServiceEntry {
        frontends: frontends
            .iter()
            .map(|(addr, port, backends)| Frontend {
                key: fkey(addr, *port),
                kind: FrontendKind::ClusterIp,
                port_name: "http".into(),
                backends: backends.iter().map(|b| backend(b)).collect(),
                affinity_timeout: None,
                flags: 0,
                source_ranges: Vec::new(),
            })
            .collect(),
    }
}
