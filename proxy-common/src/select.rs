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
}
