//! The agent against an API server (the protocol-faithful stand-in in `apiserver.rs`), through
//! the real kube-rs list/watch code path: objects created, changed and deleted are served; an
//! outage or an expired resourceVersion never flushes the datapath.

use std::time::{Duration, Instant};

use bkp_sandbox::probe::{Attempt, ProbeMode};
use bpf_kube_proxy::pipeline::model::Protocol;
use integration_tests::{
    HTTP_PORT, World, addr,
    apiserver::Kind,
    identity,
    manifests::{Ep, docs, node, service, slice},
    spread,
};

const VIP: &str = "10.96.0.10";
const PORTS: [(&str, u16, &str); 1] = [("http", HTTP_PORT, "TCP")];

fn web_slice(world: &World, backends: &[&str]) -> String {
    let eps: Vec<Ep> = backends.iter().map(|b| Ep::ready(&world.ip(b))).collect();
    slice("web-1", "web", false, &PORTS, &eps)
}

/// An agent watching a test API server that holds `web` with `backends`.
fn started(backends: &[&str]) -> World {
    started_with(backends, &[])
}

fn started_with(backends: &[&str], agent_args: &[&str]) -> World {
    let mut world = World::new(&["be1", "be2", "be3"]);
    world.use_api_server();
    world.agent_args(agent_args);
    world.apply(&docs(&[
        node("z1"),
        service("web", &[VIP], &[("http", 80, "TCP")], ""),
        web_slice(&world, backends),
    ]));
    world.start_agent();
    world.wait_for_backends(VIP, 80, Protocol::Tcp, backends.len());
    world
}

fn all_ok(attempts: &[Attempt]) -> bool {
    attempts.iter().all(|a| a.ok)
}

#[test]
fn service_and_slice_created_changed_and_deleted_through_the_api_server_are_served() {
    let mut world = started(&["be1", "be2"]);
    let answered = spread(&world.probe(&addr(VIP, 80), ProbeMode::Tcp, 20));
    assert_eq!(answered.keys().collect::<Vec<_>>(), ["be1", "be2"]);

    world.apply(&web_slice(&world, &["be2"]));
    world.wait_for_backends(VIP, 80, Protocol::Tcp, 1);
    let answered = spread(&world.probe(&addr(VIP, 80), ProbeMode::Tcp, 10));
    assert_eq!(answered.keys().collect::<Vec<_>>(), ["be2"]);

    world.api().delete(Kind::Service, "test", "web");
    world.wait_until("the frontend to disappear", Duration::from_secs(10), |w| {
        w.backends_of(VIP, 80, Protocol::Tcp).is_none().then_some(())
    });
    let attempt = &world.probe(&addr(VIP, 80), ProbeMode::Tcp, 1)[0];
    assert_eq!(attempt.errno, Some(libc::ENETUNREACH), "{attempt:?}");

    // The agent really list-watches each kind, with the server-side filters kube-proxy uses.
    let requests = world.api().requests();
    for kind in ["Service", "EndpointSlice", "Node"] {
        assert!(
            requests.iter().any(|r| r.starts_with(&format!("LIST {kind} "))),
            "{requests:?}"
        );
        assert!(
            requests.iter().any(|r| r.starts_with(&format!("WATCH {kind} "))),
            "{requests:?}"
        );
    }
}

