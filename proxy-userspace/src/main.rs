//! The `bpf-kube-proxy` binary: the agent and its tools.

mod cli;

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use bpf_kube_proxy::{
    agent::{self, AgentOptions, ExternalOptions},
    config::{self, ProxyConfig},
    datapath::{features::TcAttach, host, loader},
    node::devices::Devices,
    node::nodeport::NodePortAddresses,
    pipeline::translate::TranslateOptions,
    telemetry::metrics::Metrics,
};
use clap::{Parser, Subcommand};

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/bpf-kube-proxy";

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
    Run(Box<RunArgs>),
    /// Show what the pinned maps hold: frontends and their backends.
    List {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: cli::list::Format,
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

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// A kube-proxy KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1). Flags given
    /// on the command line override its values; fields that do not apply are reported once.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Health server (/healthz, /livez), as kube-proxy's flag; "" turns it off
    /// [default: 0.0.0.0:10256].
    #[arg(long)]
    healthz_bind_address: Option<String>,
    /// Metrics server (/metrics, /proxyMode), as kube-proxy's flag; "" turns it off
    /// [default: 127.0.0.1:10249].
    #[arg(long)]
    metrics_bind_address: Option<String>,
    /// Full sync at least this often (e.g. 30s, 1m); /healthz fails when a change waits for
    /// twice as long [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration)]
    sync_period: Option<Duration>,
    /// Read Services, EndpointSlices (and this node's Node) from YAML/JSON files, one file
    /// or a directory, instead of the API server. Changes are picked up as they happen.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// kubeconfig for the API server (default: in-cluster config, then KUBECONFIG, then
    /// ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// cgroup v2 directory whose processes get socket load balancing (default: the root of the
    /// cgroup2 mount, i.e. the whole node).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Directory on bpffs for pinned maps and links (mounted at /sys/fs/bpf if absent).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// This node's name, for traffic policies and topology (default: the hostname).
    #[arg(long, env = "NODE_NAME")]
    hostname_override: Option<String>,
    /// Also serve Services labelled service.kubernetes.io/service-proxy-name=<this>.
    #[arg(long)]
    service_proxy_name: Option<String>,
    /// With --manifests: re-read at least this often (seconds), in case a file event was missed
    /// [default: 10, or the config file's configSyncPeriod].
    #[arg(long)]
    resync_seconds: Option<u64>,
    /// Capacity of the services maps (frontend entries plus one per backend slot).
    #[arg(long, default_value_t = proxy_common::maps::capacity::SERVICES)]
    map_size_services: u32,
    /// Capacity of the backends maps.
    #[arg(long, default_value_t = proxy_common::maps::capacity::BACKENDS)]
    map_size_backends: u32,
    /// Capacity of the reverse-NAT maps (one entry per frontend).
    #[arg(long, default_value_t = proxy_common::maps::capacity::REV_NAT)]
    map_size_rev_nat: u32,
    /// Capacity of the socket reverse-NAT LRU maps.
    #[arg(long, default_value_t = proxy_common::maps::capacity::SOCK_REV)]
    map_size_sock_rev: u32,
    /// Capacity of the session affinity LRU map (one entry per client and frontend in use).
    #[arg(long, default_value_t = proxy_common::maps::capacity::AFFINITY)]
    map_size_affinity: u32,
    /// Capacity of the tc path's conntrack LRU map (two entries per flow).
    #[arg(long, default_value_t = proxy_common::maps::capacity::CONNTRACK)]
    map_size_conntrack: u32,
    /// Devices that carry NodePort, LoadBalancer and externalIP traffic from outside the node,
    /// and every device through which backends on other nodes are reached (their replies come
    /// back there): "auto" (devices with a global address, tunnels included, minus per-pod
    /// plumbing), a comma-separated list, or "none" (the socket hooks alone: only this node's
    /// own clients are served).
    #[arg(long, default_value = "none")]
    devices: Devices,
    /// How the tc programs attach to --devices: "tcx" links (Linux 6.6+), "netlink" cls_bpf
    /// filters on a clsact qdisc (any kernel), or "auto": TCX where the kernel has it.
    #[arg(long, default_value = "auto")]
    tc_attach: TcAttach,
    /// kube-proxy's nodePortAddresses: CIDRs whose node addresses serve NodePorts, or
    /// "primary" (default: every node address, and 127.0.0.1 for the node's own clients).
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Option<Vec<String>>,
    /// The node's primary address(es), one per family: SNAT source for traffic sent to
    /// other nodes' backends (default: the first address of the first device).
    #[arg(long, value_delimiter = ',')]
    node_ip: Vec<std::net::IpAddr>,
    /// Idle TCP flows in the tc path's conntrack expire after this [default: 24h, or the
    /// config file's conntrack.tcpEstablishedTimeout].
    #[arg(long, value_parser = humantime::parse_duration)]
    conntrack_tcp_timeout_established: Option<Duration>,
    /// Idle UDP flows in the tc path's conntrack expire after this [default: 120s, or the
    /// config file's conntrack.udpTimeout].
    #[arg(long, value_parser = humantime::parse_duration)]
    conntrack_udp_timeout: Option<Duration>,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Escape codes only for a terminal: log files and `kubectl logs` stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

const DEFAULT_HEALTHZ_BIND_ADDRESS: &str = "0.0.0.0:10256";
const DEFAULT_METRICS_BIND_ADDRESS: &str = "127.0.0.1:10249";
const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);
const DEFAULT_RESYNC: Duration = Duration::from_secs(10);

