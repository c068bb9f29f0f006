//! Maglev consistent hashing for traffic from outside the node, checked for what it promises,
//! with two nodes, each running its own agent on the same Service and backends:
//!
//! ```text
//!              ┌─a0── node A (192.168.50.1; 172.30.0.1) ──n2─┐
//!  ext (client 192.168.60.2)                                 pods (10.245.0.2, UDP 9001–9010)
//!              └─b0── node B (192.168.51.1; 172.31.0.1) ──n2─┘
//! ```
//!
//! The client reaches the externalIP 203.0.113.10 through node A, then (as if ECMP moved it)
//! through node B. Every backend runs on another node, so each node SNATs to its own address
//! and translates the replies back on its `n2`.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use aya::maps::{HashMap, MapData};
use bkp_sandbox::{netns::Netns, servers::Identity};
use bpf_kube_proxy::{datapath::maps::typed, pipeline::model::Protocol};
use integration_tests::{World, manifests::docs, metric_sample};
use proxy_common::maps::{self as names, AddrV4, CtKey, CtValue};

const CLIENT: &str = "192.168.60.2";
const SERVICE_IP: &str = "203.0.113.10";
const POD_IP: &str = "10.245.0.2";
const FIRST_PORT: u16 = 9001;
const BACKENDS: u16 = 10;
/// Client source ports, one flow each.
const FLOWS: std::ops::Range<u16> = 20_000..21_000;

/// The Service (annotated for Maglev; the agents' own default stays random) and one slice per
/// backend, each backend a port of the pods namespace.
fn manifests(backends: std::ops::Range<u16>) -> String {
    let mut parts = vec![format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: test, annotations: {{bpf-kube-proxy.io/lb-algorithm: maglev}}}}\nspec:\n  clusterIP: 10.96.0.53\n  externalIPs: [{SERVICE_IP}]\n  ports:\n  - {{name: dns, port: 53, protocol: UDP}}\n"
    )];
    for port in backends {
        parts.push(format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: dns-{port}, namespace: test, labels: {{kubernetes.io/service-name: dns}}}}\naddressType: IPv4\nports:\n- {{name: dns, port: {port}, protocol: UDP}}\nendpoints:\n- addresses: [\"{POD_IP}\"]\n  nodeName: elsewhere\n  conditions: {{ready: true}}\n"
        ));
    }
    docs(&parts)
}

fn run(ns: &Netns, args: &[&str]) {
    ns.ip(args)
        .unwrap_or_else(|e| panic!("ip {args:?} in {}: {e}", ns.name()));
}

/// Field order is drop order: agents and their worlds go before the namespaces they reach.
/// The pods' namespace is only held, so it lives as long as the test.
struct Cluster {
    a: World,
    b: World,
    ext: Netns,
    _pods: Netns,
}

/// A node world wired to the client (`uplink` on the client's side, `subnet` between them)
/// and to the pods (`pod_subnet`), its agent started.
fn wire(world: &mut World, ext: &Netns, pods: &Netns, uplink: &str, subnet: u8, pod_subnet: u8) {
    let node = &world.topology.node;
    node.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
        .expect("forwarding");
    let node_ip = format!("172.{pod_subnet}.0.1");
    run(
        node,
        &[
            "link",
            "add",
            "up0",
            "type",
            "veth",
            "peer",
            "name",
            uplink,
            "netns",
            ext.name(),
        ],
    );
    run(
        node,
        &["addr", "add", &format!("192.168.{subnet}.1/24"), "dev", "up0"],
    );
    run(node, &["link", "set", "up0", "up"]);
    run(
        ext,
        &["addr", "add", &format!("192.168.{subnet}.2/24"), "dev", uplink],
    );
    run(ext, &["link", "set", uplink, "up"]);
    run(
        node,
        &[
            "route",
            "add",
            &format!("{CLIENT}/32"),
            "via",
            &format!("192.168.{subnet}.2"),
        ],
    );
    let pod_end = format!("p{subnet}");
    run(
        node,
        &[
            "link",
            "add",
            "n2",
            "type",
            "veth",
            "peer",
            "name",
            &pod_end,
            "netns",
            pods.name(),
        ],
    );
    run(node, &["addr", "add", &format!("{node_ip}/24"), "dev", "n2"]);
    run(node, &["link", "set", "n2", "up"]);
    run(
        node,
        &[
            "route",
            "add",
            &format!("{POD_IP}/32"),
            "via",
            &format!("172.{pod_subnet}.0.2"),
        ],
    );
    run(
        pods,
        &[
            "addr",
            "add",
            &format!("172.{pod_subnet}.0.2/24"),
            "dev",
            &pod_end,
        ],
    );
    run(pods, &["link", "set", &pod_end, "up"]);
    // Replies leave from the backends' address (the servers are bound to the wildcard, so
    // the route picks their source), as a pod's would.
    run(
        pods,
        &[
            "route",
            "add",
            &format!("{node_ip}/32"),
            "dev",
            &pod_end,
            "src",
            POD_IP,
        ],
    );
    world.write("dns.yaml", &manifests(FIRST_PORT..FIRST_PORT + BACKENDS));
    world
        .agent_in_node()
        .agent_args(&["--devices", "up0,n2", "--node-ip", &node_ip]);
    world.start_agent();
    world.wait_for_backends(SERVICE_IP, 53, Protocol::Udp, usize::from(BACKENDS));
}

