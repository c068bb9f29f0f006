//! A "node" namespace with a bridge, and "pods" (one namespace each) on veth ports of it.
//! Pods get addresses in 10.244.0.0/24 and fd00:10:244::/64 and no default route, so a packet
//! that the datapath failed to translate fails with ENETUNREACH instead of going anywhere.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::netns::Netns;

pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 1);

#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub netns: Netns,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Pod {
    pub fn addr(&self, v4: bool) -> IpAddr {
        if v4 { self.ipv4.into() } else { self.ipv6.into() }
    }
}

/// Field order matters: pods (and their veths) go before the node namespace.
#[derive(Debug)]
pub struct Topology {
    pub pods: Vec<Pod>,
    pub node: Netns,
    pub prefix: String,
}

impl Topology {
    /// Creates `<prefix>-node` and one `<prefix>-<pod>` namespace per pod name.
    pub fn create(prefix: &str, pod_names: &[&str]) -> io::Result<Self> {
        let node = Netns::create(&format!("{prefix}-node"))?;
        node.ip(&["link", "add", "br0", "type", "bridge"])?;
        node.ip(&["addr", "add", &format!("{GATEWAY_V4}/24"), "dev", "br0"])?;
        node.ip(&["addr", "add", &format!("{GATEWAY_V6}/64"), "dev", "br0", "nodad"])?;
        node.ip(&["link", "set", "br0", "up"])?;
        let mut topology = Self {
            pods: Vec::new(),
            node,
            prefix: prefix.to_string(),
        };
        for (i, name) in pod_names.iter().enumerate() {
            topology.add_pod(name, 10 + i as u8)?;
        }
        Ok(topology)
    }

    fn add_pod(&mut self, name: &str, host: u8) -> io::Result<()> {
        let netns = Netns::create(&format!("{}-{name}", self.prefix))?;
        let port = format!("v{host}");
        self.node.veth_to(&port, &netns)?;
        self.node.ip(&["link", "set", &port, "master", "br0", "up"])?;
        let ipv4 = Ipv4Addr::new(10, 244, 0, host);
        let ipv6 = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, u16::from(host));
        netns.ip(&["addr", "add", &format!("{ipv4}/24"), "dev", "eth0"])?;
        netns.ip(&["addr", "add", &format!("{ipv6}/64"), "dev", "eth0", "nodad"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        self.pods.push(Pod {
            name: name.to_string(),
            netns,
            ipv4,
            ipv6,
        });
        Ok(())
    }

    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }
}
