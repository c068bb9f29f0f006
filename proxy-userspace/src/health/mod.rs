//! Health as load balancers and probes see it: the proxy's own (`/healthz`, `/livez`) and each
//! externalTrafficPolicy Local Service's healthCheckNodePort.

pub mod proxy;
pub(crate) mod server;
pub(crate) mod services;
