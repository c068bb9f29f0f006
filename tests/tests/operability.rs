//! Day-two behaviour an operator replacing kube-proxy relies on: restarts without disruption,
//! kube-proxy's health and metrics endpoints, clean uninstall, full maps.

use std::time::Duration;

use bkp_sandbox::probe::ProbeMode;
use bpf_kube_proxy::pipeline::model::Protocol;
use integration_tests::{
    HTTP_PORT, UDP_PORT, World, addr, identity,
    manifests::{Ep, docs, service, slice},
    metric_sample as sample, spread,
};
use nix::sys::signal::Signal;

const VIP: &str = "10.96.0.10";
const PORTS: [(&str, u16, &str); 2] = [("http", HTTP_PORT, "TCP"), ("dns", UDP_PORT, "UDP")];

fn web(world: &World, extra_spec: &str, pods: &[&str], slice_annotations: &str) -> String {
    let eps: Vec<Ep> = pods.iter().map(|p| Ep::ready(&world.ip(p))).collect();
    let slice = slice("web-1", "web", false, &PORTS, &eps).replacen(
        "metadata:\n",
        &format!("metadata:\n  annotations: {{{slice_annotations}}}\n"),
        1,
    );
    docs(&[
        service(
            "web",
            &[VIP],
            &[("http", 80, "TCP"), ("dns", 53, "UDP")],
            extra_spec,
        ),
        slice,
    ])
}

fn started(pods: &[&str], extra_spec: &str, agent_args: &[&str]) -> World {
    let mut world = World::new(pods);
    world.write("web.yaml", &web(&world, extra_spec, pods, ""));
    world.agent_args(agent_args);
    world.start_agent();
    world.wait_for_backends(VIP, 80, Protocol::Tcp, pods.len());
    world
}

#[test]
fn sigkill_and_restart_under_load_fail_no_connection_and_keep_affinity() {
    let affinity = "sessionAffinity: ClientIP\nsessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}";
    let mut world = started(&["be1", "be2", "be3"], affinity, &[]);
    let before = spread(&world.probe(&addr(VIP, 80), ProbeMode::Tcp, 5));
    assert_eq!(before.len(), 1, "affinity holds: {before:?}");

    // New TCP connections, connected UDP and unconnected UDP keep flowing all along.
    let tcp = world.spawn_probe(&addr(VIP, 80), ProbeMode::Tcp, 500, 10);
    let udp = world.spawn_probe(&addr(VIP, 53), ProbeMode::Udp, 500, 10);
    let udp_connected = world.spawn_probe(&addr(VIP, 53), ProbeMode::UdpConnected, 500, 10);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        world.stop_agent(Signal::SIGKILL);
        std::thread::sleep(Duration::from_millis(200));
        world.start_agent();
    }
    for (what, prober) in [("tcp", tcp), ("udp", udp), ("udp-connected", udp_connected)] {
        let attempts = prober.results();
        let failed: Vec<_> = attempts.iter().filter(|a| !a.ok).collect();
        assert_eq!(attempts.len(), 500, "{what}");
        assert!(
            failed.is_empty(),
            "{what}: {} of 500 failed: {failed:?}",
            failed.len()
        );
    }
    let after = spread(&world.probe(&addr(VIP, 80), ProbeMode::Tcp, 5));
    assert_eq!(after, before, "the client keeps its backend across restarts");
    let log = world.agent_log();
    assert!(log.contains("adopting datapath state from pinned maps"), "{log}");
}

#[test]
fn sigterm_leaves_the_datapath_serving_and_cleanup_removes_everything() {
    let mut world = started(&["be1"], "", &[]);
    world.stop_agent(Signal::SIGTERM);
    assert!(
        world.agent_log().contains("the datapath stays in place"),
        "{}",
        world.agent_log()
    );
    let attempts = world.probe(&addr(VIP, 80), ProbeMode::Tcp, 3);
    assert!(
        attempts.iter().all(|a| a.ok),
        "no agent, still served: {attempts:?}"
    );

    let out = std::process::Command::new(integration_tests::binary())
        .args(["cleanup", "--pin-dir"])
        .arg(world.pin_dir())
        .output()
        .expect("running cleanup");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!world.pin_dir().exists(), "pins removed");
    // The programs are gone: the VIP is an ordinary, unrouted address again.
    let attempts = world.probe(&addr(VIP, 80), ProbeMode::Tcp, 1);
    assert_eq!(attempts[0].errno, Some(libc::ENETUNREACH), "{attempts:?}");
}

