//! The agent's settings: `run`'s flags ([`RunFlags`]) over a config file over kube-proxy's
//! defaults, resolved into [`AgentOptions`].
//!
//! `--config FILE`: a kube-proxy `KubeProxyConfiguration` (kubeproxy.config.k8s.io/v1alpha1),
//! read as-is so an existing kube-proxy ConfigMap can be reused.
//!
//! Fields that mean something here are honoured; fields of kube-proxy's other modes (iptables,
//! IPVS, nftables, Windows) or of datapath parts this proxy does not have are accepted and
//! reported once each, when set to a non-zero value. Anything else is an error, as kube-proxy's
//! strict decoding makes it, so a typo is never silently ignored.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use proxy_common::maglev;
use serde_json::{Map, Value};

use crate::{
    datapath::{
        features::{TcAttach, XdpAttach},
        host::{self, HostError},
        sizing::{self, FixedSizes, MapSizing},
    },
    node::{
        devices::Devices,
        external::{DEFAULT_CT_TCP_TIMEOUT, DEFAULT_CT_UDP_TIMEOUT, ExternalOptions},
        nodeport::NodePortAddresses,
    },
    pipeline::{model::LbAlgorithm, translate::TranslateOptions},
};

pub(crate) const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub(crate) const KIND: &str = "KubeProxyConfiguration";

/// What the file sets. `None`: not set (a flag or the default applies).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProxyConfig {
    pub kubeconfig: Option<PathBuf>,
    pub hostname_override: Option<String>,
    /// `Some(None)`: set to "" (server off).
    pub(crate) healthz_bind_address: Option<Option<SocketAddr>>,
    pub(crate) metrics_bind_address: Option<Option<SocketAddr>>,
    pub(crate) sync_period: Option<Duration>,
    pub(crate) config_sync_period: Option<Duration>,
    /// `nodePortAddresses`: CIDRs or `primary`.
    pub node_port_addresses: Option<Vec<String>>,
    /// `conntrack.tcpEstablishedTimeout`: lifetime of an idle TCP flow in the tc path.
    pub(crate) conntrack_tcp_timeout: Option<Duration>,
    /// `conntrack.udpTimeout`: lifetime of an idle UDP flow in the tc path.
    pub(crate) conntrack_udp_timeout: Option<Duration>,
    /// `bpfKubeProxy.mapDynamicSizeRatio` (not a kube-proxy field).
    pub(crate) map_dynamic_size_ratio: Option<f64>,
    /// `bpfKubeProxy.mapDynamicSizeMemory`: the node memory the ratio applies to.
    pub(crate) map_dynamic_size_memory: Option<u64>,
    /// `bpfKubeProxy.mapSize.*` (not kube-proxy fields).
    pub(crate) map_size: FixedSizes,
    /// `bpfKubeProxy.lbAlgorithm`.
    pub(crate) lb_algorithm: Option<LbAlgorithm>,
    /// `bpfKubeProxy.maglev.tableSize`.
    pub(crate) maglev_table_size: Option<u32>,
    /// `bpfKubeProxy.maglev.hashSeed`.
    pub(crate) maglev_hash_seed: Option<u32>,
    /// `bpfKubeProxy.xdp`, as `--xdp`.
    pub(crate) xdp: Option<XdpAttach>,
    /// One line per ignored field, for the caller to log.
    pub ignored: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("not YAML or JSON: {0}")]
    Syntax(String),
    #[error("apiVersion must be {API_VERSION}, not {0:?}")]
    ApiVersion(String),
    #[error("kind must be {KIND}, not {0:?}")]
    Kind(String),
    #[error("{field}: {problem}")]
    Field { field: String, problem: String },
    #[error("unknown field {0:?}")]
    Unknown(String),
}

fn field_error(field: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.into(),
        problem: problem.into(),
    }
}

/// kube-proxy's fields that have no meaning here, with the reason shown to the operator.
const IGNORED: &[(&str, &str)] = &[
    ("featureGates", "feature gates are kube-proxy's"),
    ("bindAddressHardFail", "bind failures always stop the agent"),
    ("enableProfiling", "no pprof endpoint"),
    ("showHiddenMetricsForVersion", "no hidden metrics"),
    ("mode", "the mode is always ebpf"),
    ("ipvs", "IPVS mode only"),
    ("winkernel", "Windows only"),
    ("windows", "Windows only"),
    (
        "detectLocalMode",
        "socket-level balancing never masquerades pod traffic",
    ),
    (
        "detectLocal",
        "socket-level balancing never masquerades pod traffic",
    ),
    ("oomScoreAdj", "set it in the DaemonSet"),
    ("portRange", "userspace proxy only"),
    ("logging", "use RUST_LOG"),
    ("bindAddress", "the datapath is always dual-stack"),
    (
        "clusterCIDR",
        "the tc datapath masquerades by backend locality, not by pod CIDR",
    ),
    ("minSyncPeriod", "every change is synced at once"),
];

