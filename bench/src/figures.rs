//! Each figure, measured for bpf-kube-proxy ("ours"), kube-proxy's iptables and nftables
//! rulesets, and no proxy ("direct") where that makes sense, at each N.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::fd::AsFd as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bkp_sandbox::{cgroup, netns, servers::Servers, topology::Topology, unique_suffix};
use bpf_kube_proxy::datapath::host::Offload;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Serialize;

use aya::maps::MapData;
use bpf_kube_proxy::datapath::{loader::MapSizes, maps::typed, readings::PinnedReadings};
use bpf_kube_proxy::telemetry::metrics::DatapathReadings as _;
use proxy_common::maps::{self as names, AddrV4, AddrV6, CtKey, CtValue};

use crate::{
    Opts,
    rulesets::{self, Svc},
    world::{
        self, BACKEND_PORT, ENDPOINTS, Ours, RunningAgent, median, percentile, scratch_netns, timed_in,
        timed_within,
    },
};

/// One measured value: figure, implementation, N, metric.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    pub figure: &'static str,
    pub implementation: &'static str,
    pub n: usize,
    pub metric: &'static str,
    pub value: f64,
    pub unit: &'static str,
}

/// A kube-proxy ruleset that did not load within the bench's limit: no figure, and the limit.
#[derive(Clone, Debug, Serialize)]
pub struct Unfinished {
    pub figure: &'static str,
    pub implementation: &'static str,
    pub n: usize,
    pub limit_s: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub points: Vec<Point>,
    pub unfinished: Vec<Unfinished>,
    /// Facts about the run: tool versions, kernel, what was skipped and why.
    pub notes: Vec<String>,
}

impl Results {
    pub(crate) fn add(
        &mut self,
        figure: &'static str,
        implementation: &'static str,
        n: usize,
        metric: &'static str,
        value: f64,
        unit: &'static str,
    ) {
        println!("{figure:<14} {implementation:<9} N={n:<6} {metric:<18} {value:>12.3} {unit}");
        self.points.push(Point {
            figure,
            implementation,
            n,
            metric,
            value,
            unit,
        });
    }

    fn did_not_finish(
        &mut self,
        figure: &'static str,
        implementation: &'static str,
        n: usize,
        limit: Duration,
    ) {
        println!(
            "{figure:<14} {implementation:<9} N={n:<6} did not finish in {} s",
            limit.as_secs()
        );
        self.unfinished.push(Unfinished {
            figure,
            implementation,
            n,
            limit_s: limit.as_secs(),
        });
    }

    /// The limit a figure's run did not finish in, if it did not.
    pub fn unfinished(&self, figure: &str, implementation: &str, n: usize) -> Option<u64> {
        self.unfinished
            .iter()
            .find(|u| u.figure == figure && u.implementation == implementation && u.n == n)
            .map(|u| u.limit_s)
    }

