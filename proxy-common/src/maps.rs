//! BPF map names, keys and values.
//!
//! Conventions, chosen so that `bpftool map dump pinned ...` is readable on its own:
//! - addresses are byte arrays in network order (`[10, 96, 0, 10]`);
//! - ports are `u16` in *host* order (`80`, not `20480`); the programs swap once per lookup;
//! - every padding byte is a named `_pad` field that writers zero.
//!
//! Map names are at most 15 bytes so the kernel (BPF_OBJ_NAME_LEN) keeps them whole.

/// IPv4 address bytes, network order.
pub type AddrV4 = [u8; 4];
/// IPv6 address bytes, network order.
pub type AddrV6 = [u8; 16];

pub const SERVICES_V4: &str = "bkp_svc_v4";
pub const SERVICES_V6: &str = "bkp_svc_v6";
pub const BACKENDS_V4: &str = "bkp_be_v4";
pub const BACKENDS_V6: &str = "bkp_be_v6";
pub const REV_NAT_V4: &str = "bkp_revnat_v4";
pub const REV_NAT_V6: &str = "bkp_revnat_v6";
pub const SOCK_REV_V4: &str = "bkp_sockrev_v4";
pub const SOCK_REV_V6: &str = "bkp_sockrev_v6";
pub const COUNTERS: &str = "bkp_counters";
pub const SERVICE_LABELS: &str = "bkp_svc_names";
pub const AFFINITY: &str = "bkp_affinity";

/// Every map the datapath declares, in the order the agent pins and documents them.
pub const ALL: [&str; 11] = [
    SERVICES_V4,
    SERVICES_V6,
    BACKENDS_V4,
    BACKENDS_V6,
    REV_NAT_V4,
    REV_NAT_V6,
    SOCK_REV_V4,
    SOCK_REV_V6,
    AFFINITY,
    COUNTERS,
    SERVICE_LABELS,
];

/// Default capacities, overridable at load time by the agent.
pub mod capacity {
    pub const SERVICES: u32 = 262_144;
    pub const BACKENDS: u32 = 262_144;
    pub const REV_NAT: u32 = 65_536;
    pub const SOCK_REV: u32 = 262_144;
    /// One entry per (client network namespace, frontend) with ClientIP affinity in use.
    pub const AFFINITY: u32 = 65_536;
    /// One label per frontend, like rev-NAT ids.
    pub const SERVICE_LABELS: u32 = REV_NAT;
}

/// Which traffic a frontend entry serves. Cilium's "two scopes" idea: an external frontend
/// (NodePort, LoadBalancer, externalIP) whose externalTrafficPolicy narrows its backends keeps a
/// second, internal view with the cluster-wide backends for traffic that starts on this node.
pub mod scope {
    pub const EXTERNAL: u8 = 0;
    pub const INTERNAL: u8 = 1;
}

/// Services map key. `slot == 0` addresses the frontend entry; `1..=count` its backend slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct ServiceKey<A> {
    pub addr: A,
    pub port: u16,
    pub slot: u16,
    pub proto: u8,
    pub scope: u8,
    pub _pad: [u8; 2],
}

impl<A: Copy> ServiceKey<A> {
    pub const fn frontend(addr: A, port: u16, proto: u8, scope: u8) -> Self {
        Self {
            addr,
            port,
            slot: 0,
            proto,
            scope,
            _pad: [0; 2],
        }
    }

    pub const fn with_slot(self, slot: u16) -> Self {
        Self { slot, ..self }
    }
}

/// Frontend flags (`ServiceValue::flags` of slot 0).
pub mod svc_flags {
    /// ClientIP session affinity: `affinity_timeout_s` holds the timeout.
    pub const AFFINITY: u32 = 1 << 0;
}

/// Services map value. The frontend entry (slot 0) uses `count`, `rev_nat_id`, `flags` and
/// `affinity_timeout_s`; a slot entry uses `backend_id` (and repeats `rev_nat_id` so a slot is
/// self-describing in a dump).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct ServiceValue {
    pub backend_id: u32,
    /// Number of backend slots. Zero on a frontend entry means "reject": the service exists
    /// but has no usable endpoint, which kube-proxy answers with REJECT.
    pub count: u32,
    pub rev_nat_id: u32,
    pub flags: u32,
    pub affinity_timeout_s: u32,
    pub _pad: u32,
}

/// Backend flags.
pub mod backend_flags {
    /// The endpoint is terminating (used only as kube-proxy's fallback when nothing is ready).
    pub const TERMINATING: u8 = 1 << 0;
    /// The endpoint runs on this node.
    pub const LOCAL: u8 = 1 << 1;
}

/// Backends map value, keyed by a `u32` backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct Backend<A> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}

/// Reverse-NAT map value, keyed by a `u32` rev-NAT id: the frontend a reply must appear from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct RevNat<A> {
    pub addr: A,
    pub port: u16,
    pub _pad: u16,
}

/// A `u64` as two native-endian `u32` halves, low first: keys hold cookies this way so that
/// they need no 8-byte alignment (and hence no padding).
pub const fn halves(value: u64) -> [u32; 2] {
    [value as u32, (value >> 32) as u32]
}

