//! What a plan asks of the datapath: the map operations the writer applies and the state the
//! reader hands back after a restart. The contract between the planner and `datapath/`.
//!
//! The writer applies the phases of a [`Plan`] in field order:
//! 1. new and changed backends;
//! 2. reverse-NAT entries;
//! 3. backend slots, new source ranges and new or changed Maglev tables;
//! 4. frontend entries (the slot count last, so a grown Service is complete before it shows;
//!    the source-ranges flag only once its ranges are there);
//! 5. frontend deletions, then source ranges no longer wanted;
//! 6. slot deletions beyond the new count;
//! 7. reverse-NAT and Maglev table deletions;
//! 8. backends no longer referenced.

use std::{fmt, net::IpAddr};

use foldhash::HashMap;
use ipnet::IpNet;

use crate::pipeline::model::{BackendKey, BackendState, FrontendKey};

pub(crate) type BackendId = u32;
pub(crate) type RevNatId = u32;

/// No backend has id 0 (see `ids`): a slot the maps lack reads back as this id.
pub(crate) const NO_BACKEND: BackendId = 0;

/// The datapath stores at most this many backend slots per frontend (slot numbers are u16).
pub(crate) const MAX_SLOTS: usize = u16::MAX as usize;

/// Where plans go: the BPF map writer in the agent, a recorder in tests. `Send`: a large sync
/// writes from a second thread while it plans.
pub trait PlanSink: Send {
    /// Applies `plan` in its phase order, going on past a failed operation; returns each
    /// operation that failed.
    fn apply(&mut self, plan: &Plan) -> Vec<WriteFailure>;

    /// What the datapath holds now, for the repair pass to compare with what it should hold.
    fn read_back(&mut self) -> Result<Programmed, ReadBackError>;
}

/// One map operation of a plan, named for logs and repair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    UpsertBackend(BackendId, BackendKey),
    UpsertRevNat(RevNatId, FrontendKey),
    UpsertSlot(FrontendKey, u16),
    UpsertSourceRange(RevNatId, IpNet),
    UpsertMaglev(RevNatId, FrontendKey),
    UpsertFrontend(FrontendKey),
    DeleteFrontend(FrontendKey),
    DeleteSourceRange(RevNatId, IpNet),
    DeleteSlot(FrontendKey, u16),
    DeleteRevNat(RevNatId, FrontendKey),
    DeleteMaglev(RevNatId, FrontendKey),
    DeleteBackend(BackendId, BackendKey),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::UpsertBackend(id, key) => write!(f, "write backend {id} ({key})"),
            Op::UpsertRevNat(id, frontend) => write!(f, "write rev-NAT {id} ({frontend})"),
            Op::UpsertSlot(frontend, slot) => write!(f, "write frontend {frontend} slot {slot}"),
            Op::UpsertSourceRange(id, net) => write!(f, "write source range {net} of rev-NAT {id}"),
            Op::UpsertMaglev(id, frontend) => write!(f, "write Maglev table {id} ({frontend})"),
            Op::UpsertFrontend(frontend) => write!(f, "write frontend {frontend}"),
            Op::DeleteFrontend(frontend) => write!(f, "delete frontend {frontend}"),
            Op::DeleteSourceRange(id, net) => write!(f, "delete source range {net} of rev-NAT {id}"),
            Op::DeleteSlot(frontend, slot) => write!(f, "delete frontend {frontend} slot {slot}"),
            Op::DeleteRevNat(id, frontend) => write!(f, "delete rev-NAT {id} ({frontend})"),
            Op::DeleteMaglev(id, frontend) => write!(f, "delete Maglev table {id} ({frontend})"),
            Op::DeleteBackend(id, key) => write!(f, "delete backend {id} ({key})"),
        }
    }
}

/// A map operation the datapath refused; the rest of its plan was still applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{op}: {reason}")]
pub struct WriteFailure {
    pub op: Op,
    pub reason: String,
}

/// The datapath's contents could not be read back.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("reading the datapath back: {0}")]
pub struct ReadBackError(pub String);

