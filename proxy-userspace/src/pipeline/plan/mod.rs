//! The planner: desired frontends of a Service → the map operations that take the datapath
//! there. `ops` is the contract with the datapath (what the writer applies, what the reader
//! returns), `diff` the planner that produces it, `ids` its id allocator and `capacity` what
//! the maps can hold.

mod capacity;
mod diff;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use diff::audit;
#[cfg(test)]
mod fixtures;
mod ids;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod memory;
mod ops;
#[cfg(test)]
mod properties;

pub use capacity::Capacity;
pub use capacity::PlanIssue;
pub use capacity::Usage;
pub(crate) use diff::Outcome;
pub use diff::Planner;
pub use ops::Departure;
pub use ops::Label;
pub use ops::Op;
pub use ops::Plan;
pub use ops::PlanSink;
pub use ops::Programmed;
pub use ops::ProgrammedBackend;
pub use ops::ProgrammedFrontend;
pub use ops::ReadBackError;
pub use ops::WriteFailure;
pub(crate) use ops::{BackendId, FrontendWrite, NO_BACKEND, RevNatId, RevNatWrite, SlotWrite};
