//! Where the replies of SNATed flows come back. A flow from outside the node to a backend on
//! another node leaves with the node's address as its source; the backend's replies come
//! back on the device the node routes that backend through (routing is symmetric in every
//! CNI this proxy serves), and only the tc ingress program there translates them back. A
//! device without the programs makes such connections hang, with nothing in any log.
//!
//! The kernel answers which device: one `ip route get fibmatch` (RTM_GETROUTE with
//! RTM_F_FIB_MATCH) per backend address, so policy rules and every path of a multipath route
//! count. Answers are kept until the node's routes, links or addresses change.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io,
    net::IpAddr,
};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAttribute, RouteFlags, RouteMessage, RouteType},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Answers that are not ours (another sequence number) read before giving up on one.
const MAX_FOREIGN_MESSAGES: usize = 16;

/// The route lookups of one agent, with their answers kept.
struct ReplyRoutes {
    socket: Socket,
    sequence: u32,
    /// Backend address → the devices its replies arrive on (empty: no route, or local).
    devices: HashMap<IpAddr, Vec<String>>,
}

impl ReplyRoutes {
    fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
            sequence: 0,
            devices: HashMap::new(),
        })
    }

    /// Drops every answer kept: the node's routes, links or addresses changed.
    fn forget(&mut self) {
        self.devices.clear();
    }

    /// The devices replies from `addr` arrive on. A failed lookup is logged and reads as none:
    /// the check is advice, and the next change of the node's routes asks again.
    fn devices_of(&mut self, addr: IpAddr) -> &[String] {
        if !self.devices.contains_key(&addr) {
            self.sequence = self.sequence.wrapping_add(1);
            let devices = match lookup(&self.socket, self.sequence, addr) {
                Ok(indexes) => indexes.into_iter().filter_map(device_name).collect(),
                Err(e) => {
                    tracing::debug!(%addr, "route lookup of a backend: {e}");
                    Vec::new()
                }
            };
            self.devices.insert(addr, devices);
        }
        &self.devices[&addr]
    }
}

fn device_name(index: u32) -> Option<String> {
    let name = nix::net::if_::if_indextoname(index).ok()?;
    Some(name.to_string_lossy().into_owned())
}

/// `ip route get fibmatch <addr>`: the output devices of the route the kernel would use
/// (every path of a multipath route); none for a local or unreachable address.
fn lookup(socket: &Socket, sequence: u32, addr: IpAddr) -> io::Result<Vec<u32>> {
    let mut route = RouteMessage::default();
    (
        route.header.address_family,
        route.header.destination_prefix_length,
    ) = match addr {
        IpAddr::V4(_) => (AddressFamily::Inet, 32),
        IpAddr::V6(_) => (AddressFamily::Inet6, 128),
    };
    route.header.flags = RouteFlags::FibMatch;
    route.attributes.push(RouteAttribute::Destination(addr.into()));
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = sequence;
    let mut request = NetlinkMessage::new(header, NetlinkPayload::from(RouteNetlinkMessage::GetRoute(route)));
    request.finalize();
    let mut bytes = vec![0; request.buffer_len()];
    request.serialize(&mut bytes);
    socket.send(&bytes, 0)?;

    let mut buf = Vec::with_capacity(8192);
    for _ in 0..MAX_FOREIGN_MESSAGES {
        buf.clear();
        socket.recv(&mut buf, 0)?;
        let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        if answer.header.sequence_number != sequence {
            continue;
        }
        return match answer.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => Ok(output_devices(&route)),
            NetlinkPayload::Error(e) => match e.code {
                // No route at all: nothing arrives from there either.
                Some(code) if -code.get() == libc::ENETUNREACH => Ok(Vec::new()),
                _ => Err(e.to_io()),
            },
            other => Err(io::Error::other(format!("unexpected answer {other:?}"))),
        };
    }
    Err(io::Error::other("no answer to the route lookup"))
}

fn output_devices(route: &RouteMessage) -> Vec<u32> {
    if route.header.kind != RouteType::Unicast {
        return Vec::new();
    }
    let mut devices: Vec<u32> = route
        .attributes
        .iter()
        .flat_map(|a| match a {
            RouteAttribute::Oif(index) => vec![*index],
            RouteAttribute::MultiPath(hops) => hops.iter().map(|h| h.interface_index).collect(),
            _ => Vec::new(),
        })
        .collect();
    devices.sort_unstable();
    devices.dedup();
    devices
}

