//! NodePort, LoadBalancer IP and externalIP traffic from outside the node, through the tc
//! programs on the node's devices. Topology (every namespace made by the test):
//!
//! ```text
//!  ext (192.168.50.2) ──up0── node (192.168.50.1; 172.30.0.1) ──n2── node2 (172.30.0.2) ── remote (10.245.0.2)
//!  ext (fd00:50::2)           node (fd00:50::1; fd00:30::1)          node2 (fd00:30::2)  ── remote (fd00:245::2)
//!                               │ br0 10.244.0.1, fd00:10:244::1
//!                               └─ local pods 10.244.0.10, fd00:10:244::10, ...
//! ```
//!
//! The agent runs in the node namespace with `--devices up0,n2`. The remote backend's replies
//! route back through node2's default route, so a flow to it works only if it was SNATed to
//! the node and its replies are translated back on `n2`'s ingress.
//!
//! `up0` is a veth by default. The L3-device tests make it a device whose packets start at the
//! IP header, with no Ethernet header: a TUN pair that the test process copies packets across,
//! or an IPIP tunnel over a veth underlay (`u0`, 172.31.255.1/30) where the kernel has the
//! module. Through it the tc programs see bare IP packets on ingress and must send bare ones
//! out of `up0`, while the remote backend is still behind the Ethernet device `n2`.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use aya::maps::{HashMap, MapData};
use bkp_sandbox::{netns::Netns, probe::ProbeMode, servers::Identity};
use bpf_kube_proxy::{
    datapath::{host::Offload, maps::typed},
    pipeline::model::Protocol,
};
use integration_tests::{
    HTTP_PORT, NODE_NAME, UDP_PORT, World, manifests::docs, metric_sample, tun::TunPair,
};
use nix::sys::signal::Signal;
use proxy_common::{
    maps::{self as names, AddrV4, CtKey, CtValue},
    proto,
};

const NODE_IP: &str = "192.168.50.1";
const CLIENT_IP: &str = "192.168.50.2";
const REMOTE_IP: &str = "10.245.0.2";
const NODE_IP6: &str = "fd00:50::1";
const CLIENT_IP6: &str = "fd00:50::2";
const REMOTE_IP6: &str = "fd00:245::2";
const LB_IP6: &str = "2001:db8:10::10";
const NODE_PORT: u16 = 30080;
const NODE_PORT_UDP: u16 = 30053;
const LB_IP: &str = "203.0.113.10";
const EXTERNAL_IP: &str = "198.51.100.7";
const HEALTH_PORT: u16 = 32100;

/// What `up0`, the device between the client and the node, is.
#[derive(Clone, Copy, Debug)]
enum Uplink {
    /// A veth pair: Ethernet frames.
    Veth,
    /// A veth pair, the agent running native XDP (`--xdp native`) on `up0` and `n2` ahead of
    /// tc, and the veths made as a wire is for it (see [`wire_like`]).
    VethXdp,
    /// A TUN device on each side, packets copied across by the test process.
    Tun,
    /// An IPIP tunnel over a veth underlay (IPv4 only).
    Ipip,
}

/// Whatever keeps the uplink carrying packets for as long as the test runs.
enum Link {
    Kernel,
    Tun(TunPair),
}

/// Field order is drop order: the link's pump stops first, the extra namespaces go before the
/// world (and its node). The remote pod's is only held so it lives as long as the test.
struct Outside {
    link: Link,
    ext: Netns,
    _remote: Netns,
    node2: Netns,
    world: World,
}

fn forwarding(netns: &Netns) {
    netns
        .run(|| {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
            std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
        })
        .expect("enabling forwarding");
}

/// `BKP_TC_ATTACH=netlink` runs every test here through cls_bpf filters, as on kernels without
/// TCX (< 6.6), even on one that has it.
static FORCED_TC_ATTACH: std::sync::LazyLock<Option<String>> =
    std::sync::LazyLock::new(|| std::env::var("BKP_TC_ATTACH").ok());

/// `args` plus the forced `--tc-attach`, unless they choose one themselves.
fn with_forced_tc_attach(mut args: Vec<&str>) -> Vec<&str> {
    if let Some(mode) = FORCED_TC_ATTACH.as_deref()
        && !args.contains(&"--tc-attach")
    {
        args.extend(["--tc-attach", mode]);
    }
    args
}

/// Gives the uplink `device` of the node and `client_dev` of the client their addresses (IPv6
/// too with `ipv6`), brings them up and routes the client through the node.
fn address_uplink(node: &Netns, device: &str, ext: &Netns, client_dev: &str, ipv6: bool) {
    let link = |ns: &Netns, args: &[&str]| ns.ip(args).unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    link(node, &["addr", "add", &format!("{NODE_IP}/24"), "dev", device]);
    link(node, &["link", "set", device, "up"]);
    link(
        ext,
        &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", client_dev],
    );
    link(ext, &["link", "set", client_dev, "up"]);
    link(ext, &["route", "add", "default", "via", NODE_IP]);
    if ipv6 {
        // Usable at once (no duplicate address detection), as on the pods.
        let addr6 =
            |ns: &Netns, cidr: &str, dev: &str| link(ns, &["-6", "addr", "add", cidr, "dev", dev, "nodad"]);
        addr6(node, &format!("{NODE_IP6}/64"), device);
        addr6(ext, &format!("{CLIENT_IP6}/64"), client_dev);
        link(ext, &["-6", "route", "add", "default", "via", NODE_IP6]);
    }
}

/// Builds the topology around a world with `local` backend pods; the agent is not started.
fn outside(local: &[&str], agent_args: &[&str]) -> Outside {
    outside_over(Uplink::Veth, local, agent_args)
}