    pub fn get(&self, figure: &str, implementation: &str, n: usize, metric: &str) -> Option<f64> {
        self.points
            .iter()
            .find(|p| {
                p.figure == figure && p.implementation == implementation && p.n == n && p.metric == metric
            })
            .map(|p| p.value)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn version(program: &str, arg: &str) -> String {
    Command::new(program).arg(arg).output().map_or_else(
        |e| format!("{program}: {e}"),
        |o| String::from_utf8_lossy(&o.stdout).trim().to_string(),
    )
}

pub fn run_all(opts: &Opts) -> anyhow::Result<Results> {
    let mut results = Results::default();
    results.notes.push(format!("kernel {}", version("uname", "-r")));
    results.notes.push(version("iptables", "-V"));
    results.notes.push(version("nft", "-v"));
    results.notes.push(format!(
        "{} CPUs; every figure at N = {:?} Services x {ENDPOINTS} endpoints; medians of {} runs",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        opts.sizes,
        opts.repeats
    ));
    for &n in &opts.sizes {
        if opts.wants("sync") {
            sync_figures(opts, n, &mut results)?;
        }
        if opts.wants("memory") {
            memory_figure(opts, n, &mut results)?;
        }
        if opts.wants("tc") {
            tc_cost_figure(n, &mut results)?;
        }
        if opts.wants("scrape") {
            scrape_figure(opts, n, &mut results)?;
        }
    }
    if opts.wants("connect") {
        connect_figure(opts, &mut results)?;
    }
    if opts.wants("nodeport") {
        nodeport_figure(opts, &mut results)?;
    }
    if opts.wants("maglev") {
        crate::maglev::figures(opts, &mut results);
    }
    Ok(results)
}

/// Figures 1 and 2: full sync, then single endpoint changes.
fn sync_figures(opts: &Opts, n: usize, results: &mut Results) -> anyhow::Result<()> {
    let svcs = world::services(n, world::unique_endpoint);
    let services: Vec<_> = svcs.iter().map(world::k8s_service).collect();
    let slices: Vec<_> = svcs.iter().map(world::k8s_slice).collect();

    let mut ours = Vec::new();
    let ipt_text = rulesets::iptables_full(&svcs);
    let nft_text = rulesets::nft_full(&svcs);
    // Ours first: tearing down a namespace that held N Services of rules goes on in kernel
    // workers after the tool has exited, and would take a CPU from the sync measured next.
    for _ in 0..opts.repeats {
        let mut datapath = Ours::load(n)?;
        ours.push(ms(datapath.full_sync(&services, &slices)?));
    }
    results.add("full_sync", "ours", n, "median", median(ours), "ms");
    let rulesets = [
        ("iptables", "iptables-restore", &[][..], ipt_text.as_str()),
        ("nftables", "nft", &["-f", "-"][..], nft_text.as_str()),
    ];
    // Which rulesets loaded within the limit: only those get endpoint changes.
    let mut loaded = Vec::new();
    for (name, program, args, text) in rulesets {
        let mut runs = Vec::new();
        for _ in 0..opts.repeats {
            let ns = scratch_netns(name)?;
            match timed_within(&ns, program, args, text, Some(opts.ruleset_limit))? {
                Some(took) => runs.push(ms(took)),
                None => break,
            }
        }
        if runs.len() == opts.repeats {
            results.add("full_sync", name, n, "median", median(runs), "ms");
            let ns = scratch_netns(name)?;
            timed_in(&ns, program, args, text)?;
            loaded.push((name, ns));
        } else {
            results.did_not_finish("full_sync", name, n, opts.ruleset_limit);
            results.did_not_finish("endpoint_change", name, n, opts.ruleset_limit);
        }
    }

    // One endpoint of one Service replaced, again and again, on top of the full state.
    let mut datapath = Ours::load(n)?;
    datapath.full_sync(&services, &slices)?;
    let mut current = svcs.clone();
    let mut ours = Vec::new();
    let mut theirs: Vec<Vec<f64>> = vec![Vec::new(); loaded.len()];
    for k in 0..opts.changes {
        let (i, before, after) = endpoint_change(&current, k);
        ours.push(ms(program_change(&mut datapath, &after)?));
        // kube-proxy's subprocesses are part of its cost, as they are in production.
        if k < opts.changes.min(50) {
            for ((name, ns), runs) in loaded.iter().zip(&mut theirs) {
                let took = if *name == "iptables" {
                    timed_in(
                        ns,
                        "iptables-restore",
                        &["--noflush"],
                        &rulesets::iptables_partial(&before, &after),
                    )?
                } else {
                    timed_in(ns, "nft", &["-f", "-"], &rulesets::nft_partial(&before, &after))?
                };
                runs.push(ms(took));
            }
        }
        current[i] = after;
    }
    // The periodic repair pass over the same state: every map read back and compared with the
    // planner's state, nothing to write.
    let mut passes = Vec::new();
    for _ in 0..opts.repeats.max(3) {
        let started = Instant::now();
        let report = datapath.proxier.repair();
        passes.push(ms(started.elapsed()));
        anyhow::ensure!(
            report.clean() && report.differences == 0,
            "the repair pass found differences in maps it just wrote: {report:?}"
        );
    }
    results.add("repair_pass", "ours", n, "median", median(passes), "ms");
    let names = std::iter::once("ours").chain(loaded.iter().map(|(name, _)| *name));
    for (name, mut values) in names.zip(std::iter::once(ours).chain(theirs)) {
        for (metric, p) in [("p50", 50.0), ("p99", 99.0)] {
            results.add(
                "endpoint_change",
                name,
                n,
                metric,
                percentile(&mut values, p),
                "ms",
            );
        }
    }
    Ok(())
}

/// The `k`th endpoint change of a run: one endpoint of one Service replaced.
fn endpoint_change(current: &[Svc], k: usize) -> (usize, Svc, Svc) {
    let i = (k * 7919) % current.len();
    let before = current[i].clone();
    let mut after = before.clone();
    after.endpoints[k % ENDPOINTS].0 = Ipv4Addr::from(0x0b00_0000 + k as u32 + 1);
    (i, before, after)
}

/// Programs one changed Service's slice, as a watch event does; returns how long it took.
fn program_change(datapath: &mut Ours, after: &Svc) -> anyhow::Result<Duration> {
    let slice = world::k8s_slice(after);
    let started = Instant::now();
    datapath.proxier.upsert_slice(&slice);
    let report = datapath.proxier.sync();
    let elapsed = started.elapsed();
    anyhow::ensure!(
        report.failed.is_empty() && report.ops > 0,
        "endpoint change not programmed"
    );
    Ok(elapsed)
}

/// A conntrack entry that stays live for the whole run.
fn live_flow<A>(saddr: A, daddr: A) -> CtValue<A> {
    CtValue {
        last_seen_ns: u64::MAX / 2,
        saddr,
        daddr,
        sport: 40_000,
        dport: 8080,
        rev_nat_id: 1,
        backend_id: 1,
        flags: 0,
        _pad: [0; 3],
    }
}

/// Fills both conntrack maps to capacity with live-looking flows, from one CPU: an LRU map
/// keeps up to 128 free entries per CPU on that CPU's own list, and a writer that migrates
/// midway finds the shared list empty while the other CPU's holds some, so it evicts (the
/// maps then held 256 fewer entries than written, and the walker's count looked wrong).
fn fill_conntrack(pin_dir: &std::path::Path) -> anyhow::Result<u32> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut one_cpu = nix::sched::CpuSet::new();
                one_cpu.set(0)?;
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one_cpu)?;
                fill_conntrack_here(pin_dir)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the conntrack filler panicked"))?
    })
}

fn fill_conntrack_here(pin_dir: &std::path::Path) -> anyhow::Result<u32> {
    let capacity = MapSizes::default().conntrack;
    let mut v4: aya::maps::HashMap<MapData, CtKey<AddrV4>, CtValue<AddrV4>> =
        typed(pin_dir, names::CONNTRACK_V4)?;
    let mut v6: aya::maps::HashMap<MapData, CtKey<AddrV6>, CtValue<AddrV6>> =
        typed(pin_dir, names::CONNTRACK_V6)?;
    for i in 0..capacity {
        let [a, b, c, d] = i.to_be_bytes();
        let client4 = [10, b, c, d];
        let mut client6 = [0u8; 16];
        client6[..2].copy_from_slice(&[0xfd, 0x00]);
        client6[12..].copy_from_slice(&[a, b, c, d]);
        v4.insert(
            CtKey::new(client4, [10, 0, 0, 1], 40_000, 80, 6),
            live_flow(client4, [10, 0, 0, 2]),
            0,
        )?;
        v6.insert(
            CtKey::new(client6, [0xfd; 16], 40_000, 80, 6),
            live_flow(client6, [0xfe; 16]),
            0,
        )?;
    }
    Ok(capacity)
}

