//! BPF map names, keys and values.
//!
//! Conventions, chosen so that `bpftool map dump pinned ...` is readable on its own:
//! - addresses are byte arrays in network order (`[10, 96, 0, 10]`);
//! - ports are `u16` in *host* order (`80`, not `20480`); the programs swap once per lookup;
//! - every padding byte is a named `_pad` field that writers zero.
//!
//! Map names are at most 15 bytes so the kernel (BPF_OBJ_NAME_LEN) keeps them whole. The agent
//! reads back the maps it writes, to adopt the datapath's state when it restarts and for `list`.

/// IPv4 address bytes, network order.
pub type AddrV4 = [u8; 4];
/// IPv6 address bytes, network order.
pub type AddrV6 = [u8; 16];

/// IPv4 services map (hash), [`ServiceKey`] → [`ServiceValue`]: frontend entries and their
/// backend slots. The agent writes it; connect/sendmsg and the tc programs read it.
pub const SERVICES_V4: &str = "bkp_svc_v4";
/// IPv6 services map, as [`SERVICES_V4`].
pub const SERVICES_V6: &str = "bkp_svc_v6";
/// IPv4 backends map (hash), backend id (`u32`, from 1) → [`Backend`]. The agent writes it;
/// connect/sendmsg and the tc programs read it.
pub const BACKENDS_V4: &str = "bkp_be_v4";
/// IPv6 backends map, as [`BACKENDS_V4`].
pub const BACKENDS_V6: &str = "bkp_be_v6";
/// IPv4 reverse-NAT map (hash), rev-NAT id (`u32`, from 1) → [`RevNat`], one per frontend. The
/// agent writes it; recvmsg/getpeername read it to check that a socket's frontend still exists.
pub const REV_NAT_V4: &str = "bkp_revnat_v4";
/// IPv6 reverse-NAT map, as [`REV_NAT_V4`].
pub const REV_NAT_V6: &str = "bkp_revnat_v6";
/// IPv4 socket reverse map (LRU hash), [`SockRevKey`] → [`SockRevValue`], for UDP sockets
/// (TCP ones use [`SOCK_FRONTEND_V4`]). connect/sendmsg write it; recvmsg/getpeername read it
/// and delete stale entries; the agent reads it to find the connected UDP sockets of a departed
/// backend.
pub const SOCK_REV_V4: &str = "bkp_sockrev_v4";
/// IPv6 socket reverse map, as [`SOCK_REV_V4`].
pub const SOCK_REV_V6: &str = "bkp_sockrev_v6";
/// IPv4 socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`), socket → [`SockFrontend`]: the
/// frontend a connected TCP (or SCTP) socket asked for. connect writes it, getpeername reads it;
/// the kernel frees an entry with its socket. Userspace can only read it through a socket (no
/// key to walk), so dumps and counts leave it out.
pub const SOCK_FRONTEND_V4: &str = "bkp_sockfe_v4";
/// IPv6 socket-local storage, as [`SOCK_FRONTEND_V4`].
pub const SOCK_FRONTEND_V6: &str = "bkp_sockfe_v6";
/// Counters map (per-CPU array), [`Counter`](crate::counters::Counter) index → `u64` events.
/// The programs increment it; the agent sums the CPUs for its metrics.
pub const COUNTERS: &str = "bkp_counters";
/// Service labels map (hash, not preallocated), rev-NAT id → [`ServiceLabel`]. The agent writes
/// it; the programs never read it.
pub const SERVICE_LABELS: &str = "bkp_svc_names";
/// Session affinity map (LRU hash, both families and both paths), [`AffinityKey`] →
/// [`AffinityValue`]. Only the programs read and write it.
pub const AFFINITY: &str = "bkp_affinity";
/// IPv4 conntrack map of the tc path (LRU hash), [`CtKey`] → [`CtValue`], two entries per flow.
/// The tc programs write and read it; the agent deletes expired entries.
pub const CONNTRACK_V4: &str = "bkp_ct_v4";
/// IPv6 conntrack map, as [`CONNTRACK_V4`].
pub const CONNTRACK_V6: &str = "bkp_ct_v6";
/// IPv4 source ranges map (LPM trie), [`SourceRange`] → `u32` (always 1). The agent writes it;
/// tc ingress reads it for frontends with [`svc_flags::SOURCE_RANGES`].
pub const SOURCE_RANGES_V4: &str = "bkp_srcrng_v4";
/// IPv6 source ranges map, as [`SOURCE_RANGES_V4`].
pub const SOURCE_RANGES_V6: &str = "bkp_srcrng_v6";
/// Node settings map (array of one entry, key 0), [`NodeConfig`]. The agent writes it at start;
/// the tc programs read it.
pub const NODE: &str = "bkp_node";
/// Devices XDP may send frames to (devmap hash), ifindex → ifindex: those the agent attached
/// the XDP program to in native mode. XDP hands a packet routed anywhere else to tc.
pub const XDP_DEVICES: &str = "bkp_xdp_devs";

