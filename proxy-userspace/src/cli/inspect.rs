//! `get`, `explain` and `dump`: one Service from the maps, one Service's desired state beside
//! the maps, and any pinned map decoded entry by entry.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use super::drift::{Drift, drift};
use anyhow::Context as _;
use aya::{
    Pod,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray},
};
use bpf_kube_proxy::{
    datapath::{
        maps::{PinnedMaps, typed},
        reader::{FrontendView, Snapshot},
    },
    pipeline::model::{LbAlgorithm, ServiceEntry, ServiceName},
    pipeline::snapshot::desired_service,
    pipeline::translate::TranslateOptions,
    source,
};
use proxy_common::{
    counters::Counter,
    maps::{self as names, svc_flags},
};
use serde::Serialize;

use super::list::{Format, table};

fn parse_name(text: &str) -> anyhow::Result<ServiceName> {
    let (ns, name) = text
        .split_once('/')
        .with_context(|| format!("{text:?}: expected NAMESPACE/NAME"))?;
    Ok(ServiceName::new(ns, name))
}

fn frontends_of(snapshot: Snapshot, service: &ServiceName) -> Snapshot {
    let label = service.to_string();
    Snapshot {
        frontends: snapshot
            .frontends
            .into_iter()
            .filter(|f| f.service == label)
            .collect(),
        orphan_backends: Vec::new(),
        maglev_tables: Vec::new(),
    }
}

pub fn get(pin_dir: &Path, service: &str, format: Format) -> anyhow::Result<()> {
    let service = parse_name(service)?;
    let snapshot = frontends_of(Snapshot::read(&PinnedMaps::open(pin_dir)?)?, &service);
    anyhow::ensure!(
        !snapshot.frontends.is_empty(),
        "the maps under {} hold no frontend of {service}",
        pin_dir.display()
    );
    match format {
        Format::Table => print!("{}", table(&snapshot)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&snapshot)?),
    }
    Ok(())
}

/// Where `explain` reads the desired state from.
#[derive(Debug, clap::Args)]
pub struct ExplainSource {
    /// Manifests, as given to `run --manifests`.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// kubeconfig (default: in-cluster, KUBECONFIG, ~/.kube/config), when not --manifests.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name, as given to `run`.
    #[arg(long, env = "NODE_NAME")]
    pub hostname_override: Option<String>,
    #[arg(long)]
    pub service_proxy_name: Option<String>,
    /// The agent's `--lb-algorithm`.
    #[arg(long, value_parser = str::parse::<LbAlgorithm>, default_value = "random")]
    pub lb_algorithm: LbAlgorithm,
}

/// `node_port_addresses`: the agent's, as the maps show them (the addresses of NodePort
/// frontends), so that `explain` judges NodePorts by the agent's flags rather than its own.
async fn desired(
    source: &ExplainSource,
    service: &ServiceName,
    node_port_addresses: Vec<IpAddr>,
) -> anyhow::Result<Option<ServiceEntry>> {
    let node = match &source.hostname_override {
        Some(n) => n.clone(),
        None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
    };
    let snapshot = match &source.manifests {
        Some(path) => {
            let (snapshot, errors) = source::manifests::read_once(path);
            for e in errors {
                tracing::warn!("{e}");
            }
            snapshot
        }
        None => {
            let client = source::kube::client(source.kubeconfig.as_deref(), None).await?;
            source::kube::list_once(client, &node, source.service_proxy_name.as_deref())
                .await
                .context("listing from the API server")?
        }
    };
    let opts = TranslateOptions {
        service_proxy_name: source.service_proxy_name.clone(),
        lb_algorithm: source.lb_algorithm,
    };
    let desired = desired_service(&snapshot, &node, node_port_addresses, &opts, service);
    for issue in &desired.issues {
        tracing::warn!("{issue}");
    }
    for error in &desired.invalid {
        tracing::error!("{error}; ignored");
    }
    Ok(desired.entry)
}

#[derive(Serialize)]
struct Explanation<'a> {
    service: String,
    desired: Option<Vec<DesiredFrontend>>,
    programmed: &'a [FrontendView],
    drift: Vec<Drift>,
}

#[derive(Serialize)]
struct DesiredFrontend {
    frontend: String,
    backends: Vec<String>,
    affinity_timeout: Option<u32>,
}

