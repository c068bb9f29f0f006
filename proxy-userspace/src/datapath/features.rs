//! What the running kernel offers the datapath, probed once at start, and what the agent uses
//! instead where something is missing.
//!
//! Every fact here is probed, never inferred from the kernel version (distributions backport:
//! Debian's 6.1.0-57 has the `BPF_F_IPV6` csum flag of 6.16, for one):
//! - TCX: `BPF_PROG_QUERY` with `BPF_TCX_INGRESS` on `lo` (read-only; kernels before 6.6 refuse
//!   the attach type with EINVAL), as cilium/ebpf probes it.
//! - names in the kernel's own BTF (`/sys/kernel/btf/vmlinux`): the `bpf_sock_destroy` kfunc,
//!   and enumerators of the UAPI that arrived with a feature (`BPF_F_IPV6 = 1 << 7`,
//!   `BPF_MAP_UPDATE_BATCH`, `BPF_CGROUP_INET4_GETPEERNAME`).
//! - sock_diag `SOCK_DESTROY` (`CONFIG_INET_DIAG_DESTROY`): the agent destroys a UDP socket of
//!   its own (see [`sockets::destroy_supported`]).

use std::{collections::BTreeMap, fmt, str::FromStr};

use aya::programs::{ProgramError, SchedClassifier, TcAttachType};

use crate::datapath::sockets;

/// `--tc-attach`: how the tc programs are attached to the devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcAttach {
    /// TCX links where the kernel has them (6.6+), netlink cls_bpf filters otherwise.
    #[default]
    Auto,
    Tcx,
    Netlink,
}

impl FromStr for TcAttach {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value {
            "auto" => Ok(Self::Auto),
            "tcx" => Ok(Self::Tcx),
            "netlink" => Ok(Self::Netlink),
            other => Err(format!("{other:?} is not auto, tcx or netlink")),
        }
    }
}

/// `--xdp`: whether external traffic is also translated by XDP, before tc, on `--devices`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpAttach {
    /// Native XDP on each Ethernet device whose driver has it, except veths (a frame XDP sends
    /// to a veth is dropped unless its peer runs NAPI: GRO on, or an XDP program of its own,
    /// which the agent cannot see from this side); tc alone elsewhere.
    #[default]
    Auto,
    /// Native XDP on every Ethernet device; one whose driver refuses it is a failure.
    Native,
    /// Generic (skb) XDP on every Ethernet device: any driver, but no faster than tc.
    Generic,
    /// tc alone.
    Off,
}

impl FromStr for XdpAttach {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value {
            "auto" => Ok(Self::Auto),
            "native" => Ok(Self::Native),
            "generic" => Ok(Self::Generic),
            "off" => Ok(Self::Off),
            other => Err(format!("{other:?} is not auto, native, generic or off")),
        }
    }
}

impl XdpAttach {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Generic => "generic",
            Self::Off => "off",
        }
    }
}

/// How a tc program is attached to one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcMode {
    /// A TCX link (6.6+), pinned, so it outlives the agent and is updated in place.
    Tcx,
    /// A cls_bpf direct-action filter on the device's clsact qdisc, at a fixed priority and
    /// handle, so a restarted agent replaces it in place.
    Netlink,
}

impl TcMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Netlink => "netlink",
        }
    }
}

impl fmt::Display for TcMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TcAttach {
    /// The mode to use given whether the kernel has TCX (`None`: the probe could not tell).
    /// Forcing `tcx` on a kernel without it is honoured: the attach then fails per device,
    /// and that is reported, rather than silently doing something else.
    pub fn mode(self, tcx: Option<bool>) -> TcMode {
        match (self, tcx) {
            (Self::Tcx, _) | (Self::Auto, Some(true)) => TcMode::Tcx,
            (Self::Netlink | Self::Auto, _) => TcMode::Netlink,
        }
    }
}

/// One probed fact: its name (the metric's `feature` label), whether the kernel has it
/// (`None`: could not be probed) and what the agent does without it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Feature {
    pub name: &'static str,
    pub(crate) available: Option<bool>,
    /// What happens when it is missing.
    pub fallback: &'static str,
}

/// What the running kernel has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct KernelFeatures {
    pub release: String,
    /// `/sys/kernel/btf/vmlinux` parsed; the BTF facts below are `None` without it.
    pub btf: bool,
    pub tcx: Option<bool>,
    pub(crate) sock_destroy_kfunc: Option<bool>,
    pub(crate) sock_diag_destroy: Option<bool>,
    pub(crate) l4_csum_ipv6: Option<bool>,
    pub(crate) map_batch: Option<bool>,
    pub(crate) sock_peer_hooks: Option<bool>,
}

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// `BPF_F_IPV6` of `bpf_l4_csum_replace`; an enumerator of that name and value exists exactly
/// where the helper honours it.
const BPF_F_IPV6: (&str, i64) = ("BPF_F_IPV6", 1 << 7);

