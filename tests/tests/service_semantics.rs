//! ClusterIP behaviours of the upstream e2e suite (test/e2e/network/service.go and friends),
//! each reproduced through the socket programs in a netns world. Test names follow the upstream
//! test they mirror.

use std::time::Duration;

use bkp_sandbox::probe::{Attempt, ProbeMode};
use bpf_kube_proxy::pipeline::model::Protocol;
use integration_tests::{
    HTTP_PORT, UDP_PORT, World, addr, identity,
    manifests::{Ep, docs, node, service, slice},
    spread,
};

const VIP: &str = "10.96.0.10";
const VIP6: &str = "fd00:10:96::10";
const BOTH: [(&str, u16, &str); 2] = [("http", HTTP_PORT, "TCP"), ("dns", UDP_PORT, "UDP")];

/// A world with the given backend pods, running the agent on `manifest(world)`, once the
/// frontend `VIP:80/TCP` holds `expected` backends.
fn started(pods: &[&str], manifest: impl Fn(&World) -> String, expected: usize) -> World {
    let mut world = World::new(pods);
    world.write("svc.yaml", &manifest(&world));
    world.start_agent();
    world.wait_for_backends(VIP, 80, Protocol::Tcp, expected);
    world
}

/// Service `web` (80/TCP → http, 53/UDP → dns) over IPv4 endpoints.
fn web(extra_spec: &str, endpoints: &[Ep]) -> String {
    docs(&[
        service(
            "web",
            &[VIP],
            &[("http", 80, "TCP"), ("dns", 53, "UDP")],
            extra_spec,
        ),
        slice("web-1", "web", false, &BOTH, endpoints),
    ])
}

fn ready(world: &World, pods: &[&str]) -> Vec<Ep> {
    pods.iter().map(|p| Ep::ready(&world.ip(p))).collect()
}

fn backends(attempts: &[Attempt]) -> Vec<String> {
    attempts.iter().map(|a| identity(a).backend).collect()
}

/// The backends that answered `count` TCP connects to `VIP:80`, each named once.
fn answering(world: &World, count: u32) -> Vec<String> {
    spread(&world.probe(&addr(VIP, 80), ProbeMode::Tcp, count))
        .into_keys()
        .collect()
}

fn refused(attempts: &[Attempt]) -> bool {
    attempts.iter().all(|a| a.errno == Some(libc::ECONNREFUSED))
}

/// A dual-stack `web` whose IPv4 and IPv6 slices hold `endpoints(world, ipv6)`, running, once
/// both ClusterIPs hold `expected` backends.
fn dual_stack(pods: &[&str], endpoints: impl Fn(&World, bool) -> Vec<Ep>, expected: usize) -> World {
    let mut world = World::new(pods);
    world.write(
        "svc.yaml",
        &docs(&[
            service(
                "web",
                &[VIP, VIP6],
                &[("http", 80, "TCP"), ("dns", 53, "UDP")],
                "ipFamilyPolicy: RequireDualStack\nipFamilies: [IPv4, IPv6]",
            ),
            slice("web-v4", "web", false, &BOTH, &endpoints(&world, false)),
            slice("web-v6", "web", true, &BOTH, &endpoints(&world, true)),
        ]),
    );
    world.start_agent();
    world.wait_for_backends(VIP6, 80, Protocol::Tcp, expected);
    world.wait_for_backends(VIP, 80, Protocol::Tcp, expected);
    world
}

fn pod_ip(world: &World, pod: &str, ipv6: bool) -> String {
    if ipv6 { world.ip6(pod) } else { world.ip(pod) }
}

