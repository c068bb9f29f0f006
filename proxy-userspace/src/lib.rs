//! bpf-kube-proxy: Kubernetes Service load balancing in eBPF.
//!
//! Data flows one way: `source` (manifests, API server) → `translate` (validated model) →
//! `inventory` (desired frontends per Service, using `policy`) → `plan` (ordered map
//! operations) → `datapath` (the only code that touches BPF).

pub mod agent;
pub mod config;
pub mod datapath;
pub mod drift;
pub mod health;
pub mod healthcheck;
pub mod inventory;
pub mod metrics;
pub mod model;
pub mod nodeport;
pub mod plan;
pub mod policy;
pub mod proxier;
pub mod sandbox;
pub mod serve;
pub mod source;
pub mod translate;
