//! The map capacities the agent loads the datapath with, and grows to.
//!
//! - The LRU maps the programs fill (conntrack, socket reverse, affinity) take
//!   `--map-dynamic-size-ratio` of the node's memory (Cilium's `--bpf-map-dynamic-size-ratio`),
//!   split by [`proxy_common::sizing::lru_sizes`]; they are preallocated, so that is what they
//!   cost from the start.
//! - The maps the agent writes (services, backends, reverse NAT) are not preallocated: they
//!   start at [`WRITTEN_MIN`](proxy_common::sizing::WRITTEN_MIN) entries (or the capacity they
//!   are pinned with) and grow when a sync needs more.
//!
//! A `--map-size-*` flag (or the config file's `bpfKubeProxy.mapSize`) fixes that map's
//! capacity: the ratio does not apply to it, and it never grows.

use std::{mem::size_of, path::Path};

use proxy_common::{
    maps::{
        self as names, AddrV4, AddrV6, AffinityKey, AffinityValue, CtKey, CtValue, SockRevKey, SockRevValue,
    },
    sizing::{self, LruElems, WRITTEN_MIN},
};

use crate::{
    datapath::{loader::MapSizes, sys},
    pipeline::plan::{Capacity, Usage},
};

/// Capacities set by flag or config file; `None`: chosen by the agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FixedSizes {
    pub services: Option<u32>,
    pub backends: Option<u32>,
    pub rev_nat: Option<u32>,
    pub sock_rev: Option<u32>,
    pub affinity: Option<u32>,
    pub conntrack: Option<u32>,
}

/// How the agent sizes its maps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MapSizing {
    /// Share of the node's memory the LRU maps may take.
    pub ratio: f64,
    /// The node's memory the ratio applies to; `None`: MemTotal of /proc/meminfo.
    pub node_memory: Option<u64>,
    pub fixed: FixedSizes,
}

impl Default for MapSizing {
    fn default() -> Self {
        Self {
            ratio: sizing::DEFAULT_RATIO,
            node_memory: None,
            fixed: FixedSizes::default(),
        }
    }
}

/// Which of the maps the agent writes may grow (those no flag fixed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Growable {
    pub services: bool,
    pub backends: bool,
    pub rev_nat: bool,
}

/// The element bytes of the LRU maps, from the types the programs store.
pub fn lru_elems() -> LruElems {
    LruElems {
        conntrack: [
            sizing::elem_bytes(size_of::<CtKey<AddrV4>>(), size_of::<CtValue<AddrV4>>()),
            sizing::elem_bytes(size_of::<CtKey<AddrV6>>(), size_of::<CtValue<AddrV6>>()),
        ],
        sock_rev: [
            sizing::elem_bytes(size_of::<SockRevKey<AddrV4>>(), size_of::<SockRevValue<AddrV4>>()),
            sizing::elem_bytes(size_of::<SockRevKey<AddrV6>>(), size_of::<SockRevValue<AddrV6>>()),
        ],
        affinity: [sizing::elem_bytes(
            size_of::<AffinityKey>(),
            size_of::<AffinityValue>(),
        )],
    }
}