/// As [`outside`], the client reaching the node over an `uplink`.
fn outside_over(uplink: Uplink, local: &[&str], agent_args: &[&str]) -> Outside {
    let mut world = World::new(local);
    let prefix = world.topology.prefix.clone();
    let node = &world.topology.node;
    forwarding(node);
    let link = |ns: &Netns, args: &[&str]| ns.ip(args).unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    let gateway6 = bkp_sandbox::topology::GATEWAY_V6.to_string();
    for pod in local {
        let netns = &world.pod(pod).netns;
        link(netns, &["route", "add", "default", "via", "10.244.0.1"]);
        link(netns, &["-6", "route", "add", "default", "via", &gateway6]);
    }
    // Addresses are usable at once (no duplicate address detection), as on the pods.
    let addr6 =
        |ns: &Netns, cidr: &str, dev: &str| link(ns, &["-6", "addr", "add", cidr, "dev", dev, "nodad"]);

    let ext = Netns::create(&format!("{prefix}-ext")).expect("client namespace");
    // The client's end of the uplink.
    let (uplink_state, client_dev) = match uplink {
        Uplink::Veth | Uplink::VethXdp => {
            node.veth_to("up0", &ext).expect("veth");
            (Link::Kernel, "eth0")
        }
        Uplink::Tun => {
            let pair = TunPair::create(node, "up0", &ext, "tun0").expect("TUN pair");
            (Link::Tun(pair), "tun0")
        }
        Uplink::Ipip => {
            let (node_u, ext_u) = ("172.31.255.1", "172.31.255.2");
            node.veth_to("u0", &ext).expect("veth");
            link(node, &["addr", "add", &format!("{node_u}/30"), "dev", "u0"]);
            link(node, &["link", "set", "u0", "up"]);
            link(&ext, &["addr", "add", &format!("{ext_u}/30"), "dev", "eth0"]);
            link(&ext, &["link", "set", "eth0", "up"]);
            let tunnel = |ns: &Netns, name: &str, local: &str, remote: &str| {
                link(
                    ns,
                    &[
                        "link", "add", name, "type", "ipip", "local", local, "remote", remote,
                    ],
                );
            };
            tunnel(node, "up0", node_u, ext_u);
            tunnel(&ext, "ipip0", ext_u, node_u);
            (Link::Kernel, "ipip0")
        }
    };
    // IPIP carries IPv4 only.
    address_uplink(node, "up0", &ext, client_dev, !matches!(uplink, Uplink::Ipip));

    let node2 = Netns::create(&format!("{prefix}-n2")).expect("second node namespace");
    forwarding(&node2);
    node.veth_to("n2", &node2).expect("veth");
    link(node, &["addr", "add", "172.30.0.1/24", "dev", "n2"]);
    link(node, &["link", "set", "n2", "up"]);
    link(node, &["route", "add", "10.245.0.0/24", "via", "172.30.0.2"]);
    link(&node2, &["addr", "add", "172.30.0.2/24", "dev", "eth0"]);
    link(&node2, &["link", "set", "eth0", "up"]);
    link(&node2, &["route", "add", "default", "via", "172.30.0.1"]);
    addr6(node, "fd00:30::1/64", "n2");
    addr6(&node2, "fd00:30::2/64", "eth0");
    link(
        node,
        &["-6", "route", "add", "fd00:245::/64", "via", "fd00:30::2"],
    );
    link(&node2, &["-6", "route", "add", "default", "via", "fd00:30::1"]);

    let remote = Netns::create(&format!("{prefix}-remote")).expect("remote pod namespace");
    node2.veth_to("p0", &remote).expect("veth");
    link(&node2, &["addr", "add", "10.245.0.1/24", "dev", "p0"]);
    link(&node2, &["link", "set", "p0", "up"]);
    link(
        &remote,
        &["addr", "add", &format!("{REMOTE_IP}/24"), "dev", "eth0"],
    );
    link(&remote, &["link", "set", "eth0", "up"]);
    link(&remote, &["route", "add", "default", "via", "10.245.0.1"]);
    addr6(&node2, "fd00:245::1/64", "p0");
    addr6(&remote, &format!("{REMOTE_IP6}/64"), "eth0");
    link(&remote, &["-6", "route", "add", "default", "via", "fd00:245::1"]);
    world.with_runtime(|servers, _| {
        servers
            .http(&remote, HTTP_PORT, "remote")
            .expect("remote http server");
        servers
            .udp(&remote, UDP_PORT, "remote")
            .expect("remote udp server");
    });

    let mut args = agent_args.to_vec();
    if !args.contains(&"--devices") {
        args.extend(["--devices", "up0,n2"]);
    }
    if matches!(uplink, Uplink::VethXdp) {
        args.extend(["--xdp", "native"]);
        wire_like(&[(&ext, "eth0"), (&node2, "eth0"), (&remote, "eth0")]);
    }
    world.agent_in_node().agent_args(&with_forced_tc_attach(args));
    Outside {
        link: uplink_state,
        ext,
        _remote: remote,
        node2,
        world,
    }
}

/// Makes veth ends behave as the far side of a wire does for native XDP: NAPI on the ends
/// XDP on `up0` and `n2` sends frames to (GRO on: without it a veth drops them), and whole
/// checksums from the senders whose packets XDP forwards (a veth otherwise leaves them
/// partial, and XDP, seeing no skb, would fold its changes into a partial sum).
fn wire_like(ends: &[(&Netns, &str)]) {
    for (netns, device) in ends {
        netns
            .offload(device, Offload::Gro, true)
            .and_then(|()| netns.offload(device, Offload::TxChecksum, false))
            .unwrap_or_else(|e| panic!("ethtool -K {device} in {}: {e}", netns.name()));
    }
}