#[test]
fn should_function_for_pod_service_over_ipv4_and_ipv6_on_a_dual_stack_service() {
    let world = dual_stack(
        &["be1", "be2"],
        |w, v6| {
            ["be1", "be2"]
                .iter()
                .map(|p| Ep::ready(&pod_ip(w, p, v6)))
                .collect()
        },
        2,
    );
    let client6 = world.ip6("client");
    for (vip, port, mode) in [
        (VIP6, 80, ProbeMode::Tcp),
        (VIP6, 53, ProbeMode::Udp),
        (VIP6, 53, ProbeMode::UdpConnected),
        (VIP, 80, ProbeMode::Tcp),
        (VIP, 53, ProbeMode::Udp),
    ] {
        let target = addr(vip, port);
        for a in world.probe(&target, mode, 4) {
            assert!(a.ok, "{target} {mode:?}: {a:?}");
            assert_eq!(
                a.peer.as_deref(),
                Some(target.as_str()),
                "{mode:?}: peer must be the VIP"
            );
            let id = identity(&a);
            assert!(["be1", "be2"].contains(&id.backend.as_str()));
            if vip == VIP6 {
                assert!(
                    id.client.contains(&client6),
                    "v6 client {} seen as {}",
                    client6,
                    id.client
                );
            }
        }
    }
}

#[test]
fn should_be_rejected_when_no_endpoints_exist() {
    // A Service whose only endpoint is not serving: kube-proxy REJECTs, so connect() must fail
    // at once with ECONNREFUSED (not time out), for TCP and for UDP sends, in both families.
    let world = dual_stack(
        &["be1"],
        |w, v6| vec![Ep::ready(&pod_ip(w, "be1", v6)).not_serving()],
        0,
    );
    for (vip, port, mode) in [
        (VIP, 80, ProbeMode::Tcp),
        (VIP, 53, ProbeMode::Udp),
        (VIP, 53, ProbeMode::UdpConnected),
        (VIP6, 80, ProbeMode::Tcp),
        (VIP6, 53, ProbeMode::Udp),
    ] {
        let attempts = world.probe(&addr(vip, port), mode, 2);
        assert!(refused(&attempts), "{vip}:{port} {mode:?}: {attempts:?}");
        assert!(
            attempts.iter().all(|a| a.micros < 500_000),
            "a reject is immediate, not a timeout: {attempts:?}"
        );
    }
}

#[test]
fn should_reject_connections_to_unknown_ports_of_a_cluster_ip() {
    let world = started(&["be1"], |w| web("", &ready(w, &["be1"])), 1);
    assert!(world.probe(&addr(VIP, 80), ProbeMode::Tcp, 1)[0].ok);
    assert!(
        refused(&world.probe(&addr(VIP, 81), ProbeMode::Tcp, 2)),
        "unknown TCP port"
    );
    assert!(
        refused(&world.probe(&addr(VIP, 80), ProbeMode::Udp, 2)),
        "port served for TCP only"
    );
    assert!(
        refused(&world.probe(&addr(VIP, 9999), ProbeMode::UdpConnected, 2)),
        "unknown UDP port"
    );
}

#[test]
fn should_have_session_affinity_work_for_service_with_type_cluster_ip() {
    let affinity = "sessionAffinity: ClientIP\nsessionAffinityConfig: {clientIP: {timeoutSeconds: 10800}}";
    let world = started(
        &["be1", "be2", "be3"],
        |w| web(affinity, &ready(w, &["be1", "be2", "be3"])),
        3,
    );
    for mode in [ProbeMode::Tcp, ProbeMode::UdpConnected] {
        let port = if mode == ProbeMode::Tcp { 80 } else { 53 };
        let seen = spread(&world.probe(&addr(VIP, port), mode, 20));
        assert_eq!(seen.len(), 1, "{mode:?}: one client, one backend: {seen:?}");
    }
    // Another client (another network namespace, so another pod IP) is placed independently;
    // it sticks too.
    let other = spread(&world.probe_from("be1", &addr(VIP, 80), ProbeMode::Tcp, 10));
    assert_eq!(other.len(), 1, "{other:?}");
}