impl MapSizing {
    /// The capacities to load with, on a node of `memory` bytes, given the capacity each
    /// written map is pinned with now (`pinned`, by map name).
    pub fn choose(&self, memory: u64, pinned: impl Fn(&'static str) -> Option<u32>) -> (MapSizes, Growable) {
        let lru = sizing::lru_sizes(memory, self.ratio, &lru_elems());
        let f = self.fixed;
        let written = |fixed: Option<u32>, maps: [&'static str; 2], min: u32| {
            fixed.unwrap_or_else(|| {
                let pinned = maps.iter().filter_map(|m| pinned(m)).max();
                sizing::start_capacity(pinned, min)
            })
        };
        let sizes = MapSizes {
            services: written(
                f.services,
                [names::SERVICES_V4, names::SERVICES_V6],
                WRITTEN_MIN.services,
            ),
            backends: written(
                f.backends,
                [names::BACKENDS_V4, names::BACKENDS_V6],
                WRITTEN_MIN.backends,
            ),
            rev_nat: written(
                f.rev_nat,
                [names::REV_NAT_V4, names::REV_NAT_V6],
                WRITTEN_MIN.rev_nat,
            ),
            sock_rev: f.sock_rev.unwrap_or(lru.sock_rev),
            affinity: f.affinity.unwrap_or(lru.affinity),
            conntrack: f.conntrack.unwrap_or(lru.conntrack),
            ..MapSizes::default()
        };
        let growable = Growable {
            services: f.services.is_none(),
            backends: f.backends.is_none(),
            rev_nat: f.rev_nat.is_none(),
        };
        (sizes, growable)
    }
}

/// The capacities after growing each growable written map that a sync needed more of
/// (`needed`); `None` when none needs to (or can) grow.
pub fn grown(sizes: MapSizes, growable: Growable, needed: Usage) -> Option<MapSizes> {
    let grow = |may: bool, current: u32, needed: u64| {
        may.then(|| sizing::grown_capacity(current, needed))
            .flatten()
            .unwrap_or(current)
    };
    let next = MapSizes {
        services: grow(growable.services, sizes.services, needed.services),
        backends: grow(growable.backends, sizes.backends, needed.backends),
        rev_nat: grow(growable.rev_nat, sizes.rev_nat, needed.rev_nat),
        ..sizes
    };
    (next != sizes).then_some(next)
}

/// What the planner weighs Services against.
pub fn capacity(sizes: MapSizes) -> Capacity {
    Capacity {
        services: sizes.services,
        backends: sizes.backends,
        rev_nat: sizes.rev_nat,
    }
}

/// The capacity `map` is pinned with under `pin_dir`, if it is.
pub fn pinned_capacity(pin_dir: &Path, map: &str) -> Option<u32> {
    sys::pinned_map_info(&pin_dir.join(map))
        .ok()
        .map(|i| i.max_entries)
}

/// The node's memory: MemTotal of /proc/meminfo, in bytes.
pub fn node_memory() -> std::io::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    parse_mem_total(&text)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no MemTotal in /proc/meminfo"))
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// Parses a memory size: bytes, or a number with Ki, Mi, Gi or Ti (powers of 1024).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |at| text.split_at(at));
    let shift = match unit.trim() {
        "" => 0,
        "Ki" => 10,
        "Mi" => 20,
        "Gi" => 30,
        "Ti" => 40,
        other => return Err(format!("{text:?}: unit {other:?} is not Ki, Mi, Gi or Ti")),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{text:?} is not a size in bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn lru_maps_follow_the_ratio_and_written_maps_start_small_unless_a_flag_fixes_them() {
        let (sizes, growable) = MapSizing::default().choose(24 * GIB, |_| None);
        let lru = sizing::lru_sizes(24 * GIB, sizing::DEFAULT_RATIO, &lru_elems());
        assert_eq!(
            (sizes.conntrack, sizes.sock_rev, sizes.affinity),
            (lru.conntrack, lru.sock_rev, lru.affinity)
        );
        assert_eq!(
            (sizes.services, sizes.backends, sizes.rev_nat),
            (WRITTEN_MIN.services, WRITTEN_MIN.backends, WRITTEN_MIN.rev_nat)
        );
        assert_eq!(
            growable,
            Growable {
                services: true,
                backends: true,
                rev_nat: true
            }
        );

        let doubled = MapSizing {
            ratio: 2.0 * sizing::DEFAULT_RATIO,
            ..MapSizing::default()
        };
        assert!(doubled.choose(24 * GIB, |_| None).0.conntrack > sizes.conntrack * 18 / 10);

        let fixed = MapSizing {
            fixed: FixedSizes {
                services: Some(6),
                conntrack: Some(1_000),
                ..FixedSizes::default()
            },
            ..MapSizing::default()
        };
        let (sizes, growable) = fixed.choose(24 * GIB, |_| Some(1 << 20));
        assert_eq!((sizes.services, sizes.conntrack), (6, 1_000), "flags win");
        assert!(!growable.services && growable.backends);
        assert_eq!(sizes.backends, 1 << 20, "a grown pinned map is kept");
    }

    #[test]
    fn only_growable_maps_that_were_short_grow() {
        let sizes = MapSizes {
            services: 16_384,
            backends: 16_384,
            rev_nat: 4_096,
            sock_rev: 1,
            affinity: 1,
            conntrack: 1,
            ..MapSizes::default()
        };
        let all = Growable {
            services: true,
            backends: true,
            rev_nat: true,
        };
        let fits = Usage {
            services: 16_384,
            backends: 10,
            rev_nat: 10,
        };
        assert_eq!(grown(sizes, all, fits), None);
        let short = Usage {
            services: 110_000,
            backends: 100_000,
            rev_nat: 10,
        };
        let next = grown(sizes, all, short).unwrap();
        assert_eq!(
            (next.services, next.backends, next.rev_nat),
            (262_144, 131_072, 4_096)
        );
        let fixed_services = Growable {
            services: false,
            ..all
        };
        let next = grown(sizes, fixed_services, short).unwrap();
        assert_eq!((next.services, next.backends), (16_384, 131_072));
    }

    #[test]
    fn memory_sizes_parse_from_meminfo_and_flags() {
        assert_eq!(
            parse_mem_total("MemTotal:       24683772 kB\nMemFree: 1 kB\n"),
            Some(24_683_772 * 1024)
        );
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_bytes("24Gi"), Ok(24 * GIB));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert!(parse_bytes("24GB").is_err());
        assert!(parse_bytes("x").is_err());
    }
}
