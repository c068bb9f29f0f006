//! `cargo xtask bench`: bpf-kube-proxy side by side with the rulesets kube-proxy's iptables and
//! nftables modes program for the same Services, and with no proxy at all, measured in one run
//! on one machine so that the ratios mean something even where the absolute figures do not.
//! Results go to bench/results/*.json, one PNG plot per figure, and BENCHMARKS.md.

mod figures;
mod maglev;
mod report;
mod rulesets;
mod world;

use std::path::PathBuf;

#[derive(Debug)]
pub struct Opts {
    pub quick: bool,
    pub out: PathBuf,
    /// Where the Markdown summary goes: the committed BENCHMARKS.md only for a full run, so that
    /// a quick or partial run never overwrites the published figures.
    pub summary: PathBuf,
    pub sizes: Vec<usize>,
    /// Repeats per measurement (the median is reported).
    pub repeats: usize,
    pub connects: usize,
    pub changes: usize,
    /// How long a kube-proxy ruleset may take to load before its figure is marked "did not
    /// finish" (at N = 100 000 they take far longer than a bench can wait).
    pub ruleset_limit: std::time::Duration,
    /// Only these figure groups (`sync`, `memory`, `tc`, `connect`, `nodeport`, `maglev`); all
    /// when empty.
    pub only: Vec<String>,
}

impl Opts {
    pub fn wants(&self, group: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == group)
    }
}

#[derive(clap::Parser)]
#[command(about = "bpf-kube-proxy beside kube-proxy's iptables and nftables rulesets")]
struct Args {
    /// N = 100 and 1 000, one repeat: minutes, for CI.
    #[arg(long)]
    quick: bool,
    /// Results folder; by default bench/results for a full run, bench/results/quick or
    /// bench/results/partial (both ignored by git) otherwise.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override the Service counts (e.g. 10000), for profiling one size.
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<usize>>,
    /// Only these figure groups: sync, memory, tc, connect, nodeport, maglev (all by default).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

fn parse_opts() -> Opts {
    let args = <Args as clap::Parser>::parse();
    let (sizes, repeats, connects, changes) = if args.quick {
        (vec![100, 1000], 1, 1000, 30)
    } else {
        (vec![100, 1000, 10_000, 100_000], 3, 4000, 200)
    };
    let full = !args.quick && args.sizes.is_none() && args.only.is_empty();
    let out = args.out.unwrap_or_else(|| match (full, args.quick) {
        (true, _) => "bench/results".into(),
        (false, true) => "bench/results/quick".into(),
        (false, false) => "bench/results/partial".into(),
    });
    let summary = if full {
        "BENCHMARKS.md".into()
    } else {
        out.join("BENCHMARKS.md")
    };
    Opts {
        quick: args.quick,
        out,
        summary,
        sizes: args.sizes.unwrap_or(sizes),
        repeats,
        connects,
        changes,
        ruleset_limit: std::time::Duration::from_secs(120),
        only: args.only,
    }
}

fn main() -> anyhow::Result<()> {
    // Re-executed as a client of the connect figure, inside a cgroup and network namespace.
    match std::env::args().nth(1).as_deref() {
        Some("connect-loop") => return figures::connect_loop(),
        Some("udp-loop") => return figures::udp_loop(),
        _ => {}
    }
    let opts = parse_opts();
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the benchmark loads eBPF programs and iptables rules in namespaces it creates: run it as root"
    );
    std::fs::create_dir_all(&opts.out)?;
    let results = figures::run_all(&opts)?;
    report::write(&opts, &results)?;
    Ok(())
}
