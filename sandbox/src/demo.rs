//! `demo`: a newcomer's first command. Builds a sandbox (a node namespace with three backend
//! pods and a client pod, a child cgroup), writes real manifests, runs the real agent on them,
//! sends traffic to the ClusterIP from a process in the cgroup, shows the maps, edits the
//! EndpointSlice live, and removes everything again, also on Ctrl-C or failure.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bkp_sandbox::{
    cgroup::ChildCgroup,
    probe::{Attempt, ProbeMode},
    servers::{Identity, Servers},
    topology::Topology,
    unique_suffix, workspace_binary,
};
use bpf_kube_proxy::{
    datapath::{host, loader, maps::PinnedMaps, reader::Snapshot},
    pipeline::model::{FrontendKey, Protocol},
};
use tokio::process::{Child, Command};

const VIP_V4: &str = "10.96.0.10";
const VIP_V6: &str = "fd00:10:96::10";
const BACKENDS: [&str; 3] = ["be1", "be2", "be3"];
const HTTP_PORT: u16 = 8080;
const DNS_PORT: u16 = 5353;
const NODE_NAME: &str = "demo-node";

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// HTTP requests to send through the ClusterIP.
    #[arg(long, default_value_t = 30)]
    pub requests: u32,
    /// How long the agent may take to load, attach and program the datapath (longer on a slow
    /// or emulated machine, where the verifier alone takes seconds per program).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,
}

/// Removes the pin directory on drop (after the agent is gone), detaching the programs.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = loader::cleanup(&self.0) {
            eprintln!("removing {}: {e}", self.0.display());
        }
    }
}

/// Everything the demo made. Field order is teardown order.
struct World {
    agent: Child,
    _pins: Pins,
    cgroup: ChildCgroup,
    _servers: Servers,
    topology: Topology,
    dir: tempfile::TempDir,
}

fn manifests(addrs: &[(std::net::Ipv4Addr, std::net::Ipv6Addr)]) -> (String, String) {
    let service = format!(
        r#"# The demo Service: dual-stack ClusterIP with a TCP and a UDP port.
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
spec:
  type: ClusterIP
  clusterIP: {VIP_V4}
  clusterIPs: [{VIP_V4}, "{VIP_V6}"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: PreferDualStack
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: {HTTP_PORT}, protocol: TCP}}
  - {{name: dns, port: 53, targetPort: {DNS_PORT}, protocol: UDP}}
"#
    );
    let mut slices = String::new();
    for (family, v4) in [("IPv4", true), ("IPv6", false)] {
        slices.push_str(&format!(
            r"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-{family_lower}
  namespace: demo
  labels: {{kubernetes.io/service-name: web}}
addressType: {family}
ports:
- {{name: http, port: {HTTP_PORT}, protocol: TCP}}
- {{name: dns, port: {DNS_PORT}, protocol: UDP}}
endpoints:
",
            family_lower = family.to_lowercase()
        ));
        for (a4, a6) in addrs {
            let addr = if v4 { a4.to_string() } else { format!("\"{a6}\"") };
            slices.push_str(&format!(
                "- {{addresses: [{addr}], conditions: {{ready: true}}, nodeName: {NODE_NAME}}}\n"
            ));
        }
    }
    (service, slices)
}

