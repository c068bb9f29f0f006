//! The harness every privileged test shares. A [`World`] is a node namespace with backend pods
//! (each running an HTTP server on 8080 and a UDP server on 5353 that answer with their name),
//! a client pod, a child cgroup, a manifest directory and a pin directory, all with names
//! unique to the test, all removed on drop, also when the test fails.

pub mod apiserver;
pub mod manifests;
pub mod tun;

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use apiserver::ApiServer;
use bkp_sandbox::{
    cgroup::ChildCgroup,
    probe::{Attempt, ProbeMode},
    servers::{Identity, Servers},
    topology::{Pod, Topology},
    unique_suffix, workspace_binary,
};
use bpf_kube_proxy::{
    datapath::{host, loader, maps::PinnedMaps, reader::Snapshot},
    pipeline::model::{FrontendKey, Protocol},
};

pub const HTTP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 5353;
pub const NODE_NAME: &str = "test-node";
/// The agent's log line once its programs serve.
const READY: &str = "datapath ready";

/// The `bpf-kube-proxy` binary next to the test executable (target/<profile>/), or `BKP_BIN`.
pub fn binary() -> PathBuf {
    built("bpf-kube-proxy", "BKP_BIN")
}

/// The `bkp-sandbox` binary (probe, exec) next to the test executable, or `BKP_SANDBOX_BIN`.
pub fn sandbox_binary() -> PathBuf {
    built("bkp-sandbox", "BKP_SANDBOX_BIN")
}

fn built(name: &str, env: &str) -> PathBuf {
    workspace_binary(name, env).unwrap_or_else(|e| panic!("{e}: run `cargo xtask test`"))
}

/// `BKP_TEST_TIMEOUT_SCALE` multiplies every deadline of [`World::wait_until`]: `cargo xtask
/// vmtest` sets it in an emulated VM, where loading the programs alone takes tens of seconds.
/// Only how long a wait may take before it fails changes, never what a test expects.
fn timeout_scale() -> u32 {
    std::env::var("BKP_TEST_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "privileged integration tests need root (they load eBPF and create namespaces)"
    );
}

/// A pin directory of the test's own under /sys/fs/bpf, removed (links first, so the programs
/// detach) on drop.
pub struct Pins(PathBuf);

impl Pins {
    /// `/sys/fs/bpf/<prefix>-<unique suffix>`; nothing is created until a load pins there.
    pub fn unique(prefix: &str) -> Self {
        Self(PathBuf::from(format!("/sys/fs/bpf/{prefix}-{}", unique_suffix())))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = loader::cleanup(&self.0);
    }
}

struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Field order is teardown order: agent, API server, pins, cgroup, servers, namespaces, files,
/// runtime.
pub struct World {
    agent: Option<AgentProcess>,
    api: Option<ApiServer>,
    pins: Pins,
    cgroup: ChildCgroup,
    servers: Servers,
    pub topology: Topology,
    manifests: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    log_path: PathBuf,
    extra_args: Vec<String>,
    /// Run the agent in this network namespace (the node's) instead of the test's.
    agent_netns: Option<PathBuf>,
}

impl World {
    /// Backends named `backends` plus a `client` pod; nothing is started yet.
    pub fn new(backends: &[&str]) -> Self {
        require_root();
        let id = unique_suffix();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut pods = backends.to_vec();
        pods.push("client");
        let topology = Topology::create(&format!("bkt-{id}"), &pods).expect("creating namespaces");
        let mut servers = Servers::default();
        {
            let _guard = runtime.enter();
            for name in backends {
                let pod = topology.pod(name).expect("backend pod");
                servers.http(&pod.netns, HTTP_PORT, name).expect("http server");
                servers.udp(&pod.netns, UDP_PORT, name).expect("udp server");
            }
        }
        let cgroup_root = host::cgroup2_root().expect("cgroup2 mount");
        let cgroup = ChildCgroup::create(&cgroup_root, &format!("bkt-{id}")).expect("child cgroup");
        let manifests = tempfile::Builder::new()
            .prefix("bkt-manifests-")
            .tempdir()
            .expect("tempdir");
        let log_path = manifests.path().with_extension("agent.log");
        Self {
            agent: None,
            api: None,
            pins: Pins(PathBuf::from(format!("/sys/fs/bpf/bkt-{id}"))),
            cgroup,
            servers,
            topology,
            manifests,
            runtime,
            log_path,
            extra_args: Vec::new(),
            agent_netns: None,
        }
    }