/// Maglev lookup tables, one map per table size of [`crate::maglev::TABLE_SIZES`] (in that
/// order): hash of maps keyed by the frontend's rev-NAT id, each inner map an array of one
/// entry, the whole table of backend ids. Only the map of the configured size holds tables.
pub const MAGLEV: [&str; 3] = ["bkp_maglev_16k", "bkp_maglev_64k", "bkp_maglev_128k"];

/// The socket-local storage maps: no capacity (they hold one value per socket that has one)
/// and no keys to walk from userspace.
pub const SOCKET_LOCAL: [&str; 2] = [SOCK_FRONTEND_V4, SOCK_FRONTEND_V6];

/// Every map the datapath declares, in the order the agent pins and documents them.
pub const ALL: [&str; 22] = [
    SERVICES_V4,
    SERVICES_V6,
    BACKENDS_V4,
    BACKENDS_V6,
    REV_NAT_V4,
    REV_NAT_V6,
    SOCK_REV_V4,
    SOCK_REV_V6,
    SOCK_FRONTEND_V4,
    SOCK_FRONTEND_V6,
    AFFINITY,
    CONNTRACK_V4,
    CONNTRACK_V6,
    SOURCE_RANGES_V4,
    SOURCE_RANGES_V6,
    NODE,
    COUNTERS,
    SERVICE_LABELS,
    MAGLEV[0],
    MAGLEV[1],
    MAGLEV[2],
    XDP_DEVICES,
];

/// Default capacities (max_entries, per family for the per-family maps). The agent overrides
/// all but `SOURCE_RANGES` at load time from its `--map-size-*` flags.
pub mod capacity {
    /// One entry per frontend plus one per backend slot (`--map-size-services`).
    pub const SERVICES: u32 = 262_144;
    /// One entry per distinct endpoint address, port and protocol (`--map-size-backends`).
    pub const BACKENDS: u32 = 262_144;
    /// One entry per frontend (`--map-size-rev-nat`, which sizes the labels map too).
    pub const REV_NAT: u32 = 65_536;
    /// One entry per (UDP socket, backend) a connect or sendmsg translated; the LRU drops the
    /// oldest (`--map-size-sock-rev`). TCP sockets keep theirs in socket-local storage, so
    /// this serves UDP only: resolvers, whose sockets live for one query or a few.
    pub const SOCK_REV: u32 = 65_536;
    /// One entry per (client, frontend) with ClientIP affinity in use: a client is a network
    /// namespace on the socket path, a source address on the tc path (`--map-size-affinity`).
    pub const AFFINITY: u32 = 65_536;
    /// One label per frontend, like rev-NAT ids.
    pub const SERVICE_LABELS: u32 = REV_NAT;
    /// Two entries (original and reply direction) per flow through the tc path, per family
    /// (`--map-size-conntrack`).
    pub const CONNTRACK: u32 = 262_144;
    /// One entry per (frontend, loadBalancerSourceRanges CIDR), per family.
    pub const SOURCE_RANGES: u32 = 16_384;
    /// One Maglev table per external frontend with `lb-algorithm` maglev. A table costs its
    /// size × 4 bytes (64 KiB at 16 381), so memory, not this count, is the real bound.
    pub const MAGLEV: u32 = 65_536;
    /// Devices with native XDP (`--devices`), keyed by ifindex.
    pub const XDP_DEVICES: u32 = 256;
}