/// The datapath's count of `reason` (`bkp_counters`, as the metrics export it).
fn datapath_events(o: &Outside, reason: &str) -> f64 {
    let (_, metrics) = o.world.http_get("/metrics", "/metrics");
    metric_sample(
        &metrics,
        &format!("bpf_kube_proxy_datapath_events_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

/// XDP, not tc, opened every flow of the traffic so far (`flows` at least) and translated
/// later packets too: XDP did the work, tc only what XDP handed it.
fn assert_xdp_opened_every_flow(o: &Outside, flows: f64) {
    let (xdp_new, xdp_tracked, tc_new) = (
        datapath_events(o, "xdp_new_flow"),
        datapath_events(o, "xdp_tracked"),
        datapath_events(o, "tc_new_flow"),
    );
    let counts = format!(
        "xdp_new_flow {xdp_new}, xdp_tracked {xdp_tracked}, tc_new_flow {tc_new}, tc_tracked {}, xdp_pass {}",
        datapath_events(o, "tc_tracked"),
        datapath_events(o, "xdp_pass")
    );
    assert!(xdp_new >= flows, "XDP opened every flow: {counts}");
    assert!(xdp_tracked > 0.0, "XDP translated later packets: {counts}");
    assert!(tc_new < 1.0, "tc opened no flow: {counts}");
}

impl Outside {
    /// What the uplink carried, for failure messages (nothing to say of a kernel's own link).
    fn observed(&self) -> String {
        match &self.link {
            Link::Kernel => String::new(),
            Link::Tun(pair) => format!(" [{}]", pair.report()),
        }
    }
}

/// One HTTP/1.0 GET from the client namespace: (status, body), or the connect/read error.
fn http_get(from: &Netns, target: SocketAddr) -> std::io::Result<(u16, String)> {
    from.run(move || {
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not HTTP: {text:?}")))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    })
}

/// Who answered a GET from the client, as the backend reports it (its name and the client it
/// saw).
fn who(o: &Outside, target: SocketAddr) -> Identity {
    let (status, body) =
        http_get(&o.ext, target).unwrap_or_else(|e| panic!("GET {target}: {e}{}", o.observed()));
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body:?}: {e}"))
}

/// One UDP request from the client namespace: the answer and the address it came from.
fn udp_ask(from: &Netns, target: SocketAddr) -> std::io::Result<(Identity, SocketAddr)> {
    from.run(move || {
        let socket = UdpSocket::bind(any_port(&target))?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        socket.send_to(b"who", target)?;
        let mut buf = [0u8; 512];
        let (n, peer) = socket.recv_from(&mut buf)?;
        let identity = serde_json::from_slice(&buf[..n]).map_err(std::io::Error::other)?;
        Ok((identity, peer))
    })
}

/// The wildcard address of `target`'s family, any port.
fn any_port(target: &SocketAddr) -> SocketAddr {
    match target {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("address"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("address"),
    }
}

/// One UDP request from a connected socket, so that an ICMP error comes back as an error.
fn udp_connected(from: &Netns, target: SocketAddr) -> std::io::Result<usize> {
    from.run(move || {
        let socket = UdpSocket::bind(any_port(&target))?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        socket.connect(target)?;
        socket.send(b"who")?;
        socket.recv(&mut [0u8; 512])
    })
}

fn target(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("IP"), port)
}

/// A NodePort Service `web` (80/TCP → 8080 on nodePort 30080, 53/UDP → 5353 on 30053) with
/// `extra_spec` lines under `spec:` and its slice of `endpoints` ((address, node, ready)).
fn web(extra_spec: &str, status: &str, endpoints: &[(&str, &str, bool)]) -> String {
    let mut svc = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: test}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.20\n  clusterIPs: [10.96.0.20]\n  ports:\n  - {{name: http, port: 80, protocol: TCP, nodePort: {NODE_PORT}}}\n  - {{name: dns, port: 53, protocol: UDP, nodePort: {NODE_PORT_UDP}}}\n"
    );
    for line in extra_spec.lines().filter(|l| !l.trim().is_empty()) {
        svc.push_str(&format!("  {line}\n"));
    }
    svc.push_str(status);
    let mut slice = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: test, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports:\n- {{name: http, port: {HTTP_PORT}, protocol: TCP}}\n- {{name: dns, port: {UDP_PORT}, protocol: UDP}}\nendpoints:\n"
    );
    for (addr, node, ready) in endpoints {
        slice.push_str(&format!(
            "- addresses: [\"{addr}\"]\n  nodeName: {node}\n  conditions: {{ready: {ready}, serving: true, terminating: {}}}\n",
            !ready
        ));
    }
    docs(&[svc, slice])
}

/// `web` as a LoadBalancer with ingress IP `LB_IP` and `extra_spec`.
fn load_balancer(extra_spec: &str, endpoints: &[(&str, &str, bool)]) -> String {
    let status = format!("status: {{loadBalancer: {{ingress: [{{ip: {LB_IP}}}]}}}}\n");
    web(extra_spec, &status, endpoints).replace("type: NodePort", "type: LoadBalancer")
}

/// `web` as a single-stack IPv6 Service with an IPv6 slice.
fn web6(extra_spec: &str, status: &str, endpoints: &[(&str, &str, bool)]) -> String {
    web(extra_spec, status, endpoints)
        .replace(
            "clusterIP: 10.96.0.20\n  clusterIPs: [10.96.0.20]",
            "clusterIP: \"fd00:96::20\"\n  clusterIPs: [\"fd00:96::20\"]\n  ipFamilies: [IPv6]",
        )
        .replace("addressType: IPv4", "addressType: IPv6")
}

/// `web6` as a LoadBalancer with ingress IP `LB_IP6` and `extra_spec`.
fn load_balancer6(extra_spec: &str, endpoints: &[(&str, &str, bool)]) -> String {
    let status = format!("status: {{loadBalancer: {{ingress: [{{ip: \"{LB_IP6}\"}}]}}}}\n");
    web6(extra_spec, &status, endpoints).replace("type: NodePort", "type: LoadBalancer")
}

/// Starts the agent on `manifest` and waits until the NodePort frontend holds `expected`
/// backends.
fn start(o: &mut Outside, manifest: &str, expected: usize) {
    start_on(o, manifest, NODE_IP, expected);
}

/// As [`start`], waiting on the NodePort of `node_ip`.
fn start_on(o: &mut Outside, manifest: &str, node_ip: &str, expected: usize) {
    o.world.write("svc.yaml", manifest);
    o.world.start_agent();
    o.world
        .wait_for_backends(node_ip, NODE_PORT, Protocol::Tcp, expected);
}

/// Endpoints of a slice: (address, node, ready).
type Endpoints<'a> = [(&'a str, &'a str, bool)];

/// One address family of the topology, so each family's test is the same code.
struct Stack {
    node_ip: &'static str,
    client_ip: &'static str,
    lb_ip: &'static str,
    remote_ip: &'static str,
    /// loadBalancerSourceRanges entries (YAML) that admit the client, and that do not.
    allowed: &'static str,
    denied: &'static str,
    web: fn(&str, &str, &Endpoints) -> String,
    load_balancer: fn(&str, &Endpoints) -> String,
}

const IPV4: Stack = Stack {
    node_ip: NODE_IP,
    client_ip: CLIENT_IP,
    lb_ip: LB_IP,
    remote_ip: REMOTE_IP,
    allowed: "192.168.50.0/24",
    denied: "10.0.0.0/8",
    web,
    load_balancer,
};

const IPV6: Stack = Stack {
    node_ip: NODE_IP6,
    client_ip: CLIENT_IP6,
    lb_ip: LB_IP6,
    remote_ip: REMOTE_IP6,
    allowed: "\"fd00:50::/64\"",
    denied: "\"fd00:99::/64\"",
    web: web6,
    load_balancer: load_balancer6,
};

impl Stack {
    /// The local pod `a` and the remote backend, both ready, in this family.
    fn local_and_remote(&self, o: &Outside) -> Vec<(String, &'static str, bool)> {
        let local = if self.node_ip == NODE_IP {
            o.world.ip("a")
        } else {
            o.world.ip6("a")
        };
        vec![
            (local, NODE_NAME, true),
            (self.remote_ip.to_string(), "node2", true),
        ]
    }

    /// The topology with pod `a`, the agent running on `web` (local and remote endpoints).
    fn started(&self) -> Outside {
        self.started_over(Uplink::Veth)
    }

    /// As [`Self::started`], the client reaching the node over `uplink`.
    fn started_over(&self, uplink: Uplink) -> Outside {
        let mut o = outside_over(uplink, &["a"], &[]);
        let eps = self.local_and_remote(&o);
        start_on(&mut o, &(self.web)("", "", &endpoints(&eps)), self.node_ip, 2);
        o
    }
}

fn endpoints<'a>(list: &'a [(String, &'static str, bool)]) -> Vec<(&'a str, &'a str, bool)> {
    list.iter().map(|(a, n, r)| (a.as_str(), *n, *r)).collect()
}

/// The NodePort of `node_ip` reaches the local backend `a` with the client's own address and
/// the remote one from the node (SNAT), over TCP and UDP, replies coming from the NodePort.
fn assert_local_and_remote_reached(o: &Outside, stack: &Stack) {
    let (node_ip, client_ip) = (stack.node_ip, stack.client_ip);
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let id = who(o, target(node_ip, NODE_PORT));
        let client: SocketAddr = id.client.parse().expect("client address");
        seen.insert(id.backend, client.ip().to_string());
    }
    let observed = o.observed();
    assert_eq!(seen.len(), 2, "both backends answer: {seen:?}{observed}");
    assert_eq!(
        seen["a"], client_ip,
        "a local backend sees the client itself{observed}"
    );
    assert_eq!(
        seen["remote"], node_ip,
        "a remote backend sees the node (SNAT){observed}"
    );

    let mut udp = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let (id, from) = udp_ask(&o.ext, target(node_ip, NODE_PORT_UDP)).unwrap_or_else(|e| {
            panic!(
                "UDP through the NodePort (answered so far: {udp:?}): {e}{}",
                o.observed()
            )
        });
        assert_eq!(
            from,
            target(node_ip, NODE_PORT_UDP),
            "replies come from the NodePort{}",
            o.observed()
        );
        udp.insert(id.backend);
    }
    assert_eq!(udp.len(), 2, "both backends answer UDP: {udp:?}{}", o.observed());
}

/// upstream "should be able to create a functioning NodePort service" (TCP and UDP), with one
/// backend on this node and one behind another node (SNAT and the reply path are real).
#[test]
fn nodeport_reaches_local_and_remote_backends_over_tcp_and_udp() {
    assert_local_and_remote_reached(&IPV4.started(), &IPV4);
}

/// The same over IPv6: a single-stack IPv6 Service, its NodePort on the node's IPv6 address.
#[test]
fn ipv6_nodeport_reaches_local_and_remote_backends_over_tcp_and_udp() {
    assert_local_and_remote_reached(&IPV6.started(), &IPV6);
}

