//! Entry points for the fuzz targets in `fuzz/` (`cargo xtask fuzz`), behind the `fuzzing`
//! feature so that the product build never carries them. Each feeds arbitrary input to one
//! stage and panics, which libFuzzer reports as a crash, when the stage panics itself or
//! breaks a promise it makes about its output.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    sync::Arc,
    time::Duration,
};

use arbitrary::Arbitrary;
use clap::Parser as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::{Value, json};

use crate::{
    config,
    health::proxy::Health,
    pipeline::{
        inventory::Inventory,
        model::{LbAlgorithm, ServiceEntry, ServiceName},
        plan::{
            Planner,
            audit::{WatchedMaps, audit, reaches},
        },
        translate::{self, ServiceOutcome, TranslateOptions},
    },
    source::{Change, Identity, Listed, Object, ObjectKind, manifests},
    sync::proxier::Proxier,
    telemetry::metrics::Metrics,
};

/// Manifest bytes through the parser: no panic; the identities it reports defined are those
/// of the objects it handed on; each problem names a line of the input.
pub fn manifests(data: &[u8]) {
    let mut applied = BTreeSet::new();
    let mut errors = Vec::new();
    let defined = manifests::parse_file(
        Path::new("fuzz.yaml"),
        &mut &data[..],
        &BTreeSet::new(),
        &mut |change| match change {
            Change::Apply(object) => {
                applied.insert(object.identity());
            }
            other => panic!("a parse handed on {other:?}"),
        },
        &mut errors,
    );
    assert_eq!(defined, applied, "defined identities differ from those applied");
    let lines = data.split(|b| *b == b'\n').count() as u64;
    for error in &errors {
        let (manifests::ManifestError::Syntax { line, .. } | manifests::ManifestError::Document { line, .. }) =
            error
        else {
            panic!("reading a slice failed: {error}");
        };
        let line = *line;
        assert!((1..=lines).contains(&line), "line {line} of {lines}: {error}");
        let _ = error.to_string();
    }
}

/// JSON through translation as a Service, an EndpointSlice and a Node: no panic, and what
/// comes out valid is: ports non-zero, one cluster IP per family, endpoints of the slice's
/// family. A proxied Service and slice then go through the inventory and the planner.
pub fn translate(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let mut issues = Vec::new();
    // Maglev by default, so its table planning is fuzzed too (an annotation can still pick
    // random).
    let opts = TranslateOptions {
        service_proxy_name: Some("fuzz".into()),
        lb_algorithm: LbAlgorithm::Maglev,
    };
    let node_ip: IpAddr = "192.168.1.10".parse().unwrap();
    let node = serde_json::from_value(value.clone()).ok();
    let mut inventory = Inventory::new(translate::translate_node("n1", node.as_ref(), vec![node_ip]));
    let mut name = None;
    if let Ok(svc) = serde_json::from_value::<Service>(value.clone()) {
        match translate::translate_service(&svc, &opts, &mut issues) {
            Ok(ServiceOutcome::Proxied(info)) => {
                assert!(!info.cluster_ips.is_empty(), "proxied without a cluster IP");
                let v4 = info.cluster_ips.iter().filter(|a| a.is_ipv4()).count();
                assert!(
                    v4 <= 1 && info.cluster_ips.len() - v4 <= 1,
                    "{:?}",
                    info.cluster_ips
                );
                assert!(!info.ports.is_empty(), "proxied without a port");
                assert!(
                    info.ports.iter().all(|p| p.port != 0 && p.node_port != Some(0)),
                    "{:?}",
                    info.ports
                );
                name = Some(info.name.clone());
                inventory.upsert_service(info);
            }
            Ok(ServiceOutcome::Skipped(..)) => {}
            Err(e) => drop(e.to_string()),
        }
    }
    if let Ok(slice) = serde_json::from_value::<EndpointSlice>(value) {
        match translate::translate_slice(&slice, &mut issues) {
            Ok(info) => {
                let v4 = slice.address_type == "IPv4";
                assert!(info.endpoints.iter().all(|e| e.addr.is_ipv4() == v4), "{info:?}");
                assert!(info.ports.iter().all(|p| p.port != 0), "{:?}", info.ports);
                name.get_or_insert_with(|| info.service.clone());
                inventory.upsert_slice(info);
            }
            Err(e) => drop(e.to_string()),
        }
    }
    for issue in &issues {
        let _ = issue.to_string();
    }
    if let Some(name) = name {
        let _ = inventory.health_checks();
        let desired = inventory.desired(&name);
        let _ = Planner::new().plan_service(&name, desired.as_ref());
    }
}

#[derive(clap::Parser)]
struct Flags {
    #[command(flatten)]
    run: config::RunFlags,
}

/// Config file bytes through the KubeProxyConfiguration parser, then resolved under flags:
/// no panic.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::parse(text) {
        Ok(file) => {
            let flags = Flags::parse_from(["fuzz", "--hostname-override", "n1", "--cgroup", "/fuzz"]);
            if let Err(e) = config::resolve(flags.run, file) {
                let _ = e.to_string();
            }
        }
        Err(e) => drop(e.to_string()),
    }
}

