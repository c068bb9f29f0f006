//! Which of the node's addresses serve NodePorts: kube-proxy's `nodePortAddresses`.

use std::net::IpAddr;

use ipnet::IpNet;

/// The special `nodePortAddresses` value that means the node's primary addresses.
pub(crate) const PRIMARY: &str = "primary";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Unset: every address of the node, 127.0.0.1 included (as kube-proxy's iptables mode
    /// accepts `localhost:nodePort`; only the socket hooks ever see it).
    #[default]
    All,
    /// `primary`: the node's primary addresses only.
    Primary,
    /// Addresses inside these CIDRs.
    Cidrs(Vec<IpNet>),
}

impl NodePortAddresses {
    pub fn parse(values: &[String]) -> Result<Self, String> {
        if values.is_empty() {
            return Ok(Self::All);
        }
        if values.iter().any(|v| v == PRIMARY) {
            if values.len() > 1 {
                return Err(format!("{PRIMARY:?} cannot be combined with CIDRs"));
            }
            return Ok(Self::Primary);
        }
        values
            .iter()
            .map(|v| {
                v.parse::<IpNet>()
                    .map_err(|e| format!("{v:?} is not a CIDR: {e}"))
            })
            .collect::<Result<_, _>>()
            .map(Self::Cidrs)
    }

    /// The NodePort addresses among the node's interface addresses, sorted; `primary` are the
    /// node's primary addresses (one per family).
    pub fn select(&self, interface_addrs: &[IpAddr], primary: &[IpAddr]) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = match self {
            Self::All => interface_addrs
                .iter()
                .copied()
                .filter(|a| usable(a) || *a == IpAddr::from([127, 0, 0, 1]))
                .collect(),
            Self::Primary => primary.to_vec(),
            Self::Cidrs(cidrs) => interface_addrs
                .iter()
                .copied()
                .filter(|a| cidrs.iter().any(|c| c.contains(a)))
                .collect(),
        };
        out.sort();
        out.dedup();
        out
    }
}

/// An address a client elsewhere can reach: not loopback, not IPv6 link-local, not unspecified.
pub(crate) fn usable(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => !a.is_loopback() && !a.is_unspecified() && !a.is_link_local(),
        IpAddr::V6(a) => !a.is_loopback() && !a.is_unspecified() && !a.is_unicast_link_local(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn parse(values: &[&str]) -> Result<NodePortAddresses, String> {
        NodePortAddresses::parse(
            &values
                .iter()
                .map(std::string::ToString::to_string)
                .collect::<Vec<_>>(),
        )
    }

    const INTERFACES: &[&str] = &[
        "127.0.0.1",
        "::1",
        "10.0.0.5",
        "192.168.7.2",
        "fe80::1",
        "fd00::5",
    ];

    #[test]
    fn unset_means_every_usable_address_and_ipv4_localhost() {
        let all = parse(&[]).unwrap();
        assert_eq!(
            all.select(&ips(INTERFACES), &ips(&["10.0.0.5"])),
            ips(&["10.0.0.5", "127.0.0.1", "192.168.7.2", "fd00::5"])
        );
    }

    #[test]
    fn cidrs_pick_matching_interface_addresses() {
        let only = parse(&["10.0.0.0/8", "fd00::/64"]).unwrap();
        assert_eq!(only.select(&ips(INTERFACES), &[]), ips(&["10.0.0.5", "fd00::5"]));
        let localhost = parse(&["127.0.0.0/8"]).unwrap();
        assert_eq!(localhost.select(&ips(INTERFACES), &[]), ips(&["127.0.0.1"]));
    }

    #[test]
    fn primary_means_the_primary_addresses_alone() {
        let primary = parse(&["primary"]).unwrap();
        assert_eq!(
            primary.select(&ips(INTERFACES), &ips(&["10.0.0.5"])),
            ips(&["10.0.0.5"])
        );
        assert!(parse(&["primary", "10.0.0.0/8"]).is_err());
    }

    #[test]
    fn bad_cidrs_are_errors_naming_the_value() {
        let err = parse(&["10.0.0.0/33"]).unwrap_err();
        assert!(err.contains("10.0.0.0/33"), "{err}");
    }
}