#[test]
fn should_have_session_affinity_timeout_work_for_service_with_type_cluster_ip() {
    let affinity = "sessionAffinity: ClientIP\nsessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}";
    let world = started(
        &["be1", "be2", "be3"],
        |w| web(affinity, &ready(w, &["be1", "be2", "be3"])),
        3,
    );
    // Within the timeout the backend holds.
    assert_eq!(spread(&world.probe(&addr(VIP, 80), ProbeMode::Tcp, 10)).len(), 1);
    // After it, the choice is made afresh: over up to 12 expiries (each a 1-in-3 chance of
    // landing on the same backend again), a second backend must appear.
    let first = backends(&world.probe(&addr(VIP, 80), ProbeMode::Tcp, 1));
    let mut seen = std::collections::BTreeSet::from([first[0].clone()]);
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(1300));
        seen.extend(backends(&world.probe(&addr(VIP, 80), ProbeMode::Tcp, 1)));
        if seen.len() > 1 {
            return;
        }
    }
    panic!("affinity never expired: always {seen:?}");
}

#[test]
fn should_be_able_to_switch_session_affinity_for_service_with_type_cluster_ip() {
    let mut world = started(
        &["be1", "be2", "be3"],
        |w| web("", &ready(w, &["be1", "be2", "be3"])),
        3,
    );
    let eps = ready(&world, &["be1", "be2", "be3"]);
    assert!(answering(&world, 30).len() > 1);
    for (spec, on) in [
        ("sessionAffinity: ClientIP", true),
        ("sessionAffinity: None", false),
    ] {
        world.write("svc.yaml", &web(spec, &eps));
        world.wait_until(spec, Duration::from_secs(10), |w| {
            let snapshot = w.snapshot()?;
            let f = snapshot.frontends.iter().find(|f| f.frontend.port == 80)?;
            (f.affinity_timeout.is_some() == on).then_some(())
        });
        assert_eq!(answering(&world, 30).len() == 1, on, "{spec}");
    }
}

#[test]
fn should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_internal_traffic_policy_cluster()
 {
    let mut world = started(
        &["be1", "be2"],
        |w| web("", &[Ep::ready(&w.ip("be1")), Ep::terminating(&w.ip("be2"))]),
        1,
    );
    // A ready endpoint exists: the terminating one gets nothing.
    assert_eq!(answering(&world, 20), ["be1"]);
    // The ready one goes away: serving+terminating endpoints take over rather than a reject.
    let eps = [
        Ep::ready(&world.ip("be1")).not_serving(),
        Ep::terminating(&world.ip("be2")),
    ];
    world.write("svc.yaml", &web("", &eps));
    world.wait_until("be2 to take over", Duration::from_secs(10), |w| {
        (w.backends_of(VIP, 80, Protocol::Tcp)? == [addr(&w.ip("be2"), HTTP_PORT)]).then_some(())
    });
    assert_eq!(answering(&world, 10), ["be2"]);
}

#[test]
fn should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_internal_traffic_policy_local()
 {
    let world = started(
        &["be1", "be2"],
        |w| {
            web(
                "internalTrafficPolicy: Local",
                &[
                    Ep::terminating(&w.ip("be1")),
                    Ep::ready(&w.ip("be2")).on_node("other-node"),
                ],
            )
        },
        1,
    );
    assert_eq!(answering(&world, 10), ["be1"]);
}

#[test]
fn should_respect_internal_traffic_policy_local_pod_to_pod() {
    let mut world = started(
        &["be1", "be2", "be3"],
        |w| {
            web(
                "internalTrafficPolicy: Local",
                &[
                    Ep::ready(&w.ip("be1")),
                    Ep::ready(&w.ip("be2")).on_node("other-node"),
                    Ep::ready(&w.ip("be3")).on_node("other-node"),
                ],
            )
        },
        1,
    );
    assert_eq!(answering(&world, 20), ["be1"]);
    // No local endpoint left: kube-proxy drops/rejects rather than leave the node.
    let eps = [
        Ep::ready(&world.ip("be2")).on_node("other-node"),
        Ep::ready(&world.ip("be3")).on_node("other-node"),
    ];
    world.write("svc.yaml", &web("internalTrafficPolicy: Local", &eps));
    world.wait_for_backends(VIP, 80, Protocol::Tcp, 0);
    assert!(refused(&world.probe(&addr(VIP, 80), ProbeMode::Tcp, 2)));
}

