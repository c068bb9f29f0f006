//! What a map costs in kernel memory, and the capacities the agent chooses from the node's
//! memory (the LRU maps the programs fill) and from what it programs (the maps it writes).
//!
//! The costs are the kernel's own accounting of a hash map (`htab_map_mem_usage`, what fdinfo's
//! `memlock` shows from Linux 6.4): every hash map has `roundup_pow_of_two(max_entries)`
//! buckets of 16 bytes from its creation; a preallocated one (every LRU map: the kernel has no
//! other kind) also holds `max_entries` elements from its creation, a `BPF_F_NO_PREALLOC` one
//! only the elements in use. An element is a 48-byte header, the key and the value, each
//! rounded up to 8 bytes.

/// Bytes of one hash bucket (`struct bucket`: a list head and a spinlock).
pub const BUCKET_BYTES: u64 = 16;
/// Bytes of an element's header (`struct htab_elem`: list node, LRU node, hash).
pub const ELEM_HEADER_BYTES: u64 = 48;
/// Extra bytes of an element allocated on demand (its free-list node in the kernel's
/// allocator).
pub const ON_DEMAND_EXTRA_BYTES: u64 = 8;

const fn round8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

/// Bytes of one element of a hash map with these key and value sizes.
pub const fn elem_bytes(key: usize, value: usize) -> u64 {
    ELEM_HEADER_BYTES + round8(key as u64) + round8(value as u64)
}

/// Buckets of a hash map of `max_entries`.
pub const fn buckets(max_entries: u32) -> u64 {
    (max_entries as u64).next_power_of_two()
}

/// Kernel memory of a preallocated hash map (an LRU map): charged in full at creation.
pub const fn preallocated_bytes(max_entries: u32, elem: u64) -> u64 {
    max_entries as u64 * elem + buckets(max_entries) * BUCKET_BYTES
}

/// Kernel memory of a `BPF_F_NO_PREALLOC` hash map holding `entries`.
pub const fn on_demand_bytes(max_entries: u32, entries: u64, elem: u64) -> u64 {
    buckets(max_entries) * BUCKET_BYTES + entries * (elem + ON_DEMAND_EXTRA_BYTES)
}

/// Cilium's `--bpf-map-dynamic-size-ratio` idea: the LRU maps may take this share of the
/// node's memory. Cilium's default (0.0025) would be 61 MiB on a 24 GiB node; this one (20 MiB
/// there) keeps every map of a 1 000-Service cluster under 32 MiB.
pub const DEFAULT_RATIO: f64 = 0.0008;

/// The share of the LRU budget each LRU kind gets, in hundredths: conntrack (tc flows, two
/// entries each), socket reverse (one per socket talking to a Service), affinity.
const SHARES: LruSizes = LruSizes {
    conntrack: 60,
    sock_rev: 25,
    affinity: 15,
};

/// Fewest entries the ratio gives each LRU kind, per family: a small node or a small ratio
/// still holds this many flows, sockets and clients.
pub const LRU_MIN: LruSizes = LruSizes {
    conntrack: 8_192,
    sock_rev: 4_096,
    affinity: 2_048,
};

/// Most entries the agent gives any map, per family (Cilium's table maximum, 2^24).
pub const MAX_ENTRIES: u32 = 1 << 24;

/// Entries of each LRU kind (per family for conntrack and socket reverse).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LruSizes {
    /// `bkp_ct_v4` and `bkp_ct_v6`, each.
    pub conntrack: u32,
    /// `bkp_sockrev_v4` and `bkp_sockrev_v6`, each.
    pub sock_rev: u32,
    /// `bkp_affinity`.
    pub affinity: u32,
}

/// Element bytes of the maps of one LRU kind: one per map (the v4 and v6 maps of a kind have
/// the same capacity).
pub struct LruElems {
    /// Conntrack v4 and v6.
    pub conntrack: [u64; 2],
    /// Socket reverse v4 and v6.
    pub sock_rev: [u64; 2],
    /// Affinity (one map for both families).
    pub affinity: [u64; 1],
}

/// The most entries the maps of one kind (same capacity each, elements of `elems` bytes) can
/// have within `budget` bytes, between `min` and [`MAX_ENTRIES`].
fn entries_within(budget: u64, elems: &[u64], min: u32) -> u32 {
    let total = |m: u32| elems.iter().map(|e| preallocated_bytes(m, *e)).sum::<u64>();
    let per_entry: u64 = elems.iter().sum();
    // Buckets cost at most 32 bytes an entry (a power of two below twice the entries): this
    // many always fit ...
    let safe = budget / (per_entry + 2 * BUCKET_BYTES * elems.len() as u64);
    let mut best = u32::try_from(safe).unwrap_or(u32::MAX).min(MAX_ENTRIES);
    // ... and up to the power of two at or above it, when the buckets it has anyway leave room.
    let pow = best
        .max(1)
        .checked_next_power_of_two()
        .unwrap_or(MAX_ENTRIES)
        .min(MAX_ENTRIES);
    let buckets_cost = u64::from(pow) * BUCKET_BYTES * elems.len() as u64;
    if let Some(rest) = budget.checked_sub(buckets_cost) {
        let more = u32::try_from(rest / per_entry).unwrap_or(u32::MAX).min(pow);
        if more > best && total(more) <= budget {
            best = more;
        }
    }
    best.max(min)
}

