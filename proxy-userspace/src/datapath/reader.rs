//! Reads the pinned maps back into model terms: for `list`, and for adopting the datapath's
//! state when the agent restarts.

use std::{net::IpAddr, os::fd::AsFd as _};

// A restarted agent reads every map here before it can serve: foldhash, not SipHash.
use foldhash::{HashMap, HashSet};

use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, IterableMap as _, LpmTrie, MapData, MapError},
};
use ipnet::IpNet;
use proxy_common::maps::{Backend, RevNat, ServiceKey, ServiceLabel, SourceRange, backend_flags, svc_flags};
use serde::Serialize;

use crate::{
    datapath::{
        maps::{FamilyAddr, FamilyMaps, PinnedMaps},
        sys,
    },
    pipeline::model::{BackendKey, BackendState, FrontendKey, Protocol, Scope},
    pipeline::plan::{
        BackendId, Label, NO_BACKEND, Programmed, ProgrammedBackend, ProgrammedFrontend, RevNatId,
    },
};

#[derive(Debug, thiserror::Error)]
#[error("reading map {map}: {source}")]
pub struct ReadError {
    map: &'static str,
    source: MapError,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BackendView {
    pub id: BackendId,
    /// `None` when the slot names a backend id that is not in the backends map.
    pub addr: Option<BackendKey>,
    pub terminating: bool,
    pub local: bool,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FrontendView {
    pub frontend: FrontendKey,
    pub service: String,
    pub port_name: String,
    pub rev_nat_id: RevNatId,
    pub affinity_timeout: Option<u32>,
    /// Datapath flags other than affinity (kind, externalTrafficPolicy Local, source ranges).
    pub flags: u32,
    pub source_ranges: Vec<IpNet>,
    /// Backends in slot order (slot 1 first).
    pub backends: Vec<BackendView>,
    /// Slots the frontend's count promises but the map lacks.
    pub missing_slots: Vec<u16>,
    /// Whether a Maglev table is held under its rev-NAT id.
    pub maglev: bool,
}

impl FrontendView {
    /// The backend id in each slot the count promises, [`NO_BACKEND`] where the map lacks the
    /// slot: the count stays the entry's, so the repair pass rewrites the slot and, when the
    /// wanted count differs, the entry (read back as no slots at all, a gap at a wanted count
    /// of 0 looked right and stayed), and a restarted planner knows where the gap is.
    fn slot_ids(&self) -> Vec<BackendId> {
        let count = self.backends.len() + self.missing_slots.len();
        let mut present = self.backends.iter();
        (1..=count as u16)
            .map(|slot| {
                if self.missing_slots.contains(&slot) {
                    NO_BACKEND
                } else {
                    present.next().map_or(NO_BACKEND, |b| b.id)
                }
            })
            .collect()
    }
}

/// Everything the pinned service maps hold, both families.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Snapshot {
    pub frontends: Vec<FrontendView>,
    /// Backends no frontend slot names (left behind, or mid-update).
    pub orphan_backends: Vec<BackendView>,
    /// The ids of the Maglev tables held (of the table size in use).
    pub maglev_tables: Vec<RevNatId>,
}

impl Snapshot {
    pub fn read(maps: &PinnedMaps) -> Result<Self, ReadError> {
        let labels = read_all(&maps.labels, proxy_common::maps::SERVICE_LABELS)?;
        let mut ranges: HashMap<RevNatId, Vec<IpNet>> = HashMap::default();
        read_ranges(&maps.source_ranges_v4, &mut ranges)?;
        read_ranges(&maps.source_ranges_v6, &mut ranges)?;
        let mut snapshot = Snapshot {
            maglev_tables: maps.maglev.ids().map_err(|source| ReadError {
                map: "bkp_maglev_*",
                source,
            })?,
            ..Snapshot::default()
        };
        read_family(&maps.v4, &labels, &ranges, &mut snapshot)?;
        read_family(&maps.v6, &labels, &ranges, &mut snapshot)?;
        let tables: HashSet<RevNatId> = snapshot.maglev_tables.iter().copied().collect();
        for fe in &mut snapshot.frontends {
            fe.maglev = tables.contains(&fe.rev_nat_id);
        }
        snapshot
            .frontends
            .sort_by(|a, b| (&a.service, &a.frontend).cmp(&(&b.service, &b.frontend)));
        Ok(snapshot)
    }

