//! The tc path on the node: the node settings map the programs read, and the programs' links
//! on each device.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Array, DevMapHash, MapData},
    programs::{
        Link as _, LinkOrder, ProgramError, SchedClassifier, TcAttachType, TcError, Xdp, XdpMode,
        links::{FdLink, LinkError},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
};
use proxy_common::maps::{self as names, NodeConfig};

pub use crate::datapath::links::Attached;
use crate::datapath::{
    features::{TcMode, XdpAttach},
    host, links,
    loader::LoadError,
    maps::typed,
    sys,
};

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

/// Whether a tc program loaded: the datapath serves without it (only traffic from outside
/// the node needs the tc path), so a failure is reported, not fatal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ProgramState {
    Loaded,
    /// The verifier's (shortened) reason, or aya's.
    Failed(String),
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    ebpf.program_mut(XDP_PROGRAM)
        .ok_or(LoadError::MissingProgram { name: XDP_PROGRAM })?
        .try_into()
        .map_err(|source| LoadError::Program {
            name: XDP_PROGRAM,
            source,
        })
}

/// Loads every tc program the object has, and the XDP one; none of their failures stops the
/// others.
pub(crate) fn load_programs(ebpf: &mut Ebpf) -> Vec<(&'static str, ProgramState)> {
    let state = |loaded: Result<Result<(), ProgramError>, LoadError>| match loaded {
        Err(e) => ProgramState::Failed(e.to_string()),
        Ok(Ok(())) => ProgramState::Loaded,
        Ok(Err(e)) => ProgramState::Failed(short_error(&e.to_string())),
    };
    let mut states: Vec<(&'static str, ProgramState)> = TC_PROGRAMS
        .iter()
        .map(|p| (p.name, state(tc_program(ebpf, p.name).map(SchedClassifier::load))))
        .collect();
    states.push((XDP_PROGRAM, state(xdp_program(ebpf).map(Xdp::load))));
    states
}

/// aya's load error carries the whole verifier log; the reason is its last line before the
/// statistics (`processed N insns`, `stack depth ...`, `verification time`).
pub(crate) fn short_error(text: &str) -> String {
    const MAX: usize = 240;
    let short = match text.split_once("Verifier output:") {
        Some((head, log)) => {
            let reason = log
                .lines()
                .map(str::trim)
                .rfind(|l| {
                    !l.is_empty()
                        && !["processed ", "stack depth", "verification time"]
                            .iter()
                            .any(|p| l.starts_with(p))
                })
                .unwrap_or("(empty verifier log)");
            format!("{}: {reason}", head.trim_end().trim_end_matches('.'))
        }
        None => text.to_string(),
    };
    match short.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &short[..cut]),
        None => short,
    }
}

/// Which program pair a device gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeviceKind {
    /// Packets start at an Ethernet header.
    Ethernet,
    /// Packets start at the IP header: tunnels (IPIP, SIT, GRE, ip6tnl), WireGuard, TUN, PPP.
    L3,
}

const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;
/// `dev->type` of devices without a link-layer header (linux/if_arp.h): PPP, RAWIP, TUNNEL
/// (ipip), TUNNEL6 (ip6tnl), SIT, IPGRE, IP6GRE, NONE (WireGuard, TUN).
const ARPHRD_L3: [u16; 8] = [512, 519, 768, 769, 776, 778, 823, 65534];

impl DeviceKind {
    /// The kind of a device of link type `arphrd`; `None` for link layers the programs do not
    /// parse (InfiniBand, CAN, ...). Bridges, bonds, VLANs, VXLAN and veths are ARPHRD_ETHER.
    pub fn of(arphrd: u16) -> Option<Self> {
        match arphrd {
            ARPHRD_ETHER | ARPHRD_LOOPBACK => Some(Self::Ethernet),
            t if ARPHRD_L3.contains(&t) => Some(Self::L3),
            _ => None,
        }
    }
}

/// A tc program: its name in the object, its direction, the devices it is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TcProgram {
    pub name: &'static str,
    pub direction: TcAttachType,
    pub kind: DeviceKind,
}

/// The XDP program, for Ethernet devices under `--xdp`.
pub(crate) const XDP_PROGRAM: &str = "bkp_xdp";