#[test]
fn should_route_traffic_to_endpoints_in_the_same_zone_with_traffic_distribution_prefer_close() {
    let mut world = started(
        &["be1", "be2", "be3"],
        |w| {
            docs(&[
                node("zone-a"),
                web(
                    "trafficDistribution: PreferClose",
                    &[
                        Ep::ready(&w.ip("be1")).on_node("n2").for_zones(&["zone-b"]),
                        Ep::ready(&w.ip("be2")).on_node("n3").for_zones(&["zone-a"]),
                        Ep::ready(&w.ip("be3")).on_node("n4").for_zones(&["zone-c"]),
                    ],
                ),
            ])
        },
        1,
    );
    assert_eq!(answering(&world, 20), ["be2"]);
    // kube-proxy's fallback: if any endpoint lacks hints, hints are ignored altogether.
    let eps = [
        Ep::ready(&world.ip("be1")).on_node("n2").for_zones(&["zone-b"]),
        Ep::ready(&world.ip("be2")).on_node("n3").for_zones(&["zone-a"]),
        Ep::ready(&world.ip("be3")).on_node("n4"),
    ];
    world.write(
        "svc.yaml",
        &docs(&[node("zone-a"), web("trafficDistribution: PreferClose", &eps)]),
    );
    world.wait_for_backends(VIP, 80, Protocol::Tcp, 3);
}

#[test]
fn should_route_traffic_to_an_endpoint_on_the_same_node_with_traffic_distribution_prefer_same_node() {
    let world = started(
        &["be1", "be2"],
        |w| {
            docs(&[
                node("zone-a"),
                web(
                    "trafficDistribution: PreferSameNode",
                    &[
                        Ep::ready(&w.ip("be1"))
                            .on_node("n2")
                            .for_zones(&["zone-a"])
                            .for_nodes(&["n2"]),
                        Ep::ready(&w.ip("be2"))
                            .for_zones(&["zone-a"])
                            .for_nodes(&[integration_tests::NODE_NAME]),
                    ],
                ),
            ])
        },
        1,
    );
    assert_eq!(answering(&world, 20), ["be2"]);
}

#[test]
fn should_serve_multiport_endpoints_from_pods_and_follow_ports_added_and_removed() {
    let mut world = started(&["be1"], |w| web("", &ready(w, &["be1"])), 1);
    assert!(world.probe(&addr(VIP, 80), ProbeMode::Tcp, 1)[0].ok);
    assert!(world.probe(&addr(VIP, 53), ProbeMode::Udp, 1)[0].ok);

    // A port is added to the live Service.
    let ports = [("http", 80, "TCP"), ("dns", 53, "UDP"), ("alt", 8000, "TCP")];
    let slice_ports = [
        ("http", HTTP_PORT, "TCP"),
        ("dns", UDP_PORT, "UDP"),
        ("alt", HTTP_PORT, "TCP"),
    ];
    let eps = ready(&world, &["be1"]);
    world.write(
        "svc.yaml",
        &docs(&[
            service("web", &[VIP], &ports, ""),
            slice("web-1", "web", false, &slice_ports, &eps),
        ]),
    );
    world.wait_for_backends(VIP, 8000, Protocol::Tcp, 1);
    assert!(world.probe(&addr(VIP, 8000), ProbeMode::Tcp, 1)[0].ok);

    // And removed again: the port is now unknown on a known ClusterIP, so it is refused.
    world.write("svc.yaml", &web("", &eps));
    world.wait_until("port 8000 to go", Duration::from_secs(10), |w| {
        w.backends_of(VIP, 8000, Protocol::Tcp).is_none().then_some(())
    });
    assert!(refused(&world.probe(&addr(VIP, 8000), ProbeMode::Tcp, 1)));
    assert!(world.probe(&addr(VIP, 80), ProbeMode::Tcp, 1)[0].ok);
}

