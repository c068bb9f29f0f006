//! ClusterIP through the socket programs: the walking-skeleton behaviours, each observed the
//! way a user would (which backend answered, which peer address the socket showed, what the
//! backend saw as client).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, ChildStdin, ChildStdout, Stdio},
    time::Duration,
};

use bkp_sandbox::probe::ProbeMode;
use bpf_kube_proxy::pipeline::model::Protocol;
use integration_tests::{
    HTTP_PORT, UDP_PORT, World, addr, identity,
    manifests::{Ep, docs, service, slice},
    spread,
};
use nix::sys::signal::Signal;

const VIP: &str = "10.96.0.10";

/// Service `web` with http (TCP 80 → 8080) and dns (UDP 53 → 5353) on the given backends.
fn web(world: &World, backends: &[&str]) -> String {
    let ports = [("http", HTTP_PORT, "TCP"), ("dns", UDP_PORT, "UDP")];
    let eps: Vec<Ep> = backends.iter().map(|b| Ep::ready(&world.ip(b))).collect();
    docs(&[
        service("web", &[VIP], &[("http", 80, "TCP"), ("dns", 53, "UDP")], ""),
        slice("web-1", "web", false, &ports, &eps),
    ])
}

fn started(backends: &[&str]) -> World {
    let mut world = World::new(backends);
    world.write("web.yaml", &web(&world, backends));
    world.start_agent();
    world.wait_for_backends(VIP, 80, Protocol::Tcp, backends.len());
    world
}

#[test]
fn tcp_connect_to_cluster_ip_reaches_a_backend_and_getpeername_shows_the_vip() {
    let world = started(&["be1"]);
    let attempts = world.probe(&addr(VIP, 80), ProbeMode::Tcp, 3);
    for a in &attempts {
        assert!(a.ok, "{a:?}");
        assert_eq!(identity(a).backend, "be1");
        assert_eq!(
            a.peer.as_deref(),
            Some("10.96.0.10:80"),
            "getpeername must show the VIP"
        );
        // Socket-level balancing never touches the packets: the backend sees the pod itself.
        assert!(
            identity(a)
                .client
                .starts_with(&format!("{}:", world.ip("client")))
        );
    }
}

/// One TCP connection held open by a process in a pod (and the test cgroup), asked for its
/// getpeername() on demand: python3, as the only portable way to keep a socket between
/// questions without another helper binary.
struct HeldSocket {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

const HOLD_SCRIPT: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=20)
for _ in sys.stdin:
    try:
        peer = s.getpeername()
        print("%s:%d" % (peer[0], peer[1]), flush=True)
    except OSError as e:
        print("error %d" % e.errno, flush=True)
"#;