/// Which traffic a frontend entry serves (Cilium's "two scopes" idea). Every frontend has a
/// scope-`ALL` entry, which the socket hooks use for traffic that starts on this node. An
/// external frontend (NodePort, LoadBalancer, externalIP) with externalTrafficPolicy Local also
/// has a scope-`EXTERNAL_LOCAL` entry with only this node's endpoints, which the tc path uses for
/// traffic from outside: so a socket connect() costs one lookup whatever the policy.
pub mod scope {
    /// The entry every frontend has: the endpoints for traffic that starts on this node (a
    /// ClusterIP's after internalTrafficPolicy, an external frontend's from the whole cluster).
    pub const ALL: u8 = 0;
    /// Only this node's endpoints, for traffic from outside to an externalTrafficPolicy Local
    /// frontend; [`EXT_LOCAL`](super::svc_flags::EXT_LOCAL) on the scope-`ALL` entry sends the
    /// tc path here.
    pub const EXTERNAL_LOCAL: u8 = 1;
}

/// Services map key. `slot == 0` addresses the frontend entry; `1..=count` its backend slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct ServiceKey<A> {
    /// Frontend address, network order: a ClusterIP, a NodePort address, a LoadBalancer
    /// ingress IP or an externalIP.
    pub addr: A,
    /// Frontend port, host order (the Service port, or the NodePort); 0 on a guard entry.
    pub port: u16,
    /// 0: the frontend entry; `1..=count`: a backend slot.
    pub slot: u16,
    /// [`proto`](crate::proto) number; [`proto::ANY`](crate::proto::ANY) on a guard entry.
    pub proto: u8,
    /// [`scope`] of the entry.
    pub scope: u8,
    /// Zero.
    pub _pad: [u8; 2],
}

impl<A: Copy> ServiceKey<A> {
    /// The frontend entry's key (slot 0).
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

    /// The same frontend's key for backend slot `slot`.
    pub const fn with_slot(self, slot: u16) -> Self {
        Self { slot, ..self }
    }
}

/// Frontend flags (`ServiceValue::flags` of slot 0).
pub mod svc_flags {
    /// ClientIP session affinity: `affinity_timeout_s` holds the timeout.
    pub const AFFINITY: u32 = 1 << 0;
    /// A NodePort on one of the node's addresses.
    pub const NODE_PORT: u32 = 1 << 1;
    /// A LoadBalancer status ingress IP.
    pub const LOAD_BALANCER: u32 = 1 << 2;
    /// A spec.externalIPs address.
    pub const EXTERNAL_IP: u32 = 1 << 3;
    /// externalTrafficPolicy Local: traffic from outside uses the scope-EXTERNAL_LOCAL entry.
    pub const EXT_LOCAL: u32 = 1 << 4;
    /// loadBalancerSourceRanges apply: clients must match the source ranges map.
    pub const SOURCE_RANGES: u32 = 1 << 5;
    /// The tc path picks this frontend's backend for a new flow from its Maglev table (keyed by
    /// the rev-NAT id) by a hash of the flow, or of the client's address under ClientIP
    /// affinity, rather than at random.
    pub const MAGLEV: u32 = 1 << 6;
    /// Frontends the tc path serves; the others (ClusterIPs) only the socket hooks.
    pub const EXTERNAL: u32 = NODE_PORT | LOAD_BALANCER | EXTERNAL_IP;
}

/// Services map value. The frontend entry (slot 0) uses `count`, `rev_nat_id`, `flags` and
/// `affinity_timeout_s`; a slot entry uses `backend_id` (and repeats `rev_nat_id` so a slot is
/// self-describing in a dump).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct ServiceValue {
    /// Slot entry: the backend's key in the backends map. 0 on a frontend entry (ids start at 1).
    pub backend_id: u32,
    /// Number of backend slots. Zero on a frontend entry means "reject": the service exists
    /// but has no usable endpoint, which kube-proxy answers with REJECT.
    pub count: u32,
    /// The frontend's id (from 1) in the reverse-NAT, labels, affinity and source ranges maps.
    pub rev_nat_id: u32,
    /// Frontend entry: [`svc_flags`]. 0 on a slot entry.
    pub flags: u32,
    /// ClientIP affinity timeout in seconds (sessionAffinityConfig.clientIP.timeoutSeconds,
    /// 10800 by default) when `flags` has [`svc_flags::AFFINITY`]; else 0.
    pub affinity_timeout_s: u32,
    /// Zero.
    pub _pad: u32,
}

