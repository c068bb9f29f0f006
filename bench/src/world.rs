//! What every figure needs: the same N Services as Kubernetes objects and as kube-proxy input,
//! throw-away network namespaces, and a loaded datapath in a pin directory of its own.

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bkp_sandbox::{cgroup, netns::Netns, unique_suffix, workspace_binary};
use bpf_kube_proxy::{
    datapath::{
        loader::{self, Datapath, MapSizes},
        maps::PinnedMaps,
        writer::Writer,
    },
    health::proxy::Health,
    pipeline::plan::Planner,
    pipeline::translate::TranslateOptions,
    sync::proxier::Proxier,
    telemetry::metrics::Metrics,
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::rulesets::Svc;

pub const ENDPOINTS: usize = 10;
pub const BACKEND_PORT: u16 = 8080;

/// Service `i`: VIP 10.96.0.0/12 + i, endpoints from `endpoint(i, e)`.
pub fn services(n: usize, endpoint: impl Fn(usize, usize) -> Ipv4Addr) -> Vec<Svc> {
    (0..n)
        .map(|i| Svc {
            namespace: "bench".into(),
            name: format!("svc-{i}"),
            vip: Ipv4Addr::from(0x0a60_0000 + 1 + i as u32),
            port: 80,
            node_port: (i < crate::rulesets::MAX_NODE_PORTS).then(|| 30000 + i as u16),
            endpoints: (0..ENDPOINTS).map(|e| (endpoint(i, e), BACKEND_PORT)).collect(),
        })
        .collect()
}

/// Unique endpoint addresses (10.128.0.0/9): the realistic case for maps and rulesets.
pub fn unique_endpoint(i: usize, e: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a80_0000 + (i * ENDPOINTS + e) as u32 + 1)
}

/// The Service as Kubernetes writes it: type NodePort when the kube-proxy rulesets give it
/// one, so every implementation programs the same frontends.
pub fn k8s_service(s: &Svc) -> Service {
    let mut port = serde_json::json!({"name": "http", "port": s.port, "protocol": "TCP"});
    if let Some(node_port) = s.node_port {
        port["nodePort"] = node_port.into();
    }
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": s.name, "namespace": s.namespace},
        "spec": {
            "type": if s.node_port.is_some() { "NodePort" } else { "ClusterIP" },
            "clusterIP": s.vip.to_string(),
            "clusterIPs": [s.vip.to_string()],
            "ports": [port],
        }
    }))
    .expect("a valid Service")
}

/// The node address the in-process datapath serves NodePorts on, as the agent would on a
/// node with one address.
pub const NODE_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);

/// The real agent on manifests for `svcs`, in `netns` (the node's) when given; killed and
/// its pins removed on drop.
pub struct RunningAgent {
    pub child: std::process::Child,
    pub pin_dir: PathBuf,
    _cgroup: cgroup::ChildCgroup,
    dir: tempfile::TempDir,
}

impl RunningAgent {
    pub fn start(svcs: &[Svc], netns: Option<&Netns>, args: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("bkp-bench-manifests-")
            .tempdir()?;
        let mut yaml = String::new();
        for s in svcs {
            yaml.push_str(&serde_json::to_string(&k8s_service(s))?);
            yaml.push_str("\n---\n");
            yaml.push_str(&serde_json::to_string(&k8s_slice(s))?);
            yaml.push_str("\n---\n");
        }
        std::fs::write(dir.path().join("services.yaml"), yaml)?;
        let id = unique_suffix();
        let cg = cgroup::ChildCgroup::create(
            &bpf_kube_proxy::datapath::host::cgroup2_root()?,
            &format!("bkp-bench-{id}"),
        )?;
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/bkp-bench-agent-{id}"));
        let log = dir.path().join("agent.log");
        let bin = workspace_binary("bpf-kube-proxy", "BKP_BIN")?;
        let mut cmd = match netns {
            Some(ns) => ns.command(bin),
            None => Command::new(bin),
        };
        let child = cmd
            .args(["run", "--manifests"])
            .arg(dir.path().join("services.yaml"))
            .arg("--cgroup")
            .arg(cg.path())
            .arg("--pin-dir")
            .arg(&pin_dir)
            .args(["--hostname-override", "bench-node"])
            .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting the agent")?;
        let mut agent = Self {
            child,
            pin_dir,
            _cgroup: cg,
            dir,
        };
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(ready) = text.lines().find(|l| l.contains("datapath ready")) {
                // A figure over an agent that programmed less than asked would be a lie.
                let programmed = format!("services={}", svcs.len());
                anyhow::ensure!(
                    ready.split_whitespace().any(|w| w == programmed),
                    "the agent did not program all {} Services:\n{text}",
                    svcs.len()
                );
                return Ok(agent);
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(120) && agent.child.try_wait()?.is_none(),
                "the agent never became ready: {text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl RunningAgent {
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = loader::cleanup(&self.pin_dir);
    }
}

pub fn k8s_slice(s: &Svc) -> EndpointSlice {
    let ips: Vec<IpAddr> = s.endpoints.iter().map(|(ip, _)| (*ip).into()).collect();
    slice_of(&s.namespace, &s.name, ("http", "TCP"), &ips)
}

/// The one EndpointSlice of Service `namespace/service`: `ips` ready at [`BACKEND_PORT`] on
/// the port `(name, protocol)`.
fn slice_of(namespace: &str, service: &str, (port, protocol): (&str, &str), ips: &[IpAddr]) -> EndpointSlice {
    let family = if ips.first().is_some_and(IpAddr::is_ipv6) {
        "IPv6"
    } else {
        "IPv4"
    };
    let endpoints: Vec<serde_json::Value> = ips
        .iter()
        .map(|ip| serde_json::json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": format!("{service}-1"),
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": family,
        "ports": [{"name": port, "port": BACKEND_PORT, "protocol": protocol}],
        "endpoints": endpoints,
    }))
    .expect("a valid EndpointSlice")
}

