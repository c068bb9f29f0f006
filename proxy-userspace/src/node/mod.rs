//! This node's side of Service traffic: which devices carry it from outside and which addresses serve NodePorts.

pub mod devices;
pub mod nodeport;
