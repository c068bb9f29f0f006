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

#[cfg(test)]
mod tests {
    use super::*;

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