/// Backend flags.
pub mod backend_flags {
    /// The endpoint is terminating (used only as kube-proxy's fallback when nothing is ready).
    /// The programs ignore it: the agent has already chosen which backends get slots.
    pub const TERMINATING: u8 = 1 << 0;
    /// The endpoint runs on this node.
    pub const LOCAL: u8 = 1 << 1;
}

/// Backends map value, keyed by a `u32` backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct Backend<A> {
    /// Endpoint address, network order.
    pub addr: A,
    /// Endpoint port (from the EndpointSlice), host order.
    pub port: u16,
    /// [`proto`](crate::proto) number.
    pub proto: u8,
    /// [`backend_flags`].
    pub flags: u8,
}

/// Reverse-NAT map value, keyed by a `u32` rev-NAT id: the frontend a reply must appear from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct RevNat<A> {
    /// Frontend address, network order.
    pub addr: A,
    /// Frontend port, host order.
    pub port: u16,
    /// Zero.
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
    /// The socket's cookie (`bpf_get_socket_cookie`, sock_diag's cookie) as [`halves`].
    pub cookie: [u32; 2],
    /// Backend address the socket was sent to, network order.
    pub addr: A,
    /// Backend port, host order.
    pub port: u16,
    /// Zero.
    pub _pad: u16,
}

impl<A> SockRevKey<A> {
    /// The key of socket `cookie` talking to backend `addr`:`port` (host order).
    pub const fn new(cookie: u64, addr: A, port: u16) -> Self {
        Self {
            cookie: halves(cookie),
            addr,
            port,
            _pad: 0,
        }
    }

    /// The socket cookie, joined from its halves.
    pub const fn cookie(&self) -> u64 {
        (self.cookie[0] as u64) | ((self.cookie[1] as u64) << 32)
    }
}

/// Socket reverse map value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct SockRevValue<A> {
    /// Frontend address the socket asked for, network order.
    pub addr: A,
    /// Frontend port, host order.
    pub port: u16,
    /// Zero.
    pub _pad: u16,
    /// The frontend's rev-NAT id: the reverse hooks translate only while the reverse-NAT map
    /// still maps it to `addr`:`port`, and the agent matches departed backends' sockets by it.
    pub rev_nat_id: u32,
}

/// Socket-local storage value ([`SOCK_FRONTEND_V4`]): which frontend a connected socket asked
/// for and which backend it was sent to. The backend is kept because the kernel frees the
/// value only with the socket: a TCP socket that failed to connect may connect again, elsewhere,
/// and getpeername translates only while the socket's peer is still this backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct SockFrontend<A> {
    /// Frontend address the socket asked for, network order.
    pub addr: A,
    /// Frontend port, host order.
    pub port: u16,
    /// Zero.
    pub _pad: u16,
    /// The frontend's rev-NAT id: getpeername translates only while the reverse-NAT map still
    /// maps it to `addr`:`port`.
    pub rev_nat_id: u32,
    /// Backend address the socket was sent to, network order.
    pub backend_addr: A,
    /// Backend port, host order.
    pub backend_port: u16,
    /// Zero.
    pub _pad2: u16,
}

/// How an affinity key names its client.
pub mod affinity_client {
    /// The socket hooks run before the kernel picks a source address, so they name the client
    /// by its network namespace cookie (Cilium's choice): a pod is one namespace with one IP,
    /// so this is kube-proxy's "ClientIP" for pods, and processes in the node's namespace share
    /// the node's identity as they would share its IP.
    pub const NETNS: u8 = 0;
    /// The tc path names the client by its IPv4 source address.
    pub const IPV4: u8 = 4;
    /// The tc path names the client by its IPv6 source address.
    pub const IPV6: u8 = 6;
}

/// Session affinity map key (LRU, both paths, both families): a client and a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct AffinityKey {
    /// A netns cookie (two halves, low first), an IPv4 address (first word) or an IPv6
    /// address, as `kind` says; unused words are zero.
    pub client: [u32; 4],
    /// The frontend's rev-NAT id.
    pub rev_nat_id: u32,
    /// [`affinity_client`]: what `client` holds.
    pub kind: u8,
    /// Zero.
    pub _pad: [u8; 3],
}