    /// The state a restarted agent adopts.
    pub fn programmed(&self) -> Programmed {
        let mut programmed = Programmed::default();
        for fe in &self.frontends {
            for b in &fe.backends {
                if let Some(key) = b.addr {
                    programmed.backends.insert(
                        key,
                        ProgrammedBackend {
                            id: b.id,
                            state: BackendState {
                                terminating: b.terminating,
                                local: b.local,
                            },
                        },
                    );
                }
            }
            programmed.frontends.insert(
                fe.frontend,
                ProgrammedFrontend {
                    rev_nat_id: fe.rev_nat_id,
                    slots: fe.slot_ids(),
                    affinity_timeout: fe.affinity_timeout,
                    flags: fe.flags,
                    source_ranges: fe.source_ranges.clone(),
                    label: Label {
                        service: fe.service.clone(),
                        port: fe.port_name.clone(),
                    },
                    maglev: fe.maglev,
                },
            );
        }
        for b in &self.orphan_backends {
            if let Some(key) = b.addr {
                programmed.backends.insert(
                    key,
                    ProgrammedBackend {
                        id: b.id,
                        state: BackendState {
                            terminating: b.terminating,
                            local: b.local,
                        },
                    },
                );
            }
        }
        programmed.maglev_tables.clone_from(&self.maglev_tables);
        programmed
    }
}

/// What the maps hold, as the planner sees it, reverse-NAT entries included.
pub fn read_programmed(maps: &PinnedMaps) -> Result<Programmed, ReadError> {
    let mut programmed = Snapshot::read(maps)?.programmed();
    read_rev_nats(&maps.v4, &mut programmed.rev_nats)?;
    read_rev_nats(&maps.v6, &mut programmed.rev_nats)?;
    Ok(programmed)
}

fn read_rev_nats<A: FamilyAddr + Eq + std::hash::Hash>(
    maps: &FamilyMaps<A>,
    out: &mut foldhash::HashMap<RevNatId, (IpAddr, u16)>,
) -> Result<(), ReadError>
where
    ServiceKey<A>: Pod,
    Backend<A>: Pod,
    RevNat<A>: Pod,
{
    for (id, rev_nat) in read_all(&maps.rev_nat, A::REV_NAT)? {
        out.insert(id, (rev_nat.addr.to_ip(), rev_nat.port));
    }
    Ok(())
}

fn read_all<K: Pod + Eq + std::hash::Hash, V: Pod>(
    map: &BpfHashMap<MapData, K, V>,
    name: &'static str,
) -> Result<HashMap<K, V>, ReadError> {
    // In chunks where the kernel can (64 syscalls for a full map instead of two per entry),
    // since the repair pass reads every map on every sync period.
    match sys::lookup_all::<K, V>(map.map().fd().as_fd()) {
        Ok(Some(entries)) => return Ok(entries.into_iter().collect()),
        Ok(None) => {}
        Err(io_error) => {
            return Err(ReadError {
                map: name,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "BPF_MAP_LOOKUP_BATCH",
                    io_error,
                }),
            });
        }
    }
    map.iter()
        .collect::<Result<HashMap<K, V>, MapError>>()
        .map_err(|source| ReadError { map: name, source })
}

/// Adds one family's source ranges to `out`, by frontend.
fn read_ranges<A: FamilyAddr>(
    map: &LpmTrie<MapData, SourceRange<A>, u32>,
    out: &mut HashMap<RevNatId, Vec<IpNet>>,
) -> Result<(), ReadError>
where
    ServiceKey<A>: Pod,
    Backend<A>: Pod,
    RevNat<A>: Pod,
    SourceRange<A>: Pod,
{
    for entry in map {
        let (key, _) = entry.map_err(|source| ReadError {
            map: A::SOURCE_RANGES,
            source,
        })?;
        let SourceRange { rev_nat_id_be, addr } = key.data();
        let prefix = key.prefix_len().saturating_sub(32) as u8;
        if let Ok(net) = IpNet::new(addr.to_ip(), prefix) {
            out.entry(u32::from_be(rev_nat_id_be)).or_default().push(net);
        }
    }
    Ok(())
}

