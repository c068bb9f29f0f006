//! The node's side of traffic from outside (NodePort, LoadBalancer, externalIP): its devices,
//! the addresses that serve NodePorts, its primary addresses and the tc path's conntrack
//! timeouts, resolved once at start into what the datapath is configured with.

use std::{net::IpAddr, time::Duration};

use proxy_common::maps::NodeConfig;

use crate::node::{
    devices::{self, Devices},
    nodeport::NodePortAddresses,
};

/// kube-proxy's default for conntrack.tcpEstablishedTimeout.
pub(crate) const DEFAULT_CT_TCP_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// The kernel's nf_conntrack_udp_timeout_stream, which kube-proxy leaves in place by default.
pub(crate) const DEFAULT_CT_UDP_TIMEOUT: Duration = Duration::from_secs(120);
/// A TCP flow that saw FIN or RST lingers this long for the last segments (Cilium's default).
const CT_TCP_CLOSING_TIMEOUT_S: u32 = 10;

/// NodePort, LoadBalancer and externalIP traffic from outside the node (the tc path).
#[derive(Debug, Clone)]
pub struct ExternalOptions {
    pub devices: Devices,
    pub node_port_addresses: NodePortAddresses,
    /// `--node-ip`: the node's primary addresses (SNAT source), if not the devices' first.
    pub(crate) node_ips: Vec<IpAddr>,
    pub(crate) ct_tcp_timeout: Duration,
    pub(crate) ct_udp_timeout: Duration,
    /// Entries of a Maglev table (one of `proxy_common::maglev::TABLE_SIZES`).
    pub(crate) maglev_table_size: u32,
    pub(crate) maglev_seed: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    #[error("listing the node's addresses: {0}")]
    Interfaces(std::io::Error),
    #[error("--devices names {0:?}, which this network namespace does not have")]
    Device(String),
}

/// The node's external side, resolved from [`ExternalOptions`] at start.
pub(crate) struct ExternalSide {
    pub devices: Vec<String>,
    pub node_port_addresses: Vec<IpAddr>,
    pub config: NodeConfig,
}

impl ExternalSide {
    pub(crate) fn resolve(opts: &ExternalOptions) -> Result<Self, ExternalError> {
        let interfaces = devices::interface_addresses().map_err(ExternalError::Interfaces)?;
        let devices = opts.devices.resolve(&interfaces);
        if let Some(missing) = devices.iter().find(|d| !interfaces.contains_key(*d)) {
            return Err(ExternalError::Device(missing.clone()));
        }
        let primary = devices::primary_addresses(&opts.node_ips, &devices, &interfaces);
        let all: Vec<IpAddr> = interfaces.values().flatten().copied().collect();
        let node_port_addresses = opts.node_port_addresses.select(&all, &primary);
        let seconds = |d: Duration| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
        let mut config = NodeConfig {
            ct_tcp_timeout_s: seconds(opts.ct_tcp_timeout),
            ct_tcp_closing_timeout_s: CT_TCP_CLOSING_TIMEOUT_S,
            ct_udp_timeout_s: seconds(opts.ct_udp_timeout),
            maglev_table_size: opts.maglev_table_size,
            maglev_seed: opts.maglev_seed,
            ..Default::default()
        };
        for ip in &primary {
            match ip {
                IpAddr::V4(a) => config.snat_v4 = a.octets(),
                IpAddr::V6(a) => config.snat_v6 = a.octets(),
            }
        }
        tracing::info!(
            devices = ?devices,
            node_port_addresses = ?node_port_addresses,
            primary = ?primary,
            "external traffic (NodePort, LoadBalancer, externalIP)"
        );
        if devices.is_empty() {
            tracing::info!(
                "no --devices: NodePorts are served to this node's own sockets only; \
                 pass --devices auto (or a list) for traffic from outside"
            );
        }
        Ok(Self {
            devices,
            node_port_addresses,
            config,
        })
    }
}