    /// Extra `run` flags for every agent start.
    pub fn agent_args(&mut self, args: &[&str]) -> &mut Self {
        self.extra_args = args.iter().map(std::string::ToString::to_string).collect();
        self
    }

    /// Runs the agent inside the node namespace from now on (only the network namespace is
    /// entered, so pins and cgroups stay the host's), as NodePort tests need for its devices.
    pub fn agent_in_node(&mut self) -> &mut Self {
        self.agent_netns = Some(self.topology.node.path());
        self
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.topology.pod(name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// IPv4 address of a pod, as a string.
    pub fn ip(&self, pod: &str) -> String {
        self.pod(pod).ipv4.to_string()
    }

    pub fn ip6(&self, pod: &str) -> String {
        self.pod(pod).ipv6.to_string()
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pins.0
    }

    pub fn cgroup(&self) -> &Path {
        self.cgroup.path()
    }

    pub fn manifest_dir(&self) -> &Path {
        self.manifests.path()
    }

    pub fn write(&self, file: &str, yaml: &str) {
        let path = self.manifests.path().join(file);
        // Write then rename, as kubectl-style tools and ConfigMap updates do, so the agent
        // never reads half a file.
        let tmp = self.manifests.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).expect("writing manifest");
        std::fs::rename(&tmp, &path).expect("renaming manifest");
    }

    pub fn remove(&self, file: &str) {
        std::fs::remove_file(self.manifests.path().join(file)).expect("removing manifest");
    }

    /// Serves objects from a test API server instead of manifest files from now on.
    pub fn use_api_server(&mut self) -> &ApiServer {
        let api = ApiServer::start(self.runtime.handle());
        api.write_kubeconfig(&self.kubeconfig_path());
        self.api.insert(api)
    }

    pub fn api(&self) -> &ApiServer {
        self.api.as_ref().expect("use_api_server() first")
    }

    pub fn api_mut(&mut self) -> &mut ApiServer {
        self.api.as_mut().expect("use_api_server() first")
    }

    /// Applies every document of a multi-document YAML string to the API server.
    pub fn apply(&self, yaml: &str) {
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml).expect("test YAML parses");
        for doc in docs.into_iter().filter(|d| !d.is_null()) {
            self.api().apply(doc);
        }
    }

    fn kubeconfig_path(&self) -> PathBuf {
        self.manifests.path().with_extension("kubeconfig")
    }

    /// Starts the agent and waits until its programs are attached.
    pub fn start_agent(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("agent log");
        let ready_before = self.agent_log().matches(READY).count();
        let mut cmd = match &self.agent_netns {
            Some(netns) => bkp_sandbox::netns::command_in(netns, binary()),
            None => Command::new(binary()),
        };
        // Tests run side by side: each agent serves health and metrics on a port of its own,
        // which `http_addr` reads back from the log.
        cmd.arg("run")
            .args(["--healthz-bind-address", "127.0.0.1:0"])
            .args(["--metrics-bind-address", "127.0.0.1:0"]);
        if self.api.is_some() {
            cmd.arg("--kubeconfig").arg(self.kubeconfig_path());
        } else {
            cmd.arg("--manifests").arg(self.manifests.path());
        }
        let child = cmd
            .arg("--cgroup")
            .arg(self.cgroup.path())
            .arg("--pin-dir")
            .arg(&self.pins.0)
            .args(["--hostname-override", NODE_NAME])
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("starting the agent");
        self.agent = Some(AgentProcess(child));
        let links = self.pin_dir().join("links");
        self.wait_until("the agent to attach its programs", Duration::from_secs(30), |w| {
            let dir = std::fs::read_dir(&links).ok()?.flatten().next()?.path();
            let attached = std::fs::read_dir(dir).ok()?.count() == loader::SOCKET_PROGRAMS.len();
            (attached && w.agent_log().matches(READY).count() > ready_before).then_some(())
        });
    }

