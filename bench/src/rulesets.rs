//! The rulesets upstream kube-proxy programs for the same Services, as `iptables-restore` and
//! `nft -f` input, following the structure of pkg/proxy/iptables/proxier.go and
//! pkg/proxy/nftables/proxier.go (chain names, match order, statistic probabilities, verdict
//! maps). Chain name hashes are ours (kube-proxy uses base32 of SHA-256); their length and
//! shape are the same.

use std::fmt::Write as _;

/// One Service port as the benchmark programs it everywhere.
#[derive(Clone, Debug)]
pub struct Svc {
    pub namespace: String,
    pub name: String,
    pub vip: std::net::Ipv4Addr,
    pub port: u16,
    /// The NodePort range holds 2 768 ports, so only that many Services can have one.
    pub node_port: Option<u16>,
    pub endpoints: Vec<(std::net::Ipv4Addr, u16)>,
    /// UDP rather than TCP (the packet-rate figure's Service).
    pub udp: bool,
}

/// Ports in kube-proxy's default NodePort range, 30000-32767.
pub const MAX_NODE_PORTS: usize = 2768;

impl Svc {
    /// The protocol as iptables and nft name it.
    pub fn proto(&self) -> &'static str {
        if self.udp { "udp" } else { "tcp" }
    }

    fn port_name(&self) -> String {
        format!("{}/{}:http", self.namespace, self.name)
    }
}

pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// 16 upper-case base32-alphabet characters, stable for a given input (FNV-1a 64).
fn hash16(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(16);
    let mut v = h ^ (h >> 29);
    for i in 0..16 {
        if i == 12 {
            v = h.rotate_left(31);
        }
        out.push(ALPHABET[(v & 31) as usize] as char);
        v >>= 5;
    }
    out
}

pub fn svc_chain(s: &Svc) -> String {
    format!("KUBE-SVC-{}", hash16(&format!("{}{}", s.port_name(), s.proto())))
}

fn ext_chain(s: &Svc) -> String {
    format!("KUBE-EXT-{}", hash16(&format!("{}{}", s.port_name(), s.proto())))
}

pub fn sep_chain(s: &Svc, ep: (std::net::Ipv4Addr, u16)) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&format!("{}{}{}:{}", s.port_name(), s.proto(), ep.0, ep.1))
    )
}

/// The rules of one Service's KUBE-SVC chain and its KUBE-SEP chains (what a partial sync
/// rewrites when that Service's endpoints change).
fn iptables_service_rules(s: &Svc, out: &mut String) {
    let svc = svc_chain(s);
    let (pn, p) = (s.port_name(), s.proto());
    let _ = writeln!(
        out,
        "-A {svc} -m comment --comment \"{pn} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
        s.vip, s.port
    );
    let n = s.endpoints.len();
    for (i, ep) in s.endpoints.iter().enumerate() {
        let sep = sep_chain(s, *ep);
        if i + 1 < n {
            let p = 1.0 / (n - i) as f64;
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"{pn} -> {}:{}\" -m statistic --mode random --probability {p:.10} -j {sep}",
                ep.0, ep.1
            );
        } else {
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"{pn} -> {}:{}\" -j {sep}",
                ep.0, ep.1
            );
        }
    }
    for ep in &s.endpoints {
        let sep = sep_chain(s, *ep);
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment {pn} -s {}/32 -j KUBE-MARK-MASQ",
            ep.0
        );
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment {pn} -m {p} -p {p} -j DNAT --to-destination {}:{}",
            ep.0, ep.1
        );
    }
}

fn iptables_declare_service(s: &Svc, out: &mut String) {
    let _ = writeln!(out, ":{} - [0:0]", svc_chain(s));
    if s.node_port.is_some() {
        let _ = writeln!(out, ":{} - [0:0]", ext_chain(s));
    }
    for ep in &s.endpoints {
        let _ = writeln!(out, ":{} - [0:0]", sep_chain(s, *ep));
    }
}

