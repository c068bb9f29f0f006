//! bpf-kube-proxy: Kubernetes Service load balancing in eBPF.
//!
//! Data flows one way: `source` (manifests, API server) → `pipeline` (validated model,
//! inventory and policy, plan) → `sync` (the proxier) → `datapath` (the only code that touches
//! BPF). `node`, `health` and `telemetry` serve the stages beside the flow; `agent` wires them.

pub mod agent;
pub mod config;
pub mod datapath;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod health;
pub mod node;
pub mod pipeline;
pub mod source;
pub mod sync;
pub mod telemetry;