#[test]
fn a_slot_deleted_with_bpftool_comes_back_within_one_sync_period() {
    let mut world = started(&["be1", "be2", "be3"], "", &["--sync-period", "2s"]);
    // What an operator (or another tool) might do: delete slot 2 of 10.96.0.10:80/TCP. The
    // key is ServiceKey's bytes: address, port and slot in host order, proto, scope, padding.
    let map = world.pin_dir().join(proxy_common::maps::SERVICES_V4);
    let key = ["10", "96", "0", "10", "80", "0", "2", "0", "6", "0", "0", "0"];
    let out = std::process::Command::new("bpftool")
        .args(["map", "delete", "pinned"])
        .arg(&map)
        .arg("key")
        .args(key)
        .output()
        .expect("running bpftool (Debian package bpftool)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deleted = std::time::Instant::now();
    let frontend = bpf_kube_proxy::pipeline::model::FrontendKey::new(VIP.parse().unwrap(), 80, Protocol::Tcp);
    world.wait_until("the deleted slot to be rewritten", Duration::from_secs(6), |w| {
        let snapshot = w.snapshot()?;
        let f = snapshot.frontends.iter().find(|f| f.frontend == frontend)?;
        (f.missing_slots.is_empty() && f.backends.len() == 3).then_some(())
    });
    let took = deleted.elapsed();
    eprintln!(
        "slot 2 rewritten {} ms after bpftool deleted it (sync period 2 s)",
        took.as_millis()
    );
    // One period, and the slack of a loaded (or emulated) machine.
    assert!(took < Duration::from_millis(3000), "took {took:?}");
    let attempts = world.probe(&addr(VIP, 80), ProbeMode::Tcp, 20);
    assert!(attempts.iter().all(|a| a.ok), "{attempts:?}");
    assert!(
        world
            .agent_log()
            .contains("repairing map entries that differ from the desired state"),
        "{}",
        world.agent_log()
    );
}

#[test]
fn health_and_metrics_are_served_like_kube_proxy() {
    let mut world = started(&["be1", "be2"], "", &["--sync-period", "1s"]);
    let (status, body) = world.http_get("/healthz", "/healthz");
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(health["nodeEligible"], true);
    for field in ["lastUpdated", "currentTime"] {
        let text = health[field].as_str().unwrap_or_default();
        assert!(humantime::parse_rfc3339(text).is_ok(), "{field}: {text:?}");
    }
    assert_eq!(world.http_get("/healthz", "/livez").0, 200);
    assert_eq!(
        world.http_get("/metrics", "/proxyMode"),
        (200, "ebpf".to_string())
    );

    // Traffic shows up in the datapath's own counters.
    assert!(
        world
            .probe(&addr(VIP, 80), ProbeMode::Tcp, 7)
            .iter()
            .all(|a| a.ok)
    );
    assert!(refused_once(&world));
    let (status, metrics) = world.http_get("/metrics", "/metrics");
    assert_eq!(status, 200);
    for series in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "kubeproxy_proxy_healthz_total{code=\"200\"}",
        "kubeproxy_proxy_livez_total{code=\"200\"}",
        "bpf_kube_proxy_map_capacity{map=\"bkp_svc_v4\"}",
    ] {
        assert!(sample(&metrics, series).is_some(), "no {series} in\n{metrics}");
    }
    // The kernel feature probe: one line at start, the same facts as gauges.
    let log = world.agent_log();
    let features: Vec<&str> = log.lines().filter(|l| l.contains("kernel features")).collect();
    assert_eq!(features.len(), 1, "{log}");
    let tcx = sample(&metrics, "bpf_kube_proxy_kernel_feature{feature=\"tcx\"}");
    let mode = if tcx == Some(1.0) { "tcx" } else { "netlink" };
    assert!(
        features[0].contains(&format!("tc_attach=\"{mode}\"")),
        "{}",
        features[0]
    );
    assert_eq!(
        sample(&metrics, "bpf_kube_proxy_kernel_feature{feature=\"btf\"}"),
        Some(1.0)
    );
    // Every tc program of this build loaded: none is listed as failed.
    assert!(!metrics.contains("state=\"failed\""), "{metrics}");
    assert_eq!(
        sample(
            &metrics,
            "bpf_kube_proxy_datapath_programs{program=\"bkp_tc_ingress\",state=\"loaded\"}"
        ),
        Some(1.0)
    );
    let forwarded = sample(
        &metrics,
        "bpf_kube_proxy_datapath_events_total{reason=\"sock_forward\"}",
    );
    assert!(forwarded.is_some_and(|n| n >= 7.0), "{forwarded:?}");
    let unknown = sample(
        &metrics,
        "bpf_kube_proxy_datapath_events_total{reason=\"sock_reject_unknown_port\"}",
    );
    assert!(unknown.is_some_and(|n| n >= 1.0), "{unknown:?}");
    // 2 ports + the ClusterIP guard, plus 2 slots each for the ports. The map walker counts
    // the maps after each sync that wrote them, at most once a second.
    let counted = world.wait_until(
        "the map walker's count after the sync",
        Duration::from_secs(3),
        |w| {
            let (_, m) = w.http_get("/metrics", "/metrics");
            sample(&m, "bpf_kube_proxy_map_entries{map=\"bkp_svc_v4\"}")
                .is_some_and(|n| n > 0.0)
                .then_some(m)
        },
    );
    assert_eq!(
        sample(&counted, "bpf_kube_proxy_map_entries{map=\"bkp_svc_v4\"}"),
        Some(7.0)
    );
    assert_eq!(
        sample(&counted, "bpf_kube_proxy_map_entries{map=\"bkp_be_v4\"}"),
        Some(4.0)
    );
    // The periodic sync runs every second.
    let last = sample(&metrics, "kubeproxy_sync_proxy_rules_last_timestamp_seconds").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (_, later) = world.http_get("/metrics", "/metrics");
    assert!(sample(&later, "kubeproxy_sync_proxy_rules_last_timestamp_seconds").unwrap() > last);
    // Each periodic sync ran the repair pass over maps nobody touched: it found nothing.
    assert_eq!(
        sample(&later, "bpf_kube_proxy_datapath_repaired_entries_total"),
        Some(0.0),
        "{later}"
    );
    assert!(!world.agent_log().contains("repairing map entries"));
}