pub(crate) const TC_PROGRAMS: [TcProgram; 4] = [
    TcProgram {
        name: "bkp_tc_ingress",
        direction: TcAttachType::Ingress,
        kind: DeviceKind::Ethernet,
    },
    TcProgram {
        name: "bkp_tc_egress",
        direction: TcAttachType::Egress,
        kind: DeviceKind::Ethernet,
    },
    TcProgram {
        name: "bkp_tc_ingress_l3",
        direction: TcAttachType::Ingress,
        kind: DeviceKind::L3,
    },
    TcProgram {
        name: "bkp_tc_egress_l3",
        direction: TcAttachType::Egress,
        kind: DeviceKind::L3,
    },
];

/// The programs for a device of `kind`, ingress first.
pub(crate) fn programs_for(kind: DeviceKind) -> impl Iterator<Item = &'static TcProgram> {
    TC_PROGRAMS.iter().filter(move |p| p.kind == kind)
}

/// Priority of our cls_bpf filters (lower runs first): fixed, so that a restarted agent
/// replaces its filter rather than adding a second one. Not 1, which Cilium uses.
pub const TC_PRIORITY: u16 = 21;
/// Handle of our cls_bpf filters, fixed for the same reason.
pub(crate) const TC_HANDLE: u32 = 0xb4b;

/// What is recorded under `<pin dir>/tc/` for a netlink filter: bpffs holds no regular files,
/// so the record is a symlink whose target names the filter. The network namespace is kept
/// because device names mean something only in their namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FilterRecord {
    pub ingress: bool,
    pub priority: u16,
    pub handle: u32,
    pub netns: u64,
}

impl FilterRecord {
    fn new(direction: TcAttachType, netns: u64) -> Self {
        Self {
            ingress: direction == TcAttachType::Ingress,
            priority: TC_PRIORITY,
            handle: TC_HANDLE,
            netns,
        }
    }

    fn direction(&self) -> TcAttachType {
        if self.ingress {
            TcAttachType::Ingress
        } else {
            TcAttachType::Egress
        }
    }

    pub(crate) fn to_text(&self) -> String {
        let dir = if self.ingress { "ingress" } else { "egress" };
        format!(
            "netlink:{dir}:pref={}:handle={:#x}:netns={}",
            self.priority, self.handle, self.netns
        )
    }

    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.strip_prefix("netlink:")?.split(':');
        let ingress = match parts.next()? {
            "ingress" => true,
            "egress" => false,
            _ => return None,
        };
        let priority = parts.next()?.strip_prefix("pref=")?.parse().ok()?;
        let handle = u32::from_str_radix(parts.next()?.strip_prefix("handle=0x")?, 16).ok()?;
        let netns = parts.next()?.strip_prefix("netns=")?.parse().ok()?;
        parts.next().is_none().then_some(Self {
            ingress,
            priority,
            handle,
            netns,
        })
    }
}

/// What `<pin dir>/tc/<device>@<program>` holds.
enum Record {
    /// A pinned TCX link.
    Tcx,
    Netlink(FilterRecord),
    Unreadable(String),
}

fn read_record(path: &Path) -> Option<Record> {
    let meta = fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_symlink() {
        return Some(Record::Tcx);
    }
    Some(match fs::read_link(path) {
        Ok(target) => match FilterRecord::parse(&target.to_string_lossy()) {
            Some(r) => Record::Netlink(r),
            None => Record::Unreadable(format!("unknown record {}", target.display())),
        },
        Err(e) => Record::Unreadable(e.to_string()),
    })
}

/// The device and program a record's file name (`<device>@<program>`) names.
fn record_name(path: &Path) -> Option<(String, String)> {
    let name = path.file_name()?.to_string_lossy();
    let (device, program) = name.rsplit_once('@')?;
    Some((device.to_string(), program.to_string()))
}

fn os_error(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::TcError(TcError::NetlinkError(e)) | ProgramError::NetlinkError(e) => e.raw_os_error(),
        ProgramError::TcError(TcError::IoError(e)) => e.raw_os_error(),
        ProgramError::SyscallError(e) => e.io_error.raw_os_error(),
        _ => None,
    }
}

