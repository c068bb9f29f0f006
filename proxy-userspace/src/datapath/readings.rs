//! The datapath's own figures for `/metrics`: the per-CPU decision counters, read at scrape
//! time (sixteen lookups), and how full each pinned map is and the kernel memory it takes,
//! counted by the map walker thread and only copied by a scrape (a count reads every entry:
//! 0.3 s with full conntrack tables).

use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::maps::{MapData, MapInfo, PerCpuArray};
use proxy_common::{counters::Counter, maps as names};

use crate::{
    datapath::{
        maps::{OpenError, typed},
        sys,
    },
    telemetry::metrics::{DatapathReadings, MapFill},
};

/// How full each map was at the map walker's last count, shared with the scrapes.
#[derive(Clone, Default)]
pub struct FillCache(Arc<Mutex<Vec<MapFill>>>);

impl FillCache {
    /// Counts every map of `pin_dir` now and keeps the result for the scrapes.
    /// Logs each map that became near full, or is no longer, since the last count.
    pub fn refresh(&self, pin_dir: &Path) {
        let fill = usage(pin_dir);
        let mut cached = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (was, now) in near_full_changes(&cached, &fill) {
            if now.near_full() {
                tracing::warn!(
                    map = now.map,
                    entries = now.entries,
                    capacity = now.capacity,
                    was = was.map_or(0, |w| w.entries),
                    "map is near full (90%): an LRU map evicts its oldest entries from here on; \
                     raise its size (--map-dynamic-size-ratio or --map-size-*)"
                );
            } else {
                tracing::info!(
                    map = now.map,
                    entries = now.entries,
                    capacity = now.capacity,
                    "map is no longer near full"
                );
            }
        }
        *cached = fill;
    }

    fn get(&self) -> Vec<MapFill> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The maps whose near-full state differs from the previous count (a map first counted near
/// full counts as a change), with their previous count.
fn near_full_changes<'a>(
    before: &'a [MapFill],
    now: &'a [MapFill],
) -> Vec<(Option<&'a MapFill>, &'a MapFill)> {
    now.iter()
        .filter_map(|n| {
            let was = before.iter().find(|b| b.map == n.map);
            (was.is_some_and(MapFill::near_full) != n.near_full()).then_some((was, n))
        })
        .collect()
}

/// Every pinned map's entries, capacity and kernel memory (reads every entry of every map:
/// for the map walker and the CLI, never a scrape).
pub fn usage(pin_dir: &Path) -> Vec<MapFill> {
    names::ALL.iter().filter_map(|m| count(pin_dir, m)).collect()
}

fn count(pin_dir: &Path, map: &'static str) -> Option<MapFill> {
    let info = MapInfo::from_pin(pin_dir.join(map)).ok()?;
    let capacity = u64::from(info.max_entries());
    // A per-CPU array always holds every index (and a batch read of it needs per-CPU values).
    // Socket-local storage has no keys to walk (and no capacity): its values are counted as
    // none, and its memory is the map's own (each value is charged to its socket).
    let entries = if map == names::COUNTERS {
        capacity
    } else if names::SOCKET_LOCAL.contains(&map) {
        0
    } else {
        sys::map_entries(&info).ok()?
    };
    let memory = info.fd().ok().and_then(|fd| sys::map_memory(fd.as_fd()).ok());
    Some(MapFill {
        map,
        entries,
        capacity,
        memory,
    })
}

pub struct PinnedReadings {
    counters: PerCpuArray<MapData, u64>,
    fill: FillCache,
    pin_dir: PathBuf,
}

impl PinnedReadings {
    pub fn open(pin_dir: &Path) -> Result<Self, OpenError> {
        Ok(Self {
            counters: typed(pin_dir, names::COUNTERS)?,
            fill: FillCache::default(),
            pin_dir: pin_dir.to_path_buf(),
        })
    }

    /// The fill counts the scrapes show, for the map walker to refresh.
    pub fn fill_cache(&self) -> FillCache {
        self.fill.clone()
    }

    /// Counts the maps on the calling thread, as the map walker does.
    pub fn refresh_fill(&self) {
        self.fill.refresh(&self.pin_dir);
    }
}

impl DatapathReadings for PinnedReadings {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Counter::ALL
            .iter()
            .map(|c| {
                let total = self
                    .counters
                    .get(&(*c as u32), 0)
                    .map_or(0, |per_cpu| per_cpu.iter().sum());
                (c.name(), total)
            })
            .collect()
    }

    /// As of the map walker's last count.
    fn map_fill(&self) -> Vec<MapFill> {
        self.fill.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(map: &'static str, entries: u64) -> MapFill {
        MapFill {
            map,
            entries,
            capacity: 100,
            memory: None,
        }
    }

    #[test]
    fn a_map_crossing_ninety_percent_is_reported_once_each_way_and_arrays_never() {
        let changes = |a: &[MapFill], b: &[MapFill]| -> Vec<(&'static str, u64)> {
            near_full_changes(a, b)
                .iter()
                .map(|(_, n)| (n.map, n.entries))
                .collect()
        };
        let low = [fill(names::CONNTRACK_V4, 10), fill(names::COUNTERS, 100)];
        let high = [fill(names::CONNTRACK_V4, 95), fill(names::COUNTERS, 100)];
        let higher = [fill(names::CONNTRACK_V4, 99), fill(names::COUNTERS, 100)];
        assert_eq!(changes(&[], &low), []);
        assert_eq!(changes(&low, &high), [(names::CONNTRACK_V4, 95)]);
        assert_eq!(changes(&high, &higher), [], "still near full: said once");
        assert_eq!(changes(&higher, &low), [(names::CONNTRACK_V4, 10)]);
        assert_eq!(
            changes(&[], &high),
            [(names::CONNTRACK_V4, 95)],
            "near full at the first count"
        );
    }
}