/// The LRU capacities for a node of `memory` bytes when they may take `ratio` of it: the
/// budget is split by fixed shares (conntrack 60 %, socket reverse 25 %, affinity 15 %), each
/// kind then holds as many entries as its share pays for, between [`LRU_MIN`] and [`MAX_ENTRIES`].
pub fn lru_sizes(memory: u64, ratio: f64, elems: &LruElems) -> LruSizes {
    // f64 holds any node's memory in bytes exactly enough for a budget.
    #[expect(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let budget = (memory as f64 * ratio.max(0.0)) as u64;
    let share = |hundredths: u32| budget / 100 * u64::from(hundredths);
    LruSizes {
        conntrack: entries_within(share(SHARES.conntrack), &elems.conntrack, LRU_MIN.conntrack),
        sock_rev: entries_within(share(SHARES.sock_rev), &elems.sock_rev, LRU_MIN.sock_rev),
        affinity: entries_within(share(SHARES.affinity), &elems.affinity, LRU_MIN.affinity),
    }
}

/// The maps the agent writes (services, backends, reverse NAT) are not preallocated: their
/// capacity costs 16 bytes a bucket, their entries only as they are written. They start at
/// [`WRITTEN_MIN`], keep a larger capacity they were pinned with, and grow to
/// [`grown_capacity`] when a sync needs more.
pub const WRITTEN_MIN: WrittenSizes = WrittenSizes {
    services: 16_384,
    backends: 16_384,
    rev_nat: 4_096,
};

/// Capacities of the maps the agent writes, per family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WrittenSizes {
    /// `bkp_svc_v4` and `bkp_svc_v6`, each.
    pub services: u32,
    /// `bkp_be_v4` and `bkp_be_v6`, each.
    pub backends: u32,
    /// `bkp_revnat_v4` and `bkp_revnat_v6` (and `bkp_svc_names`), each.
    pub rev_nat: u32,
}

/// The capacity a written map starts with: at least `min`, and never below the capacity it
/// is pinned with (an agent restart does not shrink a map that grew).
pub fn start_capacity(pinned: Option<u32>, min: u32) -> u32 {
    pinned.map_or(min, |p| p.max(min))
}

/// The capacity a written map grows to when a sync needs `needed` entries: a quarter more than
/// that, to a power of two (1.25 to 2.5 times the need: a cluster that keeps growing is copied
/// a logarithmic number of times, and the buckets of the room left cost 16 bytes each), and
/// never more than [`MAX_ENTRIES`]. `None` when `current` already holds `needed`, or cannot
/// grow (at the maximum).
pub fn grown_capacity(current: u32, needed: u64) -> Option<u32> {
    if needed <= u64::from(current) || current >= MAX_ENTRIES {
        return None;
    }
    let target = needed
        .saturating_add(needed / 4)
        .checked_next_power_of_two()
        .unwrap_or(u64::MAX)
        .min(u64::from(MAX_ENTRIES));
    u32::try_from(target).ok()
}

/// Fill share at which a map is reported near full (log line and metric).
pub const NEAR_FULL: f64 = 0.9;

