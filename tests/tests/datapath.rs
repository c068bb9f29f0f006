//! The datapath tier between the unit tests and the netns tests: the real object loaded by the
//! agent's loader, its maps filled from Kubernetes objects by the agent's own proxier and
//! writer, and the tc programs run with BPF_PROG_TEST_RUN on packet fixtures. Each test checks
//! the verdict, the bytes the program leaves (expected frames and checksums are computed here
//! with etherparse, not with the project's checksum code), and the conntrack entries and
//! counters the run writes.
//!
//! The programs are loaded, never attached, so this runs on every kernel the agent supports
//! (in the 6.1 VM as on the host). Each test runs its packets from a network namespace of its
//! own, where the route lookups of forwarded packets find the lab's two devices:
//!
//! `client 10.210.0.2 ─ up0 10.210.0.1 [node] be0 10.200.0.1 ─ remote backend 10.200.0.2`
//!
//! Local backends (10.244.0.0/16, fd00:244::/64) are pods on this node: their packets go on
//! to the stack, which needs no route here.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use aya::{
    Pod,
    maps::{HashMap, MapData},
};
use bkp_sandbox::{netns::Netns, unique_suffix};
use bpf_kube_proxy::{
    datapath::{
        conntrack::Conntrack,
        external::write_node_config,
        loader::{Datapath, MapSizes, Mismatch},
        maps::{PinnedMaps, typed},
        readings::PinnedReadings,
        sys::{TestRun, prog_test_run},
        writer::Writer,
    },
    health::proxy::Health,
    pipeline::plan::Planner,
    pipeline::translate::TranslateOptions,
    sync::proxier::Proxier,
    telemetry::metrics::{DatapathReadings as _, Metrics},
};
use etherparse::{
    IpFragOffset, IpHeaders, IpNumber, Ipv4Extensions, Ipv4Header, Ipv6Extensions, Ipv6FragmentHeader,
    Ipv6Header, Ipv6RawExtHeader, LinkSlice, NetSlice, PacketBuilder, SlicedPacket, TcpHeader,
    TransportSlice,
};
use integration_tests::{NODE_NAME, Pins, require_root};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proxy_common::{
    maps::{
        self as names, AddrV4, AddrV6, Backend, CtKey, CtValue, NodeConfig, RevNat, SNAT_PORT_MAX,
        SNAT_PORT_MIN, ct_flags,
    },
    proto,
};

/// tc verdicts (linux/pkt_cls.h). A test run reports the verdict and sends nothing: a
/// REDIRECT names the device the packet would leave by, which the run does not show.
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const NODE: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 1);
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x210, 0, 0, 0, 0, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 2);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x210, 0, 0, 0, 0, 0, 2);
const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 3);
/// Outside the `ranged` Service's loadBalancerSourceRanges (10.210.0.0/29).
const OUTSIDER: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 77);
const LOCAL_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const LOCAL_BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 5);
const RANGED_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 6);
const REMOTE_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 100);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND_PORT: u16 = 8080;
const BACKEND_UDP_PORT: u16 = 5353;
/// `web`: local endpoints in both families, a TCP and a UDP port.
const WEB_NODE_PORT: u16 = 30080;
const WEB_UDP_NODE_PORT: u16 = 30085;
/// `remote`: its one endpoint is on another node.
const REMOTE_NODE_PORT: u16 = 30081;
/// `empty`: no endpoints, one TCP and one UDP port.
const EMPTY_TCP_NODE_PORT: u16 = 30082;
const EMPTY_UDP_NODE_PORT: u16 = 30083;

type Mac = [u8; 6];
const UP0_MAC: Mac = [0x02, 0, 0, 0, 0x0a, 0x01];
const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0x0a, 0x02];
const BE0_MAC: Mac = [0x02, 0, 0, 0, 0x0b, 0x01];
const REMOTE_MAC: Mac = [0x02, 0, 0, 0, 0x0b, 0x02];
const POD_MAC: Mac = [0x02, 0, 0, 0, 0x0c, 0x01];

const SYN: u8 = 0x02;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn service(name: &str, spec: &serde_json::Value, status: &serde_json::Value) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "dp"},
        "spec": spec,
        "status": status,
    }))
    .expect("a valid Service")
}

/// One ready EndpointSlice of `service`: port `http`/TCP at [`BACKEND_PORT`], `dns`/UDP at
/// [`BACKEND_UDP_PORT`].
fn slice(service: &str, family: &str, endpoints: &[(IpAddr, &str)]) -> EndpointSlice {
    let endpoints: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|(ip, node)| {
            serde_json::json!({"addresses": [ip.to_string()], "nodeName": node, "conditions": {"ready": true}})
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": format!("{service}-{family}"),
            "namespace": "dp",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": family,
        "ports": [
            {"name": "http", "port": BACKEND_PORT, "protocol": "TCP"},
            {"name": "dns", "port": BACKEND_UDP_PORT, "protocol": "UDP"},
        ],
        "endpoints": endpoints,
    }))
    .expect("a valid EndpointSlice")
}

fn http_port(node_port: Option<u16>) -> serde_json::Value {
    let mut port = serde_json::json!({"name": "http", "port": 80, "protocol": "TCP"});
    if let Some(node_port) = node_port {
        port["nodePort"] = node_port.into();
    }
    port
}