/// LoadBalancer status IPs and externalIPs are served as the NodePort is; an externalIP need
/// not be assigned to any node (upstream "should be possible to connect to a service via
/// ExternalIP when the external IP is not assigned to a node").
#[test]
fn load_balancer_ip_and_external_ip_not_on_any_node() {
    let mut o = outside(&["a"], &[]);
    let eps = IPV4.local_and_remote(&o);
    let manifest = load_balancer(&format!("externalIPs: [{EXTERNAL_IP}]"), &endpoints(&eps));
    start(&mut o, &manifest, 2);
    for ip in [LB_IP, EXTERNAL_IP] {
        let backends: std::collections::BTreeSet<String> =
            (0..30).map(|_| who(&o, target(ip, 80)).backend).collect();
        assert_eq!(backends.len(), 2, "{ip}:80 reaches both backends: {backends:?}");
    }
}

/// A client inside the allowed ranges reaches the LoadBalancer IP, one outside the denied
/// ones does not, and the NodePort is not filtered.
fn assert_source_ranges_filter(stack: &Stack, uplink: Uplink) -> Outside {
    let mut o = outside_over(uplink, &["a"], &[]);
    let eps = stack.local_and_remote(&o);
    let manifest = |ranges: &str| {
        (stack.load_balancer)(&format!("loadBalancerSourceRanges: [{ranges}]"), &endpoints(&eps))
    };
    start_on(&mut o, &manifest(stack.allowed), stack.node_ip, 2);
    who(&o, target(stack.lb_ip, 80));

    o.world.write("svc.yaml", &manifest(stack.denied));
    let denied = stack.denied.trim_matches('"');
    o.world
        .wait_until("the ranges to change", Duration::from_secs(10), |w| {
            w.snapshot()?
                .frontends
                .iter()
                .any(|f| f.source_ranges.iter().any(|r| r.to_string() == denied))
                .then_some(())
        });
    let refused = http_get(&o.ext, target(stack.lb_ip, 80));
    assert!(
        refused.is_err(),
        "a client outside the ranges is dropped: {refused:?}"
    );
    who(&o, target(stack.node_ip, NODE_PORT));
    o
}

/// upstream "should only allow access from service loadbalancer source ranges": a client
/// inside the ranges gets through, one outside does not, and the NodePort is not filtered.
#[test]
fn load_balancer_source_ranges_allow_and_deny() {
    assert_source_ranges_filter(&IPV4, Uplink::Veth);
}

/// The same for an IPv6 LoadBalancer IP and IPv6 ranges (their own LPM trie).
#[test]
fn ipv6_load_balancer_source_ranges_allow_and_deny() {
    assert_source_ranges_filter(&IPV6, Uplink::Veth);
}

/// externalTrafficPolicy Local: only this node's endpoint, the client's own address at the
/// backend, and a healthCheckNodePort that answers 200, then 503 once only a terminating
/// endpoint is left (upstream "should preserve source IP with externalTrafficPolicy=Local"
/// and "... health check node port with only terminating endpoints").
#[test]
fn external_traffic_policy_local_keeps_the_client_ip_and_health_check_follows() {
    let mut o = outside(&["a"], &[]);
    let eps = IPV4.local_and_remote(&o);
    let spec = format!("externalTrafficPolicy: Local\nhealthCheckNodePort: {HEALTH_PORT}");
    start(&mut o, &web(&spec, "", &endpoints(&eps)), 2);

    for _ in 0..20 {
        let id = who(&o, target(NODE_IP, NODE_PORT));
        assert_eq!(id.backend, "a", "only the local endpoint serves outside clients");
        assert!(
            id.client.starts_with(&format!("{CLIENT_IP}:")),
            "client IP kept: {}",
            id.client
        );
    }
    let health = o
        .world
        .wait_until("the health check to answer", Duration::from_secs(10), |w| {
            let _ = w;
            http_get(&o.ext, target(NODE_IP, HEALTH_PORT)).ok()
        });
    assert_eq!(health.0, 200, "{}", health.1);
    let body: serde_json::Value = serde_json::from_str(&health.1).expect("JSON body");
    // kube-proxy's LocalReadyEndpoints counts addresses: one pod serving two ports counts once.
    assert_eq!(body["localEndpoints"], 1);
    assert_eq!(body["service"]["name"], "web");
    assert_eq!(body["serviceProxyHealthy"], true);

    // The local endpoint starts terminating: the node must drain.
    let terminating = vec![(o.world.ip("a"), NODE_NAME, false), eps[1].clone()];
    o.world
        .write("svc.yaml", &web(&spec, "", &endpoints(&terminating)));
    let drained = o
        .world
        .wait_until("the health check to fail", Duration::from_secs(10), |_| {
            http_get(&o.ext, target(NODE_IP, HEALTH_PORT))
                .ok()
                .filter(|(status, _)| *status == 503)
        });
    let body: serde_json::Value = serde_json::from_str(&drained.1).expect("JSON body");
    assert_eq!(body["localEndpoints"], 0);

    // No local endpoint at all: outside clients are refused, not sent elsewhere.
    let remote_only = vec![eps[1].clone()];
    o.world
        .write("svc.yaml", &web(&spec, "", &endpoints(&remote_only)));
    let refused =
        o.world.wait_until(
            "outside clients to be refused",
            Duration::from_secs(10),
            |_| match http_get(&o.ext, target(NODE_IP, NODE_PORT)) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(e),
                _ => None,
            },
        );
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
}

/// upstream "should have session affinity work for NodePort service".
#[test]
fn session_affinity_works_for_nodeport() {
    let mut o = outside(&["a", "b"], &[]);
    let eps = vec![
        (o.world.ip("a"), NODE_NAME, true),
        (o.world.ip("b"), NODE_NAME, true),
        (REMOTE_IP.to_string(), "node2", true),
    ];
    start(&mut o, &web("sessionAffinity: ClientIP", "", &endpoints(&eps)), 3);
    let backends: std::collections::BTreeSet<String> = (0..20)
        .map(|_| who(&o, target(NODE_IP, NODE_PORT)).backend)
        .collect();
    assert_eq!(backends.len(), 1, "one client, one backend: {backends:?}");
}

/// With no endpoint left, the family's NodePort refuses TCP with a RST and UDP with an
/// ICMP (ICMPv6) port unreachable, sent back over `uplink`; once the Service is deleted the
/// port is released.
fn assert_refused_then_released(stack: &Stack, uplink: Uplink) -> Outside {
    let mut o = stack.started_over(uplink);
    let node_ip = stack.node_ip;
    who(&o, target(node_ip, NODE_PORT));
    o.world.write("svc.yaml", &(stack.web)("", "", &[]));
    o.world.wait_for_backends(node_ip, NODE_PORT, Protocol::Tcp, 0);
    let refused = http_get(&o.ext, target(node_ip, NODE_PORT));
    assert!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "rejected with a RST, got {refused:?}{}",
        o.observed()
    );
    let refused = udp_connected(&o.ext, target(node_ip, NODE_PORT_UDP));
    assert!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "rejected with a port unreachable, got {refused:?}{}",
        o.observed()
    );

    o.world.remove("svc.yaml");
    o.world
        .wait_until("the NodePort to be released", Duration::from_secs(10), |w| {
            let gone = !w
                .snapshot()?
                .frontends
                .iter()
                .any(|f| f.frontend.port == NODE_PORT);
            gone.then_some(())
        });
    let err = http_get(&o.ext, target(node_ip, NODE_PORT)).expect_err("released");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    o
}

/// upstream "should release NodePorts on delete", and "should be rejected when no endpoints
/// exist" for NodePort traffic (TCP and UDP).
#[test]
fn nodeport_rejects_without_endpoints_and_is_released_on_delete() {
    assert_refused_then_released(&IPV4, Uplink::Veth);
}