pub async fn explain(
    pin_dir: &Path,
    service: &str,
    source: &ExplainSource,
    format: Format,
) -> anyhow::Result<()> {
    let name = parse_name(service)?;
    let everything = Snapshot::read(&PinnedMaps::open(pin_dir)?)?;
    let mut node_port_addresses: Vec<IpAddr> = everything
        .frontends
        .iter()
        .filter(|f| f.flags & svc_flags::NODE_PORT != 0)
        .map(|f| f.frontend.addr)
        .collect();
    node_port_addresses.sort();
    node_port_addresses.dedup();
    let wanted = desired(source, &name, node_port_addresses).await?;
    let programmed = frontends_of(everything, &name);
    let views: Vec<&FrontendView> = programmed.frontends.iter().collect();
    let explanation = Explanation {
        service: name.to_string(),
        desired: wanted.as_ref().map(|e| {
            e.frontends
                .iter()
                .map(|f| DesiredFrontend {
                    frontend: f.key.to_string(),
                    backends: f.backends.iter().map(|b| b.key.to_string()).collect(),
                    affinity_timeout: f.affinity_timeout,
                })
                .collect()
        }),
        programmed: &programmed.frontends,
        drift: drift(wanted.as_ref(), &views),
    };
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&explanation)?),
        Format::Table => {
            println!("Service {}", explanation.service);
            match &explanation.desired {
                None => println!("\ndesired: not proxied (absent, skipped, or invalid in the source)"),
                Some(frontends) => {
                    println!("\ndesired (from the source):");
                    for f in frontends {
                        let backends = if f.backends.is_empty() {
                            "(none: rejected)".to_string()
                        } else {
                            f.backends.join(", ")
                        };
                        println!("  {}  {backends}", f.frontend);
                    }
                }
            }
            println!("\nprogrammed (from the maps):");
            print!("{}", table(&programmed));
            if explanation.drift.is_empty() {
                println!("\nin sync: the maps hold exactly the desired state");
            } else {
                println!("\ndrift:");
                for d in &explanation.drift {
                    println!("  {d}");
                }
            }
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct Entry<K, V> {
    key: K,
    value: V,
}

fn entries<K, V>(dir: &Path, name: &'static str) -> anyhow::Result<Vec<serde_json::Value>>
where
    K: Pod + Serialize,
    V: Pod + Serialize,
{
    let map: HashMap<MapData, K, V> = typed(dir, name)?;
    map.iter()
        .map(|item| {
            let (key, value) = item.with_context(|| format!("reading {name}"))?;
            Ok(serde_json::to_value(Entry { key, value })?)
        })
        .collect()
}

fn counter_entries(dir: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let map: PerCpuArray<MapData, u64> = typed(dir, names::COUNTERS)?;
    Counter::ALL
        .iter()
        .map(|c| {
            let per_cpu: Vec<u64> = map.get(&(*c as u32), 0)?.iter().copied().collect();
            Ok(serde_json::json!({"key": c.name(), "value": per_cpu}))
        })
        .collect()
}

fn source_range_entries<A>(dir: &Path, name: &'static str) -> anyhow::Result<Vec<serde_json::Value>>
where
    proxy_common::maps::SourceRange<A>: aya::Pod + serde::Serialize,
{
    let map: LpmTrie<MapData, proxy_common::maps::SourceRange<A>, u32> = typed(dir, name)?;
    map.iter()
        .map(|item| {
            let (key, value) = item.context("reading the source ranges")?;
            let data = key.data();
            Ok(serde_json::json!({
                "key": {"prefix_len": key.prefix_len(), "data": data},
                "value": value,
            }))
        })
        .collect()
}

fn node_entries(dir: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let map: Array<MapData, proxy_common::maps::NodeConfig> = typed(dir, names::NODE)?;
    Ok(vec![serde_json::json!({"key": 0, "value": map.get(&0, 0)?})])
}

/// Every pinned map decoded with its key and value types: `bpftool map dump` without BTF.
pub fn dump(pin_dir: &Path, map: &str, format: Format) -> anyhow::Result<()> {
    use proxy_common::maps::{
        AddrV4, AddrV6, AffinityKey, AffinityValue, Backend, CtKey, CtValue, RevNat, ServiceKey,
        ServiceLabel, ServiceValue, SockRevKey, SockRevValue,
    };
    let rows = match map {
        names::SERVICES_V4 => entries::<ServiceKey<AddrV4>, ServiceValue>(pin_dir, names::SERVICES_V4)?,
        names::SERVICES_V6 => entries::<ServiceKey<AddrV6>, ServiceValue>(pin_dir, names::SERVICES_V6)?,
        names::BACKENDS_V4 => entries::<u32, Backend<AddrV4>>(pin_dir, names::BACKENDS_V4)?,
        names::BACKENDS_V6 => entries::<u32, Backend<AddrV6>>(pin_dir, names::BACKENDS_V6)?,
        names::REV_NAT_V4 => entries::<u32, RevNat<AddrV4>>(pin_dir, names::REV_NAT_V4)?,
        names::REV_NAT_V6 => entries::<u32, RevNat<AddrV6>>(pin_dir, names::REV_NAT_V6)?,
        names::SOCK_REV_V4 => {
            entries::<SockRevKey<AddrV4>, SockRevValue<AddrV4>>(pin_dir, names::SOCK_REV_V4)?
        }
        names::SOCK_REV_V6 => {
            entries::<SockRevKey<AddrV6>, SockRevValue<AddrV6>>(pin_dir, names::SOCK_REV_V6)?
        }
        names::AFFINITY => entries::<AffinityKey, AffinityValue>(pin_dir, names::AFFINITY)?,
        names::SERVICE_LABELS => entries::<u32, ServiceLabel>(pin_dir, names::SERVICE_LABELS)?,
        names::CONNTRACK_V4 => entries::<CtKey<AddrV4>, CtValue<AddrV4>>(pin_dir, names::CONNTRACK_V4)?,
        names::CONNTRACK_V6 => entries::<CtKey<AddrV6>, CtValue<AddrV6>>(pin_dir, names::CONNTRACK_V6)?,
        names::SOURCE_RANGES_V4 => source_range_entries::<AddrV4>(pin_dir, names::SOURCE_RANGES_V4)?,
        names::SOURCE_RANGES_V6 => source_range_entries::<AddrV6>(pin_dir, names::SOURCE_RANGES_V6)?,
        names::NODE => node_entries(pin_dir)?,
        names::COUNTERS => counter_entries(pin_dir)?,
        names::SOCK_FRONTEND_V4 | names::SOCK_FRONTEND_V6 => anyhow::bail!(
            "{map} is socket-local storage: the kernel keeps one value per socket and offers no \
             way to walk them from userspace (its values are in sock_diag's INET_DIAG_SK_BPF_STORAGES)"
        ),
        other => anyhow::bail!("unknown map {other:?}; the maps are: {}", names::ALL.join(", ")),
    };
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Format::Table => {
            for row in &rows {
                println!("{} => {}", row["key"], row["value"]);
            }
            println!("{} entries", rows.len());
        }
    }
    Ok(())
}