/// Figure: with N Services programmed and both conntrack tables full, a `/metrics` scrape's
/// datapath readings (the counters, the walker's latest fill counts), the map walker's count of
/// every map (batched), beside the key-by-key walk of the conntrack tables alone that scrapes
/// did before; and endpoint changes programmed while the walker counts back to back on
/// another thread, as it does in the agent.
fn scrape_figure(opts: &Opts, n: usize, results: &mut Results) -> anyhow::Result<()> {
    let svcs = world::services(n, world::unique_endpoint);
    let services: Vec<_> = svcs.iter().map(world::k8s_service).collect();
    let slices: Vec<_> = svcs.iter().map(world::k8s_slice).collect();
    let mut datapath = Ours::load(n)?;
    datapath.full_sync(&services, &slices)?;
    let capacity = fill_conntrack(datapath.pin_dir())?;
    let readings = PinnedReadings::open(datapath.pin_dir())?;
    let (mut walks, mut scrapes) = (Vec::new(), Vec::new());
    for _ in 0..opts.repeats.max(5) {
        let started = Instant::now();
        readings.refresh_fill();
        walks.push(ms(started.elapsed()));
        let started = Instant::now();
        let counters = readings.counters();
        let fill = readings.map_fill();
        scrapes.push(ms(started.elapsed()));
        let conntrack: u64 = fill
            .iter()
            .filter(|f| f.map == names::CONNTRACK_V4 || f.map == names::CONNTRACK_V6)
            .map(|f| f.entries)
            .sum();
        anyhow::ensure!(
            !counters.is_empty() && conntrack == 2 * u64::from(capacity),
            "the walker counted {conntrack} conntrack entries of {}",
            2 * capacity
        );
    }
    results.add("map_walk", "ours", n, "median", median(walks), "ms");
    results.add("scrape", "ours", n, "median", median(scrapes), "ms");
    let mut key_walks = Vec::new();
    for _ in 0..opts.repeats.max(3) {
        let v4: aya::maps::HashMap<MapData, CtKey<AddrV4>, CtValue<AddrV4>> =
            typed(datapath.pin_dir(), names::CONNTRACK_V4)?;
        let v6: aya::maps::HashMap<MapData, CtKey<AddrV6>, CtValue<AddrV6>> =
            typed(datapath.pin_dir(), names::CONNTRACK_V6)?;
        let started = Instant::now();
        let walked = v4.keys().count() + v6.keys().count();
        key_walks.push(ms(started.elapsed()));
        anyhow::ensure!(walked == 2 * capacity as usize, "walked {walked} keys");
    }
    results.add(
        "map_walk",
        "key_walk",
        n,
        "conntrack_only",
        median(key_walks),
        "ms",
    );

    let mut current = svcs;
    let (mut quiet, mut scraping) = (Vec::new(), Vec::new());
    for k in 0..opts.changes {
        let (i, _, after) = endpoint_change(&current, k);
        quiet.push(ms(program_change(&mut datapath, &after)?));
        current[i] = after;
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let scraped = std::thread::scope(|scope| -> anyhow::Result<usize> {
        let scraper = scope.spawn(|| {
            let mut count = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                readings.refresh_fill();
                count += 1;
            }
            count
        });
        let programmed = (opts.changes..2 * opts.changes).try_for_each(|k| {
            let (i, _, after) = endpoint_change(&current, k);
            scraping.push(ms(program_change(&mut datapath, &after)?));
            current[i] = after;
            Ok::<_, anyhow::Error>(())
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        programmed?;
        scraper
            .join()
            .map_err(|_| anyhow::anyhow!("the scraper panicked"))
    })?;
    for (name, values) in [("ours", &mut quiet), ("ours_while_walking", &mut scraping)] {
        results.add(
            "endpoint_change_scrape",
            name,
            n,
            "p99",
            percentile(values, 99.0),
            "ms",
        );
    }
    results.notes.push(format!(
        "N={n}: the map walker counted every map {scraped} times while {} endpoint changes were programmed",
        opts.changes
    ));
    Ok(())
}

/// The node memory the agent's map sizes are derived from in the memory figure: issue 16's
/// target is stated for a 24 GiB node, whatever machine the bench runs on.
const NODE_MEMORY: &str = "24Gi";

/// Figure 5: the real agent's RSS with N Services programmed, the kernel memory of its maps at
/// default settings (on a 24 GiB node), how long it took to program them all (after a cold
/// start on empty maps, and after a restart, SIGTERM as a rollout sends, that adopts the pinned
/// maps), and the kernel memory kube-proxy's rulesets for the same Services take.
fn memory_figure(opts: &Opts, n: usize, results: &mut Results) -> anyhow::Result<()> {
    let svcs = world::services(n, world::unique_endpoint);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let source = world::Source::ApiServer(runtime.handle());
    // Per start ("ours": cold, "restart"): how long until ready, and the RSS then. A start's
    // time varies by hundreds of milliseconds from one to the next on a busy 2-CPU machine:
    // medians of fresh agents, each started cold and then restarted.
    let mut ready = [Vec::new(), Vec::new()];
    let mut rss = [Vec::new(), Vec::new()];
    let mut map_memory = 0.0;
    for _ in 0..opts.repeats {
        let mut agent =
            RunningAgent::start(&svcs, None, &source, &["--map-dynamic-size-memory", NODE_MEMORY])?;
        for (i, (ready, rss)) in ready.iter_mut().zip(&mut rss).enumerate() {
            if i == 1 {
                agent.restart()?;
            }
            ready.push(ms(agent.ready_after));
            // Let the allocator settle after the first sync before reading RSS.
            std::thread::sleep(Duration::from_millis(500));
            rss.push(agent.rss_mib()?);
        }
        map_memory = map_memlock(&agent.pin_dir)? / (1024.0 * 1024.0);
    }
    for (start, (ready, rss)) in ["ours", "restart"].into_iter().zip(ready.into_iter().zip(rss)) {
        results.add("ready", start, n, "after_start", median(ready), "ms");
        results.add("memory", start, n, "agent_rss", median(rss), "MiB");
    }
    results.add("memory", "ours", n, "map_memlock", map_memory, "MiB");
    let rules = [
        (
            "iptables",
            "iptables-restore",
            vec![],
            rulesets::iptables_full(&svcs),
        ),
        ("nftables", "nft", vec!["-f", "-"], rulesets::nft_full(&svcs)),
    ];
    for (name, program, args, text) in rules {
        match ruleset_memory(program, &args, &text, opts.ruleset_limit) {
            Ok(Some(bytes)) => {
                results.add("memory", name, n, "map_memlock", bytes / (1024.0 * 1024.0), "MiB");
            }
            Ok(None) => results.did_not_finish("memory", name, n, opts.ruleset_limit),
            Err(e) => results.notes.push(format!(
                "N={n}: kernel memory of the {name} ruleset not measured: {e:#}"
            )),
        }
    }
    Ok(())
}

/// The kernel memory a ruleset takes once loaded: `program` loads it in a fresh network
/// namespace from inside a fresh memory cgroup, and the kernel memory charged to that cgroup
/// once the program has exited is what the ruleset holds (x_tables and nf_tables allocate
/// their tables with `GFP_KERNEL_ACCOUNT`, charged to the loader's cgroup for as long as
/// they live; the loader's own pages are gone with it). cgroup v1's `memory.kmem.usage_in_bytes`
/// where the memory controller is there, else cgroup v2's slab, percpu and vmalloc.
fn ruleset_memory(program: &str, args: &[&str], input: &str, limit: Duration) -> anyhow::Result<Option<f64>> {
    let cg = MemoryCgroup::create()?;
    let ns = scratch_netns("mem")?;
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec {program} {}",
        cg.path.display(),
        args.join(" ")
    );
    if timed_within(&ns, "sh", &["-c", &script], input, Some(limit))?.is_none() {
        return Ok(None);
    }
    let bytes = cg.kernel_bytes()?;
    drop(ns);
    Ok(Some(bytes as f64))
}

/// A memory cgroup of its own, removed on drop.
struct MemoryCgroup {
    path: std::path::PathBuf,
    v1: bool,
}

impl MemoryCgroup {
    fn create() -> anyhow::Result<Self> {
        let name = format!("bkp-bench-rules-{}", unique_suffix());
        let v1 = std::path::Path::new("/sys/fs/cgroup/memory/memory.kmem.usage_in_bytes").exists();
        let parent = if v1 {
            std::path::PathBuf::from("/sys/fs/cgroup/memory")
        } else {
            let root = bpf_kube_proxy::datapath::host::cgroup2_root()?;
            let controllers =
                std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap_or_default();
            anyhow::ensure!(
                controllers.split_whitespace().any(|c| c == "memory"),
                "no memory controller (cgroup v1 memory or v2 with +memory at the root)"
            );
            root
        };
        let path = parent.join(name);
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, v1 })
    }

    fn kernel_bytes(&self) -> anyhow::Result<u64> {
        if self.v1 {
            let text = std::fs::read_to_string(self.path.join("memory.kmem.usage_in_bytes"))?;
            return Ok(text.trim().parse()?);
        }
        let stat = std::fs::read_to_string(self.path.join("memory.stat"))?;
        Ok(stat
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(k, _)| matches!(*k, "slab" | "percpu" | "vmalloc"))
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum())
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // The charges of freed rules leave with the namespace's teardown, in kernel workers.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Runs of the tc ingress program per measurement (medians are reported).
const TEST_RUNS: u16 = 2000;

