//! `cargo xtask bench`: bpf-kube-proxy side by side with the rulesets kube-proxy's iptables and
//! nftables modes program for the same Services, and with no proxy at all, measured in one run
//! on one machine so that the ratios mean something even where the absolute figures do not.
//! Results go to bench/results/*.json, one PNG plot per figure, and BENCHMARKS.md.

mod figures;
mod report;
mod rulesets;
mod world;

use std::path::PathBuf;

#[derive(Debug)]
pub struct Opts {
    pub quick: bool,
    pub out: PathBuf,
    pub sizes: Vec<usize>,
    /// Repeats per measurement (the median is reported).
    pub repeats: usize,
    pub connects: usize,
    pub changes: usize,
}

fn parse_opts() -> anyhow::Result<Opts> {
    let mut quick = false;
    let mut out = PathBuf::from("bench/results");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--out" => {
                out = args
                    .next()
                    .map(PathBuf::from)
                    .ok_or_else(|| anyhow::anyhow!("--out DIR"))?
            }
            other => anyhow::bail!("unknown argument {other:?} (expected --quick, --out DIR)"),
        }
    }
    Ok(if quick {
        Opts {
            quick,
            out,
            sizes: vec![100, 1000],
            repeats: 1,
            connects: 1000,
            changes: 30,
        }
    } else {
        Opts {
            quick,
            out,
            sizes: vec![100, 1000, 10_000],
            repeats: 3,
            connects: 4000,
            changes: 200,
        }
    })
}

fn main() -> anyhow::Result<()> {
    // Re-executed as the client of the connect figure, inside a cgroup and network namespace.
    if std::env::args().nth(1).as_deref() == Some("connect-loop") {
        return figures::connect_loop();
    }
    let opts = parse_opts()?;
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the benchmark loads eBPF programs and iptables rules in namespaces it creates: run it as root"
    );
    std::fs::create_dir_all(&opts.out)?;
    let results = figures::run_all(&opts)?;
    report::write(&opts, &results)?;
    Ok(())
}