fn read_config(path: &std::path::Path) -> anyhow::Result<ProxyConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let config = config::parse(&text).with_context(|| format!("invalid config file {}", path.display()))?;
    for line in &config.ignored {
        tracing::warn!(file = %path.display(), "{line}");
    }
    Ok(config)
}

/// A bind address from its flag, else the config file, else kube-proxy's default.
fn bind_address(
    flag: &str,
    from_flag: Option<String>,
    from_file: Option<Option<std::net::SocketAddr>>,
    default: &str,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    match (from_flag, from_file) {
        (Some(text), _) => Ok(config::parse_bind_address(flag, &text)?),
        (None, Some(addr)) => Ok(addr),
        (None, None) => Ok(config::parse_bind_address(flag, default)?),
    }
}

fn run_agent(args: RunArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => read_config(path)?,
        None => ProxyConfig::default(),
    };
    let node_name = match args.hostname_override.or(file.hostname_override) {
        Some(name) => name,
        None => nix::unistd::gethostname()
            .context("reading the hostname (or pass --hostname-override)")?
            .to_string_lossy()
            .into_owned(),
    };
    let cgroup = match args.cgroup {
        Some(path) => path,
        None => host::cgroup2_root()?,
    };
    let sync_period = args
        .sync_period
        .or(file.sync_period)
        .unwrap_or(DEFAULT_SYNC_PERIOD);
    let opts = AgentOptions {
        pin_dir: args.pin_dir,
        cgroup,
        node_name,
        source: match args.manifests {
            Some(path) => agent::SourceConfig::Manifests(path),
            None => agent::SourceConfig::Kubernetes {
                kubeconfig: args.kubeconfig.or(file.kubeconfig),
            },
        },
        map_sizes: loader::MapSizes {
            services: args.map_size_services,
            backends: args.map_size_backends,
            rev_nat: args.map_size_rev_nat,
            sock_rev: args.map_size_sock_rev,
            affinity: args.map_size_affinity,
            conntrack: args.map_size_conntrack,
        },
        translate: TranslateOptions {
            service_proxy_name: args.service_proxy_name,
        },
        resync_period: args
            .resync_seconds
            .map(|s| Duration::from_secs(s.max(1)))
            .or(file.config_sync_period)
            .unwrap_or(DEFAULT_RESYNC),
        sync_period,
        healthz_addr: bind_address(
            "--healthz-bind-address",
            args.healthz_bind_address,
            file.healthz_bind_address,
            DEFAULT_HEALTHZ_BIND_ADDRESS,
        )?,
        metrics_addr: bind_address(
            "--metrics-bind-address",
            args.metrics_bind_address,
            file.metrics_bind_address,
            DEFAULT_METRICS_BIND_ADDRESS,
        )?,
        external: ExternalOptions {
            devices: args.devices,
            tc_attach: args.tc_attach,
            node_port_addresses: NodePortAddresses::parse(
                &args
                    .nodeport_addresses
                    .or(file.node_port_addresses)
                    .unwrap_or_default(),
            )
            .map_err(|e| anyhow::anyhow!("--nodeport-addresses: {e}"))?,
            node_ips: args.node_ip,
            ct_tcp_timeout: args
                .conntrack_tcp_timeout_established
                .or(file.conntrack_tcp_timeout)
                .unwrap_or(agent::DEFAULT_CT_TCP_TIMEOUT),
            ct_udp_timeout: args
                .conntrack_udp_timeout
                .or(file.conntrack_udp_timeout)
                .unwrap_or(agent::DEFAULT_CT_UDP_TIMEOUT),
        },
    };
    runtime()?.block_on(agent::run(opts, Metrics::new()))?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            init_logging();
            run_agent(*args)?;
        }
        Command::List { pin_dir, output } => cli::list::run(&pin_dir, output)?,
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
            init_logging();
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