/// An Ethernet + IPv4 + TCP SYN frame; checksums are left zero (the programs update them
/// incrementally and never verify them).
fn syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut frame = vec![0u8; 14 + 20 + 20];
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    frame[14] = 0x45;
    frame[16..18].copy_from_slice(&40u16.to_be_bytes());
    frame[22] = 64;
    frame[23] = 6;
    frame[26..30].copy_from_slice(&src.octets());
    frame[30..34].copy_from_slice(&dst.octets());
    frame[34..36].copy_from_slice(&sport.to_be_bytes());
    frame[36..38].copy_from_slice(&dport.to_be_bytes());
    frame[46] = 5 << 4;
    frame[47] = 0x02;
    frame
}

/// Figure 7: BPF_PROG_TEST_RUN of the tc ingress program on synthetic SYNs with N Services
/// programmed: the first packet of a NodePort flow (backend choice, SNAT, two conntrack
/// inserts), a packet of a known flow (one conntrack lookup and the rewrite), and a packet for
/// no Service (what every other packet on the device pays). Each run is its own syscall, since
/// repeated runs would see the previous run's rewrite.
fn tc_cost_figure(n: usize, results: &mut Results) -> anyhow::Result<()> {
    let svcs = world::services(n, world::unique_endpoint);
    let mut ours = Ours::load(n)?;
    ours.full_sync(
        &svcs.iter().map(world::k8s_service).collect::<Vec<_>>(),
        &svcs.iter().map(world::k8s_slice).collect::<Vec<_>>(),
    )?;
    let node = proxy_common::maps::NodeConfig {
        snat_v4: world::NODE_ADDRESS.octets(),
        ct_tcp_timeout_s: 3600,
        ct_tcp_closing_timeout_s: 10,
        ct_udp_timeout_s: 120,
        ..Default::default()
    };
    bpf_kube_proxy::datapath::external::write_node_config(ours.pin_dir(), &node)?;
    let prog = ours.datapath.program_fd("bkp_tc_ingress")?;
    let client = Ipv4Addr::new(198, 51, 100, 7);
    let node_port = svcs[n.min(rulesets::MAX_NODE_PORTS) - 1]
        .node_port
        .context("a NodePort Service")?;
    let run = |frame: &[u8]| -> anyhow::Result<f64> {
        Ok(f64::from(
            bpf_kube_proxy::datapath::sys::prog_test_run(prog, frame, 1)?.duration_ns,
        ))
    };
    let mut new_flow = Vec::new();
    let mut tracked = Vec::new();
    let mut miss = Vec::new();
    for sport in 10_000..10_000 + TEST_RUNS {
        new_flow.push(run(&syn(client, sport, world::NODE_ADDRESS, node_port))?);
    }
    for _ in 0..TEST_RUNS {
        tracked.push(run(&syn(client, 10_000, world::NODE_ADDRESS, node_port))?);
        miss.push(run(&syn(client, 10_000, Ipv4Addr::new(192, 0, 2, 1), 80))?);
    }
    for (metric, values) in [
        ("tc_new_flow", new_flow),
        ("tc_tracked", tracked),
        ("tc_miss", miss),
    ] {
        results.add("prog_cost", "ours", n, metric, median(values), "ns");
    }
    Ok(())
}

/// A client outside the node, the node, and one backend pod:
/// `client 10.210.0.2 ─ up0 10.210.0.1 [node] be0 10.200.0.1 ─ backend 10.200.0.2:8080`.
/// Field order is drop order: the server stops before its namespace goes.
struct NodeLab {
    _servers: Servers,
    /// Where the packet-rate flood lands; never read (the device's count is the figure).
    _sink: std::net::UdpSocket,
    client: netns::Netns,
    backend: netns::Netns,
    node: netns::Netns,
}

const LAB_NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 1);
const LAB_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const LAB_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 2);

