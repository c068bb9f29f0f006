//! The planner: desired frontends of a Service → the map operations that take the datapath
//! there. `ops` is the contract with the datapath (what the writer applies, what the reader
//! returns), `diff` the planner that produces it, `ids` its id allocator and `capacity` what
//! the maps can hold.

mod capacity;
mod diff;
#[cfg(test)]
mod fixtures;
mod ids;
mod ops;

pub use capacity::{Capacity, PlanIssue};
pub use diff::{Outcome, Planner};
pub use ops::{
    BackendId, Departure, FrontendWrite, Label, Plan, PlanSink, Programmed, ProgrammedBackend,
    ProgrammedFrontend, RevNatId, RevNatWrite, SlotWrite,
};