/// One connect to a port the Service does not serve; true when it was refused.
fn refused_once(world: &World) -> bool {
    world.probe(&addr(VIP, 81), ProbeMode::Tcp, 1)[0].errno == Some(libc::ECONNREFUSED)
}

#[test]
fn network_programming_latency_is_measured_from_the_slice_trigger_time() {
    let mut world = started(&["be1", "be2"], "", &[]);
    // Trigger times from before the agent started are not counted: let it be older than 2 s.
    std::thread::sleep(Duration::from_millis(3000));
    let trigger = humantime::format_rfc3339_millis(std::time::SystemTime::now() - Duration::from_secs(2));
    let annotation = format!("endpoints.kubernetes.io/last-change-trigger-time: \"{trigger}\"");
    world.write("web.yaml", &web(&world, "", &["be1"], &annotation));
    world.wait_for_backends(VIP, 80, Protocol::Tcp, 1);
    let (_, metrics) = world.http_get("/metrics", "/metrics");
    let count = sample(&metrics, "kubeproxy_network_programming_duration_seconds_count");
    let sum = sample(&metrics, "kubeproxy_network_programming_duration_seconds_sum");
    assert!(count.is_some_and(|c| c >= 1.0), "{metrics}");
    // At least the two seconds between the trigger and the write, at most a few more.
    assert!(sum.is_some_and(|s| (2.0..30.0).contains(&s)), "{sum:?}");
}