impl KernelFeatures {
    /// Probes the running kernel (needs the privileges the agent runs with anyway).
    pub fn probe() -> Self {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|r| r.trim().to_string())
            .unwrap_or_default();
        let tcx = match SchedClassifier::query_tcx("lo", TcAttachType::Ingress) {
            Ok(_) => Some(true),
            Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EINVAL) => {
                Some(false)
            }
            Err(e) => {
                tracing::debug!("TCX probe inconclusive: {e}");
                None
            }
        };
        let names = std::fs::read(VMLINUX_BTF)
            .map_err(|e| e.to_string())
            .and_then(|data| {
                BtfNames::scan(
                    &data,
                    &[
                        BPF_F_IPV6.0,
                        "BPF_MAP_UPDATE_BATCH",
                        "BPF_CGROUP_INET4_GETPEERNAME",
                    ],
                    &["bpf_sock_destroy"],
                )
                .map_err(|e| e.to_string())
            });
        let names = match names {
            Ok(names) => Some(names),
            Err(e) => {
                tracing::debug!("{VMLINUX_BTF}: {e}");
                None
            }
        };
        let sock_diag_destroy = match sockets::destroy_supported() {
            Ok(yes) => Some(yes),
            Err(e) => {
                tracing::debug!("SOCK_DESTROY probe inconclusive: {e}");
                None
            }
        };
        Self {
            release,
            btf: names.is_some(),
            tcx,
            sock_destroy_kfunc: names.as_ref().map(|n| n.funcs.contains("bpf_sock_destroy")),
            sock_diag_destroy,
            l4_csum_ipv6: names
                .as_ref()
                .map(|n| n.enumerators.get(BPF_F_IPV6.0) == Some(&BPF_F_IPV6.1)),
            map_batch: names
                .as_ref()
                .map(|n| n.enumerators.contains_key("BPF_MAP_UPDATE_BATCH")),
            sock_peer_hooks: names
                .as_ref()
                .map(|n| n.enumerators.contains_key("BPF_CGROUP_INET4_GETPEERNAME")),
        }
    }

    /// Every fact, in the order the log line lists them.
    pub fn list(&self) -> Vec<Feature> {
        vec![
            Feature {
                name: "btf",
                available: Some(self.btf),
                fallback: "the kernel's BTF cannot be read: the BTF-based probes are unknown",
            },
            Feature {
                name: "tcx",
                available: self.tcx,
                fallback: "tc programs attach as cls_bpf filters on clsact through netlink",
            },
            Feature {
                name: "bpf_sock_destroy",
                available: self.sock_destroy_kfunc,
                fallback: "none needed: stale UDP sockets end through netlink SOCK_DESTROY",
            },
            Feature {
                name: "sock_diag_destroy",
                available: self.sock_diag_destroy,
                fallback: "connected UDP sockets of departed backends are not ended (needs CONFIG_INET_DIAG_DESTROY)",
            },
            Feature {
                name: "l4_csum_ipv6",
                available: self.l4_csum_ipv6,
                fallback: "the tc program retries bpf_l4_csum_replace without BPF_F_IPV6 (skb csum of CHECKSUM_COMPLETE IPv6 packets left to the stack)",
            },
            Feature {
                name: "map_batch",
                available: self.map_batch,
                fallback: "maps are written one entry per syscall",
            },
            Feature {
                name: "sock_peer_hooks",
                available: self.sock_peer_hooks,
                fallback: "none: the getpeername/recvmsg socket programs (Linux 5.8) cannot attach",
            },
        ]
    }

    /// What cleans up connected UDP sockets of departed backends.
    pub(crate) fn stale_udp(&self) -> &'static str {
        match self.sock_diag_destroy {
            Some(false) => "none",
            _ => "netlink SOCK_DESTROY",
        }
    }

    /// The one log line at start: what the kernel has, what is used instead of what it lacks.
    pub fn log(&self, tc: TcMode) {
        let (have, missing): (Vec<Feature>, Vec<Feature>) =
            self.list().into_iter().partition(|f| f.available == Some(true));
        let names = |list: &[Feature]| list.iter().map(|f| f.name).collect::<Vec<_>>().join(",");
        let (missing, unknown): (Vec<Feature>, Vec<Feature>) =
            missing.into_iter().partition(|f| f.available == Some(false));
        let fallbacks = missing
            .iter()
            .map(|f| format!("{}: {}", f.name, f.fallback))
            .collect::<Vec<_>>()
            .join("; ");
        tracing::info!(
            kernel = %self.release,
            tc_attach = tc.as_str(),
            stale_udp = self.stale_udp(),
            have = names(&have).as_str(),
            missing = names(&missing).as_str(),
            unknown = names(&unknown).as_str(),
            fallbacks = fallbacks.as_str(),
            "kernel features"
        );
    }
}