/// Polls `check` until it yields, failing early if the agent exits.
async fn wait_for<T>(
    agent: &mut Child,
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> anyhow::Result<(T, Duration)> {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return Ok((value, started.elapsed()));
        }
        if let Some(status) = agent.try_wait()? {
            bail!("the agent exited ({status}) while waiting for {what}");
        }
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn backend_count(pin_dir: &Path, frontend: FrontendKey) -> Option<usize> {
    let maps = PinnedMaps::open(pin_dir).ok()?;
    let snapshot = Snapshot::read(&maps).ok()?;
    snapshot
        .frontends
        .iter()
        .find(|f| f.frontend == frontend)
        .map(|f| f.backends.len())
}

async fn probe(
    world: &World,
    client_ns: &Path,
    target: SocketAddr,
    mode: ProbeMode,
    count: u32,
) -> anyhow::Result<Vec<Attempt>> {
    let out = Command::new(std::env::current_exe()?)
        .args(["probe", &target.to_string(), "--json", "--mode", mode.flag()])
        .args(["--count", &count.to_string()])
        .arg("--cgroup")
        .arg(world.cgroup.path())
        .arg("--netns")
        .arg(client_ns)
        .kill_on_drop(true)
        .output()
        .await
        .context("running the probe")?;
    if !out.status.success() {
        bail!("probe failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).context("parsing probe output"))
        .collect()
}

fn show(attempts: &[Attempt]) -> BTreeMap<String, u32> {
    let mut spread = BTreeMap::new();
    for a in attempts {
        match a.reply.as_deref().map(serde_json::from_str::<Identity>) {
            Some(Ok(id)) => {
                println!(
                    "  {:>3}  {}   app saw peer {}, backend saw client {}",
                    a.n,
                    id.backend,
                    a.peer.as_deref().unwrap_or("?"),
                    id.client
                );
                *spread.entry(id.backend).or_insert(0) += 1;
            }
            _ => println!(
                "  {:>3}  failed: {}",
                a.n,
                a.error.as_deref().unwrap_or("unreadable reply")
            ),
        }
    }
    let line: Vec<String> = spread.iter().map(|(b, n)| format!("{b} {n}")).collect();
    println!("  spread: {}", line.join(", "));
    spread
}

fn require_root() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo loads eBPF programs and creates network namespaces: run it as root");
    }
    Ok(())
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    require_root()?;
    tokio::select! {
        result = run_world(&args) => result,
        _ = tokio::signal::ctrl_c() => {
            println!("\ninterrupted: tearing the sandbox down");
            Ok(())
        }
    }
}

async fn run_world(args: &DemoArgs) -> anyhow::Result<()> {
    // The agent and the tools the user would run, built beside this binary.
    let agent_bin = workspace_binary("bpf-kube-proxy", "BKP_BIN")?;
    let id = unique_suffix();
    let prefix = format!("bkp-{id}");
    println!("bpf-kube-proxy demo ({prefix})\n");
    let (mut world, files) = start(&agent_bin, &id, &prefix)?;
    describe(&world, &files, &prefix);
    let http_v4 = FrontendKey::new(VIP_V4.parse()?, 80, Protocol::Tcp);
    wait_ready(&mut world, &files, http_v4, args.ready_timeout).await?;
    let client_ns = world.topology.pod("client").context("client pod")?.netns.path();
    let spread = balance(&world, &client_ns, args.requests).await?;
    show_maps(&agent_bin, &files.pin_dir).await?;
    let after = remove_be2(&mut world, &files, &client_ns, http_v4).await?;

    let all_three = BACKENDS.iter().all(|b| spread.get(*b).is_some_and(|n| *n > 0));
    let be2_gone = !after.contains_key("be2") && after.values().sum::<u32>() == 12;
    println!(
        "\nresult: {} answered through the VIP; after the edit {}",
        if all_three {
            "all 3 backends"
        } else {
            "NOT all backends"
        },
        if be2_gone {
            "be2 received nothing"
        } else {
            "be2 STILL received traffic"
        }
    );
    println!("teardown: stopping the agent, removing pins, cgroup and namespaces");
    drop(world);
    if !(all_three && be2_gone) {
        bail!("the demo did not behave as expected");
    }
    Ok(())
}

/// What the demo wrote and where, for the steps after the start.
struct Files {
    pin_dir: PathBuf,
    log_path: PathBuf,
    service_file: PathBuf,
    slices_file: PathBuf,
    slices: String,
}

/// Builds the sandbox, writes the manifests and starts the agent on them.
fn start(agent_bin: &Path, id: &str, prefix: &str) -> anyhow::Result<(World, Files)> {
    let mut pods: Vec<&str> = BACKENDS.to_vec();
    pods.push("client");
    let topology = Topology::create(prefix, &pods).context("creating the sandbox namespaces")?;
    let mut servers = Servers::default();
    for name in BACKENDS {
        let pod = topology.pod(name).context("backend pod")?;
        servers.http(&pod.netns, HTTP_PORT, name)?;
        servers.udp(&pod.netns, DNS_PORT, name)?;
    }
    let cgroup_root = host::cgroup2_root()?;
    let cgroup = ChildCgroup::create(&cgroup_root, &format!("bpf-kube-proxy-demo-{id}"))
        .with_context(|| format!("creating a child cgroup under {}", cgroup_root.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("bpf-kube-proxy-demo-")
        .tempdir()?;
    let backend_addrs: Vec<_> = BACKENDS
        .iter()
        .filter_map(|b| topology.pod(b).map(|p| (p.ipv4, p.ipv6)))
        .collect();
    let (service, slices) = manifests(&backend_addrs);
    let service_file = dir.path().join("service.yaml");
    let slices_file = dir.path().join("endpointslices.yaml");
    std::fs::write(&service_file, service)?;
    std::fs::write(&slices_file, &slices)?;

    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/bpf-kube-proxy-demo-{id}"));
    let log_path = dir.path().join("agent.log");
    let log = std::fs::File::create(&log_path)?;
    let agent = Command::new(agent_bin)
        .arg("run")
        .arg("--manifests")
        .arg(dir.path())
        .arg("--cgroup")
        .arg(cgroup.path())
        .arg("--pin-dir")
        .arg(&pin_dir)
        .args(["--hostname-override", NODE_NAME])
        // Never clash with a kube-proxy (or another demo) on this machine.
        .args([
            "--healthz-bind-address",
            "127.0.0.1:0",
            "--metrics-bind-address",
            "127.0.0.1:0",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting the agent")?;
    let world = World {
        agent,
        _pins: Pins(pin_dir.clone()),
        cgroup,
        _servers: servers,
        topology,
        dir,
    };

    let files = Files {
        pin_dir,
        log_path,
        service_file,
        slices_file,
        slices,
    };
    Ok((world, files))
}

fn describe(world: &World, files: &Files, prefix: &str) {
    println!("sandbox   node netns {prefix}-node with a bridge; pods on it:");
    for pod in &world.topology.pods {
        println!("            {:<7} {:<12} {}", pod.name, pod.ipv4, pod.ipv6);
    }
    println!("          child cgroup {}", world.cgroup.path().display());
    println!(
        "manifests {} and {}",
        files.service_file.display(),
        files.slices_file.display()
    );
    println!(
        "agent     bpf-kube-proxy run --manifests {} --cgroup {} --pin-dir {}",
        world.dir.path().display(),
        world.cgroup.path().display(),
        files.pin_dir.display()
    );
    println!("          (log: {})", files.log_path.display());
}

/// Waits until the agent has attached every socket program and programmed the Service.
async fn wait_ready(
    world: &mut World,
    files: &Files,
    http_v4: FrontendKey,
    timeout: Duration,
) -> anyhow::Result<()> {
    let pin_dir = &files.pin_dir;
    let links = pin_dir.join("links");
    let ready = wait_for(
        &mut world.agent,
        "the agent to program the datapath",
        timeout,
        || {
            let attached = std::fs::read_dir(&links)
                .ok()?
                .flatten()
                .next()
                .and_then(|d| std::fs::read_dir(d.path()).ok())?
                .count();
            (attached == loader::SOCKET_PROGRAMS.len() && backend_count(pin_dir, http_v4) == Some(3))
                .then_some(())
        },
    )
    .await;
    if let Err(e) = ready {
        println!(
            "\nagent log:\n{}",
            std::fs::read_to_string(&files.log_path).unwrap_or_default()
        );
        return Err(e);
    }
    println!("          datapath ready: 8 programs attached, maps programmed\n");

    Ok(())
}

/// The traffic section: TCP, UDP both ways and IPv6 through the VIPs; returns the TCP spread.
async fn balance(world: &World, client_ns: &Path, requests: u32) -> anyhow::Result<BTreeMap<String, u32>> {
    let vip4: std::net::IpAddr = VIP_V4.parse()?;
    let vip6: std::net::IpAddr = VIP_V6.parse()?;

    println!("== {requests} HTTP requests to {VIP_V4}:80 from the client pod (a process in the cgroup) ==");
    let attempts = probe(
        world,
        client_ns,
        SocketAddr::new(vip4, 80),
        ProbeMode::Tcp,
        requests,
    )
    .await?;
    let spread = show(&attempts);

    println!("\n== 6 DNS-style UDP queries to {VIP_V4}:53, unconnected socket (sendto/recvfrom) ==");
    show(&probe(world, client_ns, SocketAddr::new(vip4, 53), ProbeMode::Udp, 6).await?);
    println!("  (the reply's source is the ClusterIP: recvmsg translated it back)");

    println!("\n== 4 UDP queries to {VIP_V4}:53, connected socket ==");
    show(
        &probe(
            world,
            client_ns,
            SocketAddr::new(vip4, 53),
            ProbeMode::UdpConnected,
            4,
        )
        .await?,
    );

    println!("\n== 6 HTTP requests to [{VIP_V6}]:80 (IPv6) ==");
    show(&probe(world, client_ns, SocketAddr::new(vip6, 80), ProbeMode::Tcp, 6).await?);

    Ok(spread)
}

/// The maps as the CLI and bpftool show them.
async fn show_maps(agent_bin: &Path, pin_dir: &Path) -> anyhow::Result<()> {
    for extra in [&[][..], &["--maps"][..]] {
        let shown = std::iter::once("list")
            .chain(extra.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        println!("\n== bpf-kube-proxy {shown} --pin-dir {} ==", pin_dir.display());
        let listed = Command::new(agent_bin)
            .arg("list")
            .args(extra)
            .arg("--pin-dir")
            .arg(pin_dir)
            .status()
            .await
            .context("running bpf-kube-proxy list")?;
        if !listed.success() {
            bail!("bpf-kube-proxy {shown} failed: {listed}");
        }
    }

    let bpftool_args = ["map", "dump", "pinned"];
    let svc_map = pin_dir.join(proxy_common::maps::SERVICES_V4);
    if let Ok(out) = std::process::Command::new("bpftool")
        .args(bpftool_args)
        .arg(&svc_map)
        .output()
        && out.status.success()
    {
        println!(
            "\n== bpftool map dump pinned {} (first entry) ==",
            svc_map.display()
        );
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines().take(22) {
            println!("{line}");
        }
    }

    Ok(())
}

/// The live change: be2 leaves the EndpointSlices file; returns the spread afterwards.
async fn remove_be2(
    world: &mut World,
    files: &Files,
    client_ns: &Path,
    http_v4: FrontendKey,
) -> anyhow::Result<BTreeMap<String, u32>> {
    println!("\n== live change: be2 leaves the EndpointSlices ==");
    let be2 = world.topology.pod("be2").context("be2")?;
    let edited: String = files
        .slices
        .lines()
        .filter(|l| !l.contains(&be2.ipv4.to_string()) && !l.contains(&be2.ipv6.to_string()))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&files.slices_file, edited)?;
    let ((), took) = wait_for(
        &mut world.agent,
        "the agent to drop be2",
        Duration::from_secs(10),
        || (backend_count(&files.pin_dir, http_v4) == Some(2)).then_some(()),
    )
    .await?;
    println!(
        "  datapath updated {} ms after the file was written",
        took.as_millis()
    );
    let vip4: std::net::IpAddr = VIP_V4.parse()?;
    Ok(show(
        &probe(world, client_ns, SocketAddr::new(vip4, 80), ProbeMode::Tcp, 12).await?,
    ))
}