#[test]
fn healthz_fails_but_livez_holds_while_the_node_is_being_deleted() {
    let mut world = started(&["be1"], "", &[]);
    let node = format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {}, deletionTimestamp: \"2026-01-01T00:00:00Z\"}}\n",
        integration_tests::NODE_NAME
    );
    world.write("node.yaml", &node);
    world.wait_until("/healthz to fail", Duration::from_secs(10), |w| {
        (w.http_get("/healthz", "/healthz").0 == 503).then_some(())
    });
    let (_, body) = world.http_get("/healthz", "/healthz");
    assert!(body.contains("\"nodeEligible\":false"), "{body}");
    assert_eq!(world.http_get("/healthz", "/livez").0, 200);
}

#[test]
fn a_full_map_leaves_no_half_programmed_service_is_counted_and_fails_healthz() {
    // Room for web (2 ports × (1 + 1 slot) + its guard = 5 entries) and little more.
    let mut world = started(&["be1"], "", &["--map-size-services", "6", "--sync-period", "1s"]);
    let eps = [Ep::ready(&world.ip("be1"))];
    world.write(
        "api.yaml",
        &docs(&[
            service("api", &["10.96.0.11"], &[("http", 80, "TCP")], ""),
            slice("api-1", "api", false, &PORTS[..1], &eps),
        ]),
    );
    world.wait_until("the refusal to be logged", Duration::from_secs(10), |w| {
        w.agent_log()
            .contains("Service test/api could not be programmed: map bkp_svc_v4 would need")
            .then_some(())
    });
    let snapshot = world.snapshot().expect("pinned maps");
    assert!(
        snapshot.frontends.iter().all(|f| f.service != "test/api"),
        "nothing of api was written"
    );
    assert!(
        world
            .probe(&addr(VIP, 80), ProbeMode::Tcp, 3)
            .iter()
            .all(|a| a.ok),
        "web still served"
    );
    world.wait_until("/healthz to fail", Duration::from_secs(10), |w| {
        (w.http_get("/healthz", "/healthz").0 == 503).then_some(())
    });
    let (_, metrics) = world.http_get("/metrics", "/metrics");
    assert!(sample(&metrics, "bpf_kube_proxy_map_full_total").is_some_and(|n| n >= 1.0));

    // Room appears (web loses its dns port): api is programmed on a following sync.
    world.write(
        "web.yaml",
        &docs(&[
            service("web", &[VIP], &[("http", 80, "TCP")], ""),
            slice("web-1", "web", false, &PORTS[..1], &eps),
        ]),
    );
    world.wait_for_backends("10.96.0.11", 80, Protocol::Tcp, 1);
    assert_eq!(
        identity(&world.probe(&addr("10.96.0.11", 80), ProbeMode::Tcp, 1)[0]).backend,
        "be1"
    );
    world.wait_until("/healthz to recover", Duration::from_secs(10), |w| {
        (w.http_get("/healthz", "/healthz").0 == 200).then_some(())
    });
}

#[test]
fn config_file_is_read_as_kube_proxy_writes_it_and_an_invalid_one_stops_the_agent() {
    let mut world = World::new(&["be1"]);
    world.write("web.yaml", &web(&world, "", &["be1"], ""));
    let config = world.manifest_dir().with_extension("kube-proxy.yaml");
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: iptables\n\
         syncPeriod: 1s\nconntrack: {udpTimeout: 30s, maxPerCore: 32768}\n",
    )
    .unwrap();
    world.agent_args(&["--config", config.to_str().unwrap()]);
    world.start_agent();
    let log = world.agent_log();
    for expected in [
        "mode is ignored: the mode is always ebpf",
        "conntrack.maxPerCore is ignored",
    ] {
        assert_eq!(log.matches(expected).count(), 1, "{expected:?} once in\n{log}");
    }
    assert!(
        !log.contains("udpTimeout is ignored"),
        "conntrack.udpTimeout is honoured\n{log}"
    );
    world.stop_agent(Signal::SIGTERM);

    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nsyncPeriodd: 1s\n",
    )
    .unwrap();
    let out = std::process::Command::new(integration_tests::binary())
        .arg("run")
        .arg("--config")
        .arg(&config)
        .args(["--manifests", "/nonexistent"])
        .output()
        .expect("running the agent");
    let _ = std::fs::remove_file(&config);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid config file") && stderr.contains("unknown field \"syncPeriodd\""),
        "{stderr}"
    );
}

