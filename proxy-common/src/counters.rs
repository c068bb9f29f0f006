//! Datapath counters: one slot per reason in a per-CPU array, summed by the agent for metrics.

/// Why a program did what it did. The discriminant is the index in the counters map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect()/sendmsg() to a frontend rewritten to a backend.
    SockForward = 0,
    /// recvmsg()/getpeername() address rewritten back to the frontend.
    SockReverse,
    /// A frontend with no usable endpoint refused the socket (kube-proxy's REJECT).
    SockRejectNoBackend,
    /// A slot named a backend id the backends map does not hold; the socket was left
    /// untranslated. Only a writer bug or a torn update can cause it.
    SockBackendMissing,
    /// The socket reverse map refused an entry: replies will show the backend address.
    SockRevUpdateFailed,
    /// A ClusterIP was asked for a port or protocol its Service does not serve: refused.
    SockRejectUnknownPort,
    /// ClientIP session affinity sent a connection to the client's previous backend.
    SockAffinityHit,
    /// The affinity map refused an entry: the next connection may pick another backend.
    SockAffinityUpdateFailed,
}

impl Counter {
    pub const ALL: [Counter; 8] = [
        Counter::SockForward,
        Counter::SockReverse,
        Counter::SockRejectNoBackend,
        Counter::SockBackendMissing,
        Counter::SockRevUpdateFailed,
        Counter::SockRejectUnknownPort,
        Counter::SockAffinityHit,
        Counter::SockAffinityUpdateFailed,
    ];

    /// Size of the counters map.
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// Stable snake_case name, used as the metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::SockForward => "sock_forward",
            Counter::SockReverse => "sock_reverse",
            Counter::SockRejectNoBackend => "sock_reject_no_backend",
            Counter::SockBackendMissing => "sock_backend_missing",
            Counter::SockRevUpdateFailed => "sock_rev_update_failed",
            Counter::SockRejectUnknownPort => "sock_reject_unknown_port",
            Counter::SockAffinityHit => "sock_affinity_hit",
            Counter::SockAffinityUpdateFailed => "sock_affinity_update_failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense_and_in_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{} is out of place", c.name());
        }
    }
}
