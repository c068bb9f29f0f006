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
            udp: false,
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
    let mut port = serde_json::json!({"name": "http", "port": s.port, "protocol": protocol(s)});
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

/// The protocol as Kubernetes names it.
fn protocol(s: &Svc) -> &'static str {
    if s.udp { "UDP" } else { "TCP" }
}

/// The node address the in-process datapath serves NodePorts on, as the agent would on a
/// node with one address.
pub const NODE_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);

/// The real agent on manifests for `svcs`, in `netns` (the node's) when given; killed and
/// its pins removed on drop.
/// Where the agent reads the Services from.
pub enum Source<'a> {
    /// A manifest file (`--manifests`).
    Manifests,
    /// A stand-in kube-apiserver on this runtime (`--kubeconfig`): lists paged as the real one
    /// pages them, JSON as it serves them.
    ApiServer(&'a tokio::runtime::Handle),
}

pub struct RunningAgent {
    pub child: std::process::Child,
    pub pin_dir: PathBuf,
    /// How long the last start took to program every Service ("datapath ready").
    pub ready_after: Duration,
    services: usize,
    command: Command,
    _cgroup: cgroup::ChildCgroup,
    _api: Option<integration_tests::apiserver::ApiServer>,
    dir: tempfile::TempDir,
}

impl RunningAgent {
    pub fn start(
        svcs: &[Svc],
        netns: Option<&Netns>,
        source: &Source<'_>,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("bkp-bench-manifests-")
            .tempdir()?;
        let mut objects = Vec::new();
        for s in svcs {
            let mut service = serde_json::to_value(k8s_service(s))?;
            service["kind"] = "Service".into();
            service["apiVersion"] = "v1".into();
            let mut slice = serde_json::to_value(k8s_slice(s))?;
            slice["kind"] = "EndpointSlice".into();
            slice["apiVersion"] = "discovery.k8s.io/v1".into();
            objects.extend([service, slice]);
        }
        let (source_args, api) = match source {
            Source::Manifests => {
                let mut yaml = String::new();
                for object in &objects {
                    yaml.push_str(&serde_json::to_string(object)?);
                    yaml.push_str("\n---\n");
                }
                let path = dir.path().join("services.yaml");
                std::fs::write(&path, yaml)?;
                (vec!["--manifests".into(), path.into_os_string()], None)
            }
            Source::ApiServer(handle) => {
                let api = integration_tests::apiserver::ApiServer::start(handle);
                for object in objects {
                    api.apply(object);
                }
                let path = dir.path().join("kubeconfig");
                api.write_kubeconfig(&path);
                (vec!["--kubeconfig".into(), path.into_os_string()], Some(api))
            }
        };
        let id = unique_suffix();
        let cg = cgroup::ChildCgroup::create(
            &bpf_kube_proxy::datapath::host::cgroup2_root()?,
            &format!("bkp-bench-{id}"),
        )?;
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/bkp-bench-agent-{id}"));
        let bin = workspace_binary("bpf-kube-proxy", "BKP_BIN")?;
        let mut command = match netns {
            Some(ns) => ns.command(bin),
            None => Command::new(bin),
        };
        command
            .arg("run")
            .args(source_args)
            .arg("--cgroup")
            .arg(cg.path())
            .arg("--pin-dir")
            .arg(&pin_dir)
            .args(["--hostname-override", "bench-node"])
            .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
            .args(args)
            .stdout(Stdio::null());
        let (child, ready_after) = Self::spawn_until_ready(&mut command, dir.path(), svcs.len())?;
        Ok(Self {
            child,
            pin_dir,
            ready_after,
            services: svcs.len(),
            command,
            _cgroup: cg,
            _api: api,
            dir,
        })
    }