impl AffinityKey {
    /// The key of `client` (of kind `kind`) at frontend `rev_nat_id`.
    pub const fn new(client: [u32; 4], kind: u8, rev_nat_id: u32) -> Self {
        Self {
            client,
            rev_nat_id,
            kind,
            _pad: [0; 3],
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
    /// When a connect, a sendmsg or a new tc flow of this client last used the entry.
    pub last_used_ns: u64,
    /// The backend's id in the backends map.
    pub backend_id: u32,
    /// The frontend slot (`1..=count`) that held `backend_id` when it was chosen.
    pub slot: u16,
    /// Zero.
    pub _pad: u16,
}

/// Conntrack map key (LRU, tc path): a packet's 5-tuple as it arrives at the hook that
/// translates it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct CtKey<A> {
    /// Source address, network order.
    pub saddr: A,
    /// Destination address, network order.
    pub daddr: A,
    /// Source port, host order.
    pub sport: u16,
    /// Destination port, host order.
    pub dport: u16,
    /// [`proto::TCP`](crate::proto::TCP) or [`proto::UDP`](crate::proto::UDP), the only
    /// protocols the tc path translates.
    pub proto: u8,
    /// Zero.
    pub _pad: [u8; 3],
}

impl<A> CtKey<A> {
    /// The key of a packet's tuple (ports in host order).
    pub const fn new(saddr: A, daddr: A, sport: u16, dport: u16, proto: u8) -> Self {
        Self {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            _pad: [0; 3],
        }
    }
}

/// Conntrack entry flags.
pub mod ct_flags {
    /// The entry translates replies (backend → client) back to the frontend; without it, the
    /// entry translates the client's packets to the backend.
    pub const REPLY: u8 = 1 << 0;
    /// A FIN or RST was seen: the entry expires after the short closing timeout.
    pub const CLOSING: u8 = 1 << 1;
    /// The original direction is source-NATed to the node address (eTP Cluster, remote backend).
    pub const SNAT: u8 = 1 << 2;
}

/// Conntrack map value: the tuple a matching packet is rewritten to, and when the flow was
/// last seen (CLOCK_MONOTONIC ns).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct CtValue<A> {
    /// When the flow was last seen, refreshed at most every
    /// [`REFRESH_NS`](crate::conntrack::REFRESH_NS) (and at the first FIN or RST).
    pub last_seen_ns: u64,
    /// Source address a matching packet leaves with, network order: rewritten only on a reply
    /// entry or under SNAT.
    pub saddr: A,
    /// Destination address a matching packet leaves with, network order: rewritten unless on a
    /// reply entry without SNAT.
    pub daddr: A,
    /// Source port a matching packet leaves with, host order.
    pub sport: u16,
    /// Destination port a matching packet leaves with, host order.
    pub dport: u16,
    /// The flow's frontend.
    pub rev_nat_id: u32,
    /// The backend of the flow, so a packet of a flow whose backend was removed re-selects.
    pub backend_id: u32,
    /// [`ct_flags`].
    pub flags: u8,
    /// Zero.
    pub _pad: [u8; 3],
}

impl<A: Copy> CtValue<A> {
    /// The key of the other direction of this entry's flow: the tuple it rewrites packets to,
    /// reversed. For an original-direction entry that is its reply entry, and vice versa.
    pub const fn reverse_key(&self, proto: u8) -> CtKey<A> {
        CtKey::new(self.daddr, self.saddr, self.dport, self.sport, proto)
    }
}

/// Source ranges map key data (LPM trie; the trie key is this behind a `u32` prefix length):
/// a frontend's rev-NAT id, then a CIDR. The prefix length counts the 32 bits of the id plus the
/// CIDR's own (`SourceRange::prefix_len`), so a lookup with the client's full address matches
/// only ranges of that frontend. The value is unused (1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct SourceRange<A> {
    /// Big-endian, so the trie compares it byte by byte like the address.
    pub rev_nat_id_be: u32,
    /// The CIDR's network address (a lookup's: the client's address), network order.
    pub addr: A,
}

impl<A> SourceRange<A> {
    /// Key data for frontend `rev_nat_id` (host order, stored big-endian) and address `addr`.
    pub const fn new(rev_nat_id: u32, addr: A) -> Self {
        Self {
            rev_nat_id_be: rev_nat_id.to_be(),
            addr,
        }
    }