/// The whole nat and filter tables, as a full kube-proxy sync writes them.
pub fn iptables_full(services: &[Svc]) -> String {
    let mut out = String::new();
    out.push_str("*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n");
    out.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    out.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n");
    out.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    out.push_str("COMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    for s in services {
        iptables_declare_service(s, &mut out);
    }
    out.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    out.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    out.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    for s in services {
        let p = s.proto();
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} -j {}",
            s.port_name(),
            s.vip,
            s.port,
            svc_chain(s)
        );
    }
    for s in services {
        let (ext, pn, p) = (ext_chain(s), s.port_name(), s.proto());
        if let Some(node_port) = s.node_port {
            let _ = writeln!(
                out,
                "-A KUBE-NODEPORTS -m comment --comment {pn} -m {p} -p {p} --dport {node_port} -j {ext}"
            );
            let _ = writeln!(
                out,
                "-A {ext} -m comment --comment \"masquerade traffic for {pn} external destinations\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(out, "-A {ext} -j {}", svc_chain(s));
        }
        iptables_service_rules(s, &mut out);
    }
    out.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    out.push_str("COMMIT\n");
    out
}

/// The hooks kube-proxy adds outside the restore (`iptables -I`), as a restore with
/// `--noflush` so the built-in chains keep their other rules.
pub fn iptables_jumps() -> &'static str {
    "*nat\n-I OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -I PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -I POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\nCOMMIT\n"
}

/// A partial sync after `before` became `after` (same Service): kube-proxy (1.27+, with
/// MinimizeIPTablesRestore) rewrites only that Service's chains, declares new endpoint chains
/// and deletes the ones that went away, with `iptables-restore --noflush`.
pub fn iptables_partial(before: &Svc, after: &Svc) -> String {
    let mut out = String::from("*nat\n");
    let _ = writeln!(out, ":{} - [0:0]", svc_chain(after));
    for ep in &after.endpoints {
        let _ = writeln!(out, ":{} - [0:0]", sep_chain(after, *ep));
    }
    let gone: Vec<String> = before
        .endpoints
        .iter()
        .filter(|ep| !after.endpoints.contains(ep))
        .map(|ep| sep_chain(before, *ep))
        .collect();
    for chain in &gone {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    iptables_service_rules(after, &mut out);
    for chain in &gone {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

pub fn nft_service_chain(s: &Svc) -> String {
    format!(
        "service-{}-{}/{}/{}/http",
        &hash16(&s.port_name())[..8],
        s.namespace,
        s.name,
        s.proto()
    )
}

fn nft_endpoint_chain(s: &Svc, ep: (std::net::Ipv4Addr, u16)) -> String {
    format!(
        "endpoint-{}-{}/{}/{}/http__{}/{}",
        &hash16(&format!("{}{}", s.port_name(), ep.0))[..8],
        s.namespace,
        s.name,
        s.proto(),
        ep.0,
        ep.1
    )
}

/// One Service's chains, as `add chain` / `flush chain` / `add rule` commands.
fn nft_service(s: &Svc, out: &mut String) {
    let chain = nft_service_chain(s);
    let _ = writeln!(
        out,
        "add chain ip kube-proxy {chain}\nflush chain ip kube-proxy {chain}"
    );
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} ip daddr {} {} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        s.vip,
        s.proto(),
        s.port
    );
    let targets: Vec<String> = s
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| format!("{i} : goto {}", nft_endpoint_chain(s, *ep)))
        .collect();
    for ep in &s.endpoints {
        let ec = nft_endpoint_chain(s, *ep);
        let _ = writeln!(
            out,
            "add chain ip kube-proxy {ec}\nflush chain ip kube-proxy {ec}"
        );
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {ec} ip saddr {} jump mark-for-masquerade",
            ep.0
        );
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {ec} meta l4proto {} dnat to {}:{}",
            s.proto(),
            ep.0,
            ep.1
        );
    }
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} numgen random mod {} vmap {{ {} }}",
        s.endpoints.len(),
        targets.join(", ")
    );
}

