//! Garbage collection of the tc path's conntrack maps. The LRU evicts only under pressure, so
//! dead flows are removed here with the same expiry arithmetic the programs use; `dump` and
//! the fill metric then show live flows only.

use std::{path::Path, sync::Arc, time::Duration};

use aya::{
    Pod,
    maps::{HashMap, MapData},
};
use nix::time::{ClockId, clock_gettime};
use proxy_common::{
    conntrack,
    maps::{self as names, AddrV4, AddrV6, CtKey, CtValue, NodeConfig, ct_flags},
};

use crate::{
    datapath::maps::{OpenError, typed},
    telemetry::metrics::Metrics,
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
    fn gc_period(&self) -> Duration {
        Duration::from_secs(u64::from(self.config.ct_udp_timeout_s).clamp(1, 30))
    }

    /// Collects dead entries forever.
    pub(crate) async fn collect_forever(mut self, metrics: Arc<Metrics>) {
        let mut interval = tokio::time::interval(self.gc_period());
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let collected = self.collect();
            metrics.conntrack_collected.inc_by(collected as u64);
            if collected > 0 {
                tracing::debug!(collected, "removed expired conntrack entries");
            }
        }
    }
}

fn collect<A: Copy + Ord>(map: &mut CtMap<A>, config: &NodeConfig, now: u64) -> usize
where
    CtKey<A>: Pod + PartialEq,
    CtValue<A>: Pod,
{
    let mut dead = Vec::new();
    for (key, value) in map.iter().filter_map(Result::ok) {
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
    dead.iter().filter(|k| map.remove(k).is_ok()).count()
}