#[test]
fn api_server_outage_keeps_traffic_flowing_and_the_agent_catches_up() {
    let mut world = started(&["be1", "be2"]);
    let during = world.spawn_probe(&addr(VIP, 80), ProbeMode::Tcp, 40, 50);
    world.api_mut().stop();

    // While the API server is away, the cluster moves on.
    world.apply(&web_slice(&world, &["be3"]));
    world.apply(&docs(&[
        service("api", &["10.96.0.11"], &[("http", 80, "TCP")], ""),
        slice("api-1", "api", false, &PORTS, &[Ep::ready(&world.ip("be1"))]),
    ]));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        world.backends_of(VIP, 80, Protocol::Tcp).map(|b| b.len()),
        Some(2),
        "the datapath keeps its last known state while disconnected"
    );
    let attempts = during.results();
    assert!(
        attempts.iter().all(|a| a.ok),
        "connections failed during the outage: {:?}",
        attempts.iter().filter(|a| !a.ok).collect::<Vec<_>>()
    );

    world.api_mut().restart();
    world.wait_until("the agent to catch up", Duration::from_secs(30), |w| {
        let web = w.backends_of(VIP, 80, Protocol::Tcp)?;
        let api = w.backends_of("10.96.0.11", 80, Protocol::Tcp)?;
        (web.len() == 1 && api.len() == 1).then_some(())
    });
    let answered = spread(&world.probe(&addr(VIP, 80), ProbeMode::Tcp, 5));
    assert_eq!(answered.keys().collect::<Vec<_>>(), ["be3"]);
    assert_eq!(
        identity(&world.probe(&addr("10.96.0.11", 80), ProbeMode::Tcp, 1)[0]).backend,
        "be1"
    );
    let log = world.agent_log();
    assert!(log.contains("watch failed, retrying with backoff"), "{log}");
    assert!(log.contains("watch recovered"), "{log}");
}

#[test]
fn expired_resource_version_relists_without_flushing_the_datapath() {
    let mut world = started(&["be1", "be2"]);
    let lists_before = world
        .api()
        .requests()
        .iter()
        .filter(|r| r.starts_with("LIST"))
        .count();
    let during = world.spawn_probe(&addr(VIP, 80), ProbeMode::Tcp, 40, 25);

    // etcd compaction, then the watches drop: resuming from the old resourceVersion gets
    // 410 Gone, so the change below can only arrive through a relist.
    world.api().compact();
    world.api().disconnect_watches();
    world.apply(&web_slice(&world, &["be1", "be2", "be3"]));
    world.wait_for_backends(VIP, 80, Protocol::Tcp, 3);
    world.wait_until("a relist after 410 Gone", Duration::from_secs(10), |w| {
        let lists = w
            .api()
            .requests()
            .iter()
            .filter(|r| r.starts_with("LIST"))
            .count();
        (lists > lists_before).then_some(())
    });

    let attempts = during.results();
    assert!(all_ok(&attempts), "a relist must never flush: {attempts:?}");
    assert_eq!(spread(&world.probe(&addr(VIP, 80), ProbeMode::Tcp, 45)).len(), 3);
}

#[test]
fn bad_objects_from_the_api_are_logged_and_skipped_and_the_rest_is_served() {
    let mut world = World::new(&["be1", "be2"]);
    world.use_api_server();
    let be1 = world.ip("be1");
    let be2 = world.ip("be2");
    // A real API server validates these; a stand-in (or a buggy aggregated API) need not.
    world.apply(&docs(&[
        service("bad-ip", &["10.96.0.999"], &[("http", 80, "TCP")], ""),
        service("good", &["10.96.0.20"], &[("http", 80, "TCP")], ""),
        // Duplicate endpoints, within and across slices, and an address that is not one.
        slice(
            "good-1",
            "good",
            false,
            &PORTS,
            &[Ep::ready(&be1), Ep::ready(&be1), Ep::ready("10.244.0.300")],
        ),
        slice(
            "good-2",
            "good",
            false,
            &PORTS,
            &[Ep::ready(&be1), Ep::ready(&be2)],
        ),
    ]));
    // A huge slice: far beyond the API's 1000-endpoint limit.
    let many: Vec<Ep> = (0..5000u32)
        .map(|i| Ep::ready(&format!("10.1.{}.{}", i / 250, i % 250 + 1)))
        .collect();
    world.apply(&docs(&[
        service("huge", &["10.96.0.21"], &[("http", 80, "TCP")], ""),
        slice("huge-1", "huge", false, &PORTS, &many),
    ]));
    world.start_agent();
    world.wait_for_backends("10.96.0.20", 80, Protocol::Tcp, 2);
    world.wait_for_backends("10.96.0.21", 80, Protocol::Tcp, 5000);
    assert_eq!(
        spread(&world.probe(&addr("10.96.0.20", 80), ProbeMode::Tcp, 30)).len(),
        2
    );

    let log = world.agent_log();
    for expected in [
        "Service test/bad-ip: spec.clusterIPs \"10.96.0.999\" is not a valid IP address",
        "EndpointSlice test/good-1: endpoints[2].addresses[0]: \"10.244.0.300\" is not an IP address",
    ] {
        assert!(log.contains(expected), "log lacks {expected:?}:\n{log}");
    }
    let services: std::collections::BTreeSet<String> = world
        .snapshot()
        .expect("pinned maps")
        .frontends
        .into_iter()
        .map(|f| f.service)
        .collect();
    assert_eq!(
        services.into_iter().collect::<Vec<_>>(),
        ["test/good", "test/huge"],
        "only good and huge are programmed"
    );
}