/// How many Services and EndpointSlices a planner scenario names: few, so that they collide.
const OBJECTS: u8 = 4;

/// One step of a planner scenario: a change to a Service or an EndpointSlice, a sync, failed
/// writes, a repair pass or a restart.
#[derive(Arbitrary, Debug)]
pub enum Step {
    Service(u8, ServiceSpec),
    DeleteService(u8),
    Slice(u8, SliceSpec),
    DeleteSlice(u8),
    Sync,
    /// The next this many map writes fail.
    Fail(u8),
    Repair,
    /// A new proxier adopts what the maps hold, gets every object again and syncs.
    Restart,
}

#[derive(Arbitrary, Debug)]
pub struct ServiceSpec {
    /// Indexes into small address pools, so Services share and fight over frontends.
    cluster_ip: u8,
    dual_stack: bool,
    ports: Vec<PortSpec>,
    external_ip: Option<u8>,
    load_balancer_ip: Option<u8>,
    source_ranges: u8,
    affinity: Option<u16>,
    internal_local: bool,
    external_local: bool,
}

#[derive(Arbitrary, Debug)]
pub struct PortSpec {
    name: u8,
    port: u8,
    udp: bool,
    node_port: Option<u8>,
}

#[derive(Arbitrary, Debug)]
pub struct SliceSpec {
    service: u8,
    ipv6: bool,
    ports: Vec<PortSpec>,
    endpoints: Vec<EndpointSpec>,
}

#[derive(Arbitrary, Debug)]
pub struct EndpointSpec {
    addr: u8,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    zone_hint: Option<bool>,
}

fn pick<'a>(pool: &[&'a str], i: u8) -> &'a str {
    pool[usize::from(i) % pool.len()]
}

fn port_name(i: u8) -> String {
    ["", "http", "dns"][usize::from(i) % 3].to_string()
}

fn ports(specs: &[PortSpec], service: bool) -> Vec<Value> {
    specs
        .iter()
        .take(4)
        .map(|p| {
            // 0 is out of range: translation drops that port alone.
            let number = [80, 53, 8080, 0][usize::from(p.port) % 4];
            let mut port = json!({
                "name": port_name(p.name),
                "port": number,
                "protocol": if p.udp { "UDP" } else { "TCP" },
            });
            if service && let Some(n) = p.node_port {
                port["nodePort"] = json!(30_000 + u32::from(n % 4));
            }
            port
        })
        .collect()
}

fn service_object(i: u8, spec: &ServiceSpec) -> Service {
    let v4 = pick(&["10.96.0.1", "10.96.0.2", "10.96.0.3", "None"], spec.cluster_ip);
    let mut ips = vec![v4];
    if spec.dual_stack && v4 != "None" {
        ips.push(pick(&["fd00::1", "fd00::2"], spec.cluster_ip));
    }
    let ranges: Vec<&str> = ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7/32"]
        .into_iter()
        .enumerate()
        .filter(|(bit, _)| spec.source_ranges & (1 << bit) != 0)
        .map(|(_, r)| r)
        .collect();
    let policy = |local| if local { "Local" } else { "Cluster" };
    let mut obj = json!({
        "metadata": {"name": format!("s{}", i % OBJECTS), "namespace": "ns"},
        "spec": {
            "clusterIP": v4,
            "clusterIPs": ips,
            "type": if spec.load_balancer_ip.is_some() { "LoadBalancer" } else { "ClusterIP" },
            "ports": ports(&spec.ports, true),
            "externalIPs": spec.external_ip.map(|e| vec![pick(&["203.0.113.1", "10.96.0.1"], e)]),
            "loadBalancerSourceRanges": ranges,
            "internalTrafficPolicy": policy(spec.internal_local),
            "externalTrafficPolicy": policy(spec.external_local),
            "healthCheckNodePort": if spec.external_local { Some(32_000) } else { None },
        },
    });
    if let Some(timeout) = spec.affinity {
        obj["spec"]["sessionAffinity"] = json!("ClientIP");
        obj["spec"]["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": timeout}});
    }
    if let Some(lb) = spec.load_balancer_ip {
        obj["status"] =
            json!({"loadBalancer": {"ingress": [{"ip": pick(&["198.51.100.1", "fd00::99"], lb)}]}});
    }
    serde_json::from_value(obj).expect("the scenario's Service is well-typed")
}

fn slice_object(i: u8, spec: &SliceSpec) -> EndpointSlice {
    let pool: &[&str] = if spec.ipv6 {
        &["fd00::a", "fd00::b", "fd00::c"]
    } else {
        &["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
    };
    let endpoints: Vec<Value> = spec
        .endpoints
        .iter()
        .take(6)
        .map(|e| {
            let addr = usize::from(e.addr) % pool.len();
            // A pod runs on one node: every slice agrees where an address is.
            let mut ep = json!({
                "addresses": [pool[addr]],
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
                "nodeName": if addr.is_multiple_of(2) { "n1" } else { "n2" },
            });
            if let Some(same) = e.zone_hint {
                ep["hints"] = json!({"forZones": [{"name": if same { "z1" } else { "z2" }}]});
            }
            ep
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("e{}", i % OBJECTS),
            "namespace": "ns",
            "labels": {"kubernetes.io/service-name": format!("s{}", spec.service % OBJECTS)},
        },
        "addressType": if spec.ipv6 { "IPv6" } else { "IPv4" },
        "ports": ports(&spec.ports, false),
        "endpoints": endpoints,
    }))
    .expect("the scenario's EndpointSlice is well-typed")
}

