//! `--config FILE`: a kube-proxy `KubeProxyConfiguration` (kubeproxy.config.k8s.io/v1alpha1),
//! read as-is so an existing kube-proxy ConfigMap can be reused.
//!
//! Fields that mean something here are honoured; fields of kube-proxy's other modes (iptables,
//! IPVS, nftables, Windows) or of datapath parts this proxy does not have are accepted and
//! reported once each, when set to a non-zero value. Anything else is an error, as kube-proxy's
//! strict decoding makes it, so a typo is never silently ignored.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde_json::{Map, Value};

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// What the file sets. `None`: not set (a flag or the default applies).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    pub kubeconfig: Option<PathBuf>,
    pub hostname_override: Option<String>,
    /// `Some(None)`: set to "" (server off).
    pub healthz_bind_address: Option<Option<SocketAddr>>,
    pub metrics_bind_address: Option<Option<SocketAddr>>,
    pub sync_period: Option<Duration>,
    pub config_sync_period: Option<Duration>,
    /// `nodePortAddresses`: CIDRs or `primary`.
    pub node_port_addresses: Option<Vec<String>>,
    /// `conntrack.tcpEstablishedTimeout`: lifetime of an idle TCP flow in the tc path.
    pub conntrack_tcp_timeout: Option<Duration>,
    /// `conntrack.udpTimeout`: lifetime of an idle UDP flow in the tc path.
    pub conntrack_udp_timeout: Option<Duration>,
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
pub fn parse_bind_address(field: &str, text: &str) -> Result<Option<SocketAddr>, ConfigError> {
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
    const KIND_CLUSTER: &str = r#"
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
"#;

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
}