#[test]
fn should_serve_endpoints_on_same_port_and_different_protocols() {
    // Port 80 twice: TCP to the HTTP server, UDP to the datagram server.
    let world = started(
        &["be1"],
        |w| {
            docs(&[
                service("web", &[VIP], &[("tcp", 80, "TCP"), ("udp", 80, "UDP")], ""),
                slice(
                    "web-1",
                    "web",
                    false,
                    &[("tcp", HTTP_PORT, "TCP"), ("udp", UDP_PORT, "UDP")],
                    &ready(w, &["be1"]),
                ),
            ])
        },
        1,
    );
    let tcp = world.probe(&addr(VIP, 80), ProbeMode::Tcp, 1);
    let udp = world.probe(&addr(VIP, 80), ProbeMode::Udp, 1);
    assert!(tcp[0].ok && udp[0].ok, "{tcp:?} {udp:?}");
    // The HTTP server answers a GET; the datagram server echoes the probe's payload.
    assert!(identity(&tcp[0]).client.contains(&world.ip("client")));
    assert_eq!(identity(&udp[0]).backend, "be1");
    assert_ne!(tcp[0].reply, udp[0].reply, "two different servers answered");
}

#[test]
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_cluster_ip_service() {
    // A resolver-style client keeps one connected UDP socket. Its backend is replaced (the old
    // pod keeps running here, so without help the socket would keep talking to it): the agent
    // must end the socket so the client reconnects to the new backend.
    let world = started(&["be1", "be2"], |w| web("", &ready(w, &["be1"])), 1);
    let mut prober = world.spawn_probe(&addr(VIP, 53), ProbeMode::UdpSession, 60, 100);
    // The socket must be talking to be1 before be1 is replaced.
    let before = prober.answered(3);
    assert!(
        before
            .iter()
            .filter(|a| a.ok)
            .all(|a| identity(a).backend == "be1"),
        "{before:?}"
    );
    world.write("svc.yaml", &web("", &ready(&world, &["be2"])));
    let attempts = prober.results();
    let answered: Vec<(u32, String)> = attempts
        .iter()
        .filter(|a| a.ok)
        .map(|a| (a.n, identity(a).backend))
        .collect();
    let failures = attempts.iter().filter(|a| !a.ok).count();
    let last = &answered.last().expect("some answers").1;
    assert_eq!(
        last, "be2",
        "the client still talks to the old backend: {answered:?}"
    );
    assert!(answered.iter().any(|(_, b)| b == "be1"), "{answered:?}");
    // Once be2 answered, be1 never does again, and the switch costs at most a couple of
    // attempts (the destroyed socket's error, and possibly one in flight).
    let switch = answered.iter().position(|(_, b)| b == "be2").unwrap();
    assert!(answered[switch..].iter().all(|(_, b)| b == "be2"), "{answered:?}");
    assert!(failures <= 2, "{failures} failed attempts: {attempts:?}");
    assert!(
        world.agent_log().contains("destroyed connected UDP sockets"),
        "{}",
        world.agent_log()
    );
}

#[test]
fn should_allow_pods_to_hairpin_back_to_themselves_through_services() {
    let world = started(&["be1"], |w| web("", &ready(w, &["be1"])), 1);
    for mode in [ProbeMode::Tcp, ProbeMode::Udp] {
        let port = if mode == ProbeMode::Tcp { 80 } else { 53 };
        let attempts = world.probe_from("be1", &addr(VIP, port), mode, 3);
        for a in &attempts {
            assert!(a.ok, "{mode:?}: {a:?}");
            let id = identity(a);
            assert_eq!(id.backend, "be1");
            // The pod reached itself, as itself: no SNAT needed with socket-level balancing.
            assert!(id.client.contains(&world.ip("be1")), "{mode:?}: {}", id.client);
            assert_eq!(a.peer.as_deref(), Some(addr(VIP, port).as_str()));
        }
    }
}
