//! Conntrack arithmetic of the tc path, shared with the agent's garbage collector so both agree
//! on when an entry is dead.

use crate::{
    maps::{NodeConfig, SNAT_PORT_MAX, SNAT_PORT_MIN, ct_flags},
    proto,
};

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// A live entry's timestamp is rewritten at most this often, so packets of a busy flow do not
/// all write the same shared cache line.
pub const REFRESH_NS: u64 = NANOS_PER_SECOND;

/// How long an entry lives after its flow was last seen, in seconds, by protocol and
/// `ct_flags`: every protocol but TCP has the UDP timeout.
#[inline(always)]
pub const fn lifetime_s(protocol: u8, flags: u8, config: &NodeConfig) -> u32 {
    if protocol != proto::TCP {
        config.ct_udp_timeout_s
    } else if flags & ct_flags::CLOSING != 0 {
        config.ct_tcp_closing_timeout_s
    } else {
        config.ct_tcp_timeout_s
    }
}

/// Whether an entry last seen at `last_seen_ns` is dead at `now_ns` (both `bpf_ktime_get_ns`,
/// CLOCK_MONOTONIC). Saturating, because another CPU may stamp the entry just after this one
/// read the clock.
#[inline(always)]
pub const fn expired(now_ns: u64, last_seen_ns: u64, lifetime_s: u32) -> bool {
    now_ns.saturating_sub(last_seen_ns) > lifetime_s as u64 * NANOS_PER_SECOND
}

/// The SNAT source port to try when the client's own port is taken: spread over
/// `SNAT_PORT_MIN..=SNAT_PORT_MAX` by a random value (multiply-shift, no division).
#[inline(always)]
pub const fn snat_port(entropy: u32) -> u16 {
    let span = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u64 + 1;
    SNAT_PORT_MIN + ((entropy as u64 * span) >> 32) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NodeConfig {
        NodeConfig {
            ct_tcp_timeout_s: 86_400,
            ct_tcp_closing_timeout_s: 10,
            ct_udp_timeout_s: 30,
            ..Default::default()
        }
    }

    #[test]
    fn each_protocol_and_state_has_its_own_lifetime() {
        let c = config();
        assert_eq!(lifetime_s(proto::TCP, 0, &c), 86_400);
        assert_eq!(lifetime_s(proto::TCP, ct_flags::CLOSING, &c), 10);
        assert_eq!(lifetime_s(proto::UDP, 0, &c), 30);
        assert_eq!(lifetime_s(proto::SCTP, ct_flags::REPLY, &c), 30);
    }

    #[test]
    fn an_entry_expires_only_after_its_lifetime() {
        let seen = 5 * NANOS_PER_SECOND;
        assert!(!expired(seen + 30 * NANOS_PER_SECOND, seen, 30));
        assert!(expired(seen + 30 * NANOS_PER_SECOND + 1, seen, 30));
        assert!(
            !expired(seen - 1, seen, 30),
            "stamped by another CPU after our clock read"
        );
    }

    #[test]
    fn snat_ports_stay_in_their_range_at_both_ends() {
        for entropy in [0, 1, u32::MAX / 2, u32::MAX] {
            let p = snat_port(entropy);
            assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&p), "{entropy} -> {p}");
        }
        assert_eq!(snat_port(0), SNAT_PORT_MIN);
        assert_eq!(snat_port(u32::MAX), SNAT_PORT_MAX);
    }
}