/// The objects of a scenario and a proxier that writes them to in-memory maps.
struct World {
    proxier: Proxier<WatchedMaps>,
    services: BTreeMap<u8, Service>,
    slices: BTreeMap<u8, EndpointSlice>,
}

fn proxier(planner: Planner, sink: WatchedMaps) -> Proxier<WatchedMaps> {
    let node_ips = vec!["192.168.1.10".parse().unwrap(), "fd00:1::10".parse().unwrap()];
    Proxier::new(
        "n1",
        node_ips,
        TranslateOptions::default(),
        planner,
        sink,
        Metrics::new(),
        Arc::new(Health::new(Duration::from_secs(60))),
    )
}

impl World {
    fn step(&mut self, step: &Step) {
        let identity =
            |kind, i: u8, prefix| Identity::new(kind, Some("ns"), Some(&format!("{prefix}{}", i % OBJECTS)));
        match step {
            Step::Service(i, spec) => {
                let svc = service_object(*i, spec);
                self.services.insert(i % OBJECTS, svc.clone());
                self.proxier.apply(Change::Apply(Object::Service(Box::new(svc))));
            }
            Step::DeleteService(i) => {
                self.services.remove(&(i % OBJECTS));
                self.proxier
                    .apply(Change::Delete(identity(ObjectKind::Service, *i, "s")));
            }
            Step::Slice(i, spec) => {
                let slice = slice_object(*i, spec);
                self.slices.insert(i % OBJECTS, slice.clone());
                self.proxier.apply(Change::Apply(Object::Slice(Box::new(slice))));
            }
            Step::DeleteSlice(i) => {
                self.slices.remove(&(i % OBJECTS));
                self.proxier
                    .apply(Change::Delete(identity(ObjectKind::EndpointSlice, *i, "e")));
            }
            Step::Sync => drop(self.proxier.sync()),
            Step::Fail(n) => self.proxier.sink_mut().maps.failing = usize::from(n % 4),
            Step::Repair => {
                let failing = self.proxier.sink_mut().maps.failing;
                let report = self.proxier.repair();
                self.proxier.sink_mut().whole = failing == 0 && report.clean();
            }
            Step::Restart => {
                let whole = self.proxier.sink_mut().whole && self.proxier.sink_mut().maps.failing == 0;
                let mut sink = std::mem::take(self.proxier.sink_mut());
                let programmed = crate::pipeline::plan::PlanSink::read_back(&mut sink).unwrap();
                self.proxier = proxier(Planner::adopt(programmed), sink);
                self.proxier.apply(Change::Replace(Listed::Services(
                    self.services.values().cloned().collect(),
                )));
                self.proxier.apply(Change::Replace(Listed::Slices(
                    self.slices.values().cloned().collect(),
                )));
                self.proxier.sync();
                self.proxier.release_unclaimed();
                // State the adopting planner never saw waits for the repair pass, as in the agent.
                self.proxier.sink_mut().whole &= whole;
            }
        }
    }

    /// Panics with every broken invariant.
    fn check(&mut self, steps: &[Step]) {
        let sink = self.proxier.sink_mut();
        if let Some(torn) = sink.torn.take() {
            panic!("a reader saw a half-written Service: {torn}\nsteps: {steps:#?}");
        }
        if !sink.whole {
            return;
        }
        let strict = !sink.failed_ever;
        let mut maps = std::mem::take(&mut sink.maps);
        let planner = self.proxier.planner();
        let mut problems = audit(planner, &mut maps, strict);
        // Changes not yet synced are not in the maps yet.
        let synced = !self.proxier.has_pending();
        let desired: BTreeMap<ServiceName, ServiceEntry> = (0..OBJECTS)
            .filter_map(|i| {
                let name = ServiceName::new("ns", format!("s{i}"));
                Some((name.clone(), self.proxier.inventory().desired(&name)?))
            })
            .collect();
        if synced {
            problems.extend(reaches(planner, &desired));
        }
        self.proxier.sink_mut().maps = maps;
        assert!(problems.is_empty(), "{}\nsteps: {steps:#?}", problems.join("\n"));
    }
}

/// A scenario through the proxier, written to in-memory maps one operation at a time: no
/// reader ever sees a half-written Service, and after every step that leaves the maps whole
/// the planner's counts equal a recount, nothing stray is left, a repair pass finds nothing
/// and the maps hold what the Services want.
pub fn planner(steps: &[Step]) {
    let mut world = World {
        proxier: proxier(Planner::new(), WatchedMaps::default()),
        services: BTreeMap::new(),
        slices: BTreeMap::new(),
    };
    for step in steps.iter().take(64) {
        world.step(step);
        world.check(steps);
    }
    world.step(&Step::Sync);
    world.check(steps);
}
