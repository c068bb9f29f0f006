//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), as Cilium and Katran use it for
//! traffic from outside the node: a lookup table per frontend, filled by the agent from the
//! frontend's backends, indexed by a hash of each new flow. Every node builds the same table
//! from the same backends, so a flow that ECMP moves to another node keeps its backend, and a
//! backend change moves about its own share of flows.
//!
//! The hash is written once here for both sides: the programs hash flows with it, the agent
//! hashes backends with it, and tests can predict either.

/// Table sizes the datapath has maps for: primes, so that every backend's permutation visits
/// every entry (Cilium's `--bpf-lb-maglev-table-size` offers the same primes). A table should
/// be at least 100 times the frontend's backends for the entries to split evenly (the paper's
/// advice).
pub const TABLE_SIZES: [u32; 3] = [16_381, 65_521, 131_071];

/// The default table size.
pub const DEFAULT_TABLE_SIZE: u32 = TABLE_SIZES[0];

/// The default hash seed. Every node of a cluster must use the same one.
pub const DEFAULT_SEED: u32 = 0x5bd1_e995;

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

/// One 32-bit step of MurmurHash3 (x86_32): cheap in BPF (no loop over bytes, no division)
/// and well mixed after [`finish`].
#[inline(always)]
const fn mix(state: u32, word: u32) -> u32 {
    let k = word.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (state ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// MurmurHash3's finaliser over `words` words of input.
#[inline(always)]
const fn finish(state: u32, words: u32) -> u32 {
    let mut h = state ^ (words * 4);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// MurmurHash3 (x86_32) of `words`, each taken as it sits in memory (network-order addresses
/// stay in network order, so both sides hash the same bytes).
#[inline(always)]
pub fn hash<const N: usize>(words: &[u32; N], seed: u32) -> u32 {
    let mut state = seed;
    let mut i = 0;
    while i < N {
        state = mix(state, words[i]);
        i += 1;
    }
    finish(state, N as u32)
}

/// The hash of a flow: its addresses (as network-order words), ports and protocol. Only a
/// new flow is hashed; conntrack keeps it on its backend afterwards.
#[inline(always)]
pub fn flow_hash<const N: usize>(
    saddr: &[u32; N],
    daddr: &[u32; N],
    sport: u16,
    dport: u16,
    proto: u8,
    seed: u32,
) -> u32 {
    let mut state = seed;
    let mut i = 0;
    while i < N {
        state = mix(state, saddr[i]);
        state = mix(state, daddr[i]);
        i += 1;
    }
    state = mix(state, (u32::from(sport) << 16) | u32::from(dport));
    state = mix(state, u32::from(proto));
    finish(state, 2 * N as u32 + 2)
}

/// The table index a flow hash picks: multiply-shift onto `0..size` (no division, and a range
/// the verifier can follow, which it cannot through `%` on Linux 6.1).
#[inline(always)]
pub const fn index(hash: u32, size: u32) -> u32 {
    ((hash as u64 * size as u64) >> 32) as u32
}

#[cfg(feature = "user")]
pub use table::{Member, build};

#[cfg(feature = "user")]
mod table {
    extern crate alloc;
    use alloc::vec::Vec;

    use super::hash;

    /// Mixed into the seed for a backend's second hash (its permutation's skip), so that
    /// offset and skip are independent.
    const SKIP_SEED: u32 = 0x9e37_79b9;

    /// A backend as the table sees it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Member {
        /// Who the backend is: its address as network-order words (IPv4 in the first) and its
        /// port. Only this decides the backend's permutation, never an id a node assigned, so
        /// every node builds the same table.
        pub name: [u32; 5],
        /// The backend's share of the table, relative to the others' (0: none).
        pub weight: u32,
    }

    /// The lookup table of `size` entries (a prime) for `members`: entry `i` holds the index
    /// into `members` of the backend flows hashing to `i` go to. Empty when no member has a
    /// weight. The order of `members` does not matter: they are taken in the order of their
    /// names.
    ///
    /// Each backend fills entries in the order of its own permutation (an offset and a skip
    /// from two hashes of its name), taking turns; a backend of weight `w` takes `w / max
    /// weight` of a turn per round, so its share of the table follows its weight.
    pub fn build(members: &[Member], size: u32, seed: u32) -> Vec<u32> {
        const EMPTY: u32 = u32::MAX;
        let size_u64 = u64::from(size);
        let mut order: Vec<usize> = (0..members.len()).filter(|i| members[*i].weight > 0).collect();
        order.sort_by_key(|i| members[*i].name);
        let Some(max_weight) = order.iter().map(|i| members[*i].weight).max() else {
            return Vec::new();
        };
        let permutation: Vec<(u64, u64)> = order
            .iter()
            .map(|i| {
                let name = &members[*i].name;
                let offset = u64::from(hash(name, seed)) % size_u64;
                let skip = u64::from(hash(name, seed ^ SKIP_SEED)) % (size_u64 - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = alloc::vec![0u64; order.len()];
        let mut credit = alloc::vec![0u64; order.len()];
        let mut table = alloc::vec![EMPTY; size as usize];
        let mut filled = 0u32;
        loop {
            for (turn, member) in order.iter().enumerate() {
                credit[turn] += u64::from(members[*member].weight);
                while credit[turn] >= u64::from(max_weight) {
                    credit[turn] -= u64::from(max_weight);
                    let (offset, skip) = permutation[turn];
                    // A permutation visits every entry once in `size` steps (size is prime),
                    // so an empty one is always found while the table is not full.
                    loop {
                        let entry = ((offset + next[turn] * skip) % size_u64) as usize;
                        next[turn] += 1;
                        if table[entry] == EMPTY {
                            table[entry] = *member as u32;
                            filled += 1;
                            break;
                        }
                    }
                    if filled == size {
                        return table;
                    }
                }
            }
        }
    }
}

#[cfg(all(test, feature = "user"))]
mod tests {
    extern crate alloc;
    extern crate std;
    use alloc::vec::Vec;

    use super::*;

    fn members(count: u32) -> Vec<Member> {
        (0..count)
            .map(|i| Member {
                name: [
                    u32::from_ne_bytes([10, 0, (i >> 8) as u8, i as u8]),
                    0,
                    0,
                    0,
                    8080,
                ],
                weight: 1,
            })
            .collect()
    }

    /// Backend names chosen by table entry, so tables of different member lists compare.
    fn chosen(table: &[u32], members: &[Member]) -> Vec<[u32; 5]> {
        table.iter().map(|i| members[*i as usize].name).collect()
    }

    #[test]
    fn every_backend_gets_an_even_share_and_the_order_of_members_does_not_matter() {
        let ten = members(10);
        let table = build(&ten, DEFAULT_TABLE_SIZE, DEFAULT_SEED);
        assert_eq!(table.len(), DEFAULT_TABLE_SIZE as usize);
        let mut shares = [0u32; 10];
        for i in &table {
            shares[*i as usize] += 1;
        }
        // 1638.1 each; Maglev's round-robin fill keeps every share within one round of it.
        assert!(shares.iter().all(|s| s.abs_diff(1638) <= 2), "{shares:?}");
        let mut reversed = ten.clone();
        reversed.reverse();
        let other = build(&reversed, DEFAULT_TABLE_SIZE, DEFAULT_SEED);
        assert_eq!(chosen(&table, &ten), chosen(&other, &reversed));
    }

    #[test]
    fn removing_one_of_ten_backends_moves_few_flows_that_were_not_on_it() {
        let ten = members(10);
        let nine: Vec<Member> = ten[1..].to_vec();
        for size in TABLE_SIZES {
            let before = chosen(&build(&ten, size, DEFAULT_SEED), &ten);
            let after = chosen(&build(&nine, size, DEFAULT_SEED), &nine);
            let survivors = before.iter().filter(|b| **b != ten[0].name).count();
            let moved = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| **b != ten[0].name && b != a)
                .count();
            let share = moved as f64 / survivors as f64;
            // The bound is 12 %; Maglev's promise is "a few percent".
            assert!(share <= 0.12, "size {size}: {moved} of {survivors} moved");
        }
    }

    #[test]
    fn weights_set_each_backend_s_share() {
        let mut three = members(3);
        three[0].weight = 2;
        three[2].weight = 0;
        let table = build(&three, DEFAULT_TABLE_SIZE, DEFAULT_SEED);
        let heavy = table.iter().filter(|i| **i == 0).count();
        let light = table.iter().filter(|i| **i == 1).count();
        assert!(!table.contains(&2), "weight 0 gets no entry");
        assert!(
            heavy.abs_diff(2 * light) <= 4,
            "weight 2 gets twice weight 1's share: {heavy} vs {light}"
        );
        assert!(build(&[], DEFAULT_TABLE_SIZE, DEFAULT_SEED).is_empty());
    }

    #[test]
    fn another_seed_builds_another_table() {
        let ten = members(10);
        assert_ne!(
            build(&ten, DEFAULT_TABLE_SIZE, DEFAULT_SEED),
            build(&ten, DEFAULT_TABLE_SIZE, DEFAULT_SEED ^ 1)
        );
    }

    #[test]
    fn murmur3_matches_the_reference_implementation() {
        // MurmurHash3_x86_32 of the 4 bytes 0x21 0x43 0x65 0x87 with seed 0 and 0x5082EDEE,
        // from the reference test vectors (SMHasher).
        assert_eq!(hash(&[0x8765_4321], 0), 0xF55B_516B);
        assert_eq!(hash(&[0x8765_4321], 0x5082_EDEE), 0x2362_F9DE);
    }

    #[test]
    fn indices_stay_in_the_table() {
        for size in TABLE_SIZES {
            assert_eq!(index(0, size), 0);
            assert_eq!(index(u32::MAX, size), size - 1);
        }
    }
}