/// Removes our filter from `device` (a filter or device already gone is not an error).
fn detach_filter(device: &str, record: &FilterRecord) -> Result<(), String> {
    let link = match SchedClassifierLink::attached(
        device,
        record.direction(),
        record.priority,
        TcHandle::from(record.handle),
        None,
    ) {
        Ok(link) => link,
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    match link.detach() {
        Ok(()) => Ok(()),
        Err(e) if matches!(os_error(&e), Some(libc::ENOENT | libc::ENODEV)) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// Undoes one record: a pinned TCX link detaches when its pin goes; a netlink filter is
/// removed first when it is in this network namespace. Returns a note when a filter had to be
/// left (another namespace, or the removal failed).
fn remove_record(path: &Path, netns: u64) -> std::io::Result<Option<String>> {
    let note = match (read_record(path), record_name(path)) {
        (Some(Record::Netlink(record)), Some((device, program))) => {
            if record.netns == netns {
                detach_filter(&device, &record)
                    .err()
                    .map(|e| format!("{device}@{program}: removing the filter: {e}"))
            } else {
                Some(format!(
                    "{device}@{program}: filter left in network namespace {} (run cleanup there)",
                    record.netns
                ))
            }
        }
        (Some(Record::Unreadable(e)), _) => Some(format!("{}: {e}", path.display())),
        (Some(Record::Tcx), _) => return sys::unpin_link(path).map(|()| None),
        _ => None,
    };
    fs::remove_file(path)?;
    Ok(note)
}

/// Removes every tc attachment recorded under `<pin dir>/tc/`; returns (removed, notes about
/// filters left in place).
pub(crate) fn detach_all(pin_dir: &Path) -> std::io::Result<(usize, Vec<String>)> {
    let dir = pin_dir.join("tc");
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok((0, Vec::new()));
    };
    let netns = host::current_netns()?;
    let (mut removed, mut notes) = (0, Vec::new());
    for entry in entries {
        let note = remove_record(&entry?.path(), netns)?;
        match note {
            Some(n) => notes.push(n),
            None => removed += 1,
        }
    }
    Ok((removed, notes))
}

/// One tc program on one device, as the agent tried to attach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub device: String,
    pub program: &'static str,
    /// `tcx` or `netlink` for a tc program, `native` or `generic` for XDP.
    pub mode: &'static str,
    /// How it is attached, or why it is not.
    pub outcome: Result<Attached, String>,
}

/// Attaches the tc programs to `devices` in `mode`, each device getting the pair for its link
/// type. Attachments are recorded under `<pin dir>/tc/<device>@<program>` (a pinned TCX link,
/// or a record of the netlink filter) and replaced in place on a restart, so that there is no
/// instant without translation; those of devices no longer listed (or gone) are removed. A
/// severed TCX link or a filter gone with its device (the device was deleted, and maybe
/// recreated under the same name) is attached afresh. A failure on
/// one device or program is returned in its [`Attachment`] and stops nothing else.
pub fn attach(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    devices: &[String],
    mode: TcMode,
    xdp: XdpAttach,
) -> Result<Vec<Attachment>, LoadError> {
    let dir = pin_dir.join("tc");
    let pin_err = |what, path: &Path| {
        let path: PathBuf = path.to_path_buf();
        move |source| LoadError::Pin { what, path, source }
    };
    fs::create_dir_all(&dir).map_err(pin_err("creating", &dir))?;
    let netns = host::current_netns().map_err(pin_err("reading the network namespace of", &dir))?;
    let kinds: Vec<(&String, Result<DeviceKind, String>)> = devices
        .iter()
        .map(|d| {
            let kind = host::device_type(d)
                .map_err(|e| format!("reading its link type: {e}"))
                .and_then(|t| {
                    DeviceKind::of(t).ok_or(format!("link type {t} (ARPHRD) is neither Ethernet nor IP-only"))
                });
            (d, kind)
        })
        .collect();
    let xdp_modes: Vec<Option<XdpMode>> = kinds
        .iter()
        .map(|(d, k)| xdp_mode(d, k.as_ref().ok().copied(), xdp))
        .collect();
    let wanted: Vec<String> = kinds
        .iter()
        .zip(&xdp_modes)
        .filter_map(|((d, k), x)| Some((d, *k.as_ref().ok()?, *x)))
        .flat_map(|(d, k, x)| {
            programs_for(k)
                .map(move |p| format!("{d}@{}", p.name))
                .chain(x.map(|x| xdp_record(d, x)))
        })
        .collect();
    for entry in fs::read_dir(&dir).map_err(pin_err("listing", &dir))? {
        let path = entry.map_err(pin_err("listing", &dir))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if !wanted.iter().any(|w| *w == name) {
            tracing::info!(record = %path.display(), "detaching tc from a device no longer listed or gone");
            if let Some(note) = remove_record(&path, netns).map_err(pin_err("removing", &path))? {
                tracing::warn!("{note}");
            }
        }
    }
    let mut out = Vec::new();
    let mut xdp_devices = Vec::new();
    for ((device, kind), xdp_mode) in kinds.into_iter().zip(xdp_modes) {
        let kind = match kind {
            Ok(kind) => kind,
            Err(e) => {
                // Name the pair the device would get if it were Ethernet, so the failure is
                // visible per program like any other.
                out.extend(programs_for(DeviceKind::Ethernet).map(|p| Attachment {
                    device: device.clone(),
                    program: p.name,
                    mode: mode.as_str(),
                    outcome: Err(format!("device {device}: {e}")),
                }));
                continue;
            }
        };
        if let Some(xdp_mode) = xdp_mode {
            let path = dir.join(xdp_record(device, xdp_mode));
            let outcome = attach_xdp(ebpf, &path, device, xdp_mode);
            match outcome {
                Ok(_) => xdp_devices.push(device.clone()),
                // Under auto a driver without native XDP is not a failure: tc serves it.
                Err(ref e) if xdp == XdpAttach::Auto => {
                    tracing::info!(device = %device, "no native XDP ({e}): tc alone serves it");
                    continue_without_xdp(&path);
                }
                Err(_) => {}
            }
            if xdp != XdpAttach::Auto || outcome.is_ok() {
                out.push(Attachment {
                    device: device.clone(),
                    program: XDP_PROGRAM,
                    mode: xdp_mode_name(xdp_mode),
                    outcome: outcome
                        .map_err(|e| format!("{device}@{XDP_PROGRAM} ({}): {e}", xdp_mode_name(xdp_mode))),
                });
            }
        }
        for p in programs_for(kind) {
            let path = dir.join(format!("{device}@{}", p.name));
            let outcome = attach_one(ebpf, &path, device, p, mode, netns)
                .map_err(|e| format!("{device}@{} ({mode}): {e}", p.name));
            out.push(Attachment {
                device: device.clone(),
                program: p.name,
                mode: mode.as_str(),
                outcome,
            });
        }
    }
    write_xdp_devices(pin_dir, &xdp_devices);
    Ok(out)
}

/// Whether and how `device` (of `kind`, when known) gets the XDP program under `xdp`.
fn xdp_mode(device: &str, kind: Option<DeviceKind>, xdp: XdpAttach) -> Option<XdpMode> {
    // XDP reads an Ethernet header first; IP-only devices keep tc alone.
    if kind != Some(DeviceKind::Ethernet) {
        return None;
    }
    match xdp {
        XdpAttach::Off => None,
        XdpAttach::Generic => Some(XdpMode::Skb),
        XdpAttach::Native => Some(XdpMode::Driver),
        XdpAttach::Auto => match host::device_driver(device) {
            Ok(driver) if driver == "veth" => {
                tracing::info!(
                    device,
                    "veth: tc alone under --xdp auto (native XDP on a veth needs NAPI on its peer; --xdp native forces it)"
                );
                None
            }
            Ok(_) => Some(XdpMode::Driver),
            Err(e) => {
                tracing::info!(device, "reading its driver: {e}: tc alone");
                None
            }
        },
    }
}

fn xdp_mode_name(mode: XdpMode) -> &'static str {
    if mode == XdpMode::Skb { "generic" } else { "native" }
}