    /// The address the running agent's health (`"/healthz"`) or metrics (`"/metrics"`) server
    /// listens on, from its log.
    pub fn http_addr(&self, path: &str) -> SocketAddr {
        let log = self.agent_log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains(&format!("serving {path}")))
            .unwrap_or_else(|| panic!("the agent did not log its {path} server:\n{log}"));
        line.split("addr=")
            .nth(1)
            .and_then(|a| a.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
    }

    /// GET `path` from the agent's health or metrics server: status and body.
    /// The request is made from the agent's network namespace, where the server listens.
    pub fn http_get(&self, server: &str, path: &str) -> (u16, String) {
        use std::io::{Read as _, Write as _};
        let addr = self.http_addr(server);
        let request = move || {
            let mut stream = std::net::TcpStream::connect(addr)?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(stream, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        };
        let response = match self.agent_netns {
            Some(_) => self.topology.node.run(request),
            None => request(),
        }
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"));
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not HTTP: {response:?}"));
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
        (status, body)
    }

    /// Sends `signal` to the agent and waits for it to exit.
    pub fn stop_agent(&mut self, signal: nix::sys::signal::Signal) {
        if let Some(mut agent) = self.agent.take() {
            let pid = nix::unistd::Pid::from_raw(agent.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, signal);
            let _ = agent.0.wait();
        }
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Polls `check` every 20 ms; panics with the agent log on timeout (scaled by
    /// `timeout_scale`) or if the agent died.
    pub fn wait_until<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&World) -> Option<T>,
    ) -> T {
        let timeout = timeout * timeout_scale();
        let started = Instant::now();
        loop {
            if let Some(value) = check(self) {
                return value;
            }
            if let Some(agent) = self.agent.as_mut()
                && let Ok(Some(status)) = agent.0.try_wait()
            {
                panic!(
                    "agent exited ({status}) while waiting for {what}\n--- agent log ---\n{}",
                    self.agent_log()
                );
            }
            assert!(
                started.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}\n--- agent log ---\n{}",
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn snapshot(&self) -> Option<Snapshot> {
        Snapshot::read(&PinnedMaps::open(self.pin_dir()).ok()?).ok()
    }

    /// Backend addresses (`ip:port`) the maps hold for a frontend, `None` if it is absent.
    pub fn backends_of(&self, frontend: &str, port: u16, protocol: Protocol) -> Option<Vec<String>> {
        let key = FrontendKey::new(frontend.parse().expect("frontend address"), port, protocol);
        let snapshot = self.snapshot()?;
        let f = snapshot.frontends.iter().find(|f| f.frontend == key)?;
        Some(
            f.backends
                .iter()
                .filter_map(|b| b.addr.map(|a| SocketAddr::new(a.addr, a.port).to_string()))
                .collect(),
        )
    }

    /// Waits until the maps hold exactly `count` backends for a frontend.
    pub fn wait_for_backends(&mut self, frontend: &str, port: u16, protocol: Protocol, count: usize) {
        self.wait_until(
            &format!("{frontend}:{port}/{protocol} to have {count} backends"),
            Duration::from_secs(10),
            |w| (w.backends_of(frontend, port, protocol)?.len() == count).then_some(()),
        );
    }

    /// Runs `count` probes from the client pod (in the cgroup) against `target`.
    pub fn probe(&self, target: &str, mode: ProbeMode, count: u32) -> Vec<Attempt> {
        self.probe_from("client", target, mode, count)
    }

    pub fn probe_from(&self, pod: &str, target: &str, mode: ProbeMode, count: u32) -> Vec<Attempt> {
        Prober::new(
            self.probe_command(pod, target, mode, count, 0)
                .spawn()
                .expect("running the probe"),
        )
        .results()
    }

    /// Starts probing in the background: `count` attempts `interval_ms` apart.
    pub fn spawn_probe(&self, target: &str, mode: ProbeMode, count: u32, interval_ms: u64) -> Prober {
        Prober::new(
            self.probe_command("client", target, mode, count, interval_ms)
                .spawn()
                .expect("starting the probe"),
        )
    }

    fn probe_command(
        &self,
        pod: &str,
        target: &str,
        mode: ProbeMode,
        count: u32,
        interval_ms: u64,
    ) -> Command {
        let mut cmd = Command::new(sandbox_binary());
        cmd.args([
            "probe",
            target,
            "--json",
            "--mode",
            mode.flag(),
            "--count",
            &count.to_string(),
        ])
        .args(["--timeout-ms", "2000", "--interval-ms", &interval_ms.to_string()])
        .arg("--cgroup")
        .arg(self.cgroup.path())
        .arg("--netns")
        .arg(self.pod(pod).netns.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        cmd
    }

    /// A command that runs inside `pod`'s network namespace and the test cgroup.
    pub fn command_in(&self, pod: &str, program: &str) -> Command {
        let mut cmd = Command::new(sandbox_binary());
        cmd.arg("exec")
            .arg("--cgroup")
            .arg(self.cgroup.path())
            .arg("--netns")
            .arg(self.pod(pod).netns.path())
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `f` with the test's tokio runtime entered (for starting more servers).
    pub fn with_runtime<T>(&mut self, f: impl FnOnce(&mut Servers, &Topology) -> T) -> T {
        let _guard = self.runtime.enter();
        f(&mut self.servers, &self.topology)
    }
}

/// A probe running in the background, whose attempts are read as it prints them.
pub struct Prober {
    child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
    seen: Vec<Attempt>,
}

impl Prober {
    fn new(mut child: Child) -> Self {
        let stdout = child.stdout.take().expect("the probe's stdout is piped");
        Self {
            child,
            lines: BufReader::new(stdout).lines(),
            seen: Vec::new(),
        }
    }

    /// Blocks until `n` attempts have succeeded (or the probe ended) and returns them all so
    /// far. A test that changes something "while traffic flows" waits on this rather than on
    /// a sleep: on an emulated VM the probe can take longer than any fixed sleep to start.
    pub fn answered(&mut self, n: usize) -> &[Attempt] {
        while self.seen.iter().filter(|a| a.ok).count() < n {
            let Some(line) = self.lines.next() else { break };
            let line = line.expect("reading the probe's output");
            self.seen.push(serde_json::from_str(&line).expect("probe JSON"));
        }
        &self.seen
    }

    /// Waits for the probe to finish and returns its attempts.
    pub fn results(mut self) -> Vec<Attempt> {
        self.answered(usize::MAX);
        let out = self.child.wait_with_output().expect("waiting for the probe");
        assert!(
            out.status.success(),
            "probe failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.seen
    }
}

/// The value of one sample line of a metrics text (`name{labels} value`).
pub fn metric_sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// What a successful attempt's server said.
pub fn identity(attempt: &Attempt) -> Identity {
    let reply = attempt
        .reply
        .as_deref()
        .unwrap_or_else(|| panic!("attempt {} failed: {:?}", attempt.n, attempt.error));
    serde_json::from_str(reply).unwrap_or_else(|e| panic!("unexpected reply {reply:?}: {e}"))
}

/// How many attempts each backend answered.
pub fn spread(attempts: &[Attempt]) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for a in attempts {
        *out.entry(identity(a).backend).or_insert(0) += 1;
    }
    out
}

/// `ip:port` text for an address and port (brackets for IPv6).
/// bpftool's JSON for `args` on the pinned object at `pin` (`bpftool -j map show pinned P`).
pub fn bpftool_json(args: &[&str], pin: &Path) -> serde_json::Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .arg(pin)
        .output()
        .expect("running bpftool (Debian package bpftool)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("bpftool's JSON")
}

pub fn addr(ip: &str, port: u16) -> String {
    SocketAddr::new(ip.parse::<IpAddr>().expect("ip"), port).to_string()
}
