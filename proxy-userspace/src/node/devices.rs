//! Which devices carry traffic from outside the node (`--devices`), and the node's addresses
//! on them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    str::FromStr,
};

use super::nodeport::usable;

/// `--devices`: where NodePort, LoadBalancer and externalIP traffic arrives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Devices {
    /// No tc programs: only the socket hooks (traffic that starts on this node) are served.
    #[default]
    None,
    /// Every up, non-loopback device with a global address, except container and bridge
    /// plumbing (veth, cni, docker, ... ), like Cilium's device detection.
    Auto,
    Named(Vec<String>),
}

impl FromStr for Devices {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value {
            "" | "none" => Ok(Self::None),
            "auto" => Ok(Self::Auto),
            list => {
                let names: Vec<String> = list.split(',').map(|n| n.trim().to_string()).collect();
                match names
                    .iter()
                    .find(|n| n.is_empty() || n.len() > 15 || n.contains('/'))
                {
                    Some(bad) => Err(format!("{bad:?} is not a network device name")),
                    None => Ok(Self::Named(names)),
                }
            }
        }
    }
}

/// Name prefixes of devices that `auto` never picks: per-pod veths, bridges and other
/// proxies' devices. Tunnel devices (`flannel.1`, `vxlan.calico`) are picked: replies of
/// SNATed flows from backends on other nodes arrive on them.
const NOT_EXTERNAL: [&str; 9] = [
    "veth", "lxc", "cni", "docker", "br-", "kube-", "cilium", "cali", "virbr",
];

/// The node's interface addresses, by device, in this network namespace.
pub(crate) fn interface_addresses() -> std::io::Result<BTreeMap<String, Vec<IpAddr>>> {
    let mut out: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for ifaddr in nix::ifaddrs::getifaddrs()? {
        let Some(address) = ifaddr.address else {
            continue;
        };
        let ip = if let Some(v4) = address.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = address.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        out.entry(ifaddr.interface_name).or_default().push(ip);
    }
    Ok(out)
}

impl Devices {
    /// The device names this selects among `addresses` (from [`interface_addresses`]).
    pub(crate) fn resolve(&self, addresses: &BTreeMap<String, Vec<IpAddr>>) -> Vec<String> {
        match self {
            Self::None => Vec::new(),
            Self::Named(names) => names.clone(),
            Self::Auto => addresses
                .iter()
                .filter(|(name, ips)| {
                    !NOT_EXTERNAL.iter().any(|p| name.starts_with(p)) && ips.iter().any(usable)
                })
                .map(|(name, _)| name.clone())
                .collect(),
        }
    }

    /// The devices this selects now, each with its ifindex (which changes when a device is
    /// deleted and created again under its name); a listed device that does not exist is left
    /// out. `auto` also selects `reply_devices`, where remote backends' replies arrive (see
    /// `node::reply_routes`), whatever their addresses or names.
    pub(crate) fn present(&self, reply_devices: &BTreeSet<String>) -> std::io::Result<BTreeMap<String, u32>> {
        let names = match self {
            Self::None => return Ok(BTreeMap::new()),
            Self::Named(names) => names.clone(),
            Self::Auto => {
                let mut names = self.resolve(&interface_addresses()?);
                names.extend(
                    reply_devices
                        .iter()
                        .filter(|d| !names.contains(d))
                        .cloned()
                        .collect::<Vec<_>>(),
                );
                names
            }
        };
        Ok(names
            .into_iter()
            .filter_map(|name| {
                let index = nix::net::if_::if_nametoindex(name.as_str()).ok()?;
                Some((name, index))
            })
            .collect())
    }
}

/// The node's primary addresses (one per family): `--node-ip` values first, else the first
/// usable address of the first external device that has one of that family.
pub(crate) fn primary_addresses(
    explicit: &[IpAddr],
    devices: &[String],
    addresses: &BTreeMap<String, Vec<IpAddr>>,
) -> Vec<IpAddr> {
    let pick = |v4: bool| {
        explicit.iter().find(|a| a.is_ipv4() == v4).copied().or_else(|| {
            devices
                .iter()
                .filter_map(|d| addresses.get(d))
                .flatten()
                .find(|a| a.is_ipv4() == v4 && usable(a))
                .copied()
        })
    };
    [pick(true), pick(false)].into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses() -> BTreeMap<String, Vec<IpAddr>> {
        [
            ("lo", vec!["127.0.0.1", "::1"]),
            ("eth0", vec!["10.0.0.5", "fe80::1"]),
            ("eth1", vec!["fe80::2"]),
            ("veth12ab", vec!["10.244.0.1"]),
            ("cni0", vec!["10.244.0.1"]),
            ("flannel.1", vec!["10.244.0.0"]),
            ("bond0", vec!["192.168.1.2", "fd00::2"]),
        ]
        .into_iter()
        .map(|(n, ips)| (n.to_string(), ips.iter().map(|a| a.parse().unwrap()).collect()))
        .collect()
    }

    #[test]
    fn auto_picks_devices_with_global_addresses_but_not_pod_plumbing() {
        assert_eq!(
            Devices::Auto.resolve(&addresses()),
            ["bond0", "eth0", "flannel.1"]
        );
        assert!(Devices::None.resolve(&addresses()).is_empty());
    }

    #[test]
    fn device_lists_parse_and_bad_names_are_refused() {
        assert_eq!(
            "eth0, eth1".parse::<Devices>(),
            Ok(Devices::Named(vec!["eth0".into(), "eth1".into()]))
        );
        assert_eq!("none".parse::<Devices>(), Ok(Devices::None));
        assert!("eth0,,eth1".parse::<Devices>().is_err());
        assert!("a-name-longer-than-15".parse::<Devices>().is_err());
    }

    #[test]
    fn primary_addresses_prefer_node_ip_then_the_first_device() {
        let a = addresses();
        let devices = ["eth0".to_string(), "bond0".to_string()];
        let got = primary_addresses(&[], &devices, &a);
        assert_eq!(
            got,
            ["10.0.0.5".parse::<IpAddr>().unwrap(), "fd00::2".parse().unwrap()]
        );
        let explicit = ["192.0.2.9".parse().unwrap()];
        assert_eq!(primary_addresses(&explicit, &devices, &a)[0], explicit[0]);
    }
}
