//! The node side of the tc path: which devices carry external traffic, the node's addresses,
//! the node settings map, and the tc programs' links on each device.

use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, LinkError},
    },
};
use proxy_common::maps::{self as names, NodeConfig};

use crate::{
    datapath::{loader::LoadError, maps::typed, sys},
    nodeport::usable,
};

/// The tc programs and the direction each is attached in.
pub const TC_PROGRAMS: [(&str, TcAttachType); 2] = [
    ("bkp_tc_ingress", TcAttachType::Ingress),
    ("bkp_tc_egress", TcAttachType::Egress),
];

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
pub fn interface_addresses() -> std::io::Result<BTreeMap<String, Vec<IpAddr>>> {
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
    pub fn resolve(&self, addresses: &BTreeMap<String, Vec<IpAddr>>) -> Vec<String> {
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
}

/// The node's primary addresses (one per family): `--node-ip` values first, else the first
/// usable address of the first external device that has one of that family.
pub fn primary_addresses(
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

/// Writes the node settings the tc programs read.
pub fn write_node_config(pin_dir: &Path, config: &NodeConfig) -> Result<(), LoadError> {
    let mut map: Array<MapData, NodeConfig> = typed(pin_dir, names::NODE).map_err(|e| LoadError::Pin {
        what: "opening",
        path: pin_dir.join(names::NODE),
        source: std::io::Error::other(e),
    })?;
    map.set(0, config, 0).map_err(|e| LoadError::Pin {
        what: "writing",
        path: pin_dir.join(names::NODE),
        source: std::io::Error::other(e),
    })
}

fn tc_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, LoadError> {
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })
}

pub fn load_programs(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    for (name, _) in TC_PROGRAMS {
        tc_program(ebpf, name)?
            .load()
            .map_err(|source| LoadError::Program { name, source })?;
    }
    Ok(())
}

/// Attaches the tc programs to `devices` with TCX links pinned under `<pin dir>/tc/`, updating
/// pinned links in place on a restart (no instant without translation) and removing the links
/// of devices no longer listed. Returns (links updated, links created).
pub fn attach(ebpf: &mut Ebpf, pin_dir: &Path, devices: &[String]) -> Result<(usize, usize), LoadError> {
    let dir = pin_dir.join("tc");
    let pin_err = |what, path: &Path| {
        let path: PathBuf = path.to_path_buf();
        move |source| LoadError::Pin { what, path, source }
    };
    fs::create_dir_all(&dir).map_err(pin_err("creating", &dir))?;
    let wanted: Vec<String> = devices
        .iter()
        .flat_map(|d| TC_PROGRAMS.iter().map(move |(name, _)| format!("{d}@{name}")))
        .collect();
    for entry in fs::read_dir(&dir).map_err(pin_err("listing", &dir))? {
        let entry = entry.map_err(pin_err("listing", &dir))?;
        if !wanted.iter().any(|w| *w == entry.file_name().to_string_lossy()) {
            tracing::info!(link = %entry.path().display(), "detaching tc from a device no longer listed");
            fs::remove_file(entry.path()).map_err(pin_err("removing", &entry.path()))?;
        }
    }
    let (mut updated, mut created) = (0, 0);
    for device in devices {
        for (name, direction) in TC_PROGRAMS {
            let program = tc_program(ebpf, name)?;
            let prog_err = |source| LoadError::Program { name, source };
            let pin = dir.join(format!("{device}@{name}"));
            if pin.exists() {
                let link = sys::obj_get(&pin).map_err(pin_err("opening pinned link", &pin))?;
                let prog_fd = program.fd().map_err(prog_err)?;
                sys::link_update(&link, prog_fd).map_err(pin_err("updating pinned link", &pin))?;
                updated += 1;
            } else {
                let id = program.attach(device, direction).map_err(prog_err)?;
                let link: FdLink = program
                    .take_link(id)
                    .map_err(prog_err)?
                    .try_into()
                    .map_err(|source: LinkError| LoadError::Link { name, source })?;
                link.pin(&pin)
                    .map_err(|e| pin_err("pinning link", &pin)(std::io::Error::other(e)))?;
                created += 1;
            }
        }
    }
    Ok((updated, created))
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
