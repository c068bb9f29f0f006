//! kube-proxy's metrics server (`/metrics`, `/proxyMode`; default `127.0.0.1:10249`), so that
//! scrapers configured for kube-proxy work unchanged.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::header,
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::TcpListener;

use crate::telemetry::metrics::Metrics;

/// What `/proxyMode` answers (kube-proxy answers `iptables`, `ipvs` or `nftables`).
pub(crate) const PROXY_MODE: &str = "ebpf";

#[derive(Debug, thiserror::Error)]
#[error("binding {what} server to {addr}: {source}")]
pub struct BindError {
    what: &'static str,
    addr: SocketAddr,
    source: std::io::Error,
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

pub(crate) async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { what, addr, source })
}

pub(crate) fn spawn(listener: TcpListener, router: Router) {
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!("HTTP server stopped: {e}");
        }
    });
}

/// Binds the metrics server and serves it in the background. A binding error is returned, so a
/// port clash is reported at start rather than lost.
pub async fn start(metrics: Arc<Metrics>, addr: SocketAddr) -> Result<(), BindError> {
    let listener = bind("metrics", addr).await?;
    let addr = listener.local_addr().unwrap_or(addr);
    tracing::info!(%addr, "serving /metrics and /proxyMode");
    let router = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/proxyMode", get(|| async { PROXY_MODE }))
        .with_state(metrics);
    spawn(listener, router);
    Ok(())
}