/// Which Service port a frontend belongs to, as stored for tools beside the rev-NAT entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Label {
    /// `namespace/name`.
    pub service: String,
    pub port: String,
}

/// What the datapath holds for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgrammedFrontend {
    pub rev_nat_id: RevNatId,
    /// `slots[i]` is the backend in slot `i + 1`.
    pub slots: Vec<BackendId>,
    pub affinity_timeout: Option<u32>,
    /// `Frontend::flags` as written.
    pub flags: u32,
    /// Sorted.
    pub source_ranges: Vec<IpNet>,
    pub label: Label,
    /// Whether its Maglev table (keyed by `rev_nat_id`) is written.
    pub maglev: bool,
}

/// What the datapath holds for one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgrammedBackend {
    pub id: BackendId,
    pub state: BackendState,
}

/// Datapath contents read back from pinned maps: adopted after a restart, compared with the
/// planner's state by the repair pass.
#[derive(Clone, Debug, Default)]
pub struct Programmed {
    pub frontends: HashMap<FrontendKey, ProgrammedFrontend>,
    pub backends: HashMap<BackendKey, ProgrammedBackend>,
    /// Reverse-NAT entries: the frontend address and port replies are rewritten to.
    pub rev_nats: HashMap<RevNatId, (IpAddr, u16)>,
    /// The ids of the Maglev tables the maps hold.
    pub maglev_tables: Vec<RevNatId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RevNatWrite {
    pub id: RevNatId,
    pub frontend: FrontendKey,
    pub label: Label,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SlotWrite {
    pub frontend: FrontendKey,
    pub slot: u16,
    pub backend_id: BackendId,
    pub rev_nat_id: RevNatId,
}

/// A frontend's Maglev table, to be built from its backends (in slot order; the table itself
/// does not depend on their order) and written under its rev-NAT id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MaglevWrite {
    pub rev_nat_id: RevNatId,
    pub frontend: FrontendKey,
    pub backends: Vec<(BackendId, BackendKey)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FrontendWrite {
    pub frontend: FrontendKey,
    pub count: u16,
    pub rev_nat_id: RevNatId,
    pub affinity_timeout: Option<u32>,
    pub flags: u32,
}

/// A UDP backend that stopped serving a frontend. Connected UDP sockets that a client opened
/// through the frontend stay pinned to the backend's address; once the maps no longer send new
/// traffic there, those sockets are ended so the client opens a new one (see
/// `datapath::sockets`). TCP is left alone, as kube-proxy leaves established TCP flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Departure {
    pub rev_nat_id: RevNatId,
    pub backend: BackendKey,
}

/// Ordered map operations. Fields are phases, applied top to bottom; `departed` is acted on
/// last, once no map entry leads to those backends any more.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub(crate) upsert_backends: Vec<(BackendId, BackendKey, BackendState)>,
    pub(crate) upsert_rev_nats: Vec<RevNatWrite>,
    pub(crate) upsert_slots: Vec<SlotWrite>,
    pub(crate) upsert_source_ranges: Vec<(RevNatId, IpNet)>,
    pub(crate) upsert_maglev: Vec<MaglevWrite>,
    pub(crate) upsert_frontends: Vec<FrontendWrite>,
    pub(crate) delete_frontends: Vec<FrontendKey>,
    pub(crate) delete_source_ranges: Vec<(RevNatId, IpNet)>,
    pub(crate) delete_slots: Vec<(FrontendKey, u16)>,
    pub(crate) delete_rev_nats: Vec<(RevNatId, FrontendKey)>,
    pub(crate) delete_maglev: Vec<(RevNatId, FrontendKey)>,
    pub(crate) delete_backends: Vec<(BackendId, BackendKey)>,
    pub departed: Vec<Departure>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.op_count() == 0
    }

    pub(crate) fn op_count(&self) -> usize {
        self.upsert_backends.len()
            + self.upsert_rev_nats.len()
            + self.upsert_slots.len()
            + self.upsert_source_ranges.len()
            + self.upsert_maglev.len()
            + self.upsert_frontends.len()
            + self.delete_frontends.len()
            + self.delete_source_ranges.len()
            + self.delete_slots.len()
            + self.delete_rev_nats.len()
            + self.delete_maglev.len()
            + self.delete_backends.len()
    }

    /// Every map operation, in phase order (the writer goes through the phases once per family).
    pub fn ops(&self) -> impl Iterator<Item = Op> + '_ {
        let backends = self
            .upsert_backends
            .iter()
            .map(|(id, key, _)| Op::UpsertBackend(*id, *key));
        let rev_nats = self
            .upsert_rev_nats
            .iter()
            .map(|w| Op::UpsertRevNat(w.id, w.frontend));
        let slots = self
            .upsert_slots
            .iter()
            .map(|w| Op::UpsertSlot(w.frontend, w.slot));
        let ranges = self
            .upsert_source_ranges
            .iter()
            .map(|(id, net)| Op::UpsertSourceRange(*id, *net));
        let tables = self
            .upsert_maglev
            .iter()
            .map(|w| Op::UpsertMaglev(w.rev_nat_id, w.frontend));
        let frontends = self
            .upsert_frontends
            .iter()
            .map(|w| Op::UpsertFrontend(w.frontend));
        let gone_frontends = self.delete_frontends.iter().map(|k| Op::DeleteFrontend(*k));
        let gone_ranges = self
            .delete_source_ranges
            .iter()
            .map(|(id, net)| Op::DeleteSourceRange(*id, *net));
        let gone_slots = self
            .delete_slots
            .iter()
            .map(|(k, slot)| Op::DeleteSlot(*k, *slot));
        let gone_rev_nats = self
            .delete_rev_nats
            .iter()
            .map(|(id, k)| Op::DeleteRevNat(*id, *k));
        let gone_tables = self.delete_maglev.iter().map(|(id, k)| Op::DeleteMaglev(*id, *k));
        let gone_backends = self
            .delete_backends
            .iter()
            .map(|(id, key)| Op::DeleteBackend(*id, *key));
        backends
            .chain(rev_nats)
            .chain(slots)
            .chain(ranges)
            .chain(tables)
            .chain(frontends)
            .chain(gone_frontends)
            .chain(gone_ranges)
            .chain(gone_slots)
            .chain(gone_rev_nats)
            .chain(gone_tables)
            .chain(gone_backends)
    }

    pub fn extend(&mut self, other: Plan) {
        self.upsert_backends.extend(other.upsert_backends);
        self.upsert_rev_nats.extend(other.upsert_rev_nats);
        self.upsert_slots.extend(other.upsert_slots);
        self.upsert_source_ranges.extend(other.upsert_source_ranges);
        self.upsert_maglev.extend(other.upsert_maglev);
        self.upsert_frontends.extend(other.upsert_frontends);
        self.delete_frontends.extend(other.delete_frontends);
        self.delete_source_ranges.extend(other.delete_source_ranges);
        self.delete_slots.extend(other.delete_slots);
        self.delete_rev_nats.extend(other.delete_rev_nats);
        self.delete_maglev.extend(other.delete_maglev);
        self.delete_backends.extend(other.delete_backends);
        self.departed.extend(other.departed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::model::Protocol;

    #[test]
    fn departures_are_not_map_operations_but_travel_with_the_plan() {
        let frontend = FrontendKey::new("10.96.0.10".parse().unwrap(), 53, Protocol::Udp);
        let backend = BackendKey {
            addr: "10.0.0.1".parse().unwrap(),
            port: 53,
            protocol: Protocol::Udp,
        };
        let mut plan = Plan {
            delete_frontends: vec![frontend],
            ..Plan::default()
        };
        plan.extend(Plan {
            delete_backends: vec![(1, backend)],
            departed: vec![Departure {
                rev_nat_id: 1,
                backend,
            }],
            ..Plan::default()
        });
        assert_eq!(plan.op_count(), 2);
        assert_eq!(plan.departed.len(), 1);
        assert!(!plan.is_empty());
        assert!(
            Plan {
                departed: plan.departed,
                ..Plan::default()
            }
            .is_empty(),
            "departures alone write nothing"
        );
    }
}
