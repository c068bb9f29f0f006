//! `cargo xtask <task>`: everything a fresh machine needs, in one place.
//!
//! `setup` is idempotent and quick when done: it installs only what is missing (Debian
//! packages, nightly's rust-src, a bpf-linker built against nightly's own LLVM, cargo-nextest,
//! cargo-fuzz).
//! Every other task runs it first.

mod fuzz;
mod setup;
mod vmtest;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "bpf-kube-proxy project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent).
    Setup {
        /// Only what building needs (nightly rust-src, bpf-linker): for container builds.
        #[arg(long)]
        toolchain_only: bool,
    },
    /// Build the eBPF programs and the agent.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// rustfmt and clippy (warnings are errors).
    Lint,
    /// Unit tests, then the demo and the privileged integration tests on this machine's kernel
    /// and in a Linux 6.1 VM (root).
    Test {
        /// Only the unit tests (no root needed).
        #[arg(long)]
        unit: bool,
        /// Extra arguments for cargo nextest (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The demo and the privileged integration tests per kernel, in a VM for 6.1 (root).
    Vmtest {
        /// `6.1` boots Debian 12's LTS kernel with virtme-ng; `host` runs on this machine.
        #[arg(long, value_enum, default_value = "6.1")]
        kernel: vmtest::Kernel,
        /// Extra arguments for cargo nextest (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build and run the self-contained demo (root).
    Demo,
    /// The cargo-fuzz targets (manifests, translate, planner, config), each for a set time;
    /// fails on a crash. Needs nightly (cargo-fuzz is installed by setup).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Benchmarks beside kube-proxy's iptables and nftables rulesets (root): figures in
    /// bench/results/, summary in BENCHMARKS.md.
    Bench {
        /// Small N and one repeat, for CI; writes bench/results/quick/ instead.
        #[arg(long)]
        quick: bool,
        /// Further arguments for the bench binary after `--` (e.g. `--sizes 10000 --only sync`,
        /// which write to bench/results/partial/).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Runs a command from the workspace root, failing with its command line if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    cmd.current_dir(workspace_root());
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("{what} loads eBPF programs and creates network namespaces: run it as root");
    }
    Ok(())
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--workspace", "--all-targets", "--exclude", "proxy-ebpf"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup { toolchain_only: true } => setup::toolchain().map(drop),
        Task::Setup {
            toolchain_only: false,
        } => setup::all(),
        Task::Build { release } => {
            setup::all()?;
            build(release)
        }
        Task::Lint => {
            setup::all()?;
            run(cargo().args(["fmt", "--all", "--check"]))?;
            run(cargo().args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--check"]))?;
            run(cargo()
                .args([
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--exclude",
                    "proxy-ebpf",
                ])
                .args(["--", "-D", "warnings"]))?;
            // The fuzz targets' entry points, which the product build leaves out.
            run(cargo()
                .args([
                    "clippy",
                    "--package",
                    "proxy-userspace",
                    "--lib",
                    "--features",
                    "fuzzing",
                ])
                .args(["--", "-D", "warnings"]))?;
            // The programs only build for BPF, with nightly and build-std.
            run(Command::new("cargo")
                .args(["+nightly", "clippy", "--package", "proxy-ebpf", "--release"])
                .args([
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--",
                    "-D",
                    "warnings",
                ]))
        }
        Task::Test { unit, args } => {
            setup::all()?;
            build(false)?;
            run(cargo()
                .args(["nextest", "run", "--workspace", "--no-fail-fast"])
                .args(["--exclude", "integration-tests", "--exclude", "proxy-ebpf"])
                .args(&args))?;
            if unit {
                return Ok(());
            }
            require_root("the integration tests")?;
            vmtest::run_suite(vmtest::Kernel::All, &args)
        }
        Task::Vmtest { kernel, args } => {
            require_root("the integration tests")?;
            setup::all()?;
            build(false)?;
            vmtest::run_suite(kernel, &args)
        }
        Task::Bench { quick, args } => {
            require_root("the benchmark")?;
            setup::all()?;
            run(cargo().args([
                "build",
                "--release",
                "--package",
                "proxy-userspace",
                "--package",
                "bench",
                "--bin",
                "bpf-kube-proxy",
                "--bin",
                "bench",
            ]))?;
            let target = workspace_root().join("target/release");
            let mut bench = Command::new(target.join("bench"));
            bench.env("BKP_BIN", target.join("bpf-kube-proxy"));
            if quick {
                bench.arg("--quick");
            }
            run(bench.args(args))
        }
        Task::Fuzz { seconds, target } => {
            let targets: Vec<&str> = match &target {
                Some(t) => {
                    fuzz::check_target(t)?;
                    vec![t.as_str()]
                }
                None => fuzz::TARGETS.to_vec(),
            };
            setup::all()?;
            fuzz::run(seconds, &targets)
        }
        Task::Demo => {
            require_root("the demo")?;
            setup::all()?;
            build(false)?;
            run(Command::new(workspace_root().join("target/debug/bkp-sandbox")).arg("demo"))
        }
    }
}