fn cli(world: &World, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(integration_tests::binary())
        .args(args)
        .arg("--pin-dir")
        .arg(world.pin_dir())
        .output()
        .expect("running the CLI");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn get_explain_and_dump_show_the_maps_and_name_any_drift() {
    let mut world = started(&["be1", "be2"], "", &[]);
    let (ok, text) = cli(&world, &["get", "test/web", "-o", "json"]);
    assert!(ok, "{text}");
    let got: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let frontends: Vec<&str> = got["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["port_name"].as_str().unwrap())
        .collect();
    assert_eq!(
        frontends,
        ["*", "dns", "http"],
        "two ports and the ClusterIP guard"
    );

    let manifests = world.manifest_dir().to_str().unwrap().to_string();
    let explain = [
        "explain",
        "test/web",
        "--manifests",
        &manifests,
        "--hostname-override",
    ];
    let explain: Vec<&str> = explain
        .into_iter()
        .chain([integration_tests::NODE_NAME])
        .collect();
    let (ok, text) = cli(&world, &explain);
    assert!(ok && text.contains("in sync"), "{text}");

    // The source changes while no agent runs: explain names the difference.
    world.stop_agent(Signal::SIGTERM);
    world.write("web.yaml", &web(&world, "", &["be1"], ""));
    let (ok, text) = cli(&world, &explain);
    let gone = addr(&world.ip("be2"), HTTP_PORT);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!(
            "10.96.0.10:80/TCP: backend {gone}/TCP in the maps, not wanted"
        )),
        "{text}"
    );

    let (ok, text) = cli(&world, &["dump", "bkp_svc_v4", "-o", "json"]);
    assert!(ok, "{text}");
    let rows: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|r| r["key"]["addr"] == serde_json::json!([10, 96, 0, 10])
                && r["key"]["port"] == 80
                && r["value"]["count"] == 2),
        "{rows}"
    );
    let (ok, text) = cli(&world, &["dump", "bkp_svc_names"]);
    assert!(ok && text.contains("\"service\":\"test/web\""), "{text}");
    let (ok, text) = cli(&world, &["dump", "bkp_counters"]);
    assert!(ok && text.contains("\"sock_forward\""), "{text}");
    let (ok, text) = cli(&world, &["dump", "bkp_nope"]);
    assert!(!ok && text.contains("the maps are: bkp_svc_v4"), "{text}");
}

/// The kernel memory each map takes, as bpftool reports it (`bytes_memlock`).
fn bpftool_memlock(world: &World, map: &str) -> u64 {
    let shown = integration_tests::bpftool_json(&["map", "show", "pinned"], &world.pin_dir().join(map));
    shown["bytes_memlock"].as_u64().expect("bytes_memlock")
}

/// `list --maps` and `/metrics` show every pinned map's entries, capacity and kernel memory,
/// the memory equal to what bpftool reports for the same pin.
#[test]
fn list_maps_and_metrics_show_each_maps_kernel_memory_as_bpftool_does() {
    let mut world = started(&["be1", "be2"], "", &[]);
    let (ok, text) = cli(&world, &["list", "--maps", "-o", "json"]);
    assert!(ok, "{text}");
    let maps: Vec<serde_json::Value> = serde_json::from_str(&text).expect("JSON");
    let names: Vec<&str> = maps.iter().map(|m| m["map"].as_str().unwrap()).collect();
    assert_eq!(names, proxy_common::maps::ALL, "every map, in order");
    let memory: Vec<(&str, u64)> = maps
        .iter()
        .map(|m| {
            let name = m["map"].as_str().unwrap();
            (
                name,
                m["memory"].as_u64().unwrap_or_else(|| panic!("{name}: {m}")),
            )
        })
        .collect();
    for (name, bytes) in &memory {
        assert_eq!(*bytes, bpftool_memlock(&world, name), "{name}");
    }
    // A scrape copies the map walker's last count, made within a second after a sync wrote
    // the maps (a map allocated as it fills, such as bkp_svc_names, grows with its entries).
    world.wait_until("/metrics to show the same memory", Duration::from_secs(10), |w| {
        let (_, metrics) = w.http_get("/metrics", "/metrics");
        memory
            .iter()
            .all(|(name, bytes)| {
                let series = format!("bpf_kube_proxy_map_memory_bytes{{map=\"{name}\"}}");
                sample(&metrics, &series) == Some(*bytes as f64)
            })
            .then_some(())
    });
    // Two ports, the ClusterIP guard and three slots each: 2 + 2 + 1 entries in the service
    // map at least, and the two backends per protocol.
    let services = maps.iter().find(|m| m["map"] == "bkp_svc_v4").unwrap();
    assert!(services["entries"].as_u64().unwrap() >= 5, "{services}");
    let (ok, table) = cli(&world, &["list", "--maps"]);
    assert!(
        ok && table.starts_with("MAP") && table.contains("bkp_ct_v4"),
        "{table}"
    );
    assert!(
        table.contains(" maps, ") && table.contains("MiB of kernel memory"),
        "{table}"
    );
}