/// A ClusterIP Service `bench/<name>` with one port (`port`, `protocol`) at `vip` and its slice
/// over `endpoints` at [`BACKEND_PORT`]: of either family, as the address says.
pub fn cluster_ip_service(
    name: &str,
    vip: IpAddr,
    (port, protocol): (u16, &str),
    endpoints: &[IpAddr],
) -> (Service, EndpointSlice) {
    let port_name = if protocol == "UDP" { "dns" } else { "http" };
    let service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {
            "clusterIP": vip.to_string(),
            "clusterIPs": [vip.to_string()],
            "ipFamilies": [if vip.is_ipv6() { "IPv6" } else { "IPv4" }],
            "ports": [{"name": port_name, "port": port, "protocol": protocol}],
        }
    }))
    .expect("a valid Service");
    (service, slice_of("bench", name, (port_name, protocol), endpoints))
}

/// A UDP Service (`bench/udp`, one port) and its slice over `endpoints` at [`BACKEND_PORT`].
pub fn udp_service(vip: Ipv4Addr, port: u16, endpoints: &[Ipv4Addr]) -> (Service, EndpointSlice) {
    let ips: Vec<IpAddr> = endpoints.iter().map(|ip| (*ip).into()).collect();
    cluster_ip_service("udp", vip.into(), (port, "UDP"), &ips)
}

/// IPv6 ClusterIP `i` of the connect figure's IPv6 Services (fd00:10:96::/112).
pub fn vip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::from(0xfd00_0010_0096_0000_0000_0000_0000_0000_u128 + 1 + i as u128)
}

/// A loaded (not attached) datapath in its own pin directory, removed on drop.
pub struct Ours {
    pub datapath: Datapath,
    pub proxier: Proxier<Writer>,
    pin_dir: PathBuf,
}

impl Ours {
    pub fn load() -> anyhow::Result<Self> {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/bkp-bench-{}", unique_suffix()));
        let datapath = Datapath::load(&pin_dir, MapSizes::default())?;
        let writer = Writer::new(PinnedMaps::open(&pin_dir)?);
        let proxier = Proxier::new(
            "bench-node",
            vec![NODE_ADDRESS.into()],
            TranslateOptions::default(),
            Planner::new(),
            writer,
            Metrics::new(),
            std::sync::Arc::new(Health::new(Duration::from_secs(60))),
        );
        Ok(Self {
            datapath,
            proxier,
            pin_dir,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Everything from Kubernetes objects to map writes, as the agent's first sync does it.
    pub fn full_sync(&mut self, services: &[Service], slices: &[EndpointSlice]) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.proxier.replace_services(services);
        self.proxier.replace_slices(slices);
        let report = self.proxier.sync();
        let elapsed = started.elapsed();
        anyhow::ensure!(
            report.failed.is_empty(),
            "map writes failed: {:?}",
            &report.failed[..1]
        );
        Ok(elapsed)
    }
}

impl Drop for Ours {
    fn drop(&mut self) {
        let _ = loader::cleanup(&self.pin_dir);
    }
}

/// A fresh network namespace for loading rulesets, deleted on drop.
pub fn scratch_netns(what: &str) -> anyhow::Result<Netns> {
    Ok(Netns::create(&format!("bkp-bench-{what}-{}", unique_suffix()))?)
}

/// Runs `program args` inside `netns` with `input` on stdin; returns how long it took.
pub fn timed_in(netns: &Netns, program: &str, args: &[&str], input: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut child = netns
        .command(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    let elapsed = started.elapsed();
    anyhow::ensure!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .take(3)
            .collect::<Vec<_>>()
            .join(" | ")
    );
    Ok(elapsed)
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return f64::NAN;
    }
    values[values.len() / 2]
}

pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank]
}
