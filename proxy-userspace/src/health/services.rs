//! healthCheckNodePort servers: for each Service with externalTrafficPolicy Local, an HTTP
//! server on its healthCheckNodePort that tells load balancers whether this node has a local
//! endpoint, with kube-proxy's JSON body and status codes.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::SystemTime,
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde::Serialize;
use tokio::task::JoinHandle;

use super::proxy::Health;
use crate::{pipeline::inventory::HealthCheck, telemetry::metrics::Metrics};

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
struct ServiceRef {
    namespace: String,
    name: String,
}

/// kube-proxy's body (pkg/proxy/healthcheck/service_health.go).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct Body {
    service: ServiceRef,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

struct Server {
    check: Arc<RwLock<HealthCheck>>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The running servers, by port.
pub(crate) struct HealthCheckServers {
    servers: HashMap<u16, Server>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

async fn answer(
    State((check, health)): State<(Arc<RwLock<HealthCheck>>, Arc<Health>)>,
) -> (StatusCode, Json<Body>) {
    let check = check
        .read()
        .map_or_else(|p| p.into_inner().clone(), |c| c.clone());
    let body = Body {
        service: ServiceRef {
            namespace: check.service.namespace.clone(),
            name: check.service.name.clone(),
        },
        local_endpoints: check.local_endpoints,
        service_proxy_healthy: health.report(SystemTime::now(), true).healthy,
    };
    // Only ready local endpoints count: a node whose local endpoints are all terminating
    // answers 503, so load balancers drain it while those endpoints finish.
    let status = if body.local_endpoints > 0 && body.service_proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

impl HealthCheckServers {
    pub fn new(metrics: Arc<Metrics>, health: Arc<Health>) -> Self {
        Self {
            servers: HashMap::new(),
            metrics,
            health,
        }
    }

    /// Serves exactly `wanted`: starts servers for new ports, updates the others' answers,
    /// stops those no Service wants any more. A port that cannot be bound is logged and
    /// counted, and tried again on the next update.
    pub(crate) fn update(&mut self, wanted: Vec<HealthCheck>) {
        let ports: Vec<u16> = wanted.iter().map(|c| c.port).collect();
        self.servers.retain(|port, _| ports.contains(port));
        for check in wanted {
            if let Some(server) = self.servers.get(&check.port) {
                match server.check.write() {
                    Ok(mut current) => *current = check,
                    Err(poisoned) => *poisoned.into_inner() = check,
                }
                continue;
            }
            let port = check.port;
            match self.start(check) {
                Ok(server) => {
                    self.servers.insert(port, server);
                }
                Err(e) => {
                    self.metrics.health_check_bind_failures.inc();
                    tracing::error!(port, "serving healthCheckNodePort: {e}");
                }
            }
        }
    }

    fn start(&self, check: HealthCheck) -> std::io::Result<Server> {
        // `[::]` with IPV6_V6ONLY off (Linux's default) takes IPv4 clients too.
        let listener = std::net::TcpListener::bind(SocketAddr::from(([0u16; 8], check.port)))?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tracing::info!(port = check.port, service = %check.service, "serving healthCheckNodePort");
        let check = Arc::new(RwLock::new(check));
        let app = Router::new()
            .fallback(get(answer))
            .with_state((check.clone(), self.health.clone()));
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("healthCheckNodePort server stopped: {e}");
            }
        });
        Ok(Server { check, task })
    }
}
