//! The `bpf-kube-proxy` binary: the agent and its tools.

mod cli;

use std::path::PathBuf;

use anyhow::Context as _;
use bpf_kube_proxy::{
    agent,
    config::{self, DEFAULT_PIN_DIR, RunFlags},
    datapath::loader,
    telemetry::{logging, metrics::Metrics},
};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "bpf-kube-proxy",
    version,
    about = "Kubernetes Service load balancing in eBPF: a kube-proxy replacement"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: keep the eBPF datapath in sync with Services and EndpointSlices.
    Run(Box<RunFlags>),
    /// Show what the pinned maps hold: frontends and their backends (with --maps: each map's
    /// entries, capacity and kernel memory).
    List {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: cli::list::Format,
        /// Each pinned map's entries, capacity and kernel memory instead of the Services.
        #[arg(long)]
        maps: bool,
    },
    /// Show one Service's frontends and backends as the pinned maps hold them.
    Get {
        /// NAMESPACE/NAME
        service: String,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: cli::list::Format,
    },
    /// Show a Service's desired state (from manifests or the API server) beside what the maps
    /// hold, naming every difference.
    Explain {
        /// NAMESPACE/NAME
        service: String,
        #[command(flatten)]
        source: cli::inspect::ExplainSource,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: cli::list::Format,
    },
    /// Decode every entry of one pinned map (bkp_svc_v4, bkp_be_v4, bkp_affinity, ...).
    Dump {
        map: String,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: cli::list::Format,
    },
    /// Remove the datapath (detach the programs, delete the pinned maps); for uninstalling.
    /// Run it in the agent's network namespace: netlink tc filters (kernels without TCX) are
    /// found by device name.
    Cleanup {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn run_agent(flags: RunFlags) -> anyhow::Result<()> {
    let opts = config::load(flags)?;
    runtime()?.block_on(agent::run(opts, Metrics::new()))?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            logging::init();
            run_agent(*args)?;
        }
        Command::List {
            pin_dir,
            output,
            maps,
        } => cli::list::run(&pin_dir, output, maps)?,
        Command::Get {
            service,
            pin_dir,
            output,
        } => cli::inspect::get(&pin_dir, &service, output)?,
        Command::Explain {
            service,
            source,
            pin_dir,
            output,
        } => {
            logging::init();
            runtime()?.block_on(cli::inspect::explain(&pin_dir, &service, &source, output))?;
        }
        Command::Dump { map, pin_dir, output } => cli::inspect::dump(&pin_dir, &map, output)?,
        Command::Cleanup { pin_dir } => {
            let done =
                loader::cleanup(&pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
            if done.removed {
                println!(
                    "removed {} (programs detached, {} tc attachments removed, maps deleted)",
                    pin_dir.display(),
                    done.tc_detached
                );
            } else {
                println!("nothing to remove at {}", pin_dir.display());
            }
            for left in &done.tc_left {
                eprintln!("{left}");
            }
        }
    }
    Ok(())
}