/// Sections whose one honoured field is `syncPeriod`; the rest is ignored field by field.
const MODE_SECTIONS: &[&str] = &["iptables", "nftables", "linux"];

fn is_zero(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty() || humantime::parse_duration(s).is_ok_and(|d| d.is_zero()),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_zero),
    }
}

/// Reports `path` (and, for objects, each non-zero leaf) as ignored.
fn ignore(path: &str, value: &Value, why: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(fields) if !fields.is_empty() => {
            for (key, inner) in fields {
                ignore(&format!("{path}.{key}"), inner, why, out);
            }
        }
        v if !is_zero(v) => out.push(format!("{path} is ignored: {why}")),
        _ => {}
    }
}

fn string(field: &str, value: &Value) -> Result<Option<String>, ConfigError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        other => Err(field_error(field, format!("expected a string, got {other}"))),
    }
}

/// Go duration text (`30s`, `1m0s`); zero means unset, as kube-proxy's defaulting reads it.
fn duration(field: &str, value: &Value) -> Result<Option<Duration>, ConfigError> {
    let parsed = string(field, value)?
        .map(|s| humantime::parse_duration(&s).map_err(|e| field_error(field, format!("{s:?}: {e}"))))
        .transpose()?;
    Ok(parsed.filter(|d| !d.is_zero()))
}

/// kube-proxy's `IP:port` bind addresses, as in the config file and the flags; "" turns the
/// server off.
pub(crate) fn parse_bind_address(field: &str, text: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| field_error(field, format!("{text:?} is not IP:port")))
}

fn strings(field: &str, value: &Value) -> Result<Option<Vec<String>>, ConfigError> {
    match value {
        Value::Null => Ok(None),
        Value::Array(items) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| field_error(field, format!("expected strings, got {v}")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        other => Err(field_error(field, format!("expected a list, got {other}"))),
    }
}

fn bind_address(field: &str, value: &Value) -> Result<Option<Option<SocketAddr>>, ConfigError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => parse_bind_address(field, s).map(Some),
        other => Err(field_error(field, format!("expected a string, got {other}"))),
    }
}

fn object<'a>(field: &str, value: &'a Value) -> Result<Option<&'a Map<String, Value>>, ConfigError> {
    match value {
        Value::Null => Ok(None),
        Value::Object(o) => Ok(Some(o)),
        other => Err(field_error(field, format!("expected an object, got {other}"))),
    }
}

/// This proxy's own section of the config file (kube-proxy has no such fields; a file that
/// sets it is for bpf-kube-proxy only).
const BPF_SECTION: &str = "bpfKubeProxy";

fn map_size(field: &str, value: &Value) -> Result<Option<u32>, ConfigError> {
    match value {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n > 0)
            .map(Some)
            .ok_or_else(|| field_error(field, format!("{n} is not a capacity (1 to 4294967295)"))),
        other => Err(field_error(field, format!("expected a number, got {other}"))),
    }
}

/// `bpfKubeProxy: {mapDynamicSizeRatio, mapDynamicSizeMemory, mapSize: {services, backends,
/// revNat, sockRev, affinity, conntrack}, lbAlgorithm, maglev: {tableSize, hashSeed}}`, the
/// flags of the same names.
fn parse_bpf_section(value: &Value, config: &mut ProxyConfig) -> Result<(), ConfigError> {
    for (inner, v) in object(BPF_SECTION, value)?.into_iter().flatten() {
        let path = format!("{BPF_SECTION}.{inner}");
        match inner.as_str() {
            "mapDynamicSizeRatio" => {
                config.map_dynamic_size_ratio = match v {
                    Value::Null => None,
                    Value::Number(n) => {
                        Some(n.as_f64().filter(|r| (0.0..=1.0).contains(r)).ok_or_else(|| {
                            field_error(&path, format!("{n} is not a ratio between 0 and 1"))
                        })?)
                    }
                    other => return Err(field_error(&path, format!("expected a number, got {other}"))),
                };
            }
            "mapDynamicSizeMemory" => {
                config.map_dynamic_size_memory = string(&path, v)?
                    .map(|s| sizing::parse_bytes(&s).map_err(|e| field_error(&path, e)))
                    .transpose()?;
            }
            "xdp" => {
                config.xdp = string(&path, v)?
                    .map(|s| s.parse().map_err(|e| field_error(&path, e)))
                    .transpose()?;
            }
            "mapSize" => {
                let sizes = &mut config.map_size;
                for (map, n) in object(&path, v)?.into_iter().flatten() {
                    let field = format!("{path}.{map}");
                    let slot = match map.as_str() {
                        "services" => &mut sizes.services,
                        "backends" => &mut sizes.backends,
                        "revNat" => &mut sizes.rev_nat,
                        "sockRev" => &mut sizes.sock_rev,
                        "affinity" => &mut sizes.affinity,
                        "conntrack" => &mut sizes.conntrack,
                        _ => return Err(ConfigError::Unknown(field)),
                    };
                    *slot = map_size(&field, n)?;
                }
            }
            "lbAlgorithm" => {
                config.lb_algorithm = string(&path, v)?
                    .map(|s| s.parse().map_err(|e: String| field_error(&path, e)))
                    .transpose()?;
            }
            "maglev" => {
                for (field, n) in object(&path, v)?.into_iter().flatten() {
                    let field_path = format!("{path}.{field}");
                    let number = match n {
                        Value::Null => None,
                        Value::Number(n) => Some(n.to_string()),
                        other => {
                            return Err(field_error(
                                &field_path,
                                format!("expected a number, got {other}"),
                            ));
                        }
                    };
                    let parse = |parse: fn(&str) -> Result<u32, String>| {
                        number
                            .as_deref()
                            .map(parse)
                            .transpose()
                            .map_err(|e| field_error(&field_path, e))
                    };
                    match field.as_str() {
                        "tableSize" => config.maglev_table_size = parse(parse_table_size)?,
                        "hashSeed" => config.maglev_hash_seed = parse(parse_seed)?,
                        _ => return Err(ConfigError::Unknown(field_path)),
                    }
                }
            }
            _ => return Err(ConfigError::Unknown(path)),
        }
    }
    Ok(())
}