/// Whether `entries` of `capacity` is near full ([`NEAR_FULL`]).
pub fn near_full(entries: u64, capacity: u64) -> bool {
    #[expect(clippy::cast_precision_loss)]
    let fill = entries as f64 / capacity.max(1) as f64;
    capacity > 0 && fill >= NEAR_FULL
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;
    use crate::maps::{AddrV4, AddrV6, AffinityKey, AffinityValue, CtKey, CtValue, SockRevKey, SockRevValue};

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn elems() -> LruElems {
        LruElems {
            conntrack: [
                elem_bytes(size_of::<CtKey<AddrV4>>(), size_of::<CtValue<AddrV4>>()),
                elem_bytes(size_of::<CtKey<AddrV6>>(), size_of::<CtValue<AddrV6>>()),
            ],
            sock_rev: [
                elem_bytes(size_of::<SockRevKey<AddrV4>>(), size_of::<SockRevValue<AddrV4>>()),
                elem_bytes(size_of::<SockRevKey<AddrV6>>(), size_of::<SockRevValue<AddrV6>>()),
            ],
            affinity: [elem_bytes(size_of::<AffinityKey>(), size_of::<AffinityValue>())],
        }
    }

    fn lru_bytes(s: LruSizes) -> u64 {
        let e = elems();
        e.conntrack
            .iter()
            .map(|x| preallocated_bytes(s.conntrack, *x))
            .sum::<u64>()
            + e.sock_rev
                .iter()
                .map(|x| preallocated_bytes(s.sock_rev, *x))
                .sum::<u64>()
            + preallocated_bytes(s.affinity, e.affinity[0])
    }

    #[test]
    fn costs_match_what_linux_6_18_reports_for_the_preallocated_maps() {
        // fdinfo memlock of the maps at 262 144 / 65 536 entries (README's table, Linux 6.18).
        let e = elems();
        assert_eq!(preallocated_bytes(262_144, e.conntrack[0]), 28 * MIB);
        assert_eq!(preallocated_bytes(262_144, e.conntrack[1]), 40 * MIB);
        assert_eq!(preallocated_bytes(262_144, e.sock_rev[0]), 24 * MIB);
        assert_eq!(preallocated_bytes(262_144, e.sock_rev[1]), 30 * MIB);
        assert_eq!(preallocated_bytes(65_536, e.affinity[0]), 6 * MIB + MIB / 2);
    }

    #[test]
    fn the_default_ratio_on_a_24_gib_node_leaves_room_under_32_mib() {
        let s = lru_sizes(24 * GIB, DEFAULT_RATIO, &elems());
        let bytes = lru_bytes(s);
        assert!(bytes <= 20 * MIB, "{s:?}: {bytes} bytes");
        assert!(bytes >= 16 * MIB, "most of the budget is used: {s:?}: {bytes}");
        assert!(
            s.conntrack > 40_000 && s.sock_rev > 20_000 && s.affinity > 20_000,
            "{s:?}"
        );
    }

    #[test]
    fn sizes_scale_with_memory_and_ratio_and_stay_within_the_bounds() {
        let e = elems();
        let small = lru_sizes(8 * GIB, DEFAULT_RATIO, &e);
        let big = lru_sizes(256 * GIB, DEFAULT_RATIO, &e);
        assert!(big.conntrack >= 25 * small.conntrack, "{small:?} {big:?}");
        assert!(big.affinity >= 25 * small.affinity, "{small:?} {big:?}");
        let (one, two) = (lru_sizes(24 * GIB, 0.001, &e), lru_sizes(24 * GIB, 0.002, &e));
        assert!(
            two.conntrack >= one.conntrack * 18 / 10 && two.conntrack <= one.conntrack * 22 / 10,
            "twice the ratio, about twice the entries: {one:?} {two:?}"
        );
        assert_eq!(lru_sizes(0, DEFAULT_RATIO, &e), LRU_MIN);
        assert_eq!(lru_sizes(GIB, -1.0, &e), LRU_MIN, "a negative ratio is no budget");
        let huge = lru_sizes(u64::MAX, 1.0, &e);
        assert_eq!(
            (huge.conntrack, huge.sock_rev, huge.affinity),
            (MAX_ENTRIES, MAX_ENTRIES, MAX_ENTRIES)
        );
    }

    #[test]
    fn every_ratio_s_sizes_fit_their_budget() {
        let e = elems();
        for memory_gib in [1, 3, 8, 24, 64, 96, 512] {
            for ratio in [0.0005, 0.001, 0.0025, 0.01] {
                let s = lru_sizes(memory_gib * GIB, ratio, &e);
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    clippy::cast_precision_loss
                )]
                let budget = ((memory_gib * GIB) as f64 * ratio) as u64;
                if s.conntrack > LRU_MIN.conntrack
                    && s.sock_rev > LRU_MIN.sock_rev
                    && s.affinity > LRU_MIN.affinity
                {
                    assert!(lru_bytes(s) <= budget, "{memory_gib} GiB × {ratio}: {s:?}");
                }
            }
        }
    }

    #[test]
    fn written_maps_start_at_the_minimum_or_what_is_pinned_and_grow_with_a_quarter_of_room() {
        assert_eq!(start_capacity(None, 16_384), 16_384);
        assert_eq!(start_capacity(Some(4_096), 16_384), 16_384);
        assert_eq!(start_capacity(Some(262_144), 16_384), 262_144);
        assert_eq!(grown_capacity(16_384, 16_384), None, "it fits");
        assert_eq!(grown_capacity(16_384, 16_385), Some(32_768));
        assert_eq!(
            grown_capacity(16_384, 34_000),
            Some(65_536),
            "1 000 Services of the bench"
        );
        assert_eq!(grown_capacity(16_384, 110_000), Some(262_144));
        assert_eq!(
            grown_capacity(MAX_ENTRIES / 2, u64::from(MAX_ENTRIES)),
            Some(MAX_ENTRIES)
        );
        assert_eq!(grown_capacity(MAX_ENTRIES, u64::MAX), None, "at the maximum");
    }

    #[test]
    fn written_maps_cost_buckets_and_the_entries_in_use() {
        let svc = elem_bytes(12, 24);
        assert_eq!(on_demand_bytes(16_384, 0, svc), 256 * 1024);
        assert_eq!(
            on_demand_bytes(16_384, 1_000, svc),
            256 * 1024 + 1_000 * (48 + 16 + 24 + 8)
        );
    }

    #[test]
    fn near_full_is_ninety_percent() {
        assert!(!near_full(89, 100));
        assert!(near_full(90, 100));
        assert!(!near_full(0, 0));
    }
}