/// The agent's check: the route lookups and what they found, per key (a Service).
pub(crate) struct ReplyCheck<K> {
    routes: ReplyRoutes,
    paths: ReplyPaths<K>,
}

impl<K: Ord + Clone> ReplyCheck<K> {
    pub(crate) fn open() -> io::Result<Self> {
        Ok(Self {
            routes: ReplyRoutes::open()?,
            paths: ReplyPaths::default(),
        })
    }

    /// Takes the keys whose addresses changed (empty: none left), looking up only theirs.
    pub(crate) fn update<'a>(&mut self, changed: impl IntoIterator<Item = (&'a K, &'a [IpAddr])>)
    where
        K: 'a,
    {
        let routes = &mut self.routes;
        let mut devices_of = |addr| routes.devices_of(addr).to_vec();
        for (key, addrs) in changed {
            self.paths.set(key, addrs, &mut devices_of);
        }
    }

    /// After the node's routes, links or addresses changed: forgets every answer and looks
    /// up the addresses of `all` keys again.
    pub(crate) fn look_up_again<'a>(&mut self, all: impl IntoIterator<Item = (&'a K, &'a [IpAddr])>)
    where
        K: 'a,
    {
        self.routes.forget();
        self.update(all);
    }

    pub(crate) fn paths(&mut self) -> &mut ReplyPaths<K> {
        &mut self.paths
    }
}

/// What changed for one key since the last report, for a log line each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Change<K> {
    /// Its replies arrive (now also) on these devices, which have no tc programs.
    Unserved(K, BTreeSet<String>),
    /// Every device its replies arrive on carries the programs again (or it has none left).
    Served(K),
}

/// Per key (a Service), the devices its SNATed backends' replies arrive on, kept up to date
/// incrementally: an endpoint change looks up one Service's addresses (cached), and a report
/// compares only the keys that changed, unless the set of devices with programs did.
#[derive(Debug)]
pub(crate) struct ReplyPaths<K> {
    arrive_on: BTreeMap<K, BTreeSet<String>>,
    /// How many keys each device serves, so `auto` knows the devices without a walk.
    uses: BTreeMap<String, usize>,
    /// Keys whose devices changed since the last report.
    dirty: BTreeSet<K>,
    /// The devices with programs at the last report.
    served: BTreeSet<String>,
    /// The last report: the devices without programs, per key that has any.
    unserved: BTreeMap<K, BTreeSet<String>>,
}

