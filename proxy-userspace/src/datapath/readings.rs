//! The datapath's own figures for `/metrics`, read at scrape time: the per-CPU decision
//! counters and how full each pinned map is.

use std::path::{Path, PathBuf};

use aya::maps::{MapData, MapInfo, PerCpuArray};
use proxy_common::{counters::Counter, maps as names};

use crate::{
    datapath::{
        maps::{OpenError, typed},
        sys,
    },
    telemetry::metrics::{DatapathReadings, MapFill},
};

pub struct PinnedReadings {
    pin_dir: PathBuf,
    counters: PerCpuArray<MapData, u64>,
}

impl PinnedReadings {
    pub fn open(pin_dir: &Path) -> Result<Self, OpenError> {
        Ok(Self {
            pin_dir: pin_dir.to_path_buf(),
            counters: typed(pin_dir, names::COUNTERS)?,
        })
    }

    fn fill(&self, map: &'static str) -> Option<MapFill> {
        let info = MapInfo::from_pin(self.pin_dir.join(map)).ok()?;
        let entries = sys::map_entries(&info).ok()?;
        Some(MapFill {
            map,
            entries,
            capacity: u64::from(info.max_entries()),
        })
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

    /// Every hash map (an array is always full, so the counters map is left out).
    fn map_fill(&self) -> Vec<MapFill> {
        names::ALL
            .iter()
            .filter(|m| **m != names::COUNTERS)
            .filter_map(|m| self.fill(m))
            .collect()
    }
}
