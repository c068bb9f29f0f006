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
    /// ClientIP session affinity (either path) sent a connection or flow to the client's previous backend.
    AffinityHit,
    /// The affinity map refused an entry: the next connection may pick another backend.
    AffinityUpdateFailed,
    /// tc: a packet to a NodePort, LoadBalancer IP or externalIP started a translated flow.
    TcNewFlow,
    /// tc: a later packet of a flow was translated by its conntrack entry (either direction).
    TcTracked,
    /// tc: the frontend has no usable endpoint: the packet was rejected (TCP RST) or dropped.
    TcRejectNoBackend,
    /// tc: loadBalancerSourceRanges do not admit the client: dropped.
    TcDropSourceRange,
    /// tc: a slot or backend entry was missing: the packet was dropped.
    TcBackendMissing,
    /// tc: the conntrack map refused an entry: the packet was dropped.
    TcCtUpdateFailed,
    /// tc: no SNAT address is configured or no SNAT port was free: dropped.
    TcSnatFailed,
    /// tc: a non-first IP fragment (no ports) was passed untranslated.
    TcFragment,
    /// tc: a Maglev frontend's table was missing, or named a backend that is gone: the
    /// flow's backend was drawn at random instead.
    TcMaglevMiss,
    /// XDP: a packet to a NodePort, LoadBalancer IP or externalIP started a translated flow
    /// (even when tc then sends that first packet: see `XdpPass`). The other tc_* reasons
    /// count XDP's drops too.
    XdpNewFlow,
    /// XDP: a later packet of a flow was translated by its conntrack entry (either direction).
    XdpTracked,
    /// XDP: a packet of ours was handed to tc untouched (a refusal to build, a next hop not
    /// resolved yet, a route out of a device without native XDP).
    XdpPass,
}

impl Counter {
    /// Every counter in index order: what the agent sums and labels, and what `COUNT` sizes.
    pub const ALL: [Counter; 20] = [
        Counter::SockForward,
        Counter::SockReverse,
        Counter::SockRejectNoBackend,
        Counter::SockBackendMissing,
        Counter::SockRevUpdateFailed,
        Counter::SockRejectUnknownPort,
        Counter::AffinityHit,
        Counter::AffinityUpdateFailed,
        Counter::TcNewFlow,
        Counter::TcTracked,
        Counter::TcRejectNoBackend,
        Counter::TcDropSourceRange,
        Counter::TcBackendMissing,
        Counter::TcCtUpdateFailed,
        Counter::TcSnatFailed,
        Counter::TcFragment,
        Counter::TcMaglevMiss,
        Counter::XdpNewFlow,
        Counter::XdpTracked,
        Counter::XdpPass,
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
            Counter::AffinityHit => "affinity_hit",
            Counter::AffinityUpdateFailed => "affinity_update_failed",
            Counter::TcNewFlow => "tc_new_flow",
            Counter::TcTracked => "tc_tracked",
            Counter::TcRejectNoBackend => "tc_reject_no_backend",
            Counter::TcDropSourceRange => "tc_drop_source_range",
            Counter::TcBackendMissing => "tc_backend_missing",
            Counter::TcCtUpdateFailed => "tc_ct_update_failed",
            Counter::TcSnatFailed => "tc_snat_failed",
            Counter::TcFragment => "tc_fragment",
            Counter::TcMaglevMiss => "tc_maglev_miss",
            Counter::XdpNewFlow => "xdp_new_flow",
            Counter::XdpTracked => "xdp_tracked",
            Counter::XdpPass => "xdp_pass",
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
