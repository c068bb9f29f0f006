//! Typed handles on the pinned maps, generic over the address family so that the writer and
//! reader are written once for IPv4 and IPv6.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::{
    Pod,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError},
};
use proxy_common::maps::{
    self as names, AddrV4, AddrV6, Backend, NodeConfig, RevNat, ServiceKey, ServiceLabel, ServiceValue,
    SourceRange,
};

use crate::datapath::maglev::MaglevTables;

#[derive(Debug, thiserror::Error)]
#[error("opening pinned map {name} under {dir}: {source}")]
pub struct OpenError {
    name: &'static str,
    dir: String,
    source: MapError,
}

/// An address type of one family, with the names of that family's maps.
pub(crate) trait FamilyAddr: Copy + Send + Sync + 'static
where
    ServiceKey<Self>: Pod,
    Backend<Self>: Pod,
    RevNat<Self>: Pod,
{
    const SERVICES: &'static str;
    const BACKENDS: &'static str;
    const REV_NAT: &'static str;
    const SOURCE_RANGES: &'static str;

    fn from_ip(ip: IpAddr) -> Option<Self>;
    fn to_ip(self) -> IpAddr;
}

impl FamilyAddr for AddrV4 {
    const SERVICES: &'static str = names::SERVICES_V4;
    const BACKENDS: &'static str = names::BACKENDS_V4;
    const REV_NAT: &'static str = names::REV_NAT_V4;
    const SOURCE_RANGES: &'static str = names::SOURCE_RANGES_V4;

    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(a) => Some(a.octets()),
            IpAddr::V6(_) => None,
        }
    }

    fn to_ip(self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(self))
    }
}

impl FamilyAddr for AddrV6 {
    const SERVICES: &'static str = names::SERVICES_V6;
    const BACKENDS: &'static str = names::BACKENDS_V6;
    const REV_NAT: &'static str = names::REV_NAT_V6;
    const SOURCE_RANGES: &'static str = names::SOURCE_RANGES_V6;

    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(a) => Some(a.octets()),
            IpAddr::V4(_) => None,
        }
    }

    fn to_ip(self) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from(self))
    }
}

fn open(dir: &Path, name: &'static str) -> Result<Map, OpenError> {
    let err = |source| OpenError {
        name,
        dir: dir.display().to_string(),
        source,
    };
    let data = MapData::from_pin(dir.join(name)).map_err(err)?;
    // Both hash kinds and arrays are told apart by aya from the map's own info.
    Map::from_map_data(data).map_err(err)
}

/// Opens the pinned map `name` under `dir` as the typed handle `T`.
pub fn typed<T: TryFrom<Map, Error = MapError>>(dir: &Path, name: &'static str) -> Result<T, OpenError> {
    T::try_from(open(dir, name)?).map_err(|source| OpenError {
        name,
        dir: dir.display().to_string(),
        source,
    })
}

/// A second handle on a pinned map, for the commands aya does not wrap (batched updates).
pub(crate) fn raw(dir: &Path, name: &'static str) -> Result<MapData, OpenError> {
    MapData::from_pin(dir.join(name)).map_err(|source| OpenError {
        name,
        dir: dir.display().to_string(),
        source,
    })
}

/// Raw handles on one family's maps, for batched writes.
pub(crate) struct FamilyRaw {
    pub services: MapData,
    pub backends: MapData,
    pub rev_nat: MapData,
}

/// One family's service, backend and reverse-NAT maps.
pub(crate) struct FamilyMaps<A>
where
    A: FamilyAddr,
    ServiceKey<A>: Pod,
    Backend<A>: Pod,
    RevNat<A>: Pod,
{
    pub services: HashMap<MapData, ServiceKey<A>, ServiceValue>,
    pub backends: HashMap<MapData, u32, Backend<A>>,
    pub rev_nat: HashMap<MapData, u32, RevNat<A>>,
    pub(crate) raw: FamilyRaw,
}

impl<A> FamilyMaps<A>
where
    A: FamilyAddr,
    ServiceKey<A>: Pod,
    Backend<A>: Pod,
    RevNat<A>: Pod,
{
    pub fn open(dir: &Path) -> Result<Self, OpenError> {
        Ok(Self {
            services: typed(dir, A::SERVICES)?,
            backends: typed(dir, A::BACKENDS)?,
            rev_nat: typed(dir, A::REV_NAT)?,
            raw: FamilyRaw {
                services: raw(dir, A::SERVICES)?,
                backends: raw(dir, A::BACKENDS)?,
                rev_nat: raw(dir, A::REV_NAT)?,
            },
        })
    }
}

/// Every pinned map the agent writes or the CLI reads.
pub struct PinnedMaps {
    pub(crate) v4: FamilyMaps<AddrV4>,
    pub(crate) v6: FamilyMaps<AddrV6>,
    pub labels: HashMap<MapData, u32, ServiceLabel>,
    pub(crate) labels_raw: MapData,
    /// loadBalancerSourceRanges for the tc path, per family.
    pub(crate) source_ranges_v4: LpmTrie<MapData, SourceRange<AddrV4>, u32>,
    pub(crate) source_ranges_v6: LpmTrie<MapData, SourceRange<AddrV6>, u32>,
    /// The Maglev tables of the size the node settings name.
    pub(crate) maglev: MaglevTables,
}

impl PinnedMaps {
    /// Opens the maps; which Maglev tables are in use comes from the node settings, so the
    /// agent writes those first.
    pub fn open(dir: &Path) -> Result<Self, OpenError> {
        let node: Array<MapData, NodeConfig> = typed(dir, names::NODE)?;
        let config = node.get(&0, 0).map_err(|source| OpenError {
            name: names::NODE,
            dir: dir.display().to_string(),
            source,
        })?;
        Ok(Self {
            maglev: MaglevTables::open(dir, &config)?,
            v4: FamilyMaps::open(dir)?,
            v6: FamilyMaps::open(dir)?,
            labels: typed(dir, names::SERVICE_LABELS)?,
            labels_raw: raw(dir, names::SERVICE_LABELS)?,
            source_ranges_v4: typed(dir, names::SOURCE_RANGES_V4)?,
            source_ranges_v6: typed(dir, names::SOURCE_RANGES_V6)?,
        })
    }
}
