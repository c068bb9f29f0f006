//! The pure pipeline, no I/O and no BPF: Kubernetes objects are validated into the service
//! model (`translate` → `model`), joined and filtered per frontend (`inventory`, `policy`), and
//! diffed into ordered map operations (`plan`); `reply_targets` keeps which backends the tc path
//! reaches by SNAT. `snapshot` runs the same steps on a complete
//! set of objects for tools that need one Service's desired state without an agent.

pub(crate) mod inventory;
pub mod model;
pub mod plan;
pub(crate) mod policy;
pub(crate) mod reply_targets;
pub mod snapshot;
pub mod translate;