fn parse_table_size(text: &str) -> Result<u32, String> {
    text.parse::<u32>()
        .ok()
        .filter(|n| maglev::TABLE_SIZES.contains(n))
        .ok_or_else(|| {
            format!(
                "{text:?} is not a Maglev table size (one of {:?})",
                maglev::TABLE_SIZES
            )
        })
}

fn parse_seed(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse::<u32>(),
    };
    parsed.map_err(|_| format!("{text:?} is not a 32-bit seed (decimal, or hex with 0x)"))
}

pub fn parse(text: &str) -> Result<ProxyConfig, ConfigError> {
    let doc: Value = serde_saphyr::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
    let fields = doc
        .as_object()
        .ok_or_else(|| ConfigError::Syntax("the document is not a mapping".into()))?;
    let text_of = |key: &str| {
        fields
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    if text_of("apiVersion") != API_VERSION {
        return Err(ConfigError::ApiVersion(text_of("apiVersion")));
    }
    if text_of("kind") != KIND {
        return Err(ConfigError::Kind(text_of("kind")));
    }
    let mut config = ProxyConfig::default();
    let mut mode_sync_period = None;
    for (key, value) in fields {
        match key.as_str() {
            "apiVersion" | "kind" => {}
            "hostnameOverride" => config.hostname_override = string(key, value)?,
            "healthzBindAddress" => config.healthz_bind_address = bind_address(key, value)?,
            "metricsBindAddress" => config.metrics_bind_address = bind_address(key, value)?,
            "syncPeriod" => config.sync_period = duration(key, value)?,
            "configSyncPeriod" => config.config_sync_period = duration(key, value)?,
            "nodePortAddresses" => config.node_port_addresses = strings(key, value)?,
            "conntrack" => {
                for (inner, v) in object(key, value)?.into_iter().flatten() {
                    let path = format!("{key}.{inner}");
                    match inner.as_str() {
                        "tcpEstablishedTimeout" => config.conntrack_tcp_timeout = duration(&path, v)?,
                        "udpTimeout" => config.conntrack_udp_timeout = duration(&path, v)?,
                        _ => ignore(
                            &path,
                            v,
                            "the tc datapath's conntrack is its own, not the kernel's",
                            &mut config.ignored,
                        ),
                    }
                }
            }
            "clientConnection" => {
                for (inner, v) in object(key, value)?.into_iter().flatten() {
                    let path = format!("{key}.{inner}");
                    if inner == "kubeconfig" {
                        config.kubeconfig = string(&path, v)?.map(PathBuf::from);
                    } else {
                        ignore(
                            &path,
                            v,
                            "the agent talks to the API server with kube-rs defaults",
                            &mut config.ignored,
                        );
                    }
                }
            }
            BPF_SECTION => parse_bpf_section(value, &mut config)?,
            section if MODE_SECTIONS.contains(&section) => {
                for (inner, v) in object(key, value)?.into_iter().flatten() {
                    let path = format!("{key}.{inner}");
                    if inner == "syncPeriod" {
                        mode_sync_period = mode_sync_period.or(duration(&path, v)?);
                    } else {
                        ignore(&path, v, "another proxy mode's setting", &mut config.ignored);
                    }
                }
            }
            other => match IGNORED.iter().find(|(name, _)| *name == other) {
                Some((_, why)) => ignore(other, value, why, &mut config.ignored),
                None => return Err(ConfigError::Unknown(other.to_string())),
            },
        }
    }
    // Before 1.31 the sync period lived in the mode's section; the top-level field wins.
    config.sync_period = config.sync_period.or(mode_sync_period);
    Ok(config)
}

/// Where the agent pins its maps and links, and where the tools look for them.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/bpf-kube-proxy";

const DEFAULT_HEALTHZ_BIND_ADDRESS: &str = "0.0.0.0:10256";
const DEFAULT_METRICS_BIND_ADDRESS: &str = "127.0.0.1:10249";
const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);
const DEFAULT_RESYNC: Duration = Duration::from_secs(10);

