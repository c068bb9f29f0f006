//! Garbage collection of the tc path's conntrack maps. The LRU evicts only under pressure, so
//! dead flows are removed here with the same expiry arithmetic the programs use; `dump` and
//! the fill metric then show live flows only.

use std::{os::fd::AsFd as _, path::Path, time::Duration};

use aya::{
    Pod,
    maps::{HashMap, IterableMap as _, MapData},
};
use nix::time::{ClockId, clock_gettime};
use proxy_common::{
    conntrack,
    maps::{self as names, AddrV4, AddrV6, CtKey, CtValue, NodeConfig, ct_flags},
};

use crate::datapath::{
    maps::{OpenError, typed},
    sys,
};

type CtMap<A> = HashMap<MapData, CtKey<A>, CtValue<A>>;

pub struct Conntrack {
    v4: CtMap<AddrV4>,
    v6: CtMap<AddrV6>,
    config: NodeConfig,
}

impl Conntrack {
    pub fn open(pin_dir: &Path, config: NodeConfig) -> Result<Self, OpenError> {
        Ok(Self {
            v4: typed(pin_dir, names::CONNTRACK_V4)?,
            v6: typed(pin_dir, names::CONNTRACK_V6)?,
            config,
        })
    }

    /// Deletes expired entries (and, for a closed TCP flow, its other direction too) of both
    /// families; returns how many entries went.
    pub fn collect(&mut self) -> usize {
        // bpf_ktime_get_ns is CLOCK_MONOTONIC.
        let Ok(now) = clock_gettime(ClockId::CLOCK_MONOTONIC) else {
            return 0;
        };
        let now = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
        collect(&mut self.v4, &self.config, now) + collect(&mut self.v6, &self.config, now)
    }

    /// How often dead entries are collected: often enough that a UDP flow is gone soon after
    /// its timeout, rarely enough to cost nothing.
    pub(crate) fn gc_period(&self) -> Duration {
        Duration::from_secs(u64::from(self.config.ct_udp_timeout_s).clamp(1, 30))
    }
}

fn collect<A: Copy + Ord>(map: &mut CtMap<A>, config: &NodeConfig, now: u64) -> usize
where
    CtKey<A>: Pod + PartialEq,
    CtValue<A>: Pod,
{
    let fd = map.map().fd().as_fd();
    let entries = match sys::lookup_all::<CtKey<A>, CtValue<A>>(fd) {
        Ok(Some(entries)) => entries,
        // A kernel without batch lookups: key by key.
        Ok(None) => map.iter().filter_map(Result::ok).collect(),
        Err(e) => {
            tracing::warn!("reading conntrack for garbage collection: {e}");
            return 0;
        }
    };
    let mut dead = Vec::new();
    for (key, value) in entries {
        let lifetime = conntrack::lifetime_s(key.proto, value.flags, config);
        if conntrack::expired(now, value.last_seen_ns, lifetime) {
            dead.push(key);
            if value.flags & ct_flags::CLOSING != 0 {
                dead.push(value.reverse_key(key.proto));
            }
        }
    }
    dead.sort_unstable_by_key(|k| (k.saddr, k.daddr, k.sport, k.dport, k.proto));
    dead.dedup();
    // SAFETY: the keys are `CtKey<A>`, this map's key type.
    match unsafe { sys::delete_batch(fd, &dead) } {
        Ok(deleted) => deleted,
        // A kernel without batch deletes: one by one.
        Err(_) => dead.iter().filter(|k| map.remove(k).is_ok()).count(),
    }
}