impl NodeLab {
    fn create(runtime: &tokio::runtime::Runtime) -> anyhow::Result<Self> {
        let id = unique_suffix();
        let node = netns::Netns::create(&format!("bkn-{id}-node"))?;
        let client = netns::Netns::create(&format!("bkn-{id}-cl"))?;
        let backend = netns::Netns::create(&format!("bkn-{id}-be"))?;
        node.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))?;
        node.veth_to("up0", &client)?;
        node.veth_to("be0", &backend)?;
        for (ns, dev, cidr) in [
            (&node, "up0", "10.210.0.1/24"),
            (&node, "be0", "10.200.0.1/24"),
            (&client, "eth0", "10.210.0.2/24"),
            (&backend, "eth0", "10.200.0.2/24"),
        ] {
            ns.ip(&["addr", "add", cidr, "dev", dev])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        client.ip(&["route", "add", "default", "via", "10.210.0.1"])?;
        backend.ip(&["route", "add", "default", "via", "10.200.0.1"])?;
        // The far ends of up0 and be0 as a wire's would be for native XDP (NAPI to take the
        // frames XDP sends, whole checksums from the senders), for every implementation alike.
        for ns in [&client, &backend] {
            ns.offload("eth0", Offload::Gro, true)?;
            ns.offload("eth0", Offload::TxChecksum, false)?;
        }
        let mut servers = Servers::default();
        {
            let _guard = runtime.enter();
            servers.http(&backend, BACKEND_PORT, "backend")?;
        }
        let sink = backend.run(|| std::net::UdpSocket::bind((LAB_BACKEND, BACKEND_PORT)))?;
        Ok(Self {
            _servers: servers,
            _sink: sink,
            client,
            backend,
            node,
        })
    }

    /// Packets per second delivered to the backend while the client floods `target` with
    /// 64-byte UDP frames for `seconds` (see [`flood`]), counted on the backend's device.
    fn packets_per_second(&self, what: &str, target: SocketAddr, seconds: u64) -> anyhow::Result<f64> {
        println!("pps            {what:<9} UDP flood to {target} for {seconds}s");
        let macs = (mac_of(&self.client, "eth0")?, mac_of(&self.node, "up0")?);
        let before = self.backend_rx()?;
        let started = Instant::now();
        self.client
            .run(move || flood("eth0", macs, LAB_CLIENT, target, Duration::from_secs(seconds)))?;
        let elapsed = started.elapsed().as_secs_f64();
        // Let the last batches drain through the node.
        std::thread::sleep(Duration::from_millis(100));
        Ok((self.backend_rx()? - before) as f64 / elapsed)
    }

    /// Packets the backend's device has received.
    fn backend_rx(&self) -> anyhow::Result<u64> {
        let out = std::process::Command::new("ip")
            .args(["-n", self.backend.name(), "-s", "-j", "link", "show", "eth0"])
            .output()
            .context("ip -s link")?;
        let links: serde_json::Value = serde_json::from_slice(&out.stdout).context("ip -j output")?;
        links[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .context("no rx packet count in ip -s -j link")
    }

    /// Requests per second `wrk` gets from the client namespace against `url` through `what`.
    fn requests_per_second(&self, what: &str, url: &str, seconds: u64) -> anyhow::Result<f64> {
        println!("nodeport       {what:<9} wrk {url} for {seconds}s");
        let out = self
            .client
            .command("wrk")
            .args(["-t", "2", "-c", "32", "-d"])
            .arg(format!("{seconds}s"))
            .arg(url)
            .output()
            .context("running wrk")?;
        let text = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            !text.contains("Socket errors") && !text.contains("Non-2xx"),
            "wrk saw errors against {url} through {what}:\n{text}"
        );
        text.lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| {
                format!(
                    "no Requests/sec from wrk against {url} through {what}:\n{text}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
    }
}

/// Sends 64-byte UDP frames (no UDP checksum, as IPv4 allows) from `source` to `target` for
/// `duration` through the packet socket of `device` (`from_mac` to `to_mac`), 64 at a time
/// past the qdisc: far cheaper per packet than a UDP socket, so that what is measured is the
/// node more than the sender, which shares the node's CPU (a veth runs its peer's receive
/// on the sending CPU). 16 flows (source ports), round-robin.
fn flood(
    device: &str,
    (from_mac, to_mac): ([u8; 6], [u8; 6]),
    source: Ipv4Addr,
    target: SocketAddr,
    duration: Duration,
) -> std::io::Result<()> {
    const BATCH: usize = 64;
    const FLOWS: usize = 16;
    let SocketAddr::V4(target) = target else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    let mut frames = [[0u8; 60]; FLOWS];
    for (flow, frame) in frames.iter_mut().enumerate() {
        frame[0..6].copy_from_slice(&to_mac);
        frame[6..12].copy_from_slice(&from_mac);
        frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut frame[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&46u16.to_be_bytes());
        ip[8] = 64;
        ip[9] = proxy_common::proto::UDP;
        ip[12..16].copy_from_slice(&source.octets());
        ip[16..20].copy_from_slice(&target.ip().octets());
        let sum = proxy_common::checksum::finish(proxy_common::checksum::partial(
            0,
            <&[u8; 20]>::try_from(&*ip).expect("20 bytes"),
        ));
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let udp = &mut frame[34..42];
        udp[0..2].copy_from_slice(&(40_000 + flow as u16).to_be_bytes());
        udp[2..4].copy_from_slice(&target.port().to_be_bytes());
        udp[4..6].copy_from_slice(&26u16.to_be_bytes());
    }
    let name = std::ffi::CString::new(device).map_err(std::io::Error::other)?;
    // SAFETY: `name` is a valid NUL-terminated string for the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: plain socket(2); protocol 0 receives nothing, the socket only sends.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned from here on.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all zeroes then the fields bind reads.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    address.sll_ifindex = ifindex as i32;
    let one: libc::c_int = 1;
    // SAFETY: the pointers are to live values of the sizes passed.
    let ready = unsafe {
        libc::bind(
            fd,
            (&raw const address).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        ) == 0
            && libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as u32,
            ) == 0
    };
    if !ready {
        return Err(std::io::Error::last_os_error());
    }
    let mut iovs: Vec<libc::iovec> = (0..BATCH)
        .map(|i| libc::iovec {
            iov_base: frames[i % FLOWS].as_mut_ptr().cast(),
            iov_len: frames[i % FLOWS].len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain data; all zeroes is a valid empty header.
    let mut messages: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (m, iov) in messages.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        // SAFETY: `messages` holds BATCH headers, each pointing at one iovec and frame, all
        // alive for the call; the socket is bound, so no address is needed. A full device
        // queue refuses some: the flood goes on.
        unsafe {
            libc::sendmmsg(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                messages.as_mut_ptr(),
                BATCH as u32,
                0,
            )
        };
    }
    Ok(())
}

/// The MAC address of `device` in `netns`.
fn mac_of(netns: &netns::Netns, device: &str) -> anyhow::Result<[u8; 6]> {
    let out = Command::new("ip")
        .args(["-n", netns.name(), "-j", "link", "show", "dev", device])
        .output()
        .context("ip link")?;
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).context("ip -j output")?;
    let text = links[0]["address"].as_str().context("no address in ip -j link")?;
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC {text}"))?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("MAC {text}"))
}