    /// The trie prefix length for a CIDR of `cidr_prefix` bits.
    pub const fn prefix_len(cidr_prefix: u8) -> u32 {
        32 + cidr_prefix as u32
    }
}

/// The node's settings for the tc path: one entry (key 0) in an array written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct NodeConfig {
    /// Source address for NodePort/LB/externalIP traffic sent to a backend on another node
    /// (externalTrafficPolicy Cluster); all zero: no IPv4 SNAT (such traffic is dropped).
    pub snat_v4: AddrV4,
    /// As `snat_v4`, for IPv6; all zero: no IPv6 SNAT.
    pub snat_v6: AddrV6,
    /// Idle timeout of an established TCP flow, seconds (kube-proxy's
    /// conntrack.tcpEstablishedTimeout, 24 h by default).
    pub ct_tcp_timeout_s: u32,
    /// Idle timeout of a TCP flow after FIN or RST, seconds (10, Cilium's default).
    pub ct_tcp_closing_timeout_s: u32,
    /// Idle timeout of a UDP flow, seconds (conntrack.udpTimeout; by default 120, the kernel's
    /// nf_conntrack_udp_timeout_stream).
    pub ct_udp_timeout_s: u32,
    /// Entries of a Maglev table: which of the [`MAGLEV`] maps holds the tables.
    pub maglev_table_size: u32,
    /// Seed of the flow hash that indexes Maglev tables (the same on every node).
    pub maglev_seed: u32,
}

/// First of the source ports the tc path picks from when a client's own port is taken on the
/// SNAT address: `SNAT_PORT_MIN..=SNAT_PORT_MAX` is the upper part of Linux's default
/// ephemeral range (`ip_local_port_range`, 32768-60999).
pub const SNAT_PORT_MIN: u16 = 40_000;
/// Last SNAT source port (inclusive).
pub const SNAT_PORT_MAX: u16 = 60_999;

/// Service labels map value, keyed by rev-NAT id: which Service port a frontend belongs to.
/// The programs never read it: it lets `list` name Services from the pins alone.
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
    SockFrontend<AddrV4> => 20,
    SockFrontend<AddrV6> => 44,
    ServiceLabel => 144,
    AffinityKey => 24,
    AffinityValue => 16,
    CtKey<AddrV4> => 16,
    CtKey<AddrV6> => 40,
    CtValue<AddrV4> => 32,
    CtValue<AddrV6> => 56,
    SourceRange<AddrV4> => 8,
    SourceRange<AddrV6> => 20,
    NodeConfig => 40,
);

#[cfg(feature = "user")]
mod pod {
    use super::{
        AddrV4, AddrV6, AffinityKey, AffinityValue, Backend, CtKey, CtValue, NodeConfig, RevNat, ServiceKey,
        ServiceLabel, ServiceValue, SockFrontend, SockRevKey, SockRevValue, SourceRange,
    };

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
        SockFrontend<AddrV4>,
        SockFrontend<AddrV6>,
        ServiceLabel,
        AffinityKey,
        AffinityValue,
        CtKey<AddrV4>,
        CtKey<AddrV6>,
        CtValue<AddrV4>,
        CtValue<AddrV6>,
        SourceRange<AddrV4>,
        SourceRange<AddrV6>,
        NodeConfig,
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
    fn the_reverse_key_of_a_reply_entry_is_the_original_direction() {
        // Client 192.0.2.7:5555 → NodePort 10.0.0.5:30080, SNATed to 10.0.0.5:5555 towards
        // backend 10.1.0.2:8080. The reply entry rewrites backend → node into frontend → client.
        let reply = CtValue {
            saddr: [10, 0, 0, 5],
            daddr: [192, 0, 2, 7],
            sport: 30080,
            dport: 5555,
            flags: ct_flags::REPLY,
            ..Default::default()
        };
        let original = reply.reverse_key(6);
        assert_eq!(
            (original.saddr, original.daddr, original.sport, original.dport),
            ([192, 0, 2, 7], [10, 0, 0, 5], 5555, 30080)
        );
    }

    #[test]
    fn sock_rev_key_round_trips_the_cookie() {
        let key = SockRevKey::new(0x1234_5678_9abc_def0, [10, 0, 0, 1], 53);
        assert_eq!(key.cookie(), 0x1234_5678_9abc_def0);
    }
}
