//! The `bkp-sandbox` binary: the demo, and the tools the privileged tests run inside the
//! sandbox's namespaces and cgroup. It drives the `bpf-kube-proxy` binary built beside it.

mod demo;

use std::{os::unix::process::CommandExt as _, path::PathBuf};

use anyhow::Context as _;
use bkp_sandbox::{
    cgroup, netns,
    probe::{self, ProbeArgs},
};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "bkp-sandbox",
    version,
    about = "bpf-kube-proxy's sandbox: the demo, and probes from inside its namespaces"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build a throw-away sandbox, run the agent in it and show Service traffic being balanced.
    Demo(demo::DemoArgs),
    /// Connect to a Service from a cgroup and network namespace, as a workload there would.
    Probe(ProbeArgs),
    /// Run a command inside a cgroup and a network namespace (nsenter --net, plus the cgroup).
    Exec {
        #[arg(long)]
        cgroup: PathBuf,
        /// Network namespace path, such as /run/netns/NAME.
        #[arg(long)]
        netns: PathBuf,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        // Before any thread or runtime exists: these join a cgroup and a netns.
        Command::Probe(args) => probe::run(&args).context("probe")?,
        Command::Exec {
            cgroup,
            netns,
            command,
        } => {
            cgroup::join(&cgroup).with_context(|| format!("joining {}", cgroup.display()))?;
            netns::enter(&netns).with_context(|| format!("entering {}", netns.display()))?;
            // exec only returns on failure.
            let err = std::process::Command::new(&command[0]).args(&command[1..]).exec();
            return Err(err).with_context(|| format!("running {}", command[0]));
        }
        Command::Demo(args) => {
            bpf_kube_proxy::telemetry::logging::init();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?
                .block_on(demo::run(args))?;
        }
    }
    Ok(())
}