/// The same over IPv6 (a RST and an ICMPv6 port unreachable built by the program).
#[test]
fn ipv6_nodeport_rejects_without_endpoints_and_is_released_on_delete() {
    assert_refused_then_released(&IPV6, Uplink::Veth);
}

/// upstream "should be able to connect to NodePort from the node itself" (and localhost): the
/// node's own clients reach NodePorts on its addresses and on 127.0.0.1 through the socket
/// hooks, getpeername() shows the NodePort, and no tc program is involved.
#[test]
fn nodeport_on_node_addresses_and_localhost_through_the_socket_hooks() {
    let mut o = outside(&["a", "b"], &[]);
    let eps = vec![
        (o.world.ip("a"), NODE_NAME, true),
        (o.world.ip("b"), NODE_NAME, true),
    ];
    start(&mut o, &web("", "", &endpoints(&eps)), 2);
    for frontend in [NODE_IP, "127.0.0.1"] {
        let target = integration_tests::addr(frontend, NODE_PORT);
        let attempts = o.world.probe(&target, ProbeMode::Tcp, 20);
        assert!(
            attempts
                .iter()
                .all(|a| a.peer.as_deref() == Some(target.as_str())),
            "{attempts:?}"
        );
        let answered = integration_tests::spread(&attempts);
        assert_eq!(
            answered.len(),
            2,
            "{frontend}: both backends answer: {answered:?}"
        );
    }
}

/// Conntrack entries of a finished UDP flow expire and the agent removes them.
#[test]
fn conntrack_entries_expire() {
    let mut o = outside(&["a"], &["--conntrack-udp-timeout", "2s"]);
    let eps = IPV4.local_and_remote(&o);
    start(&mut o, &web("", "", &endpoints(&eps)), 2);
    udp_ask(&o.ext, target(NODE_IP, NODE_PORT_UDP)).expect("UDP through the NodePort");
    // Read in place rather than through `dump`: starting a binary in an emulated VM (read
    // over 9p) can take longer than the flow's 2 s lifetime.
    let flows = |w: &World| -> usize {
        let map: HashMap<MapData, CtKey<AddrV4>, CtValue<AddrV4>> =
            typed(w.pin_dir(), names::CONNTRACK_V4).expect("opening the conntrack map");
        map.keys()
            .map(|k| k.expect("reading a conntrack key"))
            .filter(|k| k.proto == proto::UDP)
            .count()
    };
    assert_eq!(flows(&o.world), 2, "one UDP flow: an original and a reply entry");
    o.world
        .wait_until("the entries to expire", Duration::from_secs(15), |w| {
            (flows(w) == 0).then_some(())
        });
}

/// The NodePort over an L3 device (a TUN link, packets starting at the IP header): the local
/// backend sees the client's own address (DNAT in, the reply translated back out of the L3
/// device), and the backend behind node2 is reached through the Ethernet device `n2` with the
/// node's address (SNAT: the programs put an Ethernet header on a packet that came without
/// one), over TCP and UDP.
#[test]
fn nodeport_over_an_l3_tun_device_reaches_local_and_remote_backends() {
    assert_local_and_remote_reached(&IPV4.started_over(Uplink::Tun), &IPV4);
}

/// The same over IPv6 through the TUN link.
#[test]
fn ipv6_nodeport_over_an_l3_tun_device_reaches_local_and_remote_backends() {
    assert_local_and_remote_reached(&IPV6.started_over(Uplink::Tun), &IPV6);
}

/// Without endpoints the NodePort refuses a client on the TUN link: a RST (ECONNREFUSED) and
/// an ICMP port unreachable, both built without an Ethernet header.
#[test]
fn nodeport_over_an_l3_tun_device_rejects_without_endpoints() {
    assert_refused_then_released(&IPV4, Uplink::Tun);
}

/// The same refusals over IPv6 (a RST and an ICMPv6 port unreachable) on the TUN link.
#[test]
fn ipv6_nodeport_over_an_l3_tun_device_rejects_without_endpoints() {
    assert_refused_then_released(&IPV6, Uplink::Tun);
}

/// Why IPIP tests cannot run on this kernel, if they cannot: the module does not load.
fn ipip_missing() -> Option<String> {
    if std::path::Path::new("/sys/module/ipip").exists() {
        return None;
    }
    match std::process::Command::new("modprobe").arg("ipip").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        Err(e) => Some(format!("modprobe: {e}")),
    }
}

/// Runs `test` unless the kernel has no IPIP, in which case it says why it did not.
fn over_ipip(test: impl FnOnce()) {
    match ipip_missing() {
        None => test(),
        Some(why) => println!("SKIPPED: no IPIP tunnel on this kernel (modprobe ipip: {why})"),
    }
}

/// The NodePort through a real IPIP tunnel (the kernel's `tunl0` kind of device): local and
/// remote backends, TCP and UDP, as over the TUN link.
#[test]
fn nodeport_over_an_ipip_tunnel_reaches_local_and_remote_backends() {
    over_ipip(|| assert_local_and_remote_reached(&IPV4.started_over(Uplink::Ipip), &IPV4));
}

/// Refusals without endpoints come back through the IPIP tunnel.
#[test]
fn nodeport_over_an_ipip_tunnel_rejects_without_endpoints() {
    over_ipip(|| {
        assert_refused_then_released(&IPV4, Uplink::Ipip);
    });
}

/// Our cls_bpf filters on `device` in `direction` as `tc filter show` lists them in the node
/// namespace: one line per filter with its handle, program and program id.
fn our_filters(o: &Outside, device: &str, direction: &str) -> Vec<String> {
    let out = o
        .world
        .topology
        .node
        .command("tc")
        .args(["filter", "show", "dev", device, direction])
        .output()
        .expect("running tc");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("bkp_tc_"))
        .map(str::to_string)
        .collect()
}

/// The program id in one `tc filter show` line (`... id 123 ...`).
fn program_id(line: &str) -> u32 {
    let mut words = line.split_whitespace();
    words
        .by_ref()
        .find(|w| *w == "id")
        .and_then(|_| words.next()?.parse().ok())
        .unwrap_or_else(|| panic!("no program id in {line:?}"))
}

/// SIGKILLs the agent and starts it again while a client GETs the NodePort 150 times, 10 ms
/// apart; the GETs that failed.
fn kill_and_restart_under_traffic(o: &mut Outside) -> Vec<String> {
    let Outside { ext, world, .. } = o;
    let ext: &Netns = ext;
    std::thread::scope(|scope| {
        let clients = scope.spawn(|| {
            (0..150)
                .filter_map(|_| {
                    std::thread::sleep(Duration::from_millis(10));
                    http_get(ext, target(NODE_IP, NODE_PORT))
                        .err()
                        .map(|e| e.to_string())
                })
                .collect::<Vec<_>>()
        });
        std::thread::sleep(Duration::from_millis(300));
        world.stop_agent(Signal::SIGKILL);
        std::thread::sleep(Duration::from_millis(300));
        world.start_agent();
        clients.join().expect("client thread")
    })
}