/// Each pinned map's (capacity, memory) from `list --maps`.
fn list_maps(world: &World) -> std::collections::BTreeMap<String, (u64, u64)> {
    let (ok, text) = cli(world, &["list", "--maps", "-o", "json"]);
    assert!(ok, "{text}");
    let maps: Vec<serde_json::Value> = serde_json::from_str(&text).expect("JSON");
    maps.iter()
        .map(|m| {
            (
                m["map"].as_str().unwrap().to_string(),
                (m["capacity"].as_u64().unwrap(), m["memory"].as_u64().unwrap_or(0)),
            )
        })
        .collect()
}

/// At default settings on a 24 GiB node the LRU maps take the ratio's share of its memory, the
/// maps the agent writes only what they hold, and all of them together under 32 MiB (issue
/// 16's target for up to 1 000 Services); a ratio and `--map-size-*` flags change the sizes.
#[test]
fn default_map_sizes_follow_the_node_memory_ratio_and_take_under_32_mib_and_flags_override_them() {
    use bpf_kube_proxy::datapath::sizing::lru_elems;
    use proxy_common::{maps as names, sizing};

    const GIB: u64 = 1 << 30;
    let mut world = started(&["be1", "be2"], "", &["--map-dynamic-size-memory", "24Gi"]);
    let maps = list_maps(&world);
    let expected = sizing::lru_sizes(24 * GIB, sizing::DEFAULT_RATIO, &lru_elems());
    let capacity = |map: &str| maps[map].0;
    assert_eq!(capacity(names::CONNTRACK_V4), u64::from(expected.conntrack));
    assert_eq!(capacity(names::CONNTRACK_V6), u64::from(expected.conntrack));
    assert_eq!(capacity(names::SOCK_REV_V4), u64::from(expected.sock_rev));
    assert_eq!(capacity(names::AFFINITY), u64::from(expected.affinity));
    assert_eq!(
        capacity(names::SERVICES_V4),
        u64::from(sizing::WRITTEN_MIN.services)
    );
    assert_eq!(
        capacity(names::BACKENDS_V4),
        u64::from(sizing::WRITTEN_MIN.backends)
    );
    let total: u64 = maps.values().map(|(_, memory)| memory).sum();
    assert!(total <= 32 << 20, "{} KiB: {maps:?}", total >> 10);
    assert!(
        world.agent_log().contains("map sizes (entries per family)"),
        "the chosen sizes are logged"
    );

    // Twice the ratio, and a fixed affinity map: applied at the next start.
    world.stop_agent(Signal::SIGTERM);
    world.agent_args(&[
        "--map-dynamic-size-memory",
        "24Gi",
        "--map-dynamic-size-ratio",
        "0.002",
        "--map-size-affinity",
        "1000",
    ]);
    world.start_agent();
    let maps = list_maps(&world);
    let doubled = sizing::lru_sizes(24 * GIB, 0.002, &lru_elems());
    assert_eq!(maps[names::CONNTRACK_V4].0, u64::from(doubled.conntrack));
    assert_eq!(maps[names::AFFINITY].0, 1000);
    assert!(
        world
            .probe(&addr(VIP, 80), ProbeMode::Tcp, 3)
            .iter()
            .all(|a| a.ok),
        "served across the resize"
    );
}