    /// Stops the agent as a DaemonSet rollout does (SIGTERM), which leaves its pinned maps and
    /// links, and starts it again over them.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        self.child.wait()?;
        let (child, ready_after) =
            Self::spawn_until_ready(&mut self.command, self.dir.path(), self.services)?;
        self.child = child;
        self.ready_after = ready_after;
        Ok(())
    }

    /// The agent's resident memory now, in MiB.
    pub fn rss_mib(&self) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("VmRSS")?;
        Ok(kib / 1024.0)
    }

    fn spawn_until_ready(
        command: &mut Command,
        dir: &Path,
        services: usize,
    ) -> anyhow::Result<(std::process::Child, Duration)> {
        let log = dir.join("agent.log");
        let started = Instant::now();
        let mut child = command
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting the agent")?;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(ready) = text.lines().find(|l| l.contains("datapath ready")) {
                let ready_after = started.elapsed();
                // A figure over an agent that programmed less than asked would be a lie.
                let programmed = format!("services={services}");
                if !ready.split_whitespace().any(|w| w == programmed) {
                    let _ = child.kill();
                    let _ = child.wait();
                    anyhow::bail!("the agent did not program all {services} Services:\n{text}");
                }
                return Ok((child, ready_after));
            }
            if started.elapsed() > Duration::from_secs(300) || child.try_wait()?.is_some() {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("the agent never became ready: {text}");
            }
            std::thread::sleep(Duration::from_millis(5));
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
    slice_of(&s.namespace, &s.name, ("http", protocol(s)), &ips)
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

/// Capacities for `n` Services of [`ENDPOINTS`] endpoints: the defaults where they hold them,
/// else what an operator would pass with `--map-size-*`. Each Service has a frontend and a
/// guard entry (its ClusterIP on any port); a NodePort adds a frontend per node address (a few
/// here); each frontend has a rev-NAT id and an entry per backend slot. A quarter more leaves
/// room for a sync's additions, which are written before its deletions.
pub fn map_sizes(n: usize) -> MapSizes {
    const NODE_ADDRESSES: usize = 4;
    let defaults = MapSizes::default();
    let node_ports = n.min(crate::rulesets::MAX_NODE_PORTS) * NODE_ADDRESSES;
    let room = |entries: usize| ((entries + entries / 4) as u32).next_power_of_two();
    MapSizes {
        services: defaults
            .services
            .max(room((n + node_ports) * (ENDPOINTS + 1) + n)),
        backends: defaults.backends.max(room(n * ENDPOINTS + ENDPOINTS)),
        rev_nat: defaults.rev_nat.max(room(2 * n + node_ports)),
        ..defaults
    }
}

/// A loaded (not attached) datapath in its own pin directory, removed on drop.
pub struct Ours {
    pub datapath: Datapath,
    pub proxier: Proxier<Writer>,
    pin_dir: PathBuf,
}

impl Ours {
    /// A datapath with maps large enough for `n` Services.
    pub fn load(n: usize) -> anyhow::Result<Self> {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/bkp-bench-{}", unique_suffix()));
        let datapath = Datapath::load(&pin_dir, map_sizes(n))?;
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
    timed_within(netns, program, args, input, None)?
        .with_context(|| format!("{program} {args:?} did not finish"))
}

/// As [`timed_in`], but a run still going after `limit` is killed and reported as `None`: at the
/// largest N kube-proxy's rulesets take longer than a bench can wait.
pub fn timed_within(
    netns: &Netns,
    program: &str,
    args: &[&str],
    input: &str,
    limit: Option<Duration>,
) -> anyhow::Result<Option<Duration>> {
    let started = Instant::now();
    let mut child = netns
        .command(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let status = std::thread::scope(|scope| -> anyhow::Result<Option<std::process::ExitStatus>> {
        // Fed and drained on their own threads: a tool that stops reading its input (or fills
        // its error pipe) must not hold up the deadline.
        let feeder = scope.spawn(move || stdin.write_all(input.as_bytes()));
        let drainer = scope.spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            text
        });
        loop {
            // Without a limit, a blocking wait: polling would add its interval to the figure.
            let exited = match limit {
                None => Some(child.wait()?),
                Some(_) => child.try_wait()?,
            };
            if let Some(status) = exited {
                let _ = feeder.join();
                let errors = drainer.join().unwrap_or_default();
                anyhow::ensure!(
                    status.success(),
                    "{program} {args:?} failed: {}",
                    errors.lines().take(3).collect::<Vec<_>>().join(" | ")
                );
                return Ok(Some(status));
            }
            if limit.is_some_and(|limit| started.elapsed() > limit) {
                child.kill()?;
                child.wait()?;
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    })?;
    Ok(status.map(|_| started.elapsed()))
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
