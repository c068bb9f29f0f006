//! Internet checksum arithmetic (RFC 1071) for the packets the tc programs build, kept here
//! so the host tests check it.

/// One's-complement sum of big-endian 16-bit words, not yet folded.
#[inline(always)]
pub const fn partial<const N: usize>(mut sum: u32, bytes: &[u8; N]) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// Folds a partial sum into the checksum field's value (host order).
#[inline(always)]
pub const fn finish(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Folds a sum to 16 bits with end-around carry.
const fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    ((sum & 0xffff) + (sum >> 16)) as u16
}

/// Carries a big-endian partial sum (a pseudo-header's, from [`partial`]) into a sum of
/// little-endian words, the order the kernel's `csum_partial` (and so `bpf_csum_diff`) adds
/// them in on a little-endian machine: one's-complement sums of byte-swapped words are the
/// byte-swapped sum (RFC 1071, 2.B).
#[inline(always)]
pub const fn le_seed(be_sum: u32) -> u32 {
    fold(be_sum).swap_bytes() as u32
}

/// The checksum field's bytes, in packet order, for a sum of little-endian words.
#[inline(always)]
pub const fn finish_le(le_sum: u32) -> [u8; 2] {
    (!fold(le_sum)).to_le_bytes()
}

/// The checksum field after the bytes it covers changed by `diff`, as `bpf_csum_diff` returns
/// it (the sum of the old words complemented and the new ones). `field` is read from the
/// packet in memory order, as `diff`'s words are: one's-complement sums are byte-order blind.
/// What the kernel's `l3/l4_csum_replace` do for a complete checksum, which XDP has no helper for.
#[inline(always)]
pub const fn replace(field: u16, diff: u32) -> u16 {
    !fold_wide(!field as u64 + diff as u64)
}

/// The `diff` of replacing the 32-bit word `from` by `to` (memory order), for [`replace`].
#[inline(always)]
pub const fn word_diff(from: u32, to: u32) -> u32 {
    let sum = !from as u64 + to as u64;
    ((sum & 0xffff_ffff) + (sum >> 32)) as u32
}

/// Folds a wide sum to 16 bits with end-around carry.
const fn fold_wide(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `csum_partial` computes on a little-endian machine, as the tc programs get it.
    fn le_sum(seed: u32, bytes: &[u8]) -> u32 {
        let mut sum = bytes.chunks(2).fold(u64::from(seed), |sum, w| {
            sum + u64::from(u16::from_le_bytes([w[0], w[1]]))
        });
        while sum > 0xffff_ffff {
            sum = (sum & 0xffff_ffff) + (sum >> 32);
        }
        sum as u32
    }

    #[test]
    fn a_little_endian_sum_seeded_with_a_big_endian_pseudo_header_gives_the_same_checksum() {
        // An ICMPv6-sized answer behind a pseudo-header, with words that carry in both orders.
        let pseudo: [u8; 40] = core::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(200));
        let data: [u8; 56] = core::array::from_fn(|i| (i as u8).wrapping_mul(91) ^ 0xa5);
        let mut whole = [0u8; 96];
        whole[..40].copy_from_slice(&pseudo);
        whole[40..].copy_from_slice(&data);
        assert_eq!(
            finish_le(le_sum(le_seed(partial(0, &pseudo)), &data)),
            finish(partial(0, &whole)).to_be_bytes()
        );
        // And with nothing to carry over, as for the IPv4 header and ICMP sums.
        assert_eq!(
            finish_le(le_sum(le_seed(0), &data)),
            finish(partial(0, &data)).to_be_bytes()
        );
    }

    #[test]
    fn a_valid_header_sums_to_zero() {
        // RFC 1071's worked example: 0001 f203 f4f5 f6f7 sums to ddf2 (one's complement 220d).
        assert_eq!(
            finish(partial(0, &[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7])),
            0x220d
        );
        let mut ip = [
            0x45, 0, 0, 60, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let sum = finish(partial(0, &ip));
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(
            finish(partial(0, &ip)),
            0,
            "a header with its checksum sums to zero"
        );
    }

    #[test]
    fn an_incremental_update_matches_a_checksum_computed_afresh() {
        // A TCP segment's pseudo-header and header, its addresses and ports rewritten as a
        // DNAT + SNAT does, with values whose sums carry.
        let mut seg: [u8; 32] = core::array::from_fn(|i| (i as u8).wrapping_mul(53) ^ 0x3c);
        seg[28..30].copy_from_slice(&[0, 0]);
        let field = finish(partial(0, &seg));
        let word = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let (old_src, old_dst, old_ports) = (word(&seg[0..4]), word(&seg[4..8]), word(&seg[20..24]));
        let (new_src, new_dst, new_ports) = (0xffff_fffe, 0x0a00_0001, 0x7530_1f90);
        let diff = word_diff(old_src, new_src);
        let diff = word_diff(old_dst, new_dst).wrapping_add(diff);
        let mut updated = replace(field, diff);
        updated = replace(updated, word_diff(old_ports, new_ports));
        seg[0..4].copy_from_slice(&new_src.to_be_bytes());
        seg[4..8].copy_from_slice(&new_dst.to_be_bytes());
        seg[20..24].copy_from_slice(&new_ports.to_be_bytes());
        assert_eq!(updated, finish(partial(0, &seg)));
        // Unchanged bytes leave the field alone.
        assert_eq!(replace(field, word_diff(old_src, old_src)), field);
    }
}
