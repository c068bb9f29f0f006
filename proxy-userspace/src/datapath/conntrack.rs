//! Garbage collection of the tc path's conntrack map. The LRU evicts only under pressure, so
//! dead flows are removed here with the same expiry arithmetic the programs use; `dump` and
//! the fill metric then show live flows only.

use std::path::Path;

use aya::maps::{HashMap, MapData};
use nix::time::{ClockId, clock_gettime};
use proxy_common::{
    conntrack,
    maps::{self as names, AddrV4, CtKey, CtValue, NodeConfig, ct_flags},
};

use crate::datapath::maps::{OpenError, typed};

pub struct Conntrack {
    map: HashMap<MapData, CtKey<AddrV4>, CtValue<AddrV4>>,
    config: NodeConfig,
}

impl Conntrack {
    pub fn open(pin_dir: &Path, config: NodeConfig) -> Result<Self, OpenError> {
        Ok(Self {
            map: typed(pin_dir, names::CONNTRACK_V4)?,
            config,
        })
    }

    /// Deletes expired entries (and, for a closed TCP flow, its other direction too); returns
    /// how many entries went.
    pub fn collect(&mut self) -> usize {
        // bpf_ktime_get_ns is CLOCK_MONOTONIC.
        let Ok(now) = clock_gettime(ClockId::CLOCK_MONOTONIC) else {
            return 0;
        };
        let now = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
        let mut dead = Vec::new();
        for (key, value) in self.map.iter().filter_map(Result::ok) {
            let lifetime = conntrack::lifetime_s(key.proto, value.flags, &self.config);
            if conntrack::expired(now, value.last_seen_ns, lifetime) {
                dead.push(key);
                if value.flags & ct_flags::CLOSING != 0 {
                    dead.push(value.reverse_key(key.proto));
                }
            }
        }
        dead.sort_unstable_by_key(|k| (k.saddr, k.daddr, k.sport, k.dport, k.proto));
        dead.dedup();
        dead.iter().filter(|k| self.map.remove(k).is_ok()).count()
    }
}