fn objects() -> (Vec<Service>, Vec<EndpointSlice>) {
    let services = vec![
        service(
            "web",
            &serde_json::json!({
                "type": "NodePort",
                "clusterIP": CLUSTER_IP.to_string(),
                "clusterIPs": [CLUSTER_IP.to_string(), "fd00:96::10"],
                "ipFamilies": ["IPv4", "IPv6"],
                "ipFamilyPolicy": "RequireDualStack",
                "ports": [
                    http_port(Some(WEB_NODE_PORT)),
                    {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": WEB_UDP_NODE_PORT},
                ],
            }),
            &serde_json::json!({}),
        ),
        service(
            "remote",
            &serde_json::json!({
                "type": "NodePort",
                "clusterIP": "10.96.0.11",
                "clusterIPs": ["10.96.0.11"],
                "ports": [http_port(Some(REMOTE_NODE_PORT))],
            }),
            &serde_json::json!({}),
        ),
        service(
            "empty",
            &serde_json::json!({
                "type": "NodePort",
                "clusterIP": "10.96.0.12",
                "clusterIPs": ["10.96.0.12", "fd00:96::12"],
                "ipFamilies": ["IPv4", "IPv6"],
                "ipFamilyPolicy": "RequireDualStack",
                "ports": [
                    {"name": "tcp", "port": 80, "protocol": "TCP", "nodePort": EMPTY_TCP_NODE_PORT},
                    {"name": "udp", "port": 53, "protocol": "UDP", "nodePort": EMPTY_UDP_NODE_PORT},
                ],
            }),
            &serde_json::json!({}),
        ),
        service(
            "ranged",
            &serde_json::json!({
                "type": "LoadBalancer",
                "clusterIP": "10.96.0.13",
                "clusterIPs": ["10.96.0.13"],
                "allocateLoadBalancerNodePorts": false,
                "loadBalancerSourceRanges": ["10.210.0.0/29"],
                "ports": [http_port(None)],
            }),
            &serde_json::json!({"loadBalancer": {"ingress": [{"ip": LB_IP.to_string()}]}}),
        ),
    ];
    let slices = vec![
        slice("web", "IPv4", &[(LOCAL_BACKEND.into(), NODE_NAME)]),
        slice("web", "IPv6", &[(LOCAL_BACKEND6.into(), NODE_NAME)]),
        slice("remote", "IPv4", &[(REMOTE_BACKEND.into(), "other-node")]),
        slice("ranged", "IPv4", &[(RANGED_BACKEND.into(), NODE_NAME)]),
    ];
    (services, slices)
}

/// Small maps: a test holds a handful of entries, and tests load in parallel.
const SIZES: MapSizes = MapSizes {
    services: 1024,
    backends: 1024,
    rev_nat: 1024,
    sock_rev: 1024,
    affinity: 1024,
    conntrack: 1024,
    maglev_table_size: proxy_common::maglev::DEFAULT_TABLE_SIZE,
};

/// The datapath loaded in a pin directory of its own with the Services above programmed, and
/// the node namespace test runs happen in. Field order is drop order: programs and maps close
/// before their pins go, and the namespace goes last.
struct Lab {
    datapath: Datapath,
    pins: Pins,
    node: Netns,
}

impl Lab {
    fn new() -> Self {
        require_root();
        let node = Netns::create(&format!("bkd-{}", unique_suffix())).expect("creating the node namespace");
        for (dev, mac, cidr, neighbour, neighbour_mac) in [
            ("up0", UP0_MAC, "10.210.0.1/24", CLIENT, CLIENT_MAC),
            ("be0", BE0_MAC, "10.200.0.1/24", REMOTE_BACKEND, REMOTE_MAC),
        ] {
            let peer = format!("{dev}p");
            let mac = mac_text(mac);
            node.ip(&[
                "link", "add", dev, "address", &mac, "type", "veth", "peer", "name", &peer,
            ])
            .expect("adding a veth pair");
            node.ip(&["addr", "add", cidr, "dev", dev])
                .expect("adding an address");
            for d in [dev, peer.as_str()] {
                node.ip(&["link", "set", d, "up"]).expect("setting a device up");
            }
            // Known neighbours make the route lookup complete, with the MAC addresses it found.
            node.ip(&[
                "neigh",
                "replace",
                &neighbour.to_string(),
                "lladdr",
                &mac_text(neighbour_mac),
                "dev",
                dev,
                "nud",
                "permanent",
            ])
            .expect("adding a neighbour");
        }
        // bpf_fib_lookup answers "forwarding disabled" in a namespace that does not forward.
        node.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
            .expect("enabling forwarding");

        let pins = Pins::unique("bkd");
        let datapath = Datapath::load(pins.path(), SIZES).expect("loading the datapath");
        let writer = Writer::new(PinnedMaps::open(pins.path()).expect("opening the pinned maps"));
        let mut proxier = Proxier::new(
            NODE_NAME,
            vec![NODE.into(), NODE6.into()],
            TranslateOptions::default(),
            Planner::new(),
            writer,
            Metrics::new(),
            std::sync::Arc::new(Health::new(Duration::from_secs(60))),
        );
        let (services, slices) = objects();
        proxier.replace_services(&services);
        proxier.replace_slices(&slices);
        let report = proxier.sync();
        assert!(report.failed.is_empty(), "map writes failed: {:?}", report.failed);
        assert_eq!(report.services, services.len(), "{report:?}");
        // The node's primary addresses, as the agent writes them at start.
        let config = NodeConfig {
            snat_v4: NODE.octets(),
            snat_v6: NODE6.octets(),
            ct_tcp_timeout_s: 3600,
            ct_tcp_closing_timeout_s: 10,
            ct_udp_timeout_s: 120,
            ..NodeConfig::default()
        };
        write_node_config(pins.path(), &config).expect("writing the node settings");
        Self { datapath, pins, node }
    }

    /// Runs `program` once on `frame` inside the node namespace.
    fn run(&self, program: &'static str, frame: &[u8]) -> TestRun {
        let fd = self.datapath.program_fd(program).expect("a loaded program");
        self.node
            .run(|| prog_test_run(fd, frame, 1))
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {program}: {e}"))
    }

    fn ingress(&self, frame: &[u8]) -> TestRun {
        self.run("bkp_tc_ingress", frame)
    }

    fn egress(&self, frame: &[u8]) -> TestRun {
        self.run("bkp_tc_egress", frame)
    }

    fn entries<K: Pod, V: Pod>(&self, map: &'static str) -> Vec<(K, V)> {
        let map: HashMap<MapData, K, V> = typed(self.pins.path(), map).expect("opening a pinned map");
        map.iter().map(|e| e.expect("reading a map entry")).collect()
    }

    /// Both families' conntrack entries, sorted.
    fn conntrack(&self) -> Vec<Tracked> {
        let mut all = tracked(self.entries::<CtKey<AddrV4>, CtValue<AddrV4>>(names::CONNTRACK_V4));
        all.extend(tracked(
            self.entries::<CtKey<AddrV6>, CtValue<AddrV6>>(names::CONNTRACK_V6),
        ));
        all.sort();
        all
    }

    /// Empties the IPv4 conntrack map.
    fn forget_conntrack(&self) {
        let mut map: HashMap<MapData, CtKey<AddrV4>, CtValue<AddrV4>> =
            typed(self.pins.path(), names::CONNTRACK_V4).expect("opening a pinned map");
        let keys: Vec<_> = map.keys().map(|k| k.expect("reading a key")).collect();
        for key in keys {
            map.remove(&key).expect("removing an entry");
        }
    }

    /// The id the writer gave the backend at `addr`.
    fn backend_id(&self, addr: SocketAddr) -> u32 {
        let found = match addr.ip() {
            IpAddr::V4(_) => find(self.entries::<u32, Backend<AddrV4>>(names::BACKENDS_V4), |b| {
                sa(b.addr, b.port) == addr
            }),
            IpAddr::V6(_) => find(self.entries::<u32, Backend<AddrV6>>(names::BACKENDS_V6), |b| {
                sa(b.addr, b.port) == addr
            }),
        };
        found.unwrap_or_else(|| panic!("no backend {addr} programmed"))
    }

    /// The rev-NAT id the writer gave the frontend at `addr`.
    fn rev_nat_id(&self, addr: SocketAddr) -> u32 {
        let found = match addr.ip() {
            IpAddr::V4(_) => find(self.entries::<u32, RevNat<AddrV4>>(names::REV_NAT_V4), |r| {
                sa(r.addr, r.port) == addr
            }),
            IpAddr::V6(_) => find(self.entries::<u32, RevNat<AddrV6>>(names::REV_NAT_V6), |r| {
                sa(r.addr, r.port) == addr
            }),
        };
        found.unwrap_or_else(|| panic!("no rev-NAT entry for {addr}"))
    }

    /// A datapath counter, summed over CPUs, by its metric label.
    fn counter(&self, name: &str) -> u64 {
        let readings = PinnedReadings::open(self.pins.path()).expect("opening the counters");
        readings
            .counters()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no counter {name}"))
            .1
    }

    /// The two entries a flow opened from `client` to `frontend` must leave, sorted as
    /// [`Lab::conntrack`] returns them: the original direction rewritten to `source` →
    /// `backend` (`source` is the client itself, or the node under SNAT), and the reply
    /// direction rewritten back to `frontend` → `client`.
    fn flow(
        &self,
        proto: u8,
        client: SocketAddr,
        frontend: SocketAddr,
        source: SocketAddr,
        backend: SocketAddr,
        flags: u8,
    ) -> Vec<Tracked> {
        let (rev_nat_id, backend_id) = (self.rev_nat_id(frontend), self.backend_id(backend));
        let mut entries = vec![
            Tracked {
                from: client,
                to: frontend,
                proto,
                new_from: source,
                new_to: backend,
                flags,
                rev_nat_id,
                backend_id,
            },
            Tracked {
                from: backend,
                to: source,
                proto,
                new_from: frontend,
                new_to: client,
                flags: ct_flags::REPLY | (flags & ct_flags::SNAT),
                rev_nat_id,
                backend_id,
            },
        ];
        entries.sort();
        entries
    }
}

fn find<V>(entries: Vec<(u32, V)>, matches: impl Fn(&V) -> bool) -> Option<u32> {
    entries.into_iter().find(|(_, v)| matches(v)).map(|(id, _)| id)
}

fn mac_text(mac: Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A conntrack entry in a form both families share (its timestamp checked and left out).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Tracked {
    from: SocketAddr,
    to: SocketAddr,
    proto: u8,
    new_from: SocketAddr,
    new_to: SocketAddr,
    flags: u8,
    rev_nat_id: u32,
    backend_id: u32,
}

fn tracked<A: Copy + Into<IpAddr>>(entries: Vec<(CtKey<A>, CtValue<A>)>) -> Vec<Tracked> {
    entries
        .into_iter()
        .map(|(k, v)| {
            assert_ne!(v.last_seen_ns, 0, "an entry is stamped when written");
            Tracked {
                from: sa(k.saddr, k.sport),
                to: sa(k.daddr, k.dport),
                proto: k.proto,
                new_from: sa(v.saddr, v.sport),
                new_to: sa(v.daddr, v.dport),
                flags: v.flags,
                rev_nat_id: v.rev_nat_id,
                backend_id: v.backend_id,
            }
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum L4 {
    Tcp { flags: u8, seq: u32, ack: u32 },
    Udp,
}

/// A packet fixture, written by etherparse with every length and checksum filled in.
#[derive(Clone)]
struct Packet {
    /// Source, destination.
    macs: (Mac, Mac),
    from: SocketAddr,
    to: SocketAddr,
    l4: L4,
    /// IPv6 extension headers before the L4 header.
    exts: Ipv6Extensions,
    /// An IPv4 fragment offset, in 8-byte units.
    fragment_offset: u16,
    payload: &'static [u8],
}

impl Packet {
    /// A TCP segment from a client outside the node, as it arrives on `up0`.
    fn tcp(from: SocketAddr, to: SocketAddr, flags: u8) -> Self {
        Self {
            macs: (CLIENT_MAC, UP0_MAC),
            from,
            to,
            l4: L4::Tcp {
                flags,
                seq: 1000,
                ack: if flags & ACK != 0 { 5000 } else { 0 },
            },
            exts: Ipv6Extensions::default(),
            fragment_offset: 0,
            payload: if flags & SYN != 0 {
                b""
            } else {
                b"GET / HTTP/1.1\r\n\r\n"
            },
        }
    }

    fn udp(from: SocketAddr, to: SocketAddr) -> Self {
        Self {
            l4: L4::Udp,
            payload: b"are you there?",
            ..Self::tcp(from, to, SYN)
        }
    }

    /// The same packet between other addresses (what a translation must make of it).
    fn between(&self, from: SocketAddr, to: SocketAddr) -> Self {
        Self {
            from,
            to,
            ..self.clone()
        }
    }

    fn with_macs(&self, source: Mac, destination: Mac) -> Self {
        Self {
            macs: (source, destination),
            ..self.clone()
        }
    }

    fn ip(&self) -> IpHeaders {
        match (self.from.ip(), self.to.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut ip = Ipv4Header::new(0, 64, IpNumber::TCP, s.octets(), d.octets()).expect("a header");
                ip.fragment_offset = IpFragOffset::try_new(self.fragment_offset).expect("an offset");
                ip.dont_fragment = self.fragment_offset == 0;
                IpHeaders::Ipv4(ip, Ipv4Extensions::default())
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => IpHeaders::Ipv6(
                Ipv6Header {
                    hop_limit: 64,
                    source: s.octets(),
                    destination: d.octets(),
                    ..Default::default()
                },
                self.exts.clone(),
            ),
            _ => panic!("a packet from {} to {} mixes families", self.from, self.to),
        }
    }

    fn write(&self, step: etherparse::PacketBuilderStep<IpHeaders>) -> Vec<u8> {
        let mut out = Vec::new();
        match self.l4 {
            L4::Tcp { flags, seq, ack } => {
                let mut tcp = TcpHeader::new(self.from.port(), self.to.port(), seq, 64_240);
                tcp.syn = flags & SYN != 0;
                tcp.fin = flags & FIN != 0;
                tcp.rst = flags & RST != 0;
                tcp.psh = flags & PSH != 0;
                tcp.ack = flags & ACK != 0;
                tcp.acknowledgment_number = ack;
                step.tcp_header(tcp).write(&mut out, self.payload)
            }
            L4::Udp => step
                .udp(self.from.port(), self.to.port())
                .write(&mut out, self.payload),
        }
        .expect("writing a fixture");
        out
    }

    /// The Ethernet frame.
    fn frame(&self) -> Vec<u8> {
        self.write(PacketBuilder::ethernet2(self.macs.0, self.macs.1).ip(self.ip()))
    }

    /// The packet from its IP header on, as an L3 device (IPIP, WireGuard) carries it.
    fn l3(&self) -> Vec<u8> {
        self.write(PacketBuilder::ip(self.ip()))
    }
}

/// Asserts `run` left `expected` (every byte, so addresses, ports and both checksums) with
/// `verdict`.
fn assert_output(run: &TestRun, verdict: u32, expected: &Packet, what: &str) {
    assert_eq!(run.retval, verdict, "{what}: verdict");
    let want = expected.frame();
    assert!(
        run.packet == want,
        "{what}: the packet left is not the expected one\n got:  {}\n want: {}\n (want: {} → {})",
        hex(&run.packet),
        hex(&want),
        expected.from,
        expected.to
    );
    assert_checksums(&run.packet, what);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Verifies the IPv4 header checksum and the TCP/UDP/ICMP checksum of `frame` from scratch.
fn assert_checksums(frame: &[u8], what: &str) {
    let packet = SlicedPacket::from_ethernet(frame).unwrap_or_else(|e| panic!("{what}: unparsable: {e}"));
    let (src, dst) = match &packet.net {
        Some(NetSlice::Ipv4(ip)) => {
            let header = ip.header().to_header();
            assert_eq!(
                header.header_checksum,
                header.calc_header_checksum(),
                "{what}: IPv4 header checksum"
            );
            (IpAddr::from(header.source), IpAddr::from(header.destination))
        }
        Some(NetSlice::Ipv6(ip)) => {
            let header = ip.header();
            (header.source_addr().into(), header.destination_addr().into())
        }
        _ => panic!("{what}: not an IP packet"),
    };
    match (&packet.transport, src, dst) {
        (Some(TransportSlice::Tcp(tcp)), IpAddr::V4(s), IpAddr::V4(d)) => assert_eq!(
            tcp.checksum(),
            tcp.calc_checksum_ipv4(s.octets(), d.octets())
                .expect("a checksum"),
            "{what}: TCP checksum"
        ),
        (Some(TransportSlice::Tcp(tcp)), IpAddr::V6(s), IpAddr::V6(d)) => assert_eq!(
            tcp.checksum(),
            tcp.calc_checksum_ipv6(s.octets(), d.octets())
                .expect("a checksum"),
            "{what}: TCP checksum"
        ),
        // Zero is "no checksum" in IPv4 UDP (RFC 768).
        (Some(TransportSlice::Udp(udp)), IpAddr::V4(_), IpAddr::V4(_)) if udp.checksum() == 0 => {}
        (Some(TransportSlice::Udp(udp)), IpAddr::V4(s), IpAddr::V4(d)) => {
            let header = udp.to_header();
            assert_eq!(
                header.checksum,
                header
                    .calc_checksum_ipv4_raw(s.octets(), d.octets(), udp.payload())
                    .expect("a checksum"),
                "{what}: UDP checksum"
            );
        }
        (Some(TransportSlice::Icmpv4(icmp)), _, _) => assert_eq!(
            icmp.checksum(),
            icmp.icmp_type().calc_checksum(icmp.payload()),
            "{what}: ICMP checksum"
        ),
        (Some(TransportSlice::Icmpv6(icmp)), IpAddr::V6(s), IpAddr::V6(d)) => assert!(
            icmp.is_checksum_valid(s.octets(), d.octets()),
            "{what}: ICMPv6 checksum"
        ),
        (other, _, _) => panic!("{what}: no L4 header to check: {other:?}"),
    }
}

fn ethernet(frame: &[u8]) -> (Mac, Mac) {
    match SlicedPacket::from_ethernet(frame).expect("a frame").link {
        Some(LinkSlice::Ethernet2(eth)) => (eth.source(), eth.destination()),
        other => panic!("not an Ethernet frame: {other:?}"),
    }
}

#[test]
fn a_new_flow_to_a_local_backend_is_translated_and_tracked_both_ways() {
    let lab = Lab::new();
    let client = sa(CLIENT, 40_001);
    let frontend = sa(NODE, WEB_NODE_PORT);
    let backend = sa(LOCAL_BACKEND, BACKEND_PORT);

    let syn = Packet::tcp(client, frontend, SYN);
    let run = lab.ingress(&syn.frame());
    // Handed on to the stack, which delivers to the pod: only the destination changes.
    assert_output(&run, TC_ACT_OK, &syn.between(client, backend), "SYN");
    assert_eq!(
        lab.conntrack(),
        lab.flow(proto::TCP, client, frontend, client, backend, 0)
    );
    assert_eq!(lab.counter("tc_new_flow"), 1);

    // A later segment, with data, follows its conntrack entry.
    let data = Packet::tcp(client, frontend, ACK | PSH);
    let run = lab.ingress(&data.frame());
    assert_output(&run, TC_ACT_OK, &data.between(client, backend), "data");
    assert_eq!(lab.counter("tc_tracked"), 1);
    assert_eq!(lab.conntrack().len(), 2, "no new entries for a known flow");
}

#[test]
fn udp_datagrams_are_translated_and_a_missing_checksum_stays_missing() {
    let lab = Lab::new();
    let frontend = sa(NODE, WEB_UDP_NODE_PORT);
    let backend = sa(LOCAL_BACKEND, BACKEND_UDP_PORT);

    let client = sa(CLIENT, 40_014);
    let datagram = Packet::udp(client, frontend);
    let run = lab.ingress(&datagram.frame());
    assert_output(&run, TC_ACT_OK, &datagram.between(client, backend), "a datagram");
    assert_eq!(
        lab.conntrack(),
        lab.flow(proto::UDP, client, frontend, client, backend, 0)
    );

    // An IPv4 datagram sent without a checksum (zero) must leave without one: an incremental
    // update of zero would make a wrong checksum the backend's stack drops the datagram for.
    const UDP_CHECKSUM: std::ops::Range<usize> = 14 + 20 + 6..14 + 20 + 8;
    let client = sa(CLIENT, 40_015);
    let datagram = Packet::udp(client, frontend);
    let mut sent = datagram.frame();
    sent[UDP_CHECKSUM].fill(0);
    let mut want = datagram.between(client, backend).frame();
    want[UDP_CHECKSUM].fill(0);
    let run = lab.ingress(&sent);
    assert_eq!(run.retval, TC_ACT_OK);
    assert_eq!(run.packet, want, "a datagram without a checksum");
    assert_checksums(&run.packet, "a datagram without a checksum");
}

#[test]
fn a_local_backend_s_reply_leaves_from_the_node_port() {
    let lab = Lab::new();
    let client = sa(CLIENT, 40_002);
    let frontend = sa(NODE, WEB_NODE_PORT);
    let backend = sa(LOCAL_BACKEND, BACKEND_PORT);
    assert_eq!(
        lab.ingress(&Packet::tcp(client, frontend, SYN).frame()).retval,
        TC_ACT_OK
    );

    let reply = Packet::tcp(backend, client, SYN | ACK).with_macs(POD_MAC, CLIENT_MAC);
    let run = lab.egress(&reply.frame());
    // Egress is past the stack's routing: the source becomes the NodePort, nothing else.
    assert_output(&run, TC_ACT_OK, &reply.between(frontend, client), "SYN-ACK");
    assert_eq!(lab.counter("tc_tracked"), 1);

    // The client's own packets are not replies: egress leaves them alone.
    let outbound = Packet::tcp(client, frontend, ACK).with_macs(POD_MAC, CLIENT_MAC);
    let run = lab.egress(&outbound.frame());
    assert_output(&run, TC_ACT_OK, &outbound, "a client's packet at egress");
}

#[test]
fn a_flow_to_a_remote_backend_is_source_nated_and_its_reply_translated_back() {
    let lab = Lab::new();
    let client = sa(CLIENT, 40_003);
    let frontend = sa(NODE, REMOTE_NODE_PORT);
    let backend = sa(REMOTE_BACKEND, BACKEND_PORT);
    // The node's SNAT address keeps the client's port while that port is free on it.
    let snat = sa(NODE, 40_003);

    let syn = Packet::tcp(client, frontend, SYN);
    let run = lab.ingress(&syn.frame());
    // Sent straight out of be0 towards the backend, addressed to the neighbour the route
    // lookup found: the stack would drop a packet from its own address on input.
    let forwarded = syn.between(snat, backend).with_macs(BE0_MAC, REMOTE_MAC);
    assert_output(&run, TC_ACT_REDIRECT, &forwarded, "SYN to a remote backend");
    assert_eq!(
        lab.conntrack(),
        lab.flow(proto::TCP, client, frontend, snat, backend, ct_flags::SNAT)
    );

    // The backend answers the node; the answer goes back to the client from the NodePort,
    // out of up0.
    let reply = Packet::tcp(backend, snat, SYN | ACK).with_macs(REMOTE_MAC, BE0_MAC);
    let run = lab.ingress(&reply.frame());
    let back = reply.between(frontend, client).with_macs(UP0_MAC, CLIENT_MAC);
    assert_output(&run, TC_ACT_REDIRECT, &back, "SYN-ACK from a remote backend");
    assert_eq!(lab.counter("tc_tracked"), 1);
}

#[test]
fn a_second_client_on_a_taken_source_port_gets_another_snat_port() {
    let lab = Lab::new();
    let frontend = sa(NODE, REMOTE_NODE_PORT);
    let backend = sa(REMOTE_BACKEND, BACKEND_PORT);
    let first = sa(CLIENT, 40_004);
    let second = sa(OTHER_CLIENT, 40_004);
    assert_eq!(
        lab.ingress(&Packet::tcp(first, frontend, SYN).frame()).retval,
        TC_ACT_REDIRECT
    );

    let syn = Packet::tcp(second, frontend, SYN);
    let run = lab.ingress(&syn.frame());
    assert_eq!(run.retval, TC_ACT_REDIRECT);
    let tracked = lab.conntrack();
    let entry = tracked
        .iter()
        .find(|t| t.from == second)
        .expect("the second client's flow is tracked");
    let port = entry.new_from.port();
    assert_eq!(entry.new_from.ip(), IpAddr::from(NODE));
    assert!(
        port != 40_004 && (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&port),
        "SNAT port {port}"
    );
    let snat = sa(NODE, port);
    let forwarded = syn.between(snat, backend).with_macs(BE0_MAC, REMOTE_MAC);
    assert_output(&run, TC_ACT_REDIRECT, &forwarded, "SYN on another port");
    let mut want = lab.flow(
        proto::TCP,
        first,
        frontend,
        sa(NODE, 40_004),
        backend,
        ct_flags::SNAT,
    );
    want.extend(lab.flow(proto::TCP, second, frontend, snat, backend, ct_flags::SNAT));
    want.sort();
    assert_eq!(tracked, want);
}

/// Two CPUs open SNATed flows at the same moment from two clients on the same source port, so
/// both want the same reply tuple (the node's address on that port). Each flow must keep a
/// reply entry of its own: before the reply entry was claimed with BPF_NOEXIST, a lookup chose
/// the port and a later insert took it, and the second CPU overwrote the first flow's entry.
#[test]
fn two_cpus_opening_flows_at_once_never_share_a_snat_reply_tuple() {
    const ROUNDS: u16 = 40;
    // 4 entries per pair of flows: a round stays well inside the 1024-entry LRU.
    const PAIRS_PER_ROUND: u16 = 200;
    let lab = Lab::new();
    if std::thread::available_parallelism().map_or(1, usize::from) < 2 {
        println!("SKIPPED: the race needs two CPUs");
        return;
    }
    let frontend = sa(NODE, REMOTE_NODE_PORT);
    let fd = lab
        .datapath
        .program_fd("bkp_tc_ingress")
        .expect("a loaded program");
    let start = std::sync::Barrier::new(2);
    let mut stolen = Vec::new();
    for round in 0..ROUNDS {
        let first_port = 20_000 + round * PAIRS_PER_ROUND;
        std::thread::scope(|scope| {
            for (cpu, client) in [(0, CLIENT), (1, OTHER_CLIENT)] {
                let (start, node) = (&start, &lab.node);
                scope.spawn(move || {
                    node.run(|| {
                        let mut set = nix::sched::CpuSet::new();
                        set.set(cpu).map_err(std::io::Error::from)?;
                        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                            .map_err(std::io::Error::from)?;
                        for port in first_port..first_port + PAIRS_PER_ROUND {
                            let frame = Packet::tcp(sa(client, port), frontend, SYN).frame();
                            start.wait();
                            let run = prog_test_run(fd, &frame, 1)?;
                            assert_eq!(run.retval, TC_ACT_REDIRECT, "SYN from {client}:{port}");
                        }
                        Ok(())
                    })
                    .expect("test runs on one CPU");
                });
            }
        });
        let tracked = lab.conntrack();
        for flow in tracked.iter().filter(|t| t.flags & ct_flags::REPLY == 0) {
            let reply = tracked
                .iter()
                .find(|t| t.from == flow.new_to && t.to == flow.new_from);
            if reply.is_none_or(|r| r.new_to != flow.from) {
                stolen.push((*flow, reply.copied()));
            }
        }
        lab.forget_conntrack();
    }
    assert_eq!(lab.counter("tc_snat_failed"), 0);
    assert!(
        stolen.is_empty(),
        "{} of {} flows lost their reply entry to another flow, e.g. {:?}",
        stolen.len(),
        2 * u32::from(ROUNDS) * u32::from(PAIRS_PER_ROUND),
        stolen.first()
    );
}

/// The map walker's conntrack garbage collection over 12 000 entries: every expired entry
/// goes, with the other direction of a closing flow, and nothing live; the fill count it keeps
/// for `/metrics` then matches. More entries than one batch read holds (4096).
#[test]
fn conntrack_gc_removes_every_expired_entry_and_keeps_every_live_one() {
    require_root();
    let pins = Pins::unique("bkgc");
    // Far from full: an LRU map may evict before it is full (Linux 6.1 did so at 12 000 of
    // 16 384), and an entry evicted here would look collected.
    let sizes = MapSizes {
        conntrack: 65_536,
        ..SIZES
    };
    let _datapath = Datapath::load(pins.path(), sizes).expect("loading the datapath");
    let config = NodeConfig {
        snat_v4: NODE.octets(),
        snat_v6: NODE6.octets(),
        ct_tcp_timeout_s: 1,
        ct_tcp_closing_timeout_s: 1,
        ct_udp_timeout_s: 1,
        ..NodeConfig::default()
    };
    // Seen at boot, so expired whenever the test runs (CLOCK_MONOTONIC starts at boot: a VM
    // booted a minute ago has no "an hour ago"), or an hour from now, so live however slowly
    // the entries are written.
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("the clock");
    let now = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
    let (expired, live_until) = (0, now + 3600 * 1_000_000_000);
    let key = |i: u32| {
        let [_, b, c, d] = i.to_be_bytes();
        CtKey::new([10, b, c, d], NODE.octets(), 40_000, 30_080, proto::TCP)
    };
    let mut map: HashMap<MapData, CtKey<AddrV4>, CtValue<AddrV4>> =
        typed(pins.path(), names::CONNTRACK_V4).expect("opening conntrack");
    // i % 3: 0 live, 1 expired, 2 an expired closing flow whose other direction
    // (key i + 100 000) is still fresh: both must go.
    let mut live = std::collections::HashSet::new();
    for i in 0..9000u32 {
        let (last_seen_ns, flags) = match i % 3 {
            0 => (live_until, 0),
            1 => (expired, 0),
            _ => (expired, ct_flags::CLOSING),
        };
        let other = key(i + 100_000);
        let value = CtValue {
            last_seen_ns,
            saddr: other.daddr,
            daddr: other.saddr,
            sport: other.dport,
            dport: other.sport,
            rev_nat_id: 1,
            backend_id: 1,
            flags,
            _pad: [0; 3],
        };
        map.insert(key(i), value, 0).expect("an entry");
        if i % 3 == 0 {
            live.insert(key(i));
        } else if i % 3 == 2 {
            let reply = CtValue {
                last_seen_ns: live_until,
                flags: ct_flags::REPLY | ct_flags::CLOSING,
                ..value
            };
            map.insert(other, reply, 0).expect("an entry");
        }
    }
    assert_eq!(
        map.keys().count(),
        12_000,
        "every entry written is there to collect"
    );
    let mut gc = Conntrack::open(pins.path(), config).expect("opening conntrack");
    assert_eq!(gc.collect(), 3000 + 2 * 3000);
    let left: std::collections::HashSet<_> = map.keys().map(|k| k.expect("a key")).collect();
    assert_eq!(left, live);
    let readings = PinnedReadings::open(pins.path()).expect("opening the readings");
    readings.refresh_fill();
    let fill = readings.map_fill();
    let counted = fill
        .iter()
        .find(|f| f.map == names::CONNTRACK_V4)
        .map(|f| f.entries);
    assert_eq!(counted, Some(3000));
}

#[test]
fn a_fin_marks_its_flow_closing() {
    let lab = Lab::new();
    let frontend = sa(NODE, WEB_NODE_PORT);
    let backend = sa(LOCAL_BACKEND, BACKEND_PORT);

    let client = sa(CLIENT, 40_005);
    lab.ingress(&Packet::tcp(client, frontend, SYN).frame());
    let fin = Packet::tcp(client, frontend, FIN | ACK);
    let run = lab.ingress(&fin.frame());
    assert_output(&run, TC_ACT_OK, &fin.between(client, backend), "FIN");
    assert_eq!(
        lab.conntrack(),
        lab.flow(proto::TCP, client, frontend, client, backend, ct_flags::CLOSING)
    );

    // A flow whose first packet seen is a FIN (one that outlived its entry) is closing at once.
    let late = sa(CLIENT, 40_006);
    let fin = Packet::tcp(late, frontend, FIN | ACK);
    let run = lab.ingress(&fin.frame());
    assert_output(&run, TC_ACT_OK, &fin.between(late, backend), "FIN opening a flow");
    let tracked = lab.conntrack();
    for entry in lab.flow(proto::TCP, late, frontend, late, backend, ct_flags::CLOSING) {
        assert!(tracked.contains(&entry), "{entry:?} not in {tracked:?}");
    }
}

#[test]
fn a_tcp_segment_to_a_service_without_endpoints_is_answered_with_a_reset() {
    let lab = Lab::new();
    let client = sa(CLIENT, 40_007);
    let frontend = sa(NODE, EMPTY_TCP_NODE_PORT);

    for (flags, (seq, ack, acks)) in [
        // RFC 793: a segment without ACK gets a RST+ACK acknowledging all it occupied.
        (SYN, (0, 1001, true)),
        // A segment with an ACK gets a RST whose sequence number is that acknowledgement.
        (ACK | PSH, (5000, 0, false)),
    ] {
        let segment = Packet::tcp(client, frontend, flags);
        let run = lab.ingress(&segment.frame());
        assert_eq!(run.retval, TC_ACT_REDIRECT, "the answer goes back out of up0");
        assert_eq!(ethernet(&run.packet), (UP0_MAC, CLIENT_MAC));
        assert_checksums(&run.packet, "RST");
        let answer = SlicedPacket::from_ethernet(&run.packet).expect("a frame");
        let Some(NetSlice::Ipv4(ip)) = &answer.net else {
            panic!("not IPv4: {:?}", answer.net)
        };
        let Some(TransportSlice::Tcp(tcp)) = &answer.transport else {
            panic!("not TCP: {:?}", answer.transport)
        };
        let h = ip.header();
        assert_eq!((h.source_addr(), h.destination_addr()), (NODE, CLIENT));
        assert_eq!(
            (tcp.source_port(), tcp.destination_port()),
            (EMPTY_TCP_NODE_PORT, 40_007)
        );
        assert_eq!(
            (tcp.sequence_number(), tcp.acknowledgment_number()),
            (seq, ack),
            "answer to flags {flags:#x}"
        );
        assert_eq!(
            (tcp.rst(), tcp.ack(), tcp.syn(), tcp.fin(), tcp.psh()),
            (true, acks, false, false, false),
            "RST, ACK, SYN, FIN, PSH of the answer to flags {flags:#x}"
        );
        assert!(tcp.payload().is_empty());
        assert_eq!(
            usize::from(h.total_len()),
            run.packet.len() - 14,
            "no trailing bytes"
        );
    }
    assert_eq!(lab.counter("tc_reject_no_backend"), 2);
    assert!(lab.conntrack().is_empty());

    // A RST is never answered.
    let run = lab.ingress(&Packet::tcp(client, frontend, RST).frame());
    assert_eq!(run.retval, TC_ACT_SHOT);
}

#[test]
fn a_udp_datagram_to_a_service_without_endpoints_is_answered_with_port_unreachable() {
    let lab = Lab::new();
    for (client, frontend) in [
        (sa(CLIENT, 40_008), sa(NODE, EMPTY_UDP_NODE_PORT)),
        (sa(CLIENT6, 40_008), sa(NODE6, EMPTY_UDP_NODE_PORT)),
    ] {
        let datagram = Packet::udp(client, frontend);
        let sent = datagram.frame();
        let run = lab.ingress(&sent);
        let what = format!("answer to {client}");
        assert_eq!(run.retval, TC_ACT_REDIRECT, "{what}");
        assert_eq!(ethernet(&run.packet), (UP0_MAC, CLIENT_MAC), "{what}");
        assert_checksums(&run.packet, &what);
        let answer = SlicedPacket::from_ethernet(&run.packet).expect("a frame");
        let (source, destination, ip_header_len, (kind, code), quoted) =
            match (&answer.net, &answer.transport) {
                (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Icmpv4(icmp))) => (
                    IpAddr::from(ip.header().source_addr()),
                    IpAddr::from(ip.header().destination_addr()),
                    20,
                    (icmp.type_u8(), icmp.code_u8()),
                    icmp.payload(),
                ),
                (Some(NetSlice::Ipv6(ip)), Some(TransportSlice::Icmpv6(icmp))) => (
                    IpAddr::from(ip.header().source_addr()),
                    IpAddr::from(ip.header().destination_addr()),
                    40,
                    (icmp.type_u8(), icmp.code_u8()),
                    icmp.payload(),
                ),
                other => panic!("{what}: not an ICMP answer: {other:?}"),
            };
        assert_eq!((source, destination), (frontend.ip(), client.ip()), "{what}");
        // Destination unreachable / port unreachable: 3/3 in ICMP, 1/4 in ICMPv6.
        let want = if client.is_ipv4() { (3, 3) } else { (1, 4) };
        assert_eq!((kind, code), want, "{what}");
        // The datagram's IP header and first 8 bytes (its UDP header), as the client's stack
        // matches them to its socket.
        assert_eq!(quoted, &sent[14..14 + ip_header_len + 8], "{what}: quote");
    }
    assert_eq!(lab.counter("tc_reject_no_backend"), 2);
    assert!(lab.conntrack().is_empty());
}

#[test]
fn load_balancer_source_ranges_drop_clients_outside_them() {
    let lab = Lab::new();
    let frontend = sa(LB_IP, 80);
    let backend = sa(RANGED_BACKEND, BACKEND_PORT);

    let outsider = Packet::tcp(sa(OUTSIDER, 40_009), frontend, SYN);
    let run = lab.ingress(&outsider.frame());
    assert_eq!(run.retval, TC_ACT_SHOT);
    assert_eq!(lab.counter("tc_drop_source_range"), 1);
    assert!(lab.conntrack().is_empty());

    let client = sa(CLIENT, 40_009);
    let admitted = Packet::tcp(client, frontend, SYN);
    let run = lab.ingress(&admitted.frame());
    assert_output(
        &run,
        TC_ACT_OK,
        &admitted.between(client, backend),
        "a client in range",
    );
    assert_eq!(lab.counter("tc_drop_source_range"), 1);
}

#[test]
fn ipv6_extension_headers_are_skipped_to_find_the_ports() {
    let lab = Lab::new();
    let client = sa(CLIENT6, 40_010);
    let frontend = sa(NODE6, WEB_NODE_PORT);
    let backend = sa(LOCAL_BACKEND6, BACKEND_PORT);
    // Hop-by-hop (8 bytes) then destination options (16 bytes), both PadN only.
    let mut syn = Packet::tcp(client, frontend, SYN);
    syn.exts.hop_by_hop_options =
        Some(Ipv6RawExtHeader::new_raw(IpNumber::TCP, &[1, 4, 0, 0, 0, 0]).expect("hop-by-hop"));
    syn.exts.destination_options = Some(
        Ipv6RawExtHeader::new_raw(IpNumber::TCP, &[1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .expect("destination options"),
    );
    let run = lab.ingress(&syn.frame());
    assert_output(
        &run,
        TC_ACT_OK,
        &syn.between(client, backend),
        "SYN behind extension headers",
    );
    assert_eq!(
        lab.conntrack(),
        lab.flow(proto::TCP, client, frontend, client, backend, 0)
    );

    // The answers are built for a bare IPv6 header: a datagram behind extension headers to a
    // Service without endpoints is dropped (and counted) rather than answered wrongly.
    let mut datagram = Packet::udp(sa(CLIENT6, 40_010), sa(NODE6, EMPTY_UDP_NODE_PORT));
    datagram.exts = syn.exts.clone();
    assert_eq!(lab.ingress(&datagram.frame()).retval, TC_ACT_SHOT);
    assert_eq!(lab.counter("tc_reject_no_backend"), 1);
}

#[test]
fn fragments_pass_untranslated_and_are_counted() {
    let lab = Lab::new();
    // A non-first IPv4 fragment whose data happens to look like a TCP header to the NodePort,
    // and an IPv6 first fragment (the programs pass every IPv6 fragment).
    let mut v4 = Packet::tcp(sa(CLIENT, 40_011), sa(NODE, WEB_NODE_PORT), SYN);
    v4.fragment_offset = 185;
    let mut v6 = Packet::tcp(sa(CLIENT6, 40_011), sa(NODE6, WEB_NODE_PORT), SYN);
    v6.exts.fragment = Some(Ipv6FragmentHeader::new(
        IpNumber::TCP,
        IpFragOffset::ZERO,
        true,
        0x1234,
    ));
    for fragment in [&v4, &v6] {
        let sent = fragment.frame();
        let run = lab.ingress(&sent);
        assert_eq!(run.retval, TC_ACT_OK, "fragment from {}", fragment.from);
        assert_eq!(run.packet, sent, "fragment from {} changed", fragment.from);
    }
    assert_eq!(lab.counter("tc_fragment"), 2);
    assert_eq!(lab.counter("tc_new_flow"), 0);
    assert!(lab.conntrack().is_empty());
}

#[test]
#[expect(
    clippy::large_stack_arrays,
    reason = "six test packets, each with its payload buffer"
)]
fn packets_for_no_external_frontend_pass_untouched() {
    let lab = Lab::new();
    for packet in [
        // Another port of the node.
        Packet::tcp(sa(CLIENT, 40_012), sa(NODE, 22), SYN),
        // A ClusterIP: served by the socket hooks only, never from outside.
        Packet::tcp(sa(CLIENT, 40_012), sa(CLUSTER_IP, 80), SYN),
        Packet::tcp(sa(CLIENT6, 40_012), sa(NODE6, 22), SYN),
    ] {
        let sent = packet.frame();
        for (hook, run) in [("ingress", lab.ingress(&sent)), ("egress", lab.egress(&sent))] {
            assert_eq!(run.retval, TC_ACT_OK, "{hook} to {}", packet.to);
            assert_eq!(run.packet, sent, "{hook} to {} changed", packet.to);
        }
    }
    assert!(lab.conntrack().is_empty());
}

/// An L3 device (IPIP, WireGuard, ip6tnl) hands tc the packet from its IP header on. A test
/// run sets `skb->protocol` from input bytes 12-13 whatever the packet is, so this holds only
/// because the L3 programs take the family from the IP header's version, as they must.
#[test]
fn an_l3_device_packet_is_translated_from_its_ip_header() {
    let lab = Lab::new();
    for (client, frontend, backend) in [
        (
            sa(CLIENT, 40_013),
            sa(NODE, WEB_NODE_PORT),
            sa(LOCAL_BACKEND, BACKEND_PORT),
        ),
        (
            sa(CLIENT6, 40_013),
            sa(NODE6, WEB_NODE_PORT),
            sa(LOCAL_BACKEND6, BACKEND_PORT),
        ),
    ] {
        // The expected packets are etherparse's, so they carry checksums computed from scratch.
        let syn = Packet::tcp(client, frontend, SYN);
        let run = lab.run("bkp_tc_ingress_l3", &syn.l3());
        assert_eq!(run.retval, TC_ACT_OK, "SYN from {client}");
        assert_eq!(run.packet, syn.between(client, backend).l3(), "SYN from {client}");

        let reply = Packet::tcp(backend, client, SYN | ACK);
        let run = lab.run("bkp_tc_egress_l3", &reply.l3());
        assert_eq!(run.retval, TC_ACT_OK, "SYN-ACK to {client}");
        assert_eq!(
            run.packet,
            reply.between(frontend, client).l3(),
            "SYN-ACK to {client}"
        );
    }
    let mut want = lab.flow(
        proto::TCP,
        sa(CLIENT, 40_013),
        sa(NODE, WEB_NODE_PORT),
        sa(CLIENT, 40_013),
        sa(LOCAL_BACKEND, BACKEND_PORT),
        0,
    );
    want.extend(lab.flow(
        proto::TCP,
        sa(CLIENT6, 40_013),
        sa(NODE6, WEB_NODE_PORT),
        sa(CLIENT6, 40_013),
        sa(LOCAL_BACKEND6, BACKEND_PORT),
        0,
    ));
    want.sort();
    assert_eq!(lab.conntrack(), want);
}

/// A BTF blob (the kernel's format: header, type records, strings) from type records.
fn btf_blob(types: &[&[u32]], strings: &[u8]) -> Vec<u8> {
    let types: Vec<u8> = types
        .iter()
        .flat_map(|t| t.iter())
        .flat_map(|w| w.to_ne_bytes())
        .collect();
    let mut raw = Vec::new();
    raw.extend_from_slice(&0xeb9f_u16.to_ne_bytes());
    raw.extend_from_slice(&[1, 0]);
    for word in [
        24,
        0,
        types.len() as u32,
        types.len() as u32,
        strings.len() as u32,
    ] {
        raw.extend_from_slice(&word.to_ne_bytes());
    }
    raw.extend_from_slice(&types);
    raw.extend_from_slice(strings);
    raw
}

/// `union bpf_attr` for BPF_BTF_LOAD. `log_true_size` (an output since 6.4) is spelled out
/// so the struct has no padding: a kernel before it checks that the bytes after
/// `log_level` are zero, and padding is not (6.1 answered EINVAL).
#[repr(C)]
struct BtfLoad {
    btf: u64,
    log_buf: u64,
    btf_size: u32,
    log_size: u32,
    log_level: u32,
    log_true_size: u32,
}

/// `union bpf_attr` for BPF_MAP_CREATE, up to the BTF ids.
#[repr(C)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    map_ifindex: u32,
    btf_fd: u32,
    btf_key_type_id: u32,
    btf_value_type_id: u32,
}

/// bpf(2) for a command that answers with a new file descriptor (BTF_LOAD, MAP_CREATE).
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    // SAFETY: `attr` is the bpf_attr member for `cmd`, with its addresses valid for the
    // lengths it names.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<T>(),
        )
    };
    assert!(fd >= 0, "bpf({cmd}): {}", std::io::Error::last_os_error());
    // SAFETY: both commands return a new file descriptor, which we now own.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}

/// Creates, as an older build would have, the IPv4 conntrack map with this build's sizes but
/// the frontend and backend ids in each other's place in the value, and pins it at `path`.
fn pin_conntrack_of_an_older_build(path: &std::path::Path) {
    const INT: u32 = 1 << 24;
    const ARRAY: u32 = 3 << 24;
    const STRUCT: u32 = 4 << 24;
    let strings = b"\0u8\0u16\0u32\0u64\0CtKey\0CtValue\0saddr\0daddr\0sport\0dport\0proto\0_pad\0\
                    last_seen_ns\0backend_id\0rev_nat_id\0flags\0";
    let at = |name: &str| {
        let needle = format!("\0{name}\0");
        strings
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .expect("a name in the string table") as u32
            + 1
    };
    let (u8_, u16_, u32_, u64_, addr, pad) = (1, 2, 3, 4, 5, 6);
    let member = |name, ty, bits: u32| [at(name), ty, bits];
    let key: Vec<u32> = [at("CtKey"), STRUCT | 6, 16]
        .into_iter()
        .chain(member("saddr", addr, 0))
        .chain(member("daddr", addr, 32))
        .chain(member("sport", u16_, 64))
        .chain(member("dport", u16_, 80))
        .chain(member("proto", u8_, 96))
        .chain(member("_pad", pad, 104))
        .collect();
    let value: Vec<u32> = [at("CtValue"), STRUCT | 9, 32]
        .into_iter()
        .chain(member("last_seen_ns", u64_, 0))
        .chain(member("saddr", addr, 64))
        .chain(member("daddr", addr, 96))
        .chain(member("sport", u16_, 128))
        .chain(member("dport", u16_, 144))
        .chain(member("backend_id", u32_, 160))
        .chain(member("rev_nat_id", u32_, 192))
        .chain(member("flags", u8_, 224))
        .chain(member("_pad", pad, 232))
        .collect();
    let btf = btf_blob(
        &[
            &[at("u8"), INT, 1, 8],
            &[at("u16"), INT, 2, 16],
            &[at("u32"), INT, 4, 32],
            &[at("u64"), INT, 8, 64],
            &[0, ARRAY, 0, u8_, u32_, 4],
            &[0, ARRAY, 0, u8_, u32_, 3],
            &key,
            &value,
        ],
        strings,
    );
    let (key_type, value_type) = (7, 8);

    let btf_fd = bpf(
        18,
        &mut BtfLoad {
            btf: btf.as_ptr() as u64,
            log_buf: 0,
            btf_size: btf.len() as u32,
            log_size: 0,
            log_level: 0,
            log_true_size: 0,
        },
    );
    let mut map_name = [0u8; 16];
    map_name[..names::CONNTRACK_V4.len()].copy_from_slice(names::CONNTRACK_V4.as_bytes());
    let map = bpf(
        0,
        &mut MapCreate {
            map_type: 9, // BPF_MAP_TYPE_LRU_HASH
            key_size: size_of::<CtKey<AddrV4>>() as u32,
            value_size: size_of::<CtValue<AddrV4>>() as u32,
            max_entries: SIZES.conntrack,
            map_flags: 0,
            inner_map_fd: 0,
            numa_node: 0,
            map_name,
            map_ifindex: 0,
            btf_fd: std::os::fd::AsRawFd::as_raw_fd(&btf_fd) as u32,
            btf_key_type_id: key_type,
            btf_value_type_id: value_type,
        },
    );
    MapData::from_fd(map)
        .expect("a map handle")
        .pin(path)
        .expect("pinning the older build's map");
}

/// An agent upgraded to a build whose map has the same sizes but other fields must not read
/// the old entries with the new layout: it replaces the map, names it, and on a restart of the
/// same build keeps the map and its entries.
#[test]
fn a_pinned_map_with_other_fields_of_the_same_sizes_is_recreated_and_one_of_this_build_is_kept() {
    require_root();
    let pins = Pins::unique("bkl");
    std::fs::create_dir_all(pins.path()).expect("creating the pin directory");
    let path = pins.path().join(names::CONNTRACK_V4);
    pin_conntrack_of_an_older_build(&path);
    let old_flow = CtKey::new(CLIENT.octets(), NODE.octets(), 40_000, WEB_NODE_PORT, proto::TCP);
    let mut old: HashMap<MapData, CtKey<AddrV4>, CtValue<AddrV4>> =
        typed(pins.path(), names::CONNTRACK_V4).expect("opening the older build's map");
    old.insert(old_flow, CtValue::default(), 0)
        .expect("an entry of the older build");
    let old_id = aya::maps::MapInfo::from_pin(&path).expect("the pinned map").id();

    let datapath = Datapath::load(pins.path(), SIZES).expect("loading the datapath");
    let new_id = aya::maps::MapInfo::from_pin(&path).expect("the pinned map").id();
    assert_ne!(new_id, old_id, "the older build's map is still pinned");
    let mut map: HashMap<MapData, CtKey<AddrV4>, CtValue<AddrV4>> =
        typed(pins.path(), names::CONNTRACK_V4).expect("opening the pinned map");
    assert_eq!(
        map.keys().count(),
        0,
        "the older build's entries are read with this layout"
    );
    let recreated = datapath.recreated();
    assert_eq!(
        recreated.iter().map(|r| (r.map, r.mismatch)).collect::<Vec<_>>(),
        [(names::CONNTRACK_V4, Mismatch::Layout)],
        "{recreated:?}"
    );
    assert_ne!(recreated[0].pinned, recreated[0].built);

    // A restart of the same build adopts every map, entries and all.
    let flow = CtKey::new(CLIENT.octets(), NODE.octets(), 40_001, WEB_NODE_PORT, proto::TCP);
    map.insert(flow, CtValue::default(), 0).expect("a flow");
    drop((map, datapath));
    let datapath = Datapath::load(pins.path(), SIZES).expect("reloading the datapath");
    assert_eq!(datapath.recreated(), [], "a map of this very build was recreated");
    assert_eq!(
        aya::maps::MapInfo::from_pin(&path).expect("the pinned map").id(),
        new_id
    );
    let map: HashMap<MapData, CtKey<AddrV4>, CtValue<AddrV4>> =
        typed(pins.path(), names::CONNTRACK_V4).expect("opening the pinned map");
    assert_eq!(
        map.keys().collect::<Result<Vec<_>, _>>().expect("reading keys"),
        [flow]
    );
}
