//! Backend slot choice, the same arithmetic on both sides so the agent can predict and test it.

/// Maps a 32-bit random or hash value onto a backend slot in `1..=count`.
///
/// Uses Lemire's multiply-shift instead of `%`: one multiply and no division (the BPF ISA's
/// 64-bit division is slow and a modulo of a non-power-of-two is biased towards low slots for
/// large counts). `count` must be non-zero; callers check it first because zero means reject.
#[inline(always)]
pub const fn slot(value: u32, count: u32) -> u16 {
    (((value as u64 * count as u64) >> 32) as u16).wrapping_add(1)
}

/// The 32 bits one socket's backend is drawn from at one frontend: the same for every datagram
/// of the socket, and unrelated between sockets and between frontends. Cookies are handed out
/// in sequence, so they are mixed (SplitMix64's finaliser) before their high bits pick a slot.
#[inline(always)]
pub const fn by_socket(cookie: u64, rev_nat_id: u32) -> u32 {
    let mut z = cookie ^ (rev_nat_id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((z ^ (z >> 31)) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_stays_in_range() {
        for count in [1u32, 2, 3, 7, 10, 1000, 65_535] {
            for value in [0u32, 1, u32::MAX / 2, u32::MAX - 1, u32::MAX] {
                let s = u32::from(slot(value, count));
                assert!((1..=count).contains(&s), "value {value} count {count} -> {s}");
            }
        }
    }

    #[test]
    fn slot_spreads_evenly() {
        // A linear sweep of the input space must hit every slot equally (within one step).
        let count = 3u32;
        let mut hits = [0u32; 3];
        let steps = 30_000u32;
        for i in 0..steps {
            let value = ((u64::from(i) * u64::from(u32::MAX)) / u64::from(steps)) as u32;
            hits[slot(value, count) as usize - 1] += 1;
        }
        for h in hits {
            assert!(h.abs_diff(steps / count) <= 1, "uneven spread {hits:?}");
        }
    }

    #[test]
    fn sockets_in_sequence_spread_over_the_slots_and_each_keeps_its_own() {
        let count = 3u32;
        let mut hits = [0u32; 3];
        for cookie in 4096..4096 + 3000u64 {
            let s = slot(by_socket(cookie, 7), count);
            assert_eq!(
                s,
                slot(by_socket(cookie, 7), count),
                "cookie {cookie} must keep its slot"
            );
            hits[s as usize - 1] += 1;
        }
        // 1000 expected per slot; a fair hash strays beyond ±150 with probability below 1e-6.
        assert!(
            hits.iter().all(|h| h.abs_diff(1000) < 150),
            "uneven spread {hits:?}"
        );
    }

    #[test]
    fn one_socket_draws_afresh_at_each_frontend() {
        let mut seen = [false; 3];
        for rev_nat_id in 1..=30u32 {
            seen[slot(by_socket(4242, rev_nat_id), 3) as usize - 1] = true;
        }
        assert_eq!(
            seen, [true; 3],
            "one socket must not land on the same slot of every frontend"
        );
    }
}