/// Socket reverse map key: which frontend a socket meant when it talked to this backend.
///
/// The cookie is two `u32` halves rather than a `u64` so that the IPv6 key has no trailing
/// padding (a `u64` would align the 28-byte key to 32 with four uninitialised bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct SockRevKey<A> {
    pub cookie: [u32; 2],
    pub addr: A,
    pub port: u16,
    pub _pad: u16,
}

impl<A> SockRevKey<A> {
    pub const fn new(cookie: u64, addr: A, port: u16) -> Self {
        Self {
            cookie: halves(cookie),
            addr,
            port,
            _pad: 0,
        }
    }

    pub const fn cookie(&self) -> u64 {
        (self.cookie[0] as u64) | ((self.cookie[1] as u64) << 32)
    }
}

/// Socket reverse map value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct SockRevValue<A> {
    pub addr: A,
    pub port: u16,
    pub _pad: u16,
    pub rev_nat_id: u32,
}

/// Session affinity map key (LRU, both families): a client and a frontend.
///
/// The socket hooks run before the kernel picks a source address, so the client is identified
/// by its network namespace cookie (Cilium's choice): a pod is one namespace with one IP, so
/// this is kube-proxy's "ClientIP" for pods, and processes in the node's namespace share the
/// node's identity as they would share its IP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct AffinityKey {
    pub netns_cookie: [u32; 2],
    pub rev_nat_id: u32,
}

impl AffinityKey {
    pub const fn new(netns_cookie: u64, rev_nat_id: u32) -> Self {
        Self {
            netns_cookie: halves(netns_cookie),
            rev_nat_id,
        }
    }
}

/// Session affinity map value: the backend last used and when (CLOCK_MONOTONIC ns). The slot
/// is kept so that a connect can check in one lookup that the backend still serves the
/// frontend (a removed backend must not keep its clients).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct AffinityValue {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub slot: u16,
    pub _pad: u16,
}

/// Service labels map value, keyed by rev-NAT id: which Service port a frontend belongs to.
/// Only tools read it (the programs never do), so `list` can name Services from the pins alone.
/// Both fields are UTF-8, NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct ServiceLabel {
    /// `namespace/name` (each at most 63 bytes in Kubernetes).
    #[cfg_attr(feature = "user", serde(serialize_with = "nul_padded"))]
    pub service: [u8; 128],
    /// Service port name (at most 15 bytes in Kubernetes).
    #[cfg_attr(feature = "user", serde(serialize_with = "nul_padded"))]
    pub port: [u8; 16],
}

/// The text of a NUL-padded UTF-8 field.
pub fn nul_padded_text(bytes: &[u8]) -> &str {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    core::str::from_utf8(&bytes[..end]).unwrap_or("")
}

#[cfg(feature = "user")]
fn nul_padded<const N: usize, S: serde::Serializer>(bytes: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(nul_padded_text(bytes))
}

impl Default for ServiceLabel {
    fn default() -> Self {
        Self {
            service: [0; 128],
            port: [0; 16],
        }
    }
}

macro_rules! assert_size {
    ($($t:ty => $n:expr),* $(,)?) => {
        $(const _: () = assert!(core::mem::size_of::<$t>() == $n);)*
    };
}

// Sizes equal the sum of the fields: no implicit padding anywhere.
assert_size!(
    ServiceKey<AddrV4> => 12,
    ServiceKey<AddrV6> => 24,
    ServiceValue => 24,
    Backend<AddrV4> => 8,
    Backend<AddrV6> => 20,
    RevNat<AddrV4> => 8,
    RevNat<AddrV6> => 20,
    SockRevKey<AddrV4> => 16,
    SockRevKey<AddrV6> => 28,
    SockRevValue<AddrV4> => 12,
    SockRevValue<AddrV6> => 24,
    ServiceLabel => 144,
    AffinityKey => 12,
    AffinityValue => 16,
);

#[cfg(feature = "user")]
mod pod {
    use super::*;

    macro_rules! pod {
        ($($t:ty),* $(,)?) => {
            // SAFETY: each type is repr(C), Copy, made only of integers and byte arrays, and has
            // no implicit padding (see the size assertions above), so any bit pattern is valid.
            $(unsafe impl aya::Pod for $t {})*
        };
    }

    pod!(
        ServiceKey<AddrV4>,
        ServiceKey<AddrV6>,
        ServiceValue,
        Backend<AddrV4>,
        Backend<AddrV6>,
        RevNat<AddrV4>,
        RevNat<AddrV6>,
        SockRevKey<AddrV4>,
        SockRevKey<AddrV6>,
        SockRevValue<AddrV4>,
        SockRevValue<AddrV6>,
        ServiceLabel,
        AffinityKey,
        AffinityValue,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_names_fit_the_kernel_object_name() {
        for name in ALL {
            assert!(name.len() <= 15, "{name} would be truncated by the kernel");
        }
    }

    #[test]
    fn sock_rev_key_round_trips_the_cookie() {
        let key = SockRevKey::new(0x1234_5678_9abc_def0, [10, 0, 0, 1], 53);
        assert_eq!(key.cookie(), 0x1234_5678_9abc_def0);
    }
}