/// The N the NodePort figure runs at: the largest up to 10 000, where kube-proxy's rulesets
/// still load in bounded time.
pub fn nodeport_n(opts: &Opts) -> usize {
    opts.sizes
        .iter()
        .copied()
        .filter(|n| *n <= 10_000)
        .max()
        .unwrap_or(100)
}

/// Figure 5: requests per second from a client outside the node to a NodePort (one new TCP
/// connection per request, as `Connection: close` forces), through our tc programs, kube-proxy's
/// iptables and nftables rulesets with all N Services loaded, and straight to the backend. The
/// target is the last Service with a NodePort: the worst place in iptables' linear
/// KUBE-NODEPORTS chain, as a real cluster's newest Service would be.
fn nodeport_figure(opts: &Opts, results: &mut Results) -> anyhow::Result<()> {
    let n = nodeport_n(opts);
    let target = n.min(rulesets::MAX_NODE_PORTS) - 1;
    let mut svcs = world::services(n, |i, e| {
        if i == target {
            LAB_BACKEND
        } else {
            world::unique_endpoint(i, e)
        }
    });
    let node_port = svcs[target]
        .node_port
        .context("the target Service has a NodePort")?;
    // The packet-rate figure's UDP twin of the target, on the same NodePort number: last in
    // iptables' KUBE-NODEPORTS chain, as the target is.
    let mut udp = svcs[target].clone();
    udp.name = "svc-udp".into();
    udp.vip = Ipv4Addr::from(0x0a60_0000 + 1 + n as u32);
    udp.udp = true;
    svcs.push(udp);
    let url = format!("http://{LAB_NODE_IP}:{node_port}/");
    let direct = format!("http://{LAB_BACKEND}:{BACKEND_PORT}/");
    let (flood_to, flood_direct) = (
        SocketAddr::from((LAB_NODE_IP, node_port)),
        SocketAddr::from((LAB_BACKEND, BACKEND_PORT)),
    );
    let seconds = if opts.quick { 2 } else { 5 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (ipt_text, nft_text) = (rulesets::iptables_full(&svcs), rulesets::nft_full(&svcs));
    let mut runs: [Vec<f64>; 5] = Default::default();
    let mut pps: [Vec<f64>; 5] = Default::default();
    // Rounds interleave the implementations, so drift in the machine's speed hits all alike.
    for _ in 0..opts.repeats {
        let lab = NodeLab::create(&runtime)?;
        runs[0].push(lab.requests_per_second("direct", &direct, seconds)?);
        pps[0].push(lab.packets_per_second("direct", flood_direct, seconds)?);
        drop(lab);

        let lab = NodeLab::create(&runtime)?;
        timed_in(&lab.node, "iptables-restore", &[], &ipt_text)?;
        timed_in(
            &lab.node,
            "iptables-restore",
            &["--noflush"],
            rulesets::iptables_jumps(),
        )?;
        runs[1].push(lab.requests_per_second("iptables", &url, seconds)?);
        pps[1].push(lab.packets_per_second("iptables", flood_to, seconds)?);
        drop(lab);

        let lab = NodeLab::create(&runtime)?;
        timed_in(&lab.node, "nft", &["-f", "-"], &nft_text)?;
        runs[2].push(lab.requests_per_second("nftables", &url, seconds)?);
        pps[2].push(lab.packets_per_second("nftables", flood_to, seconds)?);
        drop(lab);

        // Ours through tc alone, then with native XDP ahead of it.
        for (i, (what, xdp)) in [("ours", "off"), ("xdp", "native")].into_iter().enumerate() {
            let lab = NodeLab::create(&runtime)?;
            // The backend is on "another node" (no nodeName): the flow is SNATed and its
            // replies come back on be0, which therefore carries the programs too.
            let agent = RunningAgent::start(
                &svcs,
                Some(&lab.node),
                &world::Source::Manifests,
                &["--devices", "up0,be0", "--xdp", xdp],
            )?;
            let rate = lab.requests_per_second(what, &url, seconds);
            runs[3 + i].push(rate.with_context(|| format!("agent log:\n{}", agent.log()))?);
            let rate = lab.packets_per_second(what, flood_to, seconds);
            pps[3 + i].push(rate.with_context(|| format!("agent log:\n{}", agent.log()))?);
            drop(agent);
            drop(lab);
        }
    }
    let names = ["direct", "iptables", "nftables", "ours", "xdp"];
    for (name, values) in names.into_iter().zip(runs) {
        results.add("nodeport", name, n, "requests_per_s", median(values), "req/s");
    }
    for (name, values) in names.into_iter().zip(pps) {
        results.add("nodeport", name, n, "packets_per_s", median(values), "pps");
    }
    Ok(())
}

/// Sum of the kernel's `memlock` accounting over the pinned maps (what they really take).
fn map_memlock(pin_dir: &std::path::Path) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for name in proxy_common::maps::ALL {
        let fd = bpf_kube_proxy::datapath::sys::obj_get(&pin_dir.join(name))?;
        total += bpf_kube_proxy::datapath::sys::map_memory(fd.as_fd())? as f64;
    }
    Ok(total)
}