/// The record of the XDP link on `device`: the mode is in its name, so that a restart in the
/// other mode removes the old link (a link update keeps the mode it was made with).
fn xdp_record(device: &str, mode: XdpMode) -> String {
    format!("{device}@{XDP_PROGRAM}-{}", xdp_mode_name(mode))
}

/// A pinned XDP link from an earlier run on a device that now refuses native XDP has no
/// program to point at: unpinned, which detaches it.
fn continue_without_xdp(path: &Path) {
    if path.exists()
        && let Err(e) = sys::unpin_link(path)
    {
        tracing::warn!(record = %path.display(), "removing: {e}");
    }
}

fn attach_xdp(ebpf: &mut Ebpf, path: &Path, device: &str, mode: XdpMode) -> Result<Attached, String> {
    let program = xdp_program(ebpf).map_err(|e| e.to_string())?;
    if program.fd().is_err() {
        return Err(format!("program {XDP_PROGRAM} did not load"));
    }
    links::attach_or_update(path, program, Xdp::fd, |program| {
        let id = program.attach(device, mode).map_err(|e| e.to_string())?;
        FdLink::try_from(program.take_link(id).map_err(|e| e.to_string())?)
            .map_err(|e| format!("not a BPF link (the kernel attached by netlink): {e}"))
    })
    .map_err(|e| e.to_string())
}