/// kube-proxy's nftables table for `services`, as one `nft -f` transaction.
pub fn nft_full(services: &[Svc]) -> String {
    let mut out = String::from(
        "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n\
         delete table ip kube-proxy\n\
         add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n\
         add chain ip kube-proxy mark-for-masquerade\n\
         add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n\
         add chain ip kube-proxy masquerading\n\
         add rule ip kube-proxy masquerading mark and 0x4000 == 0 return\n\
         add rule ip kube-proxy masquerading mark set mark xor 0x4000\n\
         add rule ip kube-proxy masquerading masquerade fully-random\n\
         add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }\n\
         add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }\n\
         add chain ip kube-proxy services\n\
         add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n\
         add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority dstnat ; }\n\
         add rule ip kube-proxy nat-prerouting jump services\n\
         add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n\
         add rule ip kube-proxy nat-output jump services\n\
         add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority srcnat ; }\n\
         add rule ip kube-proxy nat-postrouting jump masquerading\n",
    );
    for s in services {
        nft_service(s, &mut out);
        let chain = nft_service_chain(s);
        let _ = writeln!(
            out,
            "add element ip kube-proxy service-ips {{ {} . {} . {} : goto {chain} }}",
            s.vip,
            s.proto(),
            s.port
        );
        if let Some(node_port) = s.node_port {
            let _ = writeln!(
                out,
                "add element ip kube-proxy service-nodeports {{ {} . {node_port} : goto {chain} }}",
                s.proto()
            );
        }
    }
    out
}

/// An endpoint change in nftables mode: the Service's chain rewritten, new endpoint chains
/// added, departed ones deleted, in one transaction.
pub fn nft_partial(before: &Svc, after: &Svc) -> String {
    let mut out = String::new();
    nft_service(after, &mut out);
    for ep in before.endpoints.iter().filter(|ep| !after.endpoints.contains(ep)) {
        let _ = writeln!(
            out,
            "delete chain ip kube-proxy {}",
            nft_endpoint_chain(before, *ep)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(i: u32, eps: usize) -> Svc {
        Svc {
            namespace: "bench".into(),
            name: format!("svc-{i}"),
            vip: std::net::Ipv4Addr::from(0x0a60_0000 + i),
            port: 80,
            node_port: Some(30000 + i as u16),
            endpoints: (0..eps)
                .map(|e| (std::net::Ipv4Addr::from(0x0a80_0000 + i * 16 + e as u32), 8080))
                .collect(),
            udp: false,
        }
    }

    #[test]
    fn iptables_probabilities_give_each_endpoint_an_equal_share() {
        let text = iptables_full(&[svc(1, 4)]);
        let probs: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split("--probability ").nth(1))
            .map(|rest| rest.split(' ').next().unwrap())
            .collect();
        assert_eq!(probs, ["0.2500000000", "0.3333333333", "0.5000000000"]);
    }

    #[test]
    fn every_jump_target_is_declared() {
        let services: Vec<Svc> = (0..20).map(|i| svc(i, 3)).collect();
        let text = iptables_full(&services);
        let declared: std::collections::HashSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        for target in text.lines().filter_map(|l| l.split(" -j ").nth(1)) {
            let target = target.split(' ').next().unwrap();
            if target.starts_with("KUBE-") {
                assert!(declared.contains(target), "{target} undeclared");
            }
        }
    }

    #[test]
    fn chain_names_are_distinct_per_service_and_endpoint() {
        let services: Vec<Svc> = (0..2000).map(|i| svc(i, 2)).collect();
        let mut names = std::collections::HashSet::new();
        for s in &services {
            assert!(names.insert(svc_chain(s)));
            for ep in &s.endpoints {
                assert!(names.insert(sep_chain(s, *ep)));
            }
        }
    }
}