fn read_family<A: FamilyAddr + Eq + std::hash::Hash>(
    maps: &FamilyMaps<A>,
    labels: &HashMap<u32, ServiceLabel>,
    ranges: &HashMap<RevNatId, Vec<IpNet>>,
    out: &mut Snapshot,
) -> Result<(), ReadError>
where
    ServiceKey<A>: Pod,
    Backend<A>: Pod,
    RevNat<A>: Pod,
{
    let services = read_all(&maps.services, A::SERVICES)?;
    let backends = read_all(&maps.backends, A::BACKENDS)?;
    let backend_view = |id: u32| {
        let b = backends.get(&id);
        BackendView {
            id,
            addr: b.and_then(|b| {
                Some(BackendKey {
                    addr: b.addr.to_ip(),
                    port: b.port,
                    protocol: Protocol::from_number(b.proto)?,
                })
            }),
            terminating: b.is_some_and(|b| b.flags & backend_flags::TERMINATING != 0),
            local: b.is_some_and(|b| b.flags & backend_flags::LOCAL != 0),
        }
    };

    // Group slot entries under their frontend (slot 0).
    let mut slots: HashMap<(ServiceKey<A>, u16), u32> = HashMap::default();
    let mut referenced = HashSet::default();
    for (key, value) in &services {
        if key.slot != 0 {
            slots.insert((key.with_slot(0), key.slot), value.backend_id);
            referenced.insert(value.backend_id);
        }
    }
    for (key, value) in &services {
        if key.slot != 0 {
            continue;
        }
        let (Some(protocol), Some(scope)) = (Protocol::from_number(key.proto), Scope::from_number(key.scope))
        else {
            continue;
        };
        let mut views = Vec::new();
        let mut missing = Vec::new();
        for slot in 1..=value.count as u16 {
            match slots.get(&(*key, slot)) {
                Some(id) => views.push(backend_view(*id)),
                None => missing.push(slot),
            }
        }
        let label = labels.get(&value.rev_nat_id);
        out.frontends.push(FrontendView {
            frontend: FrontendKey {
                addr: key.addr.to_ip(),
                port: key.port,
                protocol,
                scope,
            },
            service: label
                .map(|l| proxy_common::maps::nul_padded_text(&l.service).to_string())
                .unwrap_or_default(),
            port_name: label
                .map(|l| proxy_common::maps::nul_padded_text(&l.port).to_string())
                .unwrap_or_default(),
            rev_nat_id: value.rev_nat_id,
            affinity_timeout: (value.flags & svc_flags::AFFINITY != 0).then_some(value.affinity_timeout_s),
            flags: value.flags & !svc_flags::AFFINITY,
            source_ranges: {
                let mut r = ranges.get(&value.rev_nat_id).cloned().unwrap_or_default();
                r.sort();
                r
            },
            backends: views,
            missing_slots: missing,
            // Set once every family is read, from the table ids.
            maglev: false,
        });
    }
    out.orphan_backends.extend(
        backends
            .keys()
            .filter(|id| !referenced.contains(*id))
            .map(|id| backend_view(*id)),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_slot_reads_back_as_no_backend_in_its_place_and_keeps_the_count() {
        let backend = |id| BackendView {
            id,
            addr: None,
            terminating: false,
            local: false,
        };
        let view = FrontendView {
            frontend: FrontendKey::new("10.96.0.10".parse().unwrap(), 80, Protocol::Tcp),
            service: "ns/web".into(),
            port_name: "http".into(),
            rev_nat_id: 1,
            affinity_timeout: None,
            flags: 0,
            source_ranges: Vec::new(),
            backends: vec![backend(7), backend(9)],
            missing_slots: vec![2],
            maglev: false,
        };
        assert_eq!(view.slot_ids(), [7, NO_BACKEND, 9]);
        let whole = FrontendView {
            missing_slots: Vec::new(),
            ..view
        };
        assert_eq!(whole.slot_ids(), [7, 9]);
    }
}