fn cluster() -> Cluster {
    let mut a = World::new(&[]);
    let prefix = a.topology.prefix.clone();
    let ext = Netns::create(&format!("{prefix}-mx")).expect("client namespace");
    let pods = Netns::create(&format!("{prefix}-mp")).expect("pods namespace");
    run(&ext, &["addr", "add", &format!("{CLIENT}/32"), "dev", "lo"]);
    run(&pods, &["addr", "add", &format!("{POD_IP}/32"), "dev", "lo"]);
    a.with_runtime(|servers, _| {
        for port in FIRST_PORT..FIRST_PORT + BACKENDS {
            servers
                .udp(&pods, port, &format!("backend-{port}"))
                .expect("udp server");
        }
    });
    wire(&mut a, &ext, &pods, "a0", 50, 30);
    let mut b = World::new(&[]);
    wire(&mut b, &ext, &pods, "b0", 51, 31);
    Cluster {
        a,
        b,
        ext,
        _pods: pods,
    }
}

/// Which backend answered each flow when the client reached the Service through `via`, the
/// node `world`.
fn answers(ext: &Netns, via: &str, world: &World) -> BTreeMap<u16, String> {
    run(
        ext,
        &["route", "replace", &format!("{SERVICE_IP}/32"), "via", via],
    );
    let target: SocketAddr = format!("{SERVICE_IP}:53").parse().expect("address");
    ext.run(move || {
        let mut out = BTreeMap::new();
        for port in FLOWS {
            let socket = UdpSocket::bind((CLIENT, port))?;
            socket.set_read_timeout(Some(Duration::from_millis(500)))?;
            let mut buf = [0u8; 512];
            // A lost datagram (a neighbour still being resolved) is asked again, by the
            // same flow: conntrack keeps it on its backend.
            let answer = (0..4).find_map(|_| {
                socket.send_to(b"who", target).ok()?;
                let (n, _) = socket.recv_from(&mut buf).ok()?;
                serde_json::from_slice::<Identity>(&buf[..n]).ok()
            });
            let Some(identity) = answer else {
                return Err(std::io::Error::other(format!("flow from port {port}: no answer")));
            };
            out.insert(port, identity.backend);
        }
        Ok(out)
    })
    .unwrap_or_else(|e| {
        panic!(
            "asking through {via}: {e}; its agent's log:\n{}",
            world.agent_log()
        )
    })
}

/// Forgets every flow node `world` tracks, as `conntrack -F` would: the next packet of each
/// is a new flow, looked up in the table afresh.
fn flush_conntrack(world: &World) {
    let mut ct: HashMap<MapData, CtKey<AddrV4>, CtValue<AddrV4>> =
        typed(world.pin_dir(), names::CONNTRACK_V4).expect("conntrack map");
    let keys: Vec<CtKey<AddrV4>> = ct.keys().flatten().collect();
    for key in keys {
        let _ = ct.remove(&key);
    }
}

fn spread(answers: &BTreeMap<u16, String>) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for backend in answers.values() {
        *counts.entry(backend.as_str()).or_default() += 1;
    }
    counts
}

#[test]
fn two_nodes_pick_the_same_backend_for_every_flow_and_a_removed_backend_moves_few_others() {
    let mut c = cluster();
    let through_a = answers(&c.ext, "192.168.50.1", &c.a);
    let through_b = answers(&c.ext, "192.168.51.1", &c.b);
    let agreeing = FLOWS.filter(|p| through_a[p] == through_b[p]).count();
    eprintln!(
        "maglev: {agreeing} of {} flows reached the same backend through either node; spread {:?}",
        FLOWS.len(),
        spread(&through_a)
    );
    assert_eq!(agreeing, FLOWS.len(), "every flow keeps its backend across nodes");
    // Ten backends, 1000 flows: each gets about 100. A table that sent everything to one
    // backend would agree too, so the spread is checked as well.
    assert_eq!(spread(&through_a).len(), usize::from(BACKENDS));
    assert!(
        spread(&through_a).values().all(|n| (50..=150).contains(n)),
        "{:?}",
        spread(&through_a)
    );
    let metrics = c.b.http_get("/metrics", "/metrics").1;
    assert_eq!(
        metric_sample(
            &metrics,
            r#"bpf_kube_proxy_datapath_events_total{reason="tc_maglev_miss"}"#
        ),
        Some(0.0),
        "every flow was looked up in a table"
    );

    // One backend of ten goes away; node B's flows are forgotten, so each is looked up again.
    let removed = format!("backend-{FIRST_PORT}");
    for world in [&c.a, &c.b] {
        world.write("dns.yaml", &manifests(FIRST_PORT + 1..FIRST_PORT + BACKENDS));
    }
    c.b.wait_for_backends(SERVICE_IP, 53, Protocol::Udp, usize::from(BACKENDS - 1));
    flush_conntrack(&c.b);
    let after = answers(&c.ext, "192.168.51.1", &c.b);
    let survivors: Vec<u16> = FLOWS.filter(|p| through_b[p] != removed).collect();
    let moved = survivors.iter().filter(|p| through_b[p] != after[p]).count();
    let overall = FLOWS.filter(|p| through_b[p] != after[p]).count();
    eprintln!(
        "maglev: removing 1 of {BACKENDS} backends moved {moved} of {} flows that were not on it ({:.1} %), {overall} of {} overall ({:.1} %)",
        survivors.len(),
        100.0 * moved as f64 / survivors.len() as f64,
        FLOWS.len(),
        100.0 * overall as f64 / FLOWS.len() as f64,
    );
    assert!(
        after.values().all(|b| *b != removed),
        "nothing reaches the removed backend"
    );
    assert!(
        moved * 100 <= survivors.len() * 12,
        "at most 12 % of the flows not on the removed backend move: {moved} of {}",
        survivors.len()
    );
}
