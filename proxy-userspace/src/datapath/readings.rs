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
    pub fn refresh(&self, pin_dir: &Path) {
        let fill = usage(pin_dir);
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = fill;
    }

    fn get(&self) -> Vec<MapFill> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
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