/// Figure 3 (and 6): connect() latency and rate from a client pod to each of N ClusterIPs,
/// through our socket programs, kube-proxy's iptables and nftables rules, and to pod IPs
/// directly. All N Services share the same ten real backend pods, so every connect succeeds.
fn connect_figure(opts: &Opts, results: &mut Results) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let backends: Vec<String> = (0..ENDPOINTS).map(|e| format!("be{e}")).collect();
    let mut pods: Vec<&str> = backends.iter().map(String::as_str).collect();
    pods.push("client");
    let id = unique_suffix();
    let topology = Topology::create(&format!("bkb-{id}"), &pods)?;
    let mut servers = Servers::default();
    {
        let _guard = runtime.enter();
        for b in &backends {
            let netns = &topology.pod(b).expect("pod").netns;
            servers.http(netns, BACKEND_PORT, b)?;
            servers.udp(netns, BACKEND_PORT, b)?;
        }
    }
    let client = topology.pod("client").expect("client pod");
    let pod_ips: Vec<Ipv4Addr> = backends
        .iter()
        .map(|b| topology.pod(b).expect("pod").ipv4)
        .collect();
    let pod_ips6: Vec<IpAddr> = backends
        .iter()
        .map(|b| topology.pod(b).expect("pod").ipv6.into())
        .collect();
    // kube-proxy's DNAT happens after a route lookup for the VIP: pods route it to the node.
    client
        .netns
        .ip(&["route", "add", "10.96.0.0/12", "via", "10.244.0.1"])?;
    let cg = cgroup::ChildCgroup::create(
        &bpf_kube_proxy::datapath::host::cgroup2_root()?,
        &format!("bkb-{id}"),
    )?;

    let direct: Vec<SocketAddr> = pod_ips
        .iter()
        .map(|ip| SocketAddr::from((*ip, BACKEND_PORT)))
        .collect();
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
    for &n in &opts.sizes {
        let svcs = world::services(n, |_, e| pod_ips[e]);
        let vips: Vec<SocketAddr> = svcs.iter().map(|s| SocketAddr::from((s.vip, s.port))).collect();
        // Runs straight to the pods alternate with each proxy's runs, so that drift in the
        // machine's speed hits both sides of every ratio alike. The direct figure is the one
        // taken beside ours, with no kube-proxy rules loaded: those rules slow every new
        // connection of the namespace, direct ones included. Returns the direct runs taken
        // beside the proxy's.
        let measure = |name: &'static str,
                       cgroup: Option<&std::path::Path>,
                       results: &mut Results|
         -> anyhow::Result<Vec<(f64, f64, f64)>> {
            let mut runs = Vec::new();
            let mut direct_runs = Vec::new();
            for _ in 0..opts.repeats {
                direct_runs.push(connect_run(&client.netns, None, &direct, opts.connects)?);
                runs.push(connect_run(&client.netns, cgroup, &vips, opts.connects)?);
            }
            add_connect(results, name, n, &runs);
            Ok(direct_runs)
        };

        // Ours first, on a namespace that has not yet held (and torn down) N Services of rules.
        let mut ours = Ours::load(n)?;
        let (services, slices) = connect_services(&svcs, &pod_ips, &pod_ips6);
        ours.full_sync(&services, &slices)?;
        ours.datapath.attach(cg.path())?;
        let before = prog_stats(ours.pin_dir())?;
        let direct_runs = measure("ours", Some(cg.path()), results)?;
        udp_run(
            &client.netns,
            cg.path(),
            SocketAddr::from((UDP_VIP, UDP_PORT)),
            opts.connects,
        )?;
        let vips6: Vec<SocketAddr> = (0..n).map(|i| SocketAddr::from((world::vip6(i), 80))).collect();
        connect_run(&client.netns, Some(cg.path()), &vips6, opts.connects)?;
        udp_run(
            &client.netns,
            cg.path(),
            SocketAddr::from((UDP_VIP6, UDP_PORT)),
            opts.connects,
        )?;
        let after = prog_stats(ours.pin_dir())?;
        for hook in SOCKET_HOOKS {
            let (Some(&(cnt0, ns0)), Some(&(cnt1, ns1))) = (before.get(hook), after.get(hook)) else {
                continue;
            };
            if cnt1 > cnt0 {
                let cost = (ns1 - ns0) as f64 / (cnt1 - cnt0) as f64;
                results.add("prog_cost", "ours", n, hook, cost, "ns/run");
            }
        }
        drop(ours);
        add_connect(results, "direct", n, &direct_runs);

        kube_proxy_connects(opts, &client.netns, &svcs, n, results, &measure)?;
    }
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
    drop(servers);
    Ok(())
}

/// Measures connects through one implementation (with its cgroup, for ours); returns the
/// direct runs taken beside them.
type Measure<'a> =
    dyn Fn(&'static str, Option<&std::path::Path>, &mut Results) -> anyhow::Result<Vec<(f64, f64, f64)>> + 'a;

/// The connect figure through kube-proxy's iptables and nftables rulesets for `svcs`, each
/// loaded (within the bench's limit) into the client's namespace, measured and removed.
fn kube_proxy_connects(
    opts: &Opts,
    netns: &netns::Netns,
    svcs: &[Svc],
    n: usize,
    results: &mut Results,
    measure: &Measure<'_>,
) -> anyhow::Result<()> {
    let limit = Some(opts.ruleset_limit);
    if timed_within(
        netns,
        "iptables-restore",
        &[],
        &rulesets::iptables_full(svcs),
        limit,
    )?
    .is_some()
    {
        timed_in(
            netns,
            "iptables-restore",
            &["--noflush"],
            rulesets::iptables_jumps(),
        )?;
        measure("iptables", None, results)?;
        timed_in(netns, "iptables-restore", &[], "*nat\nCOMMIT\n*filter\nCOMMIT\n")?;
    } else {
        results.did_not_finish("connect", "iptables", n, opts.ruleset_limit);
    }

    if timed_within(netns, "nft", &["-f", "-"], &rulesets::nft_full(svcs), limit)?.is_some() {
        measure("nftables", None, results)?;
        timed_in(netns, "nft", &["delete", "table", "ip", "kube-proxy"], "")?;
    } else {
        results.did_not_finish("connect", "nftables", n, opts.ruleset_limit);
    }
    Ok(())
}

/// The connect figure's Services: the N TCP Services, one UDP Service beside them so that
/// sendmsg4 and recvmsg4 run too, and the same again over IPv6 (N TCP ClusterIPs and one UDP
/// Service on the pods' IPv6 addresses) so that the six hooks' IPv6 twins are measured at the
/// same N.
fn connect_services(
    svcs: &[Svc],
    pod_ips: &[Ipv4Addr],
    pod_ips6: &[IpAddr],
) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut services: Vec<_> = svcs.iter().map(world::k8s_service).collect();
    let mut slices: Vec<_> = svcs.iter().map(world::k8s_slice).collect();
    let (udp_service, udp_slice) = world::udp_service(UDP_VIP, UDP_PORT, pod_ips);
    services.push(udp_service);
    slices.push(udp_slice);
    for i in 0..svcs.len() {
        let (service, slice) =
            world::cluster_ip_service(&format!("svc6-{i}"), world::vip6(i).into(), (80, "TCP"), pod_ips6);
        services.push(service);
        slices.push(slice);
    }
    let (udp6_service, udp6_slice) =
        world::cluster_ip_service("udp6", UDP_VIP6.into(), (UDP_PORT, "UDP"), pod_ips6);
    services.push(udp6_service);
    slices.push(udp6_slice);
    (services, slices)
}