/// Where Services and EndpointSlices come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    /// YAML/JSON files, watched for changes.
    Manifests(PathBuf),
    /// The API server: `--kubeconfig`, else in-cluster config, else the usual kubeconfig.
    Kubernetes {
        kubeconfig: Option<PathBuf>,
        /// A watch that shows nothing, not even a bookmark, for this long is restarted.
        watch_liveness: Duration,
    },
}

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
    pub(crate) node_name: String,
    pub source: SourceConfig,
    pub(crate) map_sizing: MapSizing,
    pub translate: TranslateOptions,
    /// Manifests: re-read at least this often, in case a file event was missed.
    pub(crate) resync_period: Duration,
    /// kube-proxy's `--sync-period`: a full sync at least this often; `/healthz` fails when a
    /// change waits twice as long.
    pub(crate) sync_period: Duration,
    pub(crate) healthz_addr: Option<SocketAddr>,
    pub(crate) metrics_addr: Option<SocketAddr>,
    /// How the tc programs attach to the external devices.
    pub tc_attach: TcAttach,
    /// Whether XDP translates external traffic before tc (`--xdp`).
    pub xdp: XdpAttach,
    pub external: ExternalOptions,
}

/// `bpf-kube-proxy run`'s flags. Those without a clap default fall back to the config file,
/// then to kube-proxy's default.
#[derive(Debug, clap::Args)]
pub struct RunFlags {
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
    /// Restart a watch that has shown nothing, not even a bookmark, for this long: the API
    /// server sends a bookmark about once a minute, and a half-dead connection would otherwise
    /// hang until the watch's server-side timeout. Not a kube-proxy flag.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "90s")]
    watch_liveness_timeout: Duration,
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
    /// Share of the node's memory the LRU maps (conntrack, socket reverse, affinity) take, as
    /// Cilium's --bpf-map-dynamic-size-ratio [default: 0.0008, or the config file's
    /// bpfKubeProxy.mapDynamicSizeRatio]. A --map-size-* flag wins for its map.
    #[arg(long, value_parser = parse_ratio)]
    map_dynamic_size_ratio: Option<f64>,
    /// The node memory the ratio applies to, in bytes or with Ki/Mi/Gi/Ti [default: MemTotal of
    /// /proc/meminfo].
    #[arg(long, value_parser = sizing::parse_bytes)]
    map_dynamic_size_memory: Option<u64>,
    /// Fixed capacity of the services maps (frontend entries plus one per backend slot)
    /// [default: from 16384, grown as needed].
    #[arg(long, value_parser = parse_capacity)]
    map_size_services: Option<u32>,
    /// Fixed capacity of the backends maps [default: from 16384, grown as needed].
    #[arg(long, value_parser = parse_capacity)]
    map_size_backends: Option<u32>,
    /// Fixed capacity of the reverse-NAT maps, one entry per frontend [default: from 4096,
    /// grown as needed].
    #[arg(long, value_parser = parse_capacity)]
    map_size_rev_nat: Option<u32>,
    /// Capacity of the socket reverse-NAT LRU maps [default: from the ratio].
    #[arg(long, value_parser = parse_capacity)]
    map_size_sock_rev: Option<u32>,
    /// Capacity of the session affinity LRU map, one entry per client and frontend in use
    /// [default: from the ratio].
    #[arg(long, value_parser = parse_capacity)]
    map_size_affinity: Option<u32>,
    /// Capacity of the tc path's conntrack LRU maps, two entries per flow [default: from the
    /// ratio].
    #[arg(long, value_parser = parse_capacity)]
    map_size_conntrack: Option<u32>,
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
    /// XDP on the Ethernet --devices, before tc: "auto" (native where the driver has it,
    /// veths excepted), "native" (every device; a refusal is a failure), "generic" (skb mode,
    /// any driver, no faster than tc) or "off" [default: auto, or the config file's
    /// bpfKubeProxy.xdp].
    #[arg(long)]
    xdp: Option<XdpAttach>,
    /// kube-proxy's nodePortAddresses: CIDRs whose node addresses serve NodePorts, or
    /// "primary" (default: every node address, and 127.0.0.1 for the node's own clients).
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Option<Vec<String>>,
    /// The node's primary address(es), one per family: SNAT source for traffic sent to
    /// other nodes' backends (default: the first address of the first device).
    #[arg(long, value_delimiter = ',')]
    node_ip: Vec<IpAddr>,
    /// Idle TCP flows in the tc path's conntrack expire after this [default: 24h, or the
    /// config file's conntrack.tcpEstablishedTimeout].
    #[arg(long, value_parser = humantime::parse_duration)]
    conntrack_tcp_timeout_established: Option<Duration>,
    /// Idle UDP flows in the tc path's conntrack expire after this [default: 120s, or the
    /// config file's conntrack.udpTimeout].
    #[arg(long, value_parser = humantime::parse_duration)]
    conntrack_udp_timeout: Option<Duration>,
    /// How a backend is chosen for a new flow from outside the node (NodePort, LoadBalancer,
    /// externalIP) of a Service whose bpf-kube-proxy.io/lb-algorithm annotation names none:
    /// "random", as kube-proxy, or "maglev", consistent hashing, so that every node picks the
    /// same backend for a flow [default: random, or the config file's bpfKubeProxy.lbAlgorithm].
    #[arg(long, value_parser = str::parse::<LbAlgorithm>)]
    lb_algorithm: Option<LbAlgorithm>,
    /// Entries of each Maglev table: 16381, 65521 or 131071 (primes; at least 100 times a
    /// Service's backends for an even split), 4 bytes each per external frontend [default:
    /// 16381, or bpfKubeProxy.maglev.tableSize].
    #[arg(long, value_parser = parse_table_size)]
    lb_maglev_table_size: Option<u32>,
    /// Seed of the Maglev hashes, decimal or 0x-hex: every node of a cluster must use the same
    /// [default: 0x5bd1e995, or bpfKubeProxy.maglev.hashSeed].
    #[arg(long, value_parser = parse_seed)]
    lb_maglev_hash_seed: Option<u32>,
}

