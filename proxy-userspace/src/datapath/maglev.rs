//! Maglev tables in the maps: each built from a frontend's backends, written into an inner
//! array map of its own and put into the hash of maps of the configured table size under the
//! frontend's rev-NAT id. Replacing the inner map swaps a whole table in one update, so a new
//! flow never sees half of an old table and half of a new one.

use std::{net::IpAddr, os::fd::AsFd as _, path::Path};

use aya::{
    maps::{HashOfMaps, MapData, MapError},
    sys::SyscallError,
};
use aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY;
use proxy_common::{
    maglev::{self, Member},
    maps::{self as names, NodeConfig},
};

use crate::{
    datapath::{
        maps::{OpenError, typed},
        sys,
    },
    pipeline::{
        model::BackendKey,
        plan::{BackendId, RevNatId},
    },
};

/// The name each inner table map gets (bpftool shows it).
const TABLE_NAME: &str = "bkp_maglev_tbl";

/// The Maglev tables of the size the node settings name, with the seed to build them with.
pub(crate) struct MaglevTables {
    tables: HashOfMaps<MapData, u32>,
    size: u32,
    seed: u32,
}

impl MaglevTables {
    /// The tables the programs read under `config` (the settings the agent wrote to the node
    /// map); those of the default size when it names none, as before an agent first
    /// configured the pins (the programs then use none).
    pub(crate) fn open(dir: &Path, config: &NodeConfig) -> Result<Self, OpenError> {
        let index = maglev::TABLE_SIZES
            .iter()
            .position(|s| *s == config.maglev_table_size)
            .unwrap_or(0);
        Ok(Self {
            tables: typed(dir, names::MAGLEV[index])?,
            size: maglev::TABLE_SIZES[index],
            seed: config.maglev_seed,
        })
    }

    /// Builds the table of `backends` and puts it under `id`, replacing the one there. When
    /// that fails the old table is removed too: a table is either current or absent, so the
    /// repair pass, which checks only that tables are there, writes it again (meanwhile the
    /// programs draw at random).
    pub(crate) fn write(
        &mut self,
        id: RevNatId,
        backends: &[(BackendId, BackendKey)],
    ) -> Result<(), MapError> {
        let written = self.replace(id, backends);
        if written.is_err() {
            let _ = self.remove(id);
        }
        written
    }

    fn replace(&mut self, id: RevNatId, backends: &[(BackendId, BackendKey)]) -> Result<(), MapError> {
        let members: Vec<Member> = backends.iter().map(|(_, key)| member(key)).collect();
        let table: Vec<BackendId> = maglev::build(&members, self.size, self.seed)
            .into_iter()
            .map(|i| backends[i as usize].0)
            .collect();
        if table.is_empty() {
            return self.remove(id);
        }
        let inner = MapData::create(
            aya_obj::Map::new_from_params(BPF_MAP_TYPE_ARRAY as u32, 4, self.size * 4, 1, 0),
            TABLE_NAME,
            None,
        )?;
        // SAFETY: the inner map was just made with 4-byte keys and values of `size` u32s,
        // which is what `table` holds.
        unsafe { sys::update_elem(inner.fd().as_fd(), &0u32, &table) }.map_err(|io_error| {
            MapError::SyscallError(SyscallError {
                call: "bpf_map_update_elem",
                io_error,
            })
        })?;
        self.tables.insert(id, &inner, 0)
    }

    pub(crate) fn remove(&mut self, id: RevNatId) -> Result<(), MapError> {
        self.tables.remove(&id)
    }

    /// The ids of every table held.
    pub(crate) fn ids(&self) -> Result<Vec<RevNatId>, MapError> {
        self.tables.keys().collect()
    }
}

/// A backend as every node names it in the table: its address and port, weight 1 (Kubernetes
/// endpoints carry no weight).
fn member(key: &BackendKey) -> Member {
    let mut name = [0u32; 5];
    match key.addr {
        IpAddr::V4(a) => name[0] = u32::from_ne_bytes(a.octets()),
        IpAddr::V6(a) => {
            for (word, bytes) in name.iter_mut().zip(a.octets().chunks_exact(4)) {
                *word = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            }
        }
    }
    name[4] = u32::from(key.port);
    Member { name, weight: 1 }
}