impl<K> Default for ReplyPaths<K> {
    fn default() -> Self {
        Self {
            arrive_on: BTreeMap::new(),
            uses: BTreeMap::new(),
            dirty: BTreeSet::new(),
            served: BTreeSet::new(),
            unserved: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Clone> ReplyPaths<K> {
    /// Takes `key`'s addresses now (none: it has no SNATed backend left), looking each up with
    /// `devices_of`.
    pub(crate) fn set(
        &mut self,
        key: &K,
        addrs: &[IpAddr],
        devices_of: &mut impl FnMut(IpAddr) -> Vec<String>,
    ) {
        let devices: BTreeSet<String> = addrs.iter().flat_map(|a| devices_of(*a)).collect();
        let old = if devices.is_empty() {
            self.arrive_on.remove(key)
        } else {
            for device in &devices {
                *self.uses.entry(device.clone()).or_default() += 1;
            }
            self.arrive_on.insert(key.clone(), devices)
        };
        for device in old.iter().flatten() {
            if let Some(count) = self.uses.get_mut(device) {
                *count -= 1;
                if *count == 0 {
                    self.uses.remove(device);
                }
            }
        }
        self.dirty.insert(key.clone());
    }

    /// Every device some key's replies arrive on.
    pub(crate) fn devices(&self) -> BTreeSet<String> {
        self.uses.keys().cloned().collect()
    }

    /// Compares the devices replies arrive on with `served` (those with the programs) and
    /// returns what changed since the last report.
    pub(crate) fn report(&mut self, served: BTreeSet<String>) -> Vec<Change<K>> {
        let keys: Vec<K> = if served == self.served {
            std::mem::take(&mut self.dirty).into_iter().collect()
        } else {
            self.dirty.clear();
            self.served = served;
            self.arrive_on
                .keys()
                .chain(self.unserved.keys())
                .cloned()
                .collect()
        };
        let mut changes = Vec::new();
        for key in keys {
            let missing: BTreeSet<String> = self
                .arrive_on
                .get(&key)
                .into_iter()
                .flatten()
                .filter(|d| !self.served.contains(*d))
                .cloned()
                .collect();
            if missing.is_empty() {
                if self.unserved.remove(&key).is_some() {
                    changes.push(Change::Served(key));
                }
            } else if self.unserved.get(&key) != Some(&missing) {
                self.unserved.insert(key.clone(), missing.clone());
                changes.push(Change::Unserved(key, missing));
            }
        }
        changes
    }

    /// How many keys each device without programs fails, as of the last report.
    pub(crate) fn unserved_per_device(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for device in self.unserved.values().flatten() {
            *counts.entry(device.clone()).or_default() += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(ToString::to_string).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A node with `eth0` (default route), `n2` towards 10.245.0.0/24, a two-path route to
    /// 10.246.0.0/24 over `n2` and `n3`, and no route to 10.9.0.0/16.
    fn routes(addr: IpAddr) -> Vec<String> {
        let text = addr.to_string();
        if text.starts_with("10.245.") {
            vec!["n2".into()]
        } else if text.starts_with("10.246.") {
            vec!["n2".into(), "n3".into()]
        } else if text.starts_with("10.9.") {
            Vec::new()
        } else {
            vec!["eth0".into()]
        }
    }

    #[test]
    fn a_service_is_unserved_where_any_of_its_backends_replies_arrive_without_programs() {
        let mut paths = ReplyPaths::default();
        let mut lookup = routes;
        paths.set(&"one-path", &[ip("10.245.0.2"), ip("10.245.0.3")], &mut lookup);
        paths.set(&"multipath", &[ip("10.246.0.9")], &mut lookup);
        paths.set(&"default-route", &[ip("192.0.2.1")], &mut lookup);
        paths.set(&"no-route", &[ip("10.9.0.1")], &mut lookup);
        assert_eq!(paths.devices(), set(&["eth0", "n2", "n3"]));
        assert_eq!(
            paths.report(set(&["eth0", "n3"])),
            [
                Change::Unserved("multipath", set(&["n2"])),
                Change::Unserved("one-path", set(&["n2"]))
            ]
        );
        assert_eq!(paths.unserved_per_device(), [("n2".to_string(), 2)].into());
        // n2 gets the programs: both are served, and nothing is left to count.
        assert_eq!(
            paths.report(set(&["eth0", "n2", "n3"])),
            [Change::Served("multipath"), Change::Served("one-path")]
        );
        assert!(paths.unserved_per_device().is_empty());
    }

    #[test]
    fn each_service_is_reported_once_per_change_and_devices_are_counted_as_they_go() {
        let mut paths = ReplyPaths::default();
        let mut lookup = routes;
        let served = || set(&["eth0"]);
        paths.set(&"a", &[ip("10.245.0.2")], &mut lookup);
        paths.set(&"b", &[ip("10.246.0.2")], &mut lookup);
        assert_eq!(
            paths.report(served()),
            [
                Change::Unserved("a", set(&["n2"])),
                Change::Unserved("b", set(&["n2", "n3"]))
            ]
        );
        assert!(
            paths.report(served()).is_empty(),
            "nothing changed, nothing to say"
        );
        paths.set(&"a", &[ip("10.245.0.2"), ip("10.245.0.7")], &mut lookup);
        assert!(
            paths.report(served()).is_empty(),
            "the same devices for a's new backend"
        );
        assert_eq!(
            paths.unserved_per_device(),
            [("n2".to_string(), 2), ("n3".to_string(), 1)].into()
        );
        paths.set(&"b", &[ip("10.245.0.9")], &mut lookup);
        paths.set(&"a", &[], &mut lookup);
        assert_eq!(paths.devices(), set(&["n2"]), "n3 is no longer used");
        assert_eq!(
            paths.report(served()),
            [Change::Served("a"), Change::Unserved("b", set(&["n2"]))]
        );
        assert_eq!(paths.unserved_per_device(), [("n2".to_string(), 1)].into());
    }
}