fn parse_ratio(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|r| (0.0..=1.0).contains(r))
        .ok_or_else(|| format!("{text:?} is not a ratio between 0 and 1"))
}

fn parse_capacity(text: &str) -> Result<u32, String> {
    text.parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?} is not a capacity (1 to 4294967295)"))
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error("reading the hostname (or pass --hostname-override)")]
    Hostname(#[source] nix::Error),
    #[error(transparent)]
    Cgroup(#[from] HostError),
    #[error(transparent)]
    Value(#[from] ConfigError),
    #[error("--nodeport-addresses: {0}")]
    NodePortAddresses(String),
}

/// Reads and parses a config file, logging each field it ignores.
fn read_file(path: &Path) -> Result<ProxyConfig, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let config = parse(&text).map_err(|source| SettingsError::File {
        path: path.to_path_buf(),
        source,
    })?;
    for line in &config.ignored {
        tracing::warn!(file = %path.display(), "{line}");
    }
    Ok(config)
}

/// The agent's options from its flags and the `--config` file they name.
pub fn load(flags: RunFlags) -> Result<AgentOptions, SettingsError> {
    let file = match &flags.config {
        Some(path) => read_file(path)?,
        None => ProxyConfig::default(),
    };
    resolve(flags, file)
}

/// A bind address from its flag, else the config file, else kube-proxy's default.
fn resolve_bind_address(
    flag: &str,
    from_flag: Option<String>,
    from_file: Option<Option<SocketAddr>>,
    default: &str,
) -> Result<Option<SocketAddr>, ConfigError> {
    match (from_flag, from_file) {
        (Some(text), _) => parse_bind_address(flag, &text),
        (None, Some(addr)) => Ok(addr),
        (None, None) => parse_bind_address(flag, default),
    }
}

/// Each setting from its flag, else the config file, else kube-proxy's default.
pub(crate) fn resolve(flags: RunFlags, file: ProxyConfig) -> Result<AgentOptions, SettingsError> {
    let node_name = match flags.hostname_override.or(file.hostname_override) {
        Some(name) => name,
        None => nix::unistd::gethostname()
            .map_err(SettingsError::Hostname)?
            .to_string_lossy()
            .into_owned(),
    };
    let cgroup = match flags.cgroup {
        Some(path) => path,
        None => host::cgroup2_root()?,
    };
    Ok(AgentOptions {
        pin_dir: flags.pin_dir,
        cgroup,
        node_name,
        source: match flags.manifests {
            Some(path) => SourceConfig::Manifests(path),
            None => SourceConfig::Kubernetes {
                kubeconfig: flags.kubeconfig.or(file.kubeconfig),
                watch_liveness: flags.watch_liveness_timeout,
            },
        },
        map_sizing: MapSizing {
            ratio: flags
                .map_dynamic_size_ratio
                .or(file.map_dynamic_size_ratio)
                .unwrap_or(proxy_common::sizing::DEFAULT_RATIO),
            node_memory: flags.map_dynamic_size_memory.or(file.map_dynamic_size_memory),
            fixed: FixedSizes {
                services: flags.map_size_services.or(file.map_size.services),
                backends: flags.map_size_backends.or(file.map_size.backends),
                rev_nat: flags.map_size_rev_nat.or(file.map_size.rev_nat),
                sock_rev: flags.map_size_sock_rev.or(file.map_size.sock_rev),
                affinity: flags.map_size_affinity.or(file.map_size.affinity),
                conntrack: flags.map_size_conntrack.or(file.map_size.conntrack),
            },
        },
        translate: TranslateOptions {
            service_proxy_name: flags.service_proxy_name,
            lb_algorithm: flags.lb_algorithm.or(file.lb_algorithm).unwrap_or_default(),
        },
        resync_period: flags
            .resync_seconds
            .map(|s| Duration::from_secs(s.max(1)))
            .or(file.config_sync_period)
            .unwrap_or(DEFAULT_RESYNC),
        sync_period: flags
            .sync_period
            .or(file.sync_period)
            .unwrap_or(DEFAULT_SYNC_PERIOD),
        healthz_addr: resolve_bind_address(
            "--healthz-bind-address",
            flags.healthz_bind_address,
            file.healthz_bind_address,
            DEFAULT_HEALTHZ_BIND_ADDRESS,
        )?,
        metrics_addr: resolve_bind_address(
            "--metrics-bind-address",
            flags.metrics_bind_address,
            file.metrics_bind_address,
            DEFAULT_METRICS_BIND_ADDRESS,
        )?,
        tc_attach: flags.tc_attach,
        xdp: flags.xdp.or(file.xdp).unwrap_or_default(),
        external: ExternalOptions {
            devices: flags.devices,
            node_port_addresses: NodePortAddresses::parse(
                &flags
                    .nodeport_addresses
                    .or(file.node_port_addresses)
                    .unwrap_or_default(),
            )
            .map_err(SettingsError::NodePortAddresses)?,
            node_ips: flags.node_ip,
            ct_tcp_timeout: flags
                .conntrack_tcp_timeout_established
                .or(file.conntrack_tcp_timeout)
                .unwrap_or(DEFAULT_CT_TCP_TIMEOUT),
            ct_udp_timeout: flags
                .conntrack_udp_timeout
                .or(file.conntrack_udp_timeout)
                .unwrap_or(DEFAULT_CT_UDP_TIMEOUT),
            maglev_table_size: flags
                .lb_maglev_table_size
                .or(file.maglev_table_size)
                .unwrap_or(maglev::DEFAULT_TABLE_SIZE),
            maglev_seed: flags
                .lb_maglev_hash_seed
                .or(file.maglev_hash_seed)
                .unwrap_or(maglev::DEFAULT_SEED),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `kubeadm config print init-defaults --component-configs KubeProxyConfiguration`
    /// prints (Kubernetes 1.33).
    const KUBEADM_DEFAULTS: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: ""
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

    /// The ConfigMap a kind cluster's kube-proxy runs with (non-default values set).
    const KIND_CLUSTER: &str = r"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 15m0s
conntrack:
  maxPerCore: 0
  tcpCloseWaitTimeout: 1h0m0s
  tcpEstablishedTimeout: 24h0m0s
healthzBindAddress: 0.0.0.0:10256
iptables:
  masqueradeAll: false
  minSyncPeriod: 1s
  syncPeriod: 30s
metricsBindAddress: 0.0.0.0:10249
mode: iptables
nodePortAddresses: null
";

    #[test]
    fn kubeadm_defaults_parse_with_nothing_set_and_nothing_reported() {
        let c = parse(KUBEADM_DEFAULTS).unwrap();
        assert_eq!(
            c.kubeconfig,
            Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        // "" means "use the default" for these in kube-proxy's defaulting; here, server off.
        assert_eq!(c.healthz_bind_address, Some(None));
        assert_eq!(c.sync_period, None, "0s in a mode section means unset");
        // bindAddress 0.0.0.0 is kube-proxy's default, but it is a non-zero string.
        assert_eq!(
            c.ignored,
            ["bindAddress is ignored: the datapath is always dual-stack"]
        );
    }

    #[test]
    fn kind_cluster_config_honours_addresses_and_periods_and_reports_the_rest_once_each() {
        let c = parse(KIND_CLUSTER).unwrap();
        assert_eq!(
            c.healthz_bind_address,
            Some(Some("0.0.0.0:10256".parse().unwrap()))
        );
        assert_eq!(
            c.metrics_bind_address,
            Some(Some("0.0.0.0:10249".parse().unwrap()))
        );
        assert_eq!(c.sync_period, Some(Duration::from_secs(30)));
        assert_eq!(c.config_sync_period, Some(Duration::from_secs(900)));
        assert_eq!(c.conntrack_tcp_timeout, Some(Duration::from_secs(86_400)));
        let ignored: Vec<&str> = c.ignored.iter().map(|l| l.split(' ').next().unwrap()).collect();
        assert_eq!(
            ignored,
            [
                "bindAddress",
                "clusterCIDR",
                "conntrack.tcpCloseWaitTimeout",
                "iptables.minSyncPeriod",
                "mode",
            ]
        );
    }

    #[test]
    fn top_level_sync_period_wins_over_the_mode_section_and_zero_means_unset() {
        let c = parse(&format!("{KIND_CLUSTER}syncPeriod: 10s\n")).unwrap();
        assert_eq!(c.sync_period, Some(Duration::from_secs(10)));
        let c = parse(&format!("{KIND_CLUSTER}syncPeriod: 0s\n")).unwrap();
        assert_eq!(
            c.sync_period,
            Some(Duration::from_secs(30)),
            "falls back to iptables.syncPeriod"
        );
    }

    #[test]
    fn invalid_files_are_rejected_with_the_field_named() {
        let cases = [
            ("kind: Pod\napiVersion: v1\n", "apiVersion must be"),
            (
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: Pod\n",
                "kind must be",
            ),
            (
                &KIND_CLUSTER.replace("0.0.0.0:10256", "0.0.0.0")[..],
                "healthzBindAddress: \"0.0.0.0\" is not IP:port",
            ),
            (
                &format!("{KIND_CLUSTER}syncPeriod: soon\n")[..],
                "syncPeriod: \"soon\"",
            ),
            (
                &format!("{KIND_CLUSTER}hostnameOveride: x\n")[..],
                "unknown field \"hostnameOveride\"",
            ),
            (
                &KIND_CLUSTER.replace(
                    "clientConnection:\n  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf",
                    "clientConnection: 3",
                )[..],
                "clientConnection: expected an object",
            ),
            ("apiVersion: [unclosed\n", "not YAML or JSON"),
        ];
        for (text, expected) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{err:?} should contain {expected:?}");
        }
    }

    #[derive(clap::Parser)]
    struct Run {
        #[command(flatten)]
        flags: RunFlags,
    }

    /// `run` with `args`, on a named node and cgroup (so nothing is looked up on the host),
    /// over `file`.
    fn resolved(args: &[&str], file: &str) -> Result<AgentOptions, SettingsError> {
        let base = ["run", "--hostname-override", "n1", "--cgroup", "/sys/fs/cgroup"];
        let flags = <Run as clap::Parser>::parse_from(base.iter().chain(args)).flags;
        let file = parse(&format!("apiVersion: {API_VERSION}\nkind: {KIND}\n{file}")).unwrap();
        resolve(flags, file)
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn bind_addresses_come_from_the_flag_else_the_file_else_kube_proxys_default_and_empty_is_off() {
        let o = resolved(&[], "").unwrap();
        assert_eq!(o.healthz_addr, Some(addr("0.0.0.0:10256")));
        assert_eq!(o.metrics_addr, Some(addr("127.0.0.1:10249")));
        let file = "healthzBindAddress: \"\"\nmetricsBindAddress: 0.0.0.0:10249\n";
        let o = resolved(&[], file).unwrap();
        assert_eq!(o.healthz_addr, None, "\"\" in the file turns the server off");
        assert_eq!(o.metrics_addr, Some(addr("0.0.0.0:10249")));
        let flags = [
            "--healthz-bind-address",
            "127.0.0.1:1",
            "--metrics-bind-address",
            "",
        ];
        let o = resolved(&flags, file).unwrap();
        assert_eq!(o.healthz_addr, Some(addr("127.0.0.1:1")));
        assert_eq!(o.metrics_addr, None, "\"\" on the command line turns it off");
        let err = resolved(&["--metrics-bind-address", "10249"], "").unwrap_err();
        assert_eq!(
            err.to_string(),
            "--metrics-bind-address: \"10249\" is not IP:port"
        );
    }

    #[test]
    fn periods_come_from_the_flag_else_the_file_else_the_default() {
        let o = resolved(&[], "").unwrap();
        assert_eq!(o.sync_period, Duration::from_secs(30));
        assert_eq!(o.resync_period, Duration::from_secs(10));
        let file = "syncPeriod: 10s\nconfigSyncPeriod: 15m\n";
        let o = resolved(&[], file).unwrap();
        assert_eq!(o.sync_period, Duration::from_secs(10));
        assert_eq!(o.resync_period, Duration::from_secs(900));
        let o = resolved(&["--sync-period", "5s", "--resync-seconds", "0"], file).unwrap();
        assert_eq!(o.sync_period, Duration::from_secs(5));
        assert_eq!(o.resync_period, Duration::from_secs(1), "at least a second");
    }

    #[test]
    fn conntrack_timeouts_come_from_the_flag_else_the_file_else_kube_proxys_default() {
        let o = resolved(&[], "").unwrap();
        assert_eq!(o.external.ct_tcp_timeout, Duration::from_secs(86_400));
        assert_eq!(o.external.ct_udp_timeout, Duration::from_secs(120));
        let file = "conntrack:\n  tcpEstablishedTimeout: 1h\n  udpTimeout: 30s\n";
        let o = resolved(&[], file).unwrap();
        assert_eq!(o.external.ct_tcp_timeout, Duration::from_secs(3600));
        assert_eq!(o.external.ct_udp_timeout, Duration::from_secs(30));
        let flags = ["--conntrack-udp-timeout", "5s"];
        let o = resolved(&flags, file).unwrap();
        assert_eq!(o.external.ct_tcp_timeout, Duration::from_secs(3600));
        assert_eq!(o.external.ct_udp_timeout, Duration::from_secs(5));
    }

    #[test]
    fn nodeport_addresses_come_from_the_flag_else_the_file_and_errors_name_the_flag() {
        assert_eq!(
            resolved(&[], "").unwrap().external.node_port_addresses,
            NodePortAddresses::All
        );
        let file = "nodePortAddresses: [primary]\n";
        assert_eq!(
            resolved(&[], file).unwrap().external.node_port_addresses,
            NodePortAddresses::Primary
        );
        let o = resolved(&["--nodeport-addresses", "10.0.0.0/8"], file).unwrap();
        assert_eq!(
            o.external.node_port_addresses,
            NodePortAddresses::Cidrs(vec!["10.0.0.0/8".parse().unwrap()])
        );
        let err = resolved(&["--nodeport-addresses", "primary,10.0.0.0/8"], "").unwrap_err();
        assert_eq!(
            err.to_string(),
            "--nodeport-addresses: \"primary\" cannot be combined with CIDRs"
        );
    }

    #[test]
    fn map_sizing_comes_from_the_flags_else_the_file_s_own_section_else_the_ratio() {
        let o = resolved(&[], "").unwrap();
        assert_eq!(o.map_sizing, MapSizing::default());
        let file = "bpfKubeProxy:\n  mapDynamicSizeRatio: 0.002\n  mapDynamicSizeMemory: 8Gi\n  \
                    mapSize: {conntrack: 1000, services: 5000}\n";
        let o = resolved(&[], file).unwrap();
        assert!((o.map_sizing.ratio - 0.002).abs() < 1e-12);
        assert_eq!(o.map_sizing.node_memory, Some(8 << 30));
        assert_eq!(o.map_sizing.fixed.conntrack, Some(1000));
        assert_eq!(o.map_sizing.fixed.services, Some(5000));
        assert_eq!(o.map_sizing.fixed.backends, None);
        let flags = [
            "--map-dynamic-size-ratio",
            "0.0005",
            "--map-size-conntrack",
            "2000",
            "--map-size-backends",
            "7",
        ];
        let o = resolved(&flags, file).unwrap();
        assert!((o.map_sizing.ratio - 0.0005).abs() < 1e-12);
        assert_eq!(o.map_sizing.fixed.conntrack, Some(2000));
        assert_eq!(o.map_sizing.fixed.services, Some(5000));
        assert_eq!(o.map_sizing.fixed.backends, Some(7));
        for (bad, expected) in [
            ("bpfKubeProxy: {mapDynamicSizeRatio: 2}", "not a ratio"),
            ("bpfKubeProxy: {mapSize: {conntrack: 0}}", "not a capacity"),
            (
                "bpfKubeProxy: {mapSize: {conntrak: 1}}",
                "bpfKubeProxy.mapSize.conntrak",
            ),
            ("bpfKubeProxy: {ratio: 1}", "bpfKubeProxy.ratio"),
        ] {
            let err = parse(&format!("apiVersion: {API_VERSION}\nkind: {KIND}\n{bad}\n")).unwrap_err();
            assert!(err.to_string().contains(expected), "{bad}: {err}");
        }
    }

    #[test]
    fn xdp_comes_from_the_flag_else_the_file_else_auto_and_a_bad_mode_is_named() {
        assert_eq!(resolved(&[], "").unwrap().xdp, XdpAttach::Auto);
        let file = "bpfKubeProxy: {xdp: generic}\n";
        assert_eq!(resolved(&[], file).unwrap().xdp, XdpAttach::Generic);
        assert_eq!(resolved(&["--xdp", "off"], file).unwrap().xdp, XdpAttach::Off);
        assert_eq!(resolved(&["--xdp", "native"], "").unwrap().xdp, XdpAttach::Native);
        let err = parse(&format!(
            "apiVersion: {API_VERSION}\nkind: {KIND}\nbpfKubeProxy: {{xdp: fast}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("bpfKubeProxy.xdp") && err.contains("\"fast\" is not auto, native, generic or off"),
            "{err}"
        );
        let Err(flag) = <Run as clap::Parser>::try_parse_from(["run", "--xdp", "drv"]) else {
            panic!("--xdp drv accepted");
        };
        assert!(
            flag.to_string()
                .contains("\"drv\" is not auto, native, generic or off"),
            "{flag}"
        );
    }

    #[test]
    fn the_node_name_and_kubeconfig_flags_win_over_the_file() {
        let file = "hostnameOverride: n2\nclientConnection: {kubeconfig: /file}\n";
        let o = resolved(&["--kubeconfig", "/flag"], file).unwrap();
        assert_eq!(o.node_name, "n1");
        assert_eq!(
            o.source,
            SourceConfig::Kubernetes {
                kubeconfig: Some(PathBuf::from("/flag")),
                watch_liveness: Duration::from_secs(90),
            }
        );
        let o = resolved(&["--manifests", "/m"], file).unwrap();
        assert_eq!(o.source, SourceConfig::Manifests(PathBuf::from("/m")));
    }
}