impl HeldSocket {
    fn connect(world: &World, pod: &str, ip: &str, port: u16) -> Self {
        let mut child = world
            .command_in(pod, "python3")
            .args(["-c", HOLD_SCRIPT, ip, &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting python3");
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        Self { child, stdin, stdout }
    }

    fn peer(&mut self) -> String {
        writeln!(self.stdin).expect("asking the holder");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("reading the holder");
        line.trim().to_string()
    }
}

impl Drop for HeldSocket {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Entries of a pinned map, through bpftool (as an operator would count them).
fn entries(world: &World, map: &str) -> usize {
    let pin = world.pin_dir().join(map);
    let entries = integration_tests::bpftool_json(&["map", "dump", "pinned"], &pin);
    entries.as_array().expect("array of entries").len()
}

/// A TCP socket keeps the frontend it asked for in its own socket-local storage (freed with it),
/// not in the LRU that unconnected UDP needs: getpeername() shows the VIP, also from programs
/// that a restarted agent loaded, until the Service is deleted, when it shows the real peer.
#[test]
fn a_tcp_socket_keeps_its_vip_in_socket_storage_across_a_restart_until_the_service_goes() {
    let mut world = started(&["be1"]);
    let mut held = HeldSocket::connect(&world, "client", VIP, 80);
    assert_eq!(held.peer(), "10.96.0.10:80", "getpeername must show the VIP");
    assert_eq!(
        entries(&world, proxy_common::maps::SOCK_REV_V4),
        0,
        "a TCP connect leaves nothing in the socket reverse LRU"
    );

    world.stop_agent(Signal::SIGKILL);
    world.start_agent();
    world.wait_for_backends(VIP, 80, Protocol::Tcp, 1);
    assert_eq!(held.peer(), "10.96.0.10:80", "after an agent restart");

    world.remove("web.yaml");
    let real_peer = addr(&world.ip("be1"), HTTP_PORT);
    world.wait_until(
        "getpeername to show the real peer once the Service is deleted",
        Duration::from_secs(10),
        |_| (held.peer() == real_peer).then_some(()),
    );
}

#[test]
fn udp_request_reply_through_the_vip_with_unconnected_and_connected_sockets() {
    let world = started(&["be1", "be2"]);
    for mode in [ProbeMode::Udp, ProbeMode::UdpConnected] {
        let attempts = world.probe(&addr(VIP, 53), mode, 6);
        for a in &attempts {
            assert!(a.ok, "{mode:?}: {a:?}");
            assert_eq!(
                a.peer.as_deref(),
                Some("10.96.0.10:53"),
                "{mode:?}: the reply must come from the VIP, not the backend"
            );
            assert!(["be1", "be2"].contains(&identity(a).backend.as_str()));
        }
    }
}

#[test]
fn dns_client_gets_answers_through_the_vip() {
    // A real resolver (dig) against a real DNS server (dnsmasq) behind the ClusterIP: dig
    // rejects a reply whose source is not the server it asked, so this fails unless recvmsg
    // translates the backend address back to the VIP.
    let mut world = World::new(&["dns1"]);
    let dns_ip = world.ip("dns1");
    let mut dnsmasq = world
        .pod("dns1")
        .netns
        .command("dnsmasq")
        .args(["--keep-in-foreground", "--no-resolv", "--no-hosts", "--port=1053"])
        .args([
            "--address=/svc.test/192.0.2.53",
            "--listen-address",
            &dns_ip,
            "--bind-interfaces",
        ])
        .arg("--pid-file")
        .spawn()
        .expect("starting dnsmasq (Debian package dnsmasq-base)");
    let dns_ports = [("dns", 1053, "UDP")];
    world.write(
        "dns.yaml",
        &docs(&[
            service("dns", &[VIP], &[("dns", 53, "UDP")], ""),
            slice("dns-1", "dns", false, &dns_ports, &[Ep::ready(&dns_ip)]),
        ]),
    );
    world.start_agent();
    world.wait_for_backends(VIP, 53, Protocol::Udp, 1);
    let out = world
        .command_in("client", "dig")
        .args([
            "@10.96.0.10",
            "-p",
            "53",
            "www.svc.test",
            "+short",
            "+time=2",
            "+tries=2",
        ])
        .output()
        .expect("running dig (Debian package dnsutils)");
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim(),
        "192.0.2.53",
        "dig said: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn connections_spread_across_three_backends() {
    let world = started(&["be1", "be2", "be3"]);
    let attempts = world.probe(&addr(VIP, 80), ProbeMode::Tcp, 90);
    let spread = spread(&attempts);
    assert_eq!(spread.len(), 3, "every backend must answer: {spread:?}");
    // Uniform random choice: each backend expects 30 of 90; 10 or fewer would happen by chance
    // with probability below 1e-5.
    assert!(spread.values().all(|n| *n > 10), "uneven spread {spread:?}");
}

#[test]
fn one_unconnected_udp_socket_keeps_every_datagram_on_one_backend() {
    let world = started(&["be1", "be2", "be3"]);
    let shared = world.probe(&addr(VIP, 53), ProbeMode::UdpSharedUnconnected, 20);
    assert!(shared.iter().all(|a| a.ok), "{shared:?}");
    let spread_of_one = spread(&shared);
    // Drawn per datagram, 20 datagrams would all reach one of 3 backends with probability 3^-19.
    assert_eq!(
        spread_of_one.len(),
        1,
        "one socket's datagrams spread: {spread_of_one:?}"
    );
    // A socket per datagram is still balanced: stickiness is per socket, not per Service.
    let fresh = spread(&world.probe(&addr(VIP, 53), ProbeMode::Udp, 20));
    assert!(fresh.len() > 1, "20 sockets all reached one backend: {fresh:?}");
}

#[test]
fn manifest_edits_are_reflected_in_new_connections() {
    let mut world = started(&["be1", "be2", "be3"]);

    // A backend leaves.
    world.write("web.yaml", &web(&world, &["be1", "be3"]));
    world.wait_for_backends(VIP, 80, Protocol::Tcp, 2);
    let answered = spread(&world.probe(&addr(VIP, 80), ProbeMode::Tcp, 30));
    assert!(
        !answered.contains_key("be2"),
        "be2 was removed but answered: {answered:?}"
    );

    // A backend joins.
    world.write("web.yaml", &web(&world, &["be2"]));
    world.wait_for_backends(VIP, 80, Protocol::Tcp, 1);
    let answered = spread(&world.probe(&addr(VIP, 80), ProbeMode::Tcp, 10));
    assert_eq!(answered.keys().collect::<Vec<_>>(), ["be2"]);

    // The Service is deleted: the VIP is no longer translated, and the pods have no route to
    // it, so connect() fails with ENETUNREACH instead of reaching a backend.
    world.remove("web.yaml");
    world.wait_until("the frontend to disappear", Duration::from_secs(10), |w| {
        w.backends_of(VIP, 80, Protocol::Tcp).is_none().then_some(())
    });
    let attempts = world.probe(&addr(VIP, 80), ProbeMode::Tcp, 1);
    assert_eq!(attempts[0].errno, Some(libc::ENETUNREACH), "{:?}", attempts[0]);
    let snapshot = world.snapshot().expect("pinned maps");
    assert!(snapshot.frontends.is_empty() && snapshot.orphan_backends.is_empty());
}

#[test]
fn bpftool_map_dump_shows_btf_field_names() {
    let world = started(&["be1"]);
    let map = world.pin_dir().join(proxy_common::maps::SERVICES_V4);
    let out = std::process::Command::new("bpftool")
        .args(["--json", "map", "dump", "pinned"])
        .arg(&map)
        .output()
        .expect("running bpftool (Debian package bpftool)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    // With BTF, bpftool adds a "formatted" view of each entry with the named fields.
    let frontend = entries
        .as_array()
        .expect("array of entries")
        .iter()
        .map(|e| &e["formatted"])
        .find(|f| f["key"]["slot"] == 0 && f["key"]["port"] == 80)
        .unwrap_or_else(|| panic!("no frontend entry with named fields in {entries}"));
    // Named fields, host-order port, address as bytes: readable without our CLI.
    assert_eq!(frontend["key"]["addr"], serde_json::json!([10, 96, 0, 10]));
    assert_eq!(frontend["key"]["proto"], 6);
    assert_eq!(frontend["value"]["count"], 1);
    assert!(frontend["value"]["rev_nat_id"].as_u64().unwrap() > 0);
}

#[test]
fn bad_input_is_skipped_and_the_rest_keeps_working() {
    let mut world = World::new(&["be1", "be2"]);
    let ports = [("http", HTTP_PORT, "TCP")];
    let good = docs(&[
        service("good", &["10.96.0.20"], &[("http", 80, "TCP")], ""),
        slice("good-1", "good", false, &ports, &[Ep::ready(&world.ip("be1"))]),
    ]);
    world.write("good.yaml", &good);
    // A document that does not parse, between two that do: it alone is skipped.
    let unclosed = "kind: Service\nmetadata: {name: [unclosed\n";
    let garbage = docs(&[
        service("before", &["10.96.0.22"], &[("http", 80, "TCP")], ""),
        slice(
            "before-1",
            "before",
            false,
            &ports,
            &[Ep::ready(&world.ip("be1"))],
        ),
        unclosed.to_string(),
        service("after", &["10.96.0.23"], &[("http", 80, "TCP")], ""),
        slice("after-1", "after", false, &ports, &[Ep::ready(&world.ip("be2"))]),
    ]);
    // Its `---` is the last line before it.
    let garbage_line = garbage[..garbage.find(unclosed).unwrap()].lines().count();
    world.write("garbage.yaml", &garbage);
    world.write(
        "bad-ip.yaml",
        &service("bad-ip", &["10.96.0.300"], &[("http", 80, "TCP")], ""),
    );
    world.write(
        "bad-port.yaml",
        &docs(&[
            service(
                "mixed",
                &["10.96.0.21"],
                &[("http", 80, "TCP"), ("q", 81, "QUIC")],
                "",
            )
            .replace(
                "  - {name: \"q\"",
                "  - {name: huge, port: 65536}\n  - {name: \"q\"",
            ),
            slice("mixed-1", "mixed", false, &ports, &[Ep::ready(&world.ip("be2"))]),
        ]),
    );
    world.start_agent();
    world.wait_for_backends("10.96.0.20", 80, Protocol::Tcp, 1);
    world.wait_for_backends("10.96.0.21", 80, Protocol::Tcp, 1);
    world.wait_for_backends("10.96.0.22", 80, Protocol::Tcp, 1);
    world.wait_for_backends("10.96.0.23", 80, Protocol::Tcp, 1);
    assert_eq!(
        identity(&world.probe(&addr("10.96.0.23", 80), ProbeMode::Tcp, 1)[0]).backend,
        "be2",
        "the Service after the broken document is served"
    );
    assert_eq!(
        identity(&world.probe(&addr("10.96.0.21", 80), ProbeMode::Tcp, 1)[0]).backend,
        "be2"
    );

    let log = world.agent_log();
    for expected in [
        &format!("garbage.yaml: document at line {garbage_line}: not valid YAML/JSON, skipped"),
        "Service test/bad-ip: spec.clusterIPs \"10.96.0.300\" is not a valid IP address",
        "Service test/mixed: spec.ports[1].port: 65536 is outside 1-65535",
        "Service test/mixed: spec.ports[2].protocol: unknown protocol \"QUIC\"",
    ] {
        assert!(log.contains(expected), "log lacks {expected:?}:\n{log}");
    }
    let (_, metrics) = world.http_get("/metrics", "/metrics");
    let skipped_documents = metrics
        .lines()
        .find_map(|l| l.strip_prefix("bpf_kube_proxy_invalid_objects_total{kind=\"document\"} "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    assert!(skipped_documents >= Some(1), "{metrics}");

    // Breaking a working Service keeps its last good version serving.
    world.write("good.yaml", &good.replace("10.96.0.20", "10.96.0.999"));
    world.wait_until(
        "the agent to report the broken update",
        Duration::from_secs(10),
        |w| w.agent_log().contains("10.96.0.999").then_some(()),
    );
    let after = world.probe(&addr("10.96.0.20", 80), ProbeMode::Tcp, 3);
    assert!(
        after.iter().all(|a| a.ok && identity(a).backend == "be1"),
        "{after:?}"
    );
}
