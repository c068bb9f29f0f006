//! kube-proxy's HTTP endpoints, so that probes, load balancers and scrapers configured for
//! kube-proxy work unchanged: the health server (`/healthz`, `/livez`; default `0.0.0.0:10256`)
//! and the metrics server (`/metrics`, `/proxyMode`; default `127.0.0.1:10249`).

use std::{net::SocketAddr, sync::Arc, time::SystemTime};

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::TcpListener;

use crate::metrics::{CodeLabel, Metrics};

/// What `/proxyMode` answers (kube-proxy answers `iptables`, `ipvs` or `nftables`).
pub const PROXY_MODE: &str = "ebpf";

#[derive(Debug, thiserror::Error)]
#[error("binding {what} server to {addr}: {source}")]
pub struct BindError {
    what: &'static str,
    addr: SocketAddr,
    source: std::io::Error,
}

fn health(metrics: &Metrics, include_node: bool) -> Response {
    let report = metrics.health.report(SystemTime::now(), include_node);
    let status = if report.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let counter = if include_node {
        &metrics.healthz_requests
    } else {
        &metrics.livez_requests
    };
    counter
        .get_or_create(&CodeLabel {
            code: status.as_u16(),
        })
        .inc();
    let mut response = (status, axum::Json(report)).into_response();
    response
        .headers_mut()
        .insert("X-Content-Type-Options", HeaderValue::from_static("nosniff"));
    response
}

async fn healthz(State(metrics): State<Arc<Metrics>>) -> Response {
    health(&metrics, true)
}

async fn livez(State(metrics): State<Arc<Metrics>>) -> Response {
    health(&metrics, false)
}

async fn metrics_text(State(metrics): State<Arc<Metrics>>) -> Response {
    // The datapath readings iterate map keys with syscalls: off the async workers.
    let body = tokio::task::spawn_blocking(move || metrics.encode())
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { what, addr, source })
}

fn spawn(listener: TcpListener, router: Router) {
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!("HTTP server stopped: {e}");
        }
    });
}

/// Binds both servers (either may be off) and serves them in the background. Binding errors
/// are returned, so a port clash is reported at start rather than lost.
pub async fn start(
    metrics: Arc<Metrics>,
    healthz_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
) -> Result<(), BindError> {
    if let Some(addr) = healthz_addr {
        let listener = bind("health", addr).await?;
        let addr = listener.local_addr().unwrap_or(addr);
        tracing::info!(%addr, "serving /healthz and /livez");
        let router = Router::new()
            .route("/healthz", get(healthz))
            .route("/livez", get(livez))
            .with_state(metrics.clone());
        spawn(listener, router);
    }
    if let Some(addr) = metrics_addr {
        let listener = bind("metrics", addr).await?;
        let addr = listener.local_addr().unwrap_or(addr);
        tracing::info!(%addr, "serving /metrics and /proxyMode");
        let router = Router::new()
            .route("/metrics", get(metrics_text))
            .route("/proxyMode", get(|| async { PROXY_MODE }))
            .with_state(metrics);
        spawn(listener, router);
    }
    Ok(())
}
