//! The sync loop's core: source changes in, plans out to a [`crate::pipeline::plan::PlanSink`].

pub mod proxier;
pub mod repair;
pub(crate) mod report;
