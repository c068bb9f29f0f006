//! kube-proxy's health server (`/healthz`, `/livez`; default `0.0.0.0:10256`), so that probes
//! and load balancers configured for kube-proxy work unchanged.

use std::{net::SocketAddr, sync::Arc, time::SystemTime};

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
};

use super::proxy::Health;
use crate::telemetry::{
    metrics::{CodeLabel, Metrics},
    serve::{BindError, bind, spawn},
};

type Shared = (Arc<Health>, Arc<Metrics>);

fn answer((health, metrics): &Shared, include_node: bool) -> Response {
    let report = health.report(SystemTime::now(), include_node);
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

async fn healthz(State(shared): State<Shared>) -> Response {
    answer(&shared, true)
}

async fn livez(State(shared): State<Shared>) -> Response {
    answer(&shared, false)
}

/// Binds the health server and serves it in the background. A binding error is returned, so a
/// port clash is reported at start rather than lost.
pub async fn start(health: Arc<Health>, metrics: Arc<Metrics>, addr: SocketAddr) -> Result<(), BindError> {
    let listener = bind("health", addr).await?;
    let addr = listener.local_addr().unwrap_or(addr);
    tracing::info!(%addr, "serving /healthz and /livez");
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state((health, metrics));
    spawn(listener, router);
    Ok(())
}
