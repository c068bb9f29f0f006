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
}