/// Stops the agent and runs `cleanup` on its pin dir in the node; what it printed.
fn stop_and_clean_up(o: &mut Outside) -> String {
    o.world.stop_agent(Signal::SIGTERM);
    let out = o
        .world
        .topology
        .node
        .command(integration_tests::binary())
        .args(["cleanup", "--pin-dir"])
        .arg(o.world.pin_dir())
        .output()
        .expect("running cleanup");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kernels without TCX (< 6.6): the tc programs are cls_bpf filters attached through netlink.
/// The filters outlive a SIGKILLed agent (traffic keeps flowing while none runs), a restarted
/// agent replaces each in place (one filter per device and direction, now running its new
/// program), and `cleanup` in the agent's namespace removes them.
#[test]
fn netlink_filters_survive_sigkill_and_restart_in_place_and_cleanup_removes_them() {
    let mut o = outside(&["a"], &["--tc-attach", "netlink"]);
    let eps = IPV4.local_and_remote(&o);
    start(&mut o, &web("", "", &endpoints(&eps)), 2);
    let before: Vec<(String, &str, Vec<String>)> = ["up0", "n2"]
        .into_iter()
        .flat_map(|d| ["ingress", "egress"].map(|dir| (d.to_string(), dir)))
        .map(|(d, dir)| {
            let filters = our_filters(&o, &d, dir);
            (d, dir, filters)
        })
        .collect();
    for (device, dir, filters) in &before {
        assert_eq!(
            filters.len(),
            1,
            "{device} {dir}: one filter of ours: {filters:?}"
        );
        assert!(
            filters[0].contains("handle 0xb4b") && filters[0].contains("direct-action"),
            "{}",
            filters[0]
        );
    }
    who(&o, target(NODE_IP, NODE_PORT));

    // Clients keep connecting through the NodePort while the agent is killed and restarted.
    let failures = kill_and_restart_under_traffic(&mut o);
    assert!(
        failures.is_empty(),
        "{} of 150 failed: {failures:?}",
        failures.len()
    );
    let log = o.world.agent_log();
    let ready = log
        .lines()
        .rfind(|l| l.contains("datapath ready"))
        .expect("ready line");
    assert!(
        ready.contains("tc_mode=\"netlink\"") || ready.contains("tc_mode=netlink"),
        "{ready}"
    );
    assert!(ready.contains("tc_links_updated=4"), "replaced in place: {ready}");
    for (device, dir, old) in &before {
        let now = our_filters(&o, device, dir);
        assert_eq!(now.len(), 1, "{device} {dir}: still one filter: {now:?}");
        assert_ne!(
            program_id(&now[0]),
            program_id(&old[0]),
            "{device} {dir}: the filter runs the new agent's program"
        );
    }
    who(&o, target(NODE_IP, NODE_PORT));

    let removed = stop_and_clean_up(&mut o);
    assert!(removed.contains("4 tc attachments removed"), "{removed}");
    for (device, dir, _) in &before {
        assert_eq!(
            our_filters(&o, device, dir),
            Vec::<String>::new(),
            "{device} {dir}"
        );
    }
    assert!(!o.world.pin_dir().exists(), "pins removed");
}

/// A tc program that cannot be attached (here: another classifier already holds our filter
/// priority on `up0`) stops nothing else: the agent serves ClusterIPs through the socket
/// programs, attaches to the other device, logs the failure naming the device, counts it, and
/// `/healthz` lists it and answers 503, since NodePort traffic arriving on `up0` is not served.
#[test]
fn a_tc_attach_failure_degrades_without_stopping_cluster_ips() {
    let mut o = outside(&["a"], &["--tc-attach", "netlink"]);
    let node = &o.world.topology.node;
    let tc = |args: &[&str]| {
        let out = node.command("tc").args(args).output().expect("running tc");
        assert!(
            out.status.success(),
            "tc {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let priority = bpf_kube_proxy::datapath::external::TC_PRIORITY.to_string();
    tc(&["qdisc", "add", "dev", "up0", "clsact"]);
    tc(&[
        "filter", "add", "dev", "up0", "ingress", "pref", &priority, "protocol", "all", "u32", "match",
        "u32", "0", "0", "classid", "1:1",
    ]);
    let local = vec![(o.world.ip("a"), NODE_NAME, true)];
    o.world.write("svc.yaml", &web("", "", &endpoints(&local)));
    o.world.start_agent();
    o.world.wait_for_backends("10.96.0.20", 80, Protocol::Tcp, 1);

    let attempts = o
        .world
        .probe(&integration_tests::addr("10.96.0.20", 80), ProbeMode::Tcp, 5);
    assert!(attempts.iter().all(|a| a.ok), "ClusterIP served: {attempts:?}");
    assert_eq!(integration_tests::spread(&attempts)["a"], 5);

    let log = o.world.agent_log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("tc program not attached"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line: {errors:?}");
    assert!(errors[0].contains("up0@bkp_tc_ingress"), "{}", errors[0]);

    let (status, body) = o.world.http_get("/healthz", "/healthz");
    assert_eq!(status, 503, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let degraded = health["degraded"].as_array().expect("degraded list");
    assert_eq!(degraded.len(), 1, "{degraded:?}");
    assert!(
        degraded[0]
            .as_str()
            .unwrap_or_default()
            .contains("up0@bkp_tc_ingress"),
        "{degraded:?}"
    );
    let (status, _) = o.world.http_get("/healthz", "/livez");
    assert_eq!(status, 200, "livez ignores it: a restart would not help");

    let (_, metrics) = o.world.http_get("/metrics", "/metrics");
    let series = |device: &str, program: &str, state: &str| {
        format!(
            "bpf_kube_proxy_tc_attachments{{device=\"{device}\",program=\"{program}\",mode=\"netlink\",state=\"{state}\"}}"
        )
    };
    assert_eq!(
        metric_sample(&metrics, &series("up0", "bkp_tc_ingress", "failed")),
        Some(1.0),
        "{metrics}"
    );
    for (device, program) in [
        ("up0", "bkp_tc_egress"),
        ("n2", "bkp_tc_ingress"),
        ("n2", "bkp_tc_egress"),
    ] {
        assert_eq!(
            metric_sample(&metrics, &series(device, program, "attached")),
            Some(1.0),
            "{device}@{program}"
        );
    }
    assert_eq!(our_filters(&o, "n2", "ingress").len(), 1);
}

/// A device without a link-layer header (a TUN device, ARPHRD_NONE, like WireGuard's) gets the
/// L3 program pair, whose packets start at the IP header, beside an Ethernet device's pair.
#[test]
fn devices_without_a_link_layer_header_get_the_l3_programs() {
    let mut world = World::new(&["a"]);
    let node = &world.topology.node;
    for args in [
        &["tuntap", "add", "tun0", "mode", "tun"][..],
        &["addr", "add", "10.99.0.1/24", "dev", "tun0"],
        &["link", "set", "tun0", "up"],
    ] {
        node.ip(args).unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    }
    let local = vec![(world.ip("a"), NODE_NAME, true)];
    world.write("svc.yaml", &web("", "", &endpoints(&local)));
    world
        .agent_in_node()
        .agent_args(&with_forced_tc_attach(vec!["--devices", "tun0,br0"]));
    world.start_agent();

    let tc_dir = world.pin_dir().join("tc");
    let mut records: Vec<String> = std::fs::read_dir(&tc_dir)
        .expect("tc records")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    records.sort();
    assert_eq!(
        records,
        [
            "br0@bkp_tc_egress",
            "br0@bkp_tc_ingress",
            "tun0@bkp_tc_egress_l3",
            "tun0@bkp_tc_ingress_l3"
        ]
    );
    let (status, body) = world.http_get("/healthz", "/healthz");
    assert_eq!(status, 200, "{body}");
    let (_, metrics) = world.http_get("/metrics", "/metrics");
    let attached: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("bpf_kube_proxy_tc_attachments{") && l.contains("state=\"attached\""))
        .collect();
    assert_eq!(attached.len(), 4, "{metrics}");
    assert!(
        attached
            .iter()
            .any(|l| l.contains("device=\"tun0\",program=\"bkp_tc_ingress_l3\"")),
        "{attached:?}"
    );
}

/// Deletes the node's `up0` (its peer, the client's `eth0`, goes with it), as a lab's
/// namespaces torn down do or flannel does to `flannel.1` when it restarts.
fn delete_uplink(o: &Outside) {
    o.world
        .topology
        .node
        .ip(&["link", "del", "up0"])
        .expect("deleting up0");
}

/// Makes the uplink again as `device` (a new ifindex, under the old name or another), with the
/// addresses and routes it had.
fn create_uplink(o: &Outside, device: &str) {
    let node = &o.world.topology.node;
    node.veth_to(device, &o.ext).expect("veth");
    address_uplink(node, device, &o.ext, "eth0", true);
}

/// The state whose `bpf_kube_proxy_tc_attachments` series is 1 for `device` and `program`,
/// whichever the attach mode.
fn attachment_state(world: &World, device: &str, program: &str) -> Option<String> {
    let (_, metrics) = world.http_get("/metrics", "/metrics");
    let series = format!("bpf_kube_proxy_tc_attachments{{device=\"{device}\",program=\"{program}\",");
    metrics
        .lines()
        .filter(|l| l.starts_with(&series) && l.ends_with(" 1"))
        .find_map(|l| Some(l.split("state=\"").nth(1)?.split('"').next()?.to_string()))
}

/// Waits until `program` on `device` is reported in `state`. The programs serve a device
/// before the agent reports them: the report follows the last device's attach, and each TCX
/// attach or detach waits for an RCU grace period, longer than a test's requests may take.
fn wait_for_state(world: &mut World, device: &str, program: &str, state: &str) {
    world.wait_until(
        &format!("{device}@{program} reported {state}"),
        Duration::from_secs(5),
        |w| (attachment_state(w, device, program)? == state).then_some(()),
    );
}

fn reattached(world: &World, device: &str, program: &str) -> Option<f64> {
    let (_, metrics) = world.http_get("/metrics", "/metrics");
    metric_sample(
        &metrics,
        &format!("bpf_kube_proxy_tc_reattached_total{{device=\"{device}\",program=\"{program}\"}}"),
    )
}

/// Waits until the NodePort answers through the uplink again: only the tc programs on it
/// serve it (the node has no socket on the NodePort).
fn wait_for_nodeport(o: &mut Outside) {
    let Outside { ext, world, .. } = o;
    world.wait_until(
        "the NodePort to answer through the new uplink",
        Duration::from_secs(10),
        |_| http_get(ext, target(NODE_IP, NODE_PORT)).ok(),
    );
}

/// A device deleted and created again under its name while the agent is stopped leaves its
/// pinned TCX link severed (its netlink filter gone): the next agent starts, attaches the
/// programs to the device of that name afresh, and counts it.
#[test]
fn a_device_recreated_while_the_agent_is_stopped_gets_its_programs_at_start() {
    let mut o = outside(&["a"], &[]);
    let eps = IPV4.local_and_remote(&o);
    start(&mut o, &web("", "", &endpoints(&eps)), 2);
    o.world.stop_agent(Signal::SIGTERM);
    delete_uplink(&o);
    create_uplink(&o, "up0");
    o.world.start_agent();
    assert_local_and_remote_reached(&o, &IPV4);
    let log = o.world.agent_log();
    let ready = log
        .lines()
        .rfind(|l| l.contains("datapath ready"))
        .expect("ready line");
    assert!(
        ready.contains("tc_links_reattached=2") && ready.contains("tc_links_updated=2"),
        "up0's two attached afresh, n2's updated: {ready}"
    );
    for program in ["bkp_tc_ingress", "bkp_tc_egress"] {
        assert_eq!(reattached(&o.world, "up0", program), Some(1.0), "{program}");
        assert_eq!(reattached(&o.world, "n2", program), None, "{program}");
    }
}

/// A listed device deleted while the agent runs is reported absent (the agent goes on
/// serving), and once created again it gets its programs back without a restart.
#[test]
fn a_listed_device_recreated_while_running_gets_its_programs_again() {
    let mut o = outside(&["a"], &[]);
    let eps = IPV4.local_and_remote(&o);
    start(&mut o, &web("", "", &endpoints(&eps)), 2);
    who(&o, target(NODE_IP, NODE_PORT));
    delete_uplink(&o);
    o.world
        .wait_until("up0 reported absent", Duration::from_secs(10), |w| {
            (attachment_state(w, "up0", "bkp_tc_ingress")? == "absent").then_some(())
        });
    assert_eq!(
        attachment_state(&o.world, "n2", "bkp_tc_ingress").as_deref(),
        Some("attached")
    );
    let (status, body) = o.world.http_get("/healthz", "/healthz");
    assert_eq!(status, 200, "a device that is gone is no failure: {body}");

    create_uplink(&o, "up0");
    wait_for_nodeport(&mut o);
    assert_local_and_remote_reached(&o, &IPV4);
    for program in ["bkp_tc_ingress", "bkp_tc_egress"] {
        wait_for_state(&mut o.world, "up0", program, "attached");
    }
}

/// `--devices auto` picks a device added while the agent runs once it has a global address,
/// and lets go of one that went away: the uplink comes back as `wan0` with up0's addresses
/// (NodePort addresses are those the node had at start).
#[test]
fn auto_picks_a_device_added_while_running() {
    let mut o = outside(&["a"], &["--devices", "auto", "--node-ip", NODE_IP]);
    let eps = IPV4.local_and_remote(&o);
    start(&mut o, &web("", "", &endpoints(&eps)), 2);
    delete_uplink(&o);
    create_uplink(&o, "wan0");
    wait_for_nodeport(&mut o);
    assert_local_and_remote_reached(&o, &IPV4);
    for program in ["bkp_tc_ingress", "bkp_tc_egress"] {
        wait_for_state(&mut o.world, "wan0", program, "attached");
        wait_for_state(&mut o.world, "up0", program, "absent");
    }
}

/// How many Services have their remote backends' replies arrive on `device` without programs.
fn unserved_replies(world: &World, device: &str) -> Option<f64> {
    let (_, metrics) = world.http_get("/metrics", "/metrics");
    metric_sample(
        &metrics,
        &format!("bpf_kube_proxy_reply_device_unserved{{device=\"{device}\"}}"),
    )
}

/// The agent's warnings that a Service's remote backends reply on devices without programs.
fn unserved_warnings(world: &World) -> Vec<String> {
    world
        .agent_log()
        .lines()
        .filter(|l| l.contains("arrive on devices without the tc programs"))
        .map(str::to_string)
        .collect()
}

/// `--devices` naming only the uplink: the remote backend's replies arrive on `n2`, which has
/// no programs, so SNATed flows to it would hang. The agent finds it from the node's routes,
/// logs the Service once (not on every sync or route change) and counts it on `n2`; once the
/// Service has no remote backend left, the count goes back to 0.
#[test]
fn replies_arriving_on_an_unlisted_device_are_logged_once_per_service_and_counted() {
    let mut o = outside(&["a"], &["--devices", "up0", "--sync-period", "1s"]);
    let eps = IPV4.local_and_remote(&o);
    start(&mut o, &web("", "", &endpoints(&eps)), 2);
    o.world
        .wait_until("n2 counted as unserved", Duration::from_secs(10), |w| {
            (unserved_replies(w, "n2") == Some(1.0)).then_some(())
        });
    // A route change and a few periodic syncs later, still one warning.
    let node = &o.world.topology.node;
    node.ip(&["route", "add", "10.245.1.0/24", "via", "172.30.0.2"])
        .expect("adding a route");
    std::thread::sleep(Duration::from_millis(2500));
    let warnings = unserved_warnings(&o.world);
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].contains("service=test/web") && warnings[0].contains("\"n2\""),
        "{}",
        warnings[0]
    );
    assert_eq!(
        unserved_replies(&o.world, "up0"),
        None,
        "up0 carries the programs"
    );

    let local: Vec<(&str, &str, bool)> = endpoints(&eps).into_iter().take(1).collect();
    o.world.write("svc.yaml", &web("", "", &local));
    o.world
        .wait_until("n2 no longer counted", Duration::from_secs(10), |w| {
            (unserved_replies(w, "n2") == Some(0.0)).then_some(())
        });
}

/// `--devices auto` on a node whose link to the other node is unnumbered (link-local
/// addresses only, as on BGP-unnumbered fabrics): `auto` alone would not pick `n2`, but the
/// remote backend's replies arrive there, so the agent selects it too and SNATed flows to the
/// remote backend work.
#[test]
fn auto_selects_the_device_remote_backends_replies_arrive_on() {
    let mut o = outside(&["a"], &["--devices", "auto", "--node-ip", NODE_IP]);
    let link = |ns: &Netns, args: &[&str]| ns.ip(args).unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    let node = &o.world.topology.node;
    link(node, &["addr", "flush", "dev", "n2"]);
    link(node, &["addr", "add", "169.254.30.1/24", "dev", "n2"]);
    link(
        node,
        &[
            "route",
            "replace",
            "10.245.0.0/24",
            "via",
            "169.254.30.2",
            "dev",
            "n2",
        ],
    );
    link(&o.node2, &["addr", "flush", "dev", "eth0"]);
    link(&o.node2, &["addr", "add", "169.254.30.2/24", "dev", "eth0"]);
    link(
        &o.node2,
        &[
            "route",
            "replace",
            "default",
            "via",
            "169.254.30.1",
            "dev",
            "eth0",
        ],
    );
    let eps = IPV4.local_and_remote(&o);
    start(&mut o, &web("", "", &endpoints(&eps)), 2);
    for program in ["bkp_tc_ingress", "bkp_tc_egress"] {
        wait_for_state(&mut o.world, "n2", program, "attached");
    }
    assert_local_and_remote_reached(&o, &IPV4);
    assert!(unserved_warnings(&o.world).is_empty());
}

/// NodePort through native XDP on veths, TCP and UDP, to the local backend (translated and
/// passed to the stack) and to the remote one (SNATed and sent out of `n2` by XDP, its replies
/// translated by XDP on `n2` and sent out of `up0`); XDP opened every flow.
#[test]
fn xdp_nodeport_reaches_local_and_remote_backends_over_tcp_and_udp() {
    let o = IPV4.started_over(Uplink::VethXdp);
    assert_local_and_remote_reached(&o, &IPV4);
    assert_xdp_opened_every_flow(&o, 70.0);
    let (_, metrics) = o.world.http_get("/metrics", "/metrics");
    for device in ["up0", "n2"] {
        let series = format!(
            "bpf_kube_proxy_tc_attachments{{device=\"{device}\",program=\"bkp_xdp\",mode=\"native\",state=\"attached\"}}"
        );
        assert_eq!(metric_sample(&metrics, &series), Some(1.0), "{series}");
    }
}

/// The same over IPv6.
#[test]
fn ipv6_xdp_nodeport_reaches_local_and_remote_backends_over_tcp_and_udp() {
    let o = IPV6.started_over(Uplink::VethXdp);
    assert_local_and_remote_reached(&o, &IPV6);
    assert_xdp_opened_every_flow(&o, 70.0);
}

/// loadBalancerSourceRanges under XDP: the denied client is dropped there.
#[test]
fn xdp_load_balancer_source_ranges_allow_and_deny() {
    let o = assert_source_ranges_filter(&IPV4, Uplink::VethXdp);
    assert!(datapath_events(&o, "tc_drop_source_range") > 0.0);
    assert_xdp_opened_every_flow(&o, 2.0);
}

/// The same for IPv6.
#[test]
fn ipv6_xdp_load_balancer_source_ranges_allow_and_deny() {
    let o = assert_source_ranges_filter(&IPV6, Uplink::VethXdp);
    assert!(datapath_events(&o, "tc_drop_source_range") > 0.0);
    assert_xdp_opened_every_flow(&o, 2.0);
}

/// Without endpoints, XDP hands the packet to tc, which answers it (RST, port unreachable).
#[test]
fn xdp_nodeport_rejects_without_endpoints_through_tc() {
    assert_refused_through_tc(&assert_refused_then_released(&IPV4, Uplink::VethXdp));
}

/// XDP handed the refused packets to tc, which answered them.
fn assert_refused_through_tc(o: &Outside) {
    assert!(
        datapath_events(o, "xdp_pass") >= 2.0,
        "XDP passed the TCP and UDP packets"
    );
    assert!(
        datapath_events(o, "tc_reject_no_backend") >= 2.0,
        "tc answered them"
    );
}

/// The same over IPv6.
#[test]
fn ipv6_xdp_nodeport_rejects_without_endpoints_through_tc() {
    assert_refused_through_tc(&assert_refused_then_released(&IPV6, Uplink::VethXdp));
}

/// The XDP program on `device` of the node: (attach mode, program id) as `ip -j link` shows
/// it (mode 1 native, 2 generic), or `None`.
fn xdp_on(o: &Outside, device: &str) -> Option<(u64, u64)> {
    let out = std::process::Command::new("ip")
        .args([
            "-n",
            o.world.topology.node.name(),
            "-j",
            "link",
            "show",
            "dev",
            device,
        ])
        .output()
        .expect("ip link");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    let xdp = &links[0]["xdp"];
    Some((xdp["mode"].as_u64()?, xdp["prog"]["id"].as_u64()?))
}

/// The XDP links are pinned: they outlive a SIGKILLed agent (traffic keeps flowing), a
/// restarted agent points them at its new program in place (native still), and `cleanup`
/// removes them with the tc attachments.
#[test]
fn xdp_links_survive_sigkill_update_in_place_and_cleanup_removes_them() {
    const NATIVE: u64 = 1;
    let mut o = IPV4.started_over(Uplink::VethXdp);
    let before: Vec<(u64, u64)> = ["up0", "n2"]
        .iter()
        .map(|d| xdp_on(&o, d).unwrap_or_else(|| panic!("XDP on {d}")))
        .collect();
    assert!(before.iter().all(|(mode, _)| *mode == NATIVE), "{before:?}");
    assert!(o.world.pin_dir().join("tc/up0@bkp_xdp-native").exists());

    let failures = kill_and_restart_under_traffic(&mut o);
    assert!(
        failures.is_empty(),
        "{} of 150 failed: {failures:?}",
        failures.len()
    );
    for (device, (mode, id)) in ["up0", "n2"].iter().zip(&before) {
        let now = xdp_on(&o, device).unwrap_or_else(|| panic!("XDP on {device} after restart"));
        assert_eq!(now.0, *mode, "{device}: still native");
        assert_ne!(now.1, *id, "{device}: runs the new agent's program");
    }
    assert_local_and_remote_reached(&o, &IPV4);

    let removed = stop_and_clean_up(&mut o);
    assert!(removed.contains("6 tc attachments removed"), "{removed}");
    for device in ["up0", "n2"] {
        assert_eq!(xdp_on(&o, device), None, "{device}: XDP detached");
    }
}