/// The names found in a BTF blob among those asked for.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct BtfNames {
    /// Enumerator name → value (of ENUM or ENUM64 types).
    pub(crate) enumerators: BTreeMap<String, i64>,
    /// FUNC types (kernel functions, kfuncs among them).
    pub(crate) funcs: std::collections::BTreeSet<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum BtfParseError {
    #[error("not BTF (magic {0:#06x})")]
    Magic(u16),
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error("unknown BTF kind {kind} at byte {at}")]
    Kind { kind: u32, at: usize },
}

const BTF_MAGIC: u16 = 0xeb9f;
const BTF_KIND_ENUM: u32 = 6;
const BTF_KIND_FUNC: u32 = 12;
const BTF_KIND_ENUM64: u32 = 19;

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfParseError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(BtfParseError::Truncated(at))
}

fn string_at(strings: &[u8], offset: u32) -> Option<&str> {
    let tail = strings.get(offset as usize..)?;
    let end = tail.iter().position(|b| *b == 0)?;
    std::str::from_utf8(&tail[..end]).ok()
}

impl BtfNames {
    /// Walks the type section of a little-endian BTF blob once (aya_obj's parser would build
    /// every one of vmlinux's ~100 000 types; only names are needed here).
    pub(crate) fn scan(data: &[u8], enumerators: &[&str], funcs: &[&str]) -> Result<Self, BtfParseError> {
        let magic = data
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or(BtfParseError::Truncated(0))?;
        if magic != BTF_MAGIC {
            return Err(BtfParseError::Magic(magic));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let types = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfParseError::Truncated(hdr_len + type_off + type_len))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfParseError::Truncated(hdr_len + str_off + str_len))?;
        let mut out = Self::default();
        let mut at = 0;
        while at < types.len() {
            let name_off = u32_at(types, at)?;
            let info = u32_at(types, at + 4)?;
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let members = at + 12;
            let extra = match kind {
                1 | 14 | 17 => 4,
                3 => 12,
                4 | 5 | 15 => 12 * vlen,
                BTF_KIND_ENUM | 13 => 8 * vlen,
                BTF_KIND_ENUM64 => 12 * vlen,
                2 | 7..=12 | 16 | 18 => 0,
                kind => return Err(BtfParseError::Kind { kind, at }),
            };
            if kind == BTF_KIND_FUNC
                && let Some(name) = string_at(strings, name_off).filter(|n| funcs.contains(n))
            {
                out.funcs.insert(name.to_string());
            }
            if kind == BTF_KIND_ENUM || kind == BTF_KIND_ENUM64 {
                let size = if kind == BTF_KIND_ENUM { 8 } else { 12 };
                for i in 0..vlen {
                    let member = members + i * size;
                    let Some(name) =
                        string_at(strings, u32_at(types, member)?).filter(|n| enumerators.contains(n))
                    else {
                        continue;
                    };
                    let low = u32_at(types, member + 4)?;
                    let value = if kind == BTF_KIND_ENUM {
                        i64::from(low as i32)
                    } else {
                        (i64::from(u32_at(types, member + 8)?) << 32) | i64::from(low)
                    };
                    out.enumerators.insert(name.to_string(), value);
                }
            }
            at = members + extra;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with the given types (kind, name, members (name, value), size of the rest).
    struct Blob {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Blob {
        fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
            }
        }

        fn name(&mut self, name: &str) -> u32 {
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }

        fn header(&mut self, name: &str, kind: u32, vlen: usize) {
            let off = self.name(name);
            self.types.extend_from_slice(&off.to_le_bytes());
            self.types
                .extend_from_slice(&((kind << 24) | vlen as u32).to_le_bytes());
            self.types.extend_from_slice(&4u32.to_le_bytes());
        }

        fn int(&mut self, name: &str) -> &mut Self {
            self.header(name, 1, 0);
            self.types.extend_from_slice(&0x20u32.to_le_bytes());
            self
        }

        fn struct_(&mut self, name: &str, members: usize) -> &mut Self {
            self.header(name, 4, members);
            self.types.extend(std::iter::repeat_n(0, 12 * members));
            self
        }

        fn func(&mut self, name: &str) -> &mut Self {
            self.header(name, BTF_KIND_FUNC, 0);
            self
        }

        fn enum_(&mut self, name: &str, members: &[(&str, i32)]) -> &mut Self {
            self.header(name, BTF_KIND_ENUM, members.len());
            for (n, v) in members {
                let off = self.name(n);
                self.types.extend_from_slice(&off.to_le_bytes());
                self.types.extend_from_slice(&v.to_le_bytes());
            }
            self
        }

        fn enum64(&mut self, name: &str, members: &[(&str, i64)]) -> &mut Self {
            self.header(name, BTF_KIND_ENUM64, members.len());
            for (n, v) in members {
                let off = self.name(n);
                self.types.extend_from_slice(&off.to_le_bytes());
                self.types.extend_from_slice(&(*v as u32).to_le_bytes());
                self.types.extend_from_slice(&((*v >> 32) as u32).to_le_bytes());
            }
            self
        }

        fn bytes(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            out.extend_from_slice(&24u32.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&(self.types.len() as u32).to_le_bytes());
            out.extend_from_slice(&(self.types.len() as u32).to_le_bytes());
            out.extend_from_slice(&(self.strings.len() as u32).to_le_bytes());
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    #[test]
    fn btf_scan_finds_asked_for_enumerators_and_funcs_past_other_kinds() {
        let blob = Blob::new()
            .int("int")
            .struct_("sk_buff", 3)
            .enum_("bpf_cmd", &[("BPF_MAP_CREATE", 0), ("BPF_MAP_UPDATE_BATCH", 26)])
            .func("bpf_sock_destroy")
            .func("other_func")
            .enum_("", &[("BPF_F_MARK_ENFORCE", 64), ("BPF_F_IPV6", 128)])
            .enum64("wide", &[("BIG", 1 << 40)])
            .bytes();
        let names = BtfNames::scan(
            &blob,
            &["BPF_MAP_UPDATE_BATCH", "BPF_F_IPV6", "BIG", "BPF_TCX_INGRESS"],
            &["bpf_sock_destroy", "missing_func"],
        )
        .unwrap();
        assert_eq!(names.enumerators["BPF_MAP_UPDATE_BATCH"], 26);
        assert_eq!(names.enumerators["BPF_F_IPV6"], 128);
        assert_eq!(names.enumerators["BIG"], 1 << 40);
        assert!(!names.enumerators.contains_key("BPF_TCX_INGRESS"));
        assert!(!names.enumerators.contains_key("BPF_MAP_CREATE"), "not asked for");
        assert_eq!(names.funcs.iter().collect::<Vec<_>>(), ["bpf_sock_destroy"]);
    }

    #[test]
    fn btf_scan_refuses_what_is_not_btf() {
        assert_eq!(
            BtfNames::scan(b"\x7fELF0000000000000000000000", &[], &[]),
            Err(BtfParseError::Magic(0x457f))
        );
        let mut blob = Blob::new().func("f").bytes();
        blob.truncate(30);
        assert!(matches!(
            BtfNames::scan(&blob, &[], &[]),
            Err(BtfParseError::Truncated(_))
        ));
    }

    #[test]
    fn tc_mode_follows_the_probe_unless_forced() {
        assert_eq!(TcAttach::Auto.mode(Some(true)), TcMode::Tcx);
        assert_eq!(TcAttach::Auto.mode(Some(false)), TcMode::Netlink);
        // Netlink works on every kernel: an inconclusive probe picks it.
        assert_eq!(TcAttach::Auto.mode(None), TcMode::Netlink);
        assert_eq!(TcAttach::Netlink.mode(Some(true)), TcMode::Netlink);
        assert_eq!(TcAttach::Tcx.mode(Some(false)), TcMode::Tcx);
        assert_eq!("netlink".parse(), Ok(TcAttach::Netlink));
        assert!("tc".parse::<TcAttach>().is_err());
    }

    #[test]
    fn features_of_a_6_1_kernel_name_their_fallbacks() {
        let kernel = KernelFeatures {
            release: "6.1.0-57-amd64".into(),
            btf: true,
            tcx: Some(false),
            sock_destroy_kfunc: Some(false),
            sock_diag_destroy: Some(true),
            l4_csum_ipv6: Some(true),
            map_batch: Some(true),
            sock_peer_hooks: Some(true),
        };
        let missing: Vec<&str> = kernel
            .list()
            .iter()
            .filter(|f| f.available == Some(false))
            .map(|f| f.name)
            .collect();
        assert_eq!(missing, ["tcx", "bpf_sock_destroy"]);
        assert_eq!(kernel.stale_udp(), "netlink SOCK_DESTROY");
        let without_diag = KernelFeatures {
            sock_diag_destroy: Some(false),
            ..kernel
        };
        assert_eq!(without_diag.stale_udp(), "none");
    }
}