/// Makes the devices XDP may send frames to exactly `devices` (those it is attached to). A
/// failure leaves XDP sending less, never more: every other packet goes to tc.
fn write_xdp_devices(pin_dir: &Path, devices: &[String]) {
    let written = (|| -> Result<(), String> {
        let mut map: DevMapHash<MapData> = typed(pin_dir, names::XDP_DEVICES).map_err(|e| e.to_string())?;
        let wanted: Vec<u32> = devices
            .iter()
            .filter_map(|d| nix::net::if_::if_nametoindex(d.as_str()).ok())
            .collect();
        let stale: Vec<u32> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for key in stale {
            map.remove(key).map_err(|e| e.to_string())?;
        }
        for ifindex in wanted {
            map.insert(ifindex, ifindex, None, 0).map_err(|e| e.to_string())?;
        }
        Ok(())
    })();
    if let Err(e) = written {
        tracing::warn!(
            "writing {}: {e}; XDP hands every forwarded packet to tc",
            names::XDP_DEVICES
        );
    }
}

fn attach_one(
    ebpf: &mut Ebpf,
    path: &Path,
    device: &str,
    p: &TcProgram,
    mode: TcMode,
    netns: u64,
) -> Result<Attached, String> {
    let program = tc_program(ebpf, p.name).map_err(|e| e.to_string())?;
    if program.fd().is_err() {
        return Err(format!("program {} did not load", p.name));
    }
    let existing = read_record(path);
    match (mode, existing) {
        (TcMode::Tcx, existing) => {
            if existing.as_ref().is_some_and(|r| !matches!(r, Record::Tcx)) {
                // A netlink filter from a run in the other mode: one of the two, not both.
                if let Some(note) = remove_record(path, netns).map_err(|e| e.to_string())? {
                    tracing::warn!("{note}");
                }
            }
            links::attach_or_update(path, program, SchedClassifier::fd, |program| {
                let id = program
                    .attach_with_options(
                        device,
                        p.direction,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(|e| e.to_string())?;
                program
                    .take_link(id)
                    .map_err(|e| e.to_string())?
                    .try_into()
                    .map_err(|e: LinkError| e.to_string())
            })
            .map_err(|e| e.to_string())
        }
        (TcMode::Netlink, existing) => {
            if matches!(existing, Some(Record::Tcx | Record::Unreadable(_))) {
                fs::remove_file(path).map_err(|e| format!("removing {}: {e}", path.display()))?;
            }
            let replaced = attach_filter(program, device, p.direction)?;
            if fs::symlink_metadata(path).is_err() {
                std::os::unix::fs::symlink(FilterRecord::new(p.direction, netns).to_text(), path)
                    .map_err(|e| format!("recording the filter at {}: {e}", path.display()))?;
            }
            Ok(match (replaced, existing) {
                (true, _) => Attached::Updated,
                // Recorded, but not on the device: it went with the device it was on.
                (false, Some(Record::Netlink(_))) => {
                    tracing::info!(record = %path.display(), "recorded filter gone (its device was deleted): attached afresh");
                    Attached::Reattached
                }
                (false, _) => Attached::Created,
            })
        }
    }
}

/// Attaches `program` as our cls_bpf filter on `device`, creating the clsact qdisc if absent.
/// An existing filter at our priority and handle (an earlier agent's) is replaced in place,
/// which the kernel does atomically; otherwise one is created. Returns whether it replaced.
fn attach_filter(
    program: &mut SchedClassifier,
    device: &str,
    direction: TcAttachType,
) -> Result<bool, String> {
    match tc::qdisc_add_clsact(device) {
        Ok(()) => {}
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(format!("adding the clsact qdisc: {e}")),
    }
    let existing =
        SchedClassifierLink::attached(device, direction, TC_PRIORITY, TcHandle::from(TC_HANDLE), None)
            .map_err(|e| e.to_string())?;
    let (id, replaced) = match program.attach_to_link(existing) {
        Ok(id) => (id, true),
        Err(e) if os_error(&e) == Some(libc::ENOENT) => {
            let options = NlOptions {
                priority: TC_PRIORITY,
                handle: TcHandle::from(TC_HANDLE),
                classid: None,
            };
            let id = program
                .attach_with_options(device, direction, TcAttachOptions::Netlink(options))
                .map_err(|e| e.to_string())?;
            (id, false)
        }
        Err(e) => return Err(e.to_string()),
    };
    let link = program.take_link(id).map_err(|e| e.to_string())?;
    // Dropping the link would delete the filter, which must outlive the agent as a pinned TCX
    // link does; the record under tc/ finds it again. The link holds only the ifindex,
    // priority and handle, so forgetting it leaks nothing.
    std::mem::forget(link);
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_without_a_mac_header_get_the_l3_programs() {
        let cases = [
            (1, Some(DeviceKind::Ethernet)),   // eth, veth, bridge, bond, vlan, vxlan
            (772, Some(DeviceKind::Ethernet)), // lo
            (768, Some(DeviceKind::L3)),       // tunl0 (ipip)
            (769, Some(DeviceKind::L3)),       // ip6tnl0
            (776, Some(DeviceKind::L3)),       // sit0
            (778, Some(DeviceKind::L3)),       // gre0
            (65534, Some(DeviceKind::L3)),     // wg0, tun0
            (32, None),                        // ib0 (InfiniBand)
            (280, None),                       // can0
        ];
        for (arphrd, kind) in cases {
            assert_eq!(DeviceKind::of(arphrd), kind, "ARPHRD {arphrd}");
        }
        let l3: Vec<&str> = programs_for(DeviceKind::L3).map(|p| p.name).collect();
        assert_eq!(l3, ["bkp_tc_ingress_l3", "bkp_tc_egress_l3"]);
        let l2: Vec<TcAttachType> = programs_for(DeviceKind::Ethernet).map(|p| p.direction).collect();
        assert_eq!(l2, [TcAttachType::Ingress, TcAttachType::Egress]);
    }

    #[test]
    fn a_verifier_rejection_shortens_to_its_reason() {
        let text = "program bkp_tc_ingress: the BPF_PROG_LOAD syscall returned Permission denied (os error 13). \
                    Verifier output: 0: (bf) r6 = r1\n1: (b7) r0 = 0\ncombined stack size of 4 calls is 544. Too large\n\
                    verification time 51870 usec\nstack depth 152+0+112\nprocessed 34701 insns (limit 1000000)\n";
        assert_eq!(
            short_error(text),
            "program bkp_tc_ingress: the BPF_PROG_LOAD syscall returned Permission denied (os error 13): \
             combined stack size of 4 calls is 544. Too large"
        );
        assert_eq!(short_error("invalid link"), "invalid link");
        let long = "x".repeat(1000);
        assert_eq!(short_error(&long).chars().count(), 243);
    }

    #[test]
    fn filter_records_round_trip_and_refuse_other_text() {
        let record = FilterRecord::new(TcAttachType::Egress, 4_026_531_840);
        let text = record.to_text();
        assert_eq!(text, "netlink:egress:pref=21:handle=0xb4b:netns=4026531840");
        assert_eq!(FilterRecord::parse(&text), Some(record));
        for bad in [
            "tcx",
            "netlink:up:pref=1:handle=0x1:netns=1",
            "netlink:ingress:pref=1:handle=0x1:netns=1:x",
        ] {
            assert_eq!(FilterRecord::parse(bad), None, "{bad}");
        }
        assert_eq!(
            record_name(Path::new("/sys/fs/bpf/x/tc/eth0@bkp_tc_ingress")),
            Some(("eth0".into(), "bkp_tc_ingress".into()))
        );
    }
}