/// A Service of 20 000 endpoints (addresses nobody answers on: only the maps matter here), as
/// slices of 1 000: 20 001 service entries and 20 000 backends, more than the 16 384 of each
/// map the agent writes starts with.
fn big_service() -> String {
    let mut docs_big = vec![service("big", &["10.96.0.20"], &[("http", 80, "TCP")], "")];
    for s in 0..20 {
        let eps: Vec<Ep> = (0..1000)
            .map(|e| Ep::ready(&format!("10.{}.{}.{}", 100 + s, e / 250, 1 + e % 250)))
            .collect();
        docs_big.push(slice(&format!("big-{s}"), "big", false, &PORTS[..1], &eps));
    }
    docs(&docs_big)
}

/// Waits for [`big_service`] to be programmed whole, and checks the maps grew to hold it.
fn wait_for_big_service_in_grown_maps(world: &mut World) {
    use proxy_common::maps as names;

    world.wait_until("big to be programmed", Duration::from_secs(60), |w| {
        (w.backends_of("10.96.0.20", 80, Protocol::Tcp)?.len() == 20_000).then_some(())
    });
    let after = list_maps(world);
    assert!(after[names::SERVICES_V4].0 >= 20_001 + 20_001 / 4, "{after:?}");
    assert!(after[names::BACKENDS_V4].0 >= 20_000 + 20_000 / 4, "{after:?}");
    assert!(world.agent_log().contains("maps grew"), "{}", world.agent_log());
}

/// A cold start on a cluster larger than the maps' starting size: the agent sizes the maps
/// from the first lists before it writes anything, so no Service is refused on the way (it
/// was: a warning and a map-full count per Service, then a copy into bigger maps and a second
/// sync).
#[test]
fn a_cold_start_on_a_large_cluster_sizes_the_maps_first_and_refuses_no_service() {
    let pods = ["be1", "be2"];
    let mut world = World::new(&pods);
    world.write("web.yaml", &web(&world, "", &pods, ""));
    world.write("big.yaml", &big_service());
    world.start_agent();
    world.wait_for_backends(VIP, 80, Protocol::Tcp, pods.len());
    wait_for_big_service_in_grown_maps(&mut world);
    let log = world.agent_log();
    assert!(log.contains("sized for the listed Services"), "{log}");
    assert!(!log.contains("could not be programmed"), "{log}");
    let (_, metrics) = world.http_get("/metrics", "/metrics");
    assert_eq!(
        sample(&metrics, "bpf_kube_proxy_map_full_total"),
        Some(0.0),
        "{metrics}"
    );
}

/// A Service whose slots and backends outgrow the maps the agent writes: the maps grow (new
/// ones, entries copied, programs switched) and every Service is programmed, while the
/// Services already there keep being served; the near-full gauge and the growth counter show.
#[test]
fn maps_the_agent_writes_grow_when_a_cluster_outgrows_them_and_service_keeps_flowing() {
    use proxy_common::{maps as names, sizing};

    let mut world = started(&["be1", "be2"], "", &[]);
    let before = list_maps(&world);
    assert_eq!(
        before[names::SERVICES_V4].0,
        u64::from(sizing::WRITTEN_MIN.services)
    );
    let prober = world.spawn_probe(&addr(VIP, 80), ProbeMode::Tcp, 1000, 10);
    world.write("big.yaml", &big_service());
    wait_for_big_service_in_grown_maps(&mut world);
    assert!(
        world.agent_log().contains("Services refused for room"),
        "{}",
        world.agent_log()
    );
    let attempts = prober.results();
    assert!(
        attempts.iter().all(|a| a.ok),
        "web served throughout: {:?}",
        attempts.iter().filter(|a| !a.ok).collect::<Vec<_>>()
    );
    assert_eq!(
        spread(&world.probe(&addr(VIP, 80), ProbeMode::Tcp, 20)).len(),
        2,
        "web's backends, through the new maps"
    );
    world.wait_until("/metrics to count the growth", Duration::from_secs(10), |w| {
        let (_, metrics) = w.http_get("/metrics", "/metrics");
        let grown = sample(&metrics, "bpf_kube_proxy_maps_grown_total")?;
        let near = sample(
            &metrics,
            &format!("bpf_kube_proxy_map_near_full{{map=\"{}\"}}", names::SERVICES_V4),
        )?;
        (grown >= 1.0 && near == 0.0).then_some(())
    });
}
