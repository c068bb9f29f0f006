//! Types and pure helpers shared by the eBPF datapath (`proxy-ebpf`) and the agent
//! (`proxy-userspace`).
//!
//! Every map key and value here is `#[repr(C)]` with explicit padding so that both sides agree
//! on the layout byte for byte and so that no uninitialised padding ever reaches a hash-map key.
//! Sizes are asserted at compile time.
#![no_std]
#![warn(missing_docs)]

pub mod checksum;
pub mod conntrack;
pub mod counters;
pub mod maglev;
pub mod maps;
pub mod select;
pub mod sizing;

/// IANA protocol numbers as they appear in `bpf_sock_addr.protocol` and IP headers.
pub mod proto {
    /// Not a protocol: the key of a ClusterIP's guard entry, which rejects ports and protocols
    /// the Service does not serve (kube-proxy rejects traffic to unknown ports of a ClusterIP).
    pub const ANY: u8 = 0;
    /// TCP: served by the socket hooks and the tc path.
    pub const TCP: u8 = 6;
    /// UDP: served by the socket hooks and the tc path.
    pub const UDP: u8 = 17;
    /// SCTP: served by the socket hooks only; the tc path leaves SCTP packets to the stack.
    pub const SCTP: u8 = 132;
}