/// `web`'s backends in the maps are exactly `backend`'s.
fn serves_only(world: &World, backend: &str) -> bool {
    world.backends_of(VIP, 80, Protocol::Tcp) == Some(vec![format!("{}:{HTTP_PORT}", world.ip(backend))])
}

#[test]
fn a_change_made_as_a_restarted_api_server_becomes_ready_is_served_within_3s() {
    const WARMUP: Duration = Duration::from_secs(3);
    let mut world = started(&["be1", "be2"]);
    world.api().set_warmup(WARMUP);
    world.api_mut().stop();
    // A restart that takes a while, as a control-plane node's does: the watches fail again
    // and again (connection refused, then 403 while the authorizer warms up).
    std::thread::sleep(Duration::from_secs(8));
    world.api_mut().restart();
    let ready = world.api().ready_at();
    std::thread::sleep(ready.saturating_duration_since(Instant::now()));

    world.apply(&web_slice(&world, &["be3"]));
    world.wait_until("the change to reach the maps", Duration::from_secs(30), |w| {
        serves_only(w, "be3").then_some(())
    });
    let took = ready.elapsed();
    println!("API server ready -> change in the maps: {took:.2?}");
    assert!(
        took < Duration::from_secs(3),
        "a change made when the API server was ready took {took:.2?} to reach the maps"
    );
    assert_eq!(
        identity(&world.probe(&addr(VIP, 80), ProbeMode::Tcp, 1)[0]).backend,
        "be3"
    );
}

#[test]
fn a_silent_watch_is_restarted_after_the_liveness_window_and_the_change_arrives() {
    const LIVENESS: Duration = Duration::from_secs(3);
    let mut world = started_with(&["be1", "be2"], &["--watch-liveness-timeout", "3s"]);
    // Quiet but healthy watches (bookmarks every second, nothing else) are left alone.
    std::thread::sleep(2 * LIVENESS);
    assert!(
        !world.agent_log().contains("watch silent"),
        "{}",
        world.agent_log()
    );
    let requests = world.api().requests();
    let watches: Vec<&String> = requests.iter().filter(|r| r.starts_with("WATCH")).collect();
    assert!(
        !watches.is_empty() && watches.iter().all(|r| r.ends_with(" bookmarks")),
        "every watch asks for bookmarks: {requests:?}"
    );

    let silenced = Instant::now();
    world.api().silence_watches();
    world.apply(&web_slice(&world, &["be3"]));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        world.backends_of(VIP, 80, Protocol::Tcp).map(|b| b.len()),
        Some(2),
        "a silent watch delivers nothing"
    );
    world.wait_until(
        "the change to reach the maps",
        LIVENESS + Duration::from_secs(10),
        |w| serves_only(w, "be3").then_some(()),
    );
    let took = silenced.elapsed();
    println!("watches silenced -> change in the maps: {took:.2?} (liveness window {LIVENESS:?})");
    assert!(
        took < LIVENESS + Duration::from_secs(3),
        "the change took {took:.2?} after the watches went silent"
    );
    let log = world.agent_log();
    assert!(
        log.contains("watch silent for 3s, restarting"),
        "log lacks the restart:\n{log}"
    );
    let (_, metrics) = world.http_get("/metrics", "/metrics");
    assert!(
        metrics.lines().any(|l| l
            .starts_with("bpf_kube_proxy_watch_silent_restarts_total{kind=\"EndpointSlice\"} ")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
}
