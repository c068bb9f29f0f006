//! This node's side of Service traffic: which devices carry it from outside, which addresses serve NodePorts, and what the datapath is configured with for them.

pub(crate) mod devices;
pub mod external;
pub(crate) mod link_events;
pub(crate) mod nodeport;
pub(crate) mod reply_routes;