/// Medians over runs of (p50, p99, rate).
fn add_connect(results: &mut Results, name: &'static str, n: usize, runs: &[(f64, f64, f64)]) {
    results.add(
        "connect",
        name,
        n,
        "p50",
        median(runs.iter().map(|r| r.0).collect()),
        "us",
    );
    results.add(
        "connect",
        name,
        n,
        "p99",
        median(runs.iter().map(|r| r.1).collect()),
        "us",
    );
    results.add(
        "connect",
        name,
        n,
        "rate",
        median(runs.iter().map(|r| r.2).collect()),
        "conn/s",
    );
}

/// The socket programs (`bkp_` + hook) whose cost per run is reported: those the connect
/// figure's TCP connects (with getpeername) and UDP datagrams run, over IPv4 and IPv6.
pub const SOCKET_HOOKS: [&str; 8] = [
    "connect4", "getpeer4", "sendmsg4", "recvmsg4", "connect6", "getpeer6", "sendmsg6", "recvmsg6",
];

/// The UDP Service of the connect figure, outside the N Services' VIPs.
const UDP_VIP: Ipv4Addr = Ipv4Addr::new(10, 111, 255, 1);
/// Its IPv6 twin, outside the IPv6 Services' VIPs.
const UDP_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0xffff, 1);
const UDP_PORT: u16 = 53;

/// run_cnt and run_time_ns of each socket program behind the pinned links, from bpftool.
fn prog_stats(pin_dir: &std::path::Path) -> anyhow::Result<BTreeMap<&'static str, (u64, u64)>> {
    let mut stats = BTreeMap::new();
    let Some(links) = std::fs::read_dir(pin_dir.join("links"))?.flatten().next() else {
        return Ok(stats);
    };
    for hook in SOCKET_HOOKS {
        let out = Command::new("bpftool")
            .args(["-j", "link", "show", "pinned"])
            .arg(links.path().join(format!("bkp_{hook}")))
            .output()?;
        let link: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let Some(prog_id) = link["prog_id"].as_u64() else {
            continue;
        };
        let out = Command::new("bpftool")
            .args(["-j", "prog", "show", "id", &prog_id.to_string()])
            .output()?;
        let prog: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        // bpftool leaves both out while they are zero.
        stats.insert(
            hook,
            (
                prog["run_cnt"].as_u64().unwrap_or(0),
                prog["run_time_ns"].as_u64().unwrap_or(0),
            ),
        );
    }
    Ok(stats)
}

/// Runs `udp-loop` in `netns` and `cgroup`: `count` datagrams to `target`, each answered.
fn udp_run(
    netns: &netns::Netns,
    cgroup: &std::path::Path,
    target: SocketAddr,
    count: usize,
) -> anyhow::Result<()> {
    let status = Command::new(std::env::current_exe()?)
        .arg("udp-loop")
        .arg(netns.path())
        .arg(count.to_string())
        .arg(cgroup)
        .arg(target.to_string())
        .status()?;
    anyhow::ensure!(status.success(), "udp-loop failed");
    Ok(())
}

/// The UDP client: an unconnected socket in the cgroup and namespace sends each datagram with
/// sendto() and reads its answer with recvfrom(), as a resolver does; fails unless nearly all
/// are answered, so a figure is never taken over packets that went nowhere.
pub fn udp_loop() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let [ns, count, cg, target] = &args[..] else {
        anyhow::bail!("udp-loop NETNS COUNT CGROUP TARGET");
    };
    cgroup::join(std::path::Path::new(cg))?;
    netns::enter(std::path::Path::new(ns))?;
    let count: usize = count.parse()?;
    let target: SocketAddr = target.parse()?;
    let socket = std::net::UdpSocket::bind(if target.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" })?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = [0u8; 1500];
    let mut answered = 0;
    for _ in 0..count {
        socket.send_to(b"bench", target)?;
        if let Ok((_, from)) = socket.recv_from(&mut buf) {
            anyhow::ensure!(from == target, "answer from {from}, not from {target}");
            answered += 1;
        }
    }
    anyhow::ensure!(
        answered * 10 >= count * 9,
        "only {answered} of {count} datagrams answered"
    );
    Ok(())
}

/// Runs `connect-loop` in `netns` (and `cgroup`) over `targets`; (p50 µs, p99 µs, conn/s).
fn connect_run(
    netns: &netns::Netns,
    cgroup: Option<&std::path::Path>,
    targets: &[SocketAddr],
    count: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("connect-loop").arg(netns.path()).arg(count.to_string());
    cmd.arg(cgroup.map_or_else(|| "-".into(), |c| c.display().to_string()));
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    {
        let mut stdin = child.stdin.take().expect("piped");
        for t in targets {
            writeln!(stdin, "{t}")?;
        }
    }
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "connect-loop failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let get = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok((get("p50_us"), get("p99_us"), get("rate")))
}

/// The client: joins the cgroup (if any) and the network namespace, then connects to the
/// targets read from stdin round robin, closing each connection with RST (SO_LINGER 0) so no
/// TIME_WAIT piles up; prints latency percentiles and the rate as JSON.
pub fn connect_loop() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let [ns, count, cg] = &args[..] else {
        anyhow::bail!("connect-loop NETNS COUNT CGROUP|-");
    };
    if cg != "-" {
        cgroup::join(std::path::Path::new(cg))?;
    }
    netns::enter(std::path::Path::new(ns))?;
    let count: usize = count.parse()?;
    let targets: Vec<SocketAddr> = std::io::stdin()
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    anyhow::ensure!(!targets.is_empty(), "no targets");
    // Warm-up: caches, neighbour entries, conntrack and the programs' first runs.
    for t in targets.iter().take(200) {
        let _ = TcpStream::connect_timeout(t, Duration::from_secs(1));
    }
    let mut latencies = Vec::with_capacity(count);
    let started = Instant::now();
    for k in 0..count {
        let target = targets[(k * 104_729) % targets.len()];
        let t0 = Instant::now();
        let stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))
            .with_context(|| format!("connect to {target}"))?;
        latencies.push(t0.elapsed().as_secs_f64() * 1e6);
        // What an application asking whom it reached does (runs getpeername4 with our hooks).
        stream.peer_addr()?;
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::Linger, &linger)?;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    let p50 = percentile(&mut latencies, 50.0);
    let p99 = percentile(&mut latencies, 99.0);
    println!(
        "{}",
        serde_json::json!({"p50_us": p50, "p99_us": p99, "rate": rate})
    );
    Ok(())
}
