//! The Maglev figures (issue 17): what building the tables costs the agent, and how many
//! flows a backend's removal moves. Pure computation on the agent's own table builder: no
//! namespace, no root needed for these two.

use std::time::Instant;

use proxy_common::maglev::{self, Member};

use crate::{Opts, figures::Results, world::median};

/// Frontends and backends of the build-time figure (the 1 000 × 100).
const FRONTENDS: usize = 1_000;
const BACKENDS: u32 = 100;
/// Backend sets the disruption figure averages over.
const TRIALS: u32 = 200;

/// Backend `i` of frontend `set`, named as the agent names backends (address words, port).
fn member(set: u32, i: u32) -> Member {
    let addr = u32::from_ne_bytes([10, (set >> 8) as u8, set as u8, i as u8]);
    Member {
        name: [addr, 0, 0, 0, 8080 + (i >> 8)],
        weight: 1,
    }
}

pub fn figures(opts: &Opts, results: &mut Results) {
    for (size, metric) in maglev::TABLE_SIZES.iter().zip(["16381", "65521", "131071"]) {
        let runs = (0..opts.repeats)
            .map(|_| {
                let started = Instant::now();
                for set in 0..FRONTENDS as u32 {
                    let members: Vec<Member> = (0..BACKENDS).map(|i| member(set, i)).collect();
                    std::hint::black_box(maglev::build(&members, *size, maglev::DEFAULT_SEED));
                }
                started.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        results.add("maglev_build", "ours", FRONTENDS, metric, median(runs), "ms");
    }

    // Ten backends, one removed (a different one each trial): the share of flows that were
    // not on it and still move. Every table entry stands for an equal share of flow hashes.
    let mut moved = Vec::new();
    let mut overall = Vec::new();
    for set in 0..TRIALS {
        let ten: Vec<Member> = (0..10).map(|i| member(set, i)).collect();
        let gone = ten[(set % 10) as usize].name;
        let nine: Vec<Member> = ten.iter().copied().filter(|m| m.name != gone).collect();
        let size = maglev::DEFAULT_TABLE_SIZE;
        let before = maglev::build(&ten, size, maglev::DEFAULT_SEED);
        let after = maglev::build(&nine, size, maglev::DEFAULT_SEED);
        let (mut survivors, mut moved_survivors, mut changed) = (0u32, 0u32, 0u32);
        for (b, a) in before.iter().zip(&after) {
            let (was, now) = (ten[*b as usize].name, nine[*a as usize].name);
            changed += u32::from(was != now);
            if was != gone {
                survivors += 1;
                moved_survivors += u32::from(was != now);
            }
        }
        moved.push(100.0 * f64::from(moved_survivors) / f64::from(survivors));
        overall.push(100.0 * f64::from(changed) / f64::from(size));
    }
    let max = moved.iter().copied().fold(0.0, f64::max);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    results.add("maglev_move", "ours", 10, "others_mean_pct", mean(&moved), "%");
    results.add("maglev_move", "ours", 10, "others_max_pct", max, "%");
    results.add("maglev_move", "ours", 10, "overall_mean_pct", mean(&overall), "%");
}
