//! Loads the eBPF object with its maps pinned, and attaches the socket programs to a cgroup
//! through pinned links.
//!
//! Restart continuity: maps are reused from their pins when their layout matches this build,
//! so services, backends and socket reverse-NAT state survive the agent. Links are pinned too;
//! a restarted agent swaps its freshly loaded programs into the existing links with
//! BPF_LINK_UPDATE, so there is no instant where a connect() is not translated.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, CgroupSockAddr},
};
use proxy_common::{
    maglev,
    maps::{self as names, capacity},
};

use crate::datapath::{
    external,
    features::{TcMode, XdpAttach},
    host,
    layout::{self, Btf},
    links::{self, PinnedLinkError},
    sys,
};

/// A pinned map's flags as its object declared them: the kernel makes every devmap read-only
/// to programs (`BPF_F_RDONLY_PROG`, kernel/bpf/devmap.c) and refuses that flag at creation,
/// so no build can declare it, and comparing with it would recreate the map on every restart.
fn declared_flags(map_type: u32, flags: u32) -> u32 {
    use aya_obj::generated::{BPF_F_RDONLY_PROG, bpf_map_type};
    let devmaps = [
        bpf_map_type::BPF_MAP_TYPE_DEVMAP as u32,
        bpf_map_type::BPF_MAP_TYPE_DEVMAP_HASH as u32,
    ];
    if devmaps.contains(&map_type) {
        flags & !BPF_F_RDONLY_PROG
    } else {
        flags
    }
}

/// The datapath object, built by this crate's build script.
pub(crate) static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// The cgroup sock_addr programs, by name (their attach type comes from their ELF section).
pub const SOCKET_PROGRAMS: [&str; 8] = [
    "bkp_connect4",
    "bkp_sendmsg4",
    "bkp_recvmsg4",
    "bkp_getpeer4",
    "bkp_connect6",
    "bkp_sendmsg6",
    "bkp_recvmsg6",
    "bkp_getpeer6",
];

/// Map capacities (max_entries). Changing one recreates that map on the next start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub rev_nat: u32,
    pub sock_rev: u32,
    pub affinity: u32,
    pub conntrack: u32,
    /// The Maglev table size in use: its map gets room for tables, the others one entry.
    pub maglev_table_size: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: capacity::SERVICES,
            backends: capacity::BACKENDS,
            rev_nat: capacity::REV_NAT,
            sock_rev: capacity::SOCK_REV,
            affinity: capacity::AFFINITY,
            conntrack: capacity::CONNTRACK,
            maglev_table_size: maglev::DEFAULT_TABLE_SIZE,
        }
    }
}

impl MapSizes {
    fn of(&self, map: &str) -> Option<u32> {
        match map {
            names::SERVICES_V4 | names::SERVICES_V6 => Some(self.services),
            names::BACKENDS_V4 | names::BACKENDS_V6 => Some(self.backends),
            names::REV_NAT_V4 | names::REV_NAT_V6 | names::SERVICE_LABELS => Some(self.rev_nat),
            names::SOCK_REV_V4 | names::SOCK_REV_V6 => Some(self.sock_rev),
            names::AFFINITY => Some(self.affinity),
            names::CONNTRACK_V4 | names::CONNTRACK_V6 => Some(self.conntrack),
            _ => {
                let index = names::MAGLEV.iter().position(|m| *m == map)?;
                Some(if maglev::TABLE_SIZES[index] == self.maglev_table_size {
                    capacity::MAGLEV
                } else {
                    1
                })
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Host(#[from] host::HostError),
    #[error("parsing the embedded eBPF object: {0}")]
    Parse(#[from] aya_obj::ParseError),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("program {name}: {source}")]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("opening cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("describing map {map} from the embedded object's BTF: {source}")]
    ObjectBtf {
        map: &'static str,
        source: layout::BtfError,
    },
    #[error("{what} {path}: {source}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How the programs were attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttachReport {
    /// Links that existed and now run the new programs.
    pub updated: usize,
    /// Links created (first start, or a new cgroup).
    pub created: usize,
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    tc_programs: Vec<(&'static str, external::ProgramState)>,
    recreated: Vec<Recreated>,
}

impl Datapath {
    /// Loads and verifies every program, creating or reusing pinned maps. Attaching is a
    /// separate step so the agent can fill the maps before new programs go live. The socket
    /// programs must load; a tc program that does not is logged and reported by
    /// [`Self::tc_programs`], and the rest of the datapath serves without it.
    pub fn load(pin_dir: &Path, sizes: MapSizes) -> Result<Self, LoadError> {
        host::ensure_pin_dir(pin_dir)?;
        let recreated = drop_incompatible_pins(pin_dir, sizes)?;
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> = names::ALL.iter().map(|n| (*n, pin_dir.join(n))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
            if let Some(size) = sizes.of(name) {
                loader.map_max_entries(name, size);
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for name in SOCKET_PROGRAMS {
            socket_program(&mut ebpf, name)?
                .load()
                .map_err(|source| LoadError::Program { name, source })?;
        }
        let tc_programs = external::load_programs(&mut ebpf);
        for (program, state) in &tc_programs {
            if let external::ProgramState::Failed(reason) = state {
                tracing::error!(
                    program,
                    "tc program not loaded; traffic from outside the node is not served through it: {reason}"
                );
            }
        }
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            tc_programs,
            recreated,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// A loaded program by name (for BPF_PROG_TEST_RUN in the benchmark).
    pub fn program_fd(&self, name: &'static str) -> Result<&aya::programs::ProgramFd, LoadError> {
        self.ebpf
            .program(name)
            .ok_or(LoadError::MissingProgram { name })?
            .fd()
            .map_err(|source| LoadError::Program { name, source })
    }

    /// The pinned maps that did not match this build and were replaced by empty ones.
    pub fn recreated(&self) -> &[Recreated] {
        &self.recreated
    }

    /// Whether each tc program loaded.
    pub(crate) fn tc_programs(&self) -> &[(&'static str, external::ProgramState)] {
        &self.tc_programs
    }

    /// Attaches the tc programs to `devices` (see [`external::attach`]).
    pub(crate) fn attach_devices(
        &mut self,
        devices: &[String],
        mode: TcMode,
        xdp: XdpAttach,
    ) -> Result<Vec<external::Attachment>, LoadError> {
        external::attach(&mut self.ebpf, &self.pin_dir, devices, mode, xdp)
    }

    /// Attaches every socket program to `cgroup` (and its descendants) through links pinned
    /// under `<pin dir>/links/cgroup-<inode>/`. Links pinned for another cgroup are removed,
    /// which detaches them.
    pub fn attach(&mut self, cgroup: &Path) -> Result<AttachReport, LoadError> {
        let cgroup_err = |source| LoadError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        };
        let cgroup_dir = fs::File::open(cgroup).map_err(cgroup_err)?;
        let inode = cgroup_dir.metadata().map_err(cgroup_err)?.ino();
        let links_dir = self.pin_dir.join("links");
        let ours = links_dir.join(format!("cgroup-{inode}"));
        let pin_err = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| LoadError::Pin { what, path, source }
        };
        fs::create_dir_all(&ours).map_err(pin_err("creating", &ours))?;
        for entry in fs::read_dir(&links_dir).map_err(pin_err("listing", &links_dir))? {
            let path = entry.map_err(pin_err("listing", &links_dir))?.path();
            if path != ours {
                tracing::info!(path = %path.display(), "removing links pinned for another cgroup");
                fs::remove_dir_all(&path).map_err(pin_err("removing", &path))?;
            }
        }

        let mut report = AttachReport::default();
        for name in SOCKET_PROGRAMS {
            let program = socket_program(&mut self.ebpf, name)?;
            let prog_err = |source| LoadError::Program { name, source };
            let updated = links::attach_or_update(&ours.join(name), program, CgroupSockAddr::fd, |program| {
                // A cgroup link always coexists with other programs on the cgroup (the kernel
                // rejects BPF_F_ALLOW_MULTI on link_create: links are multi by design).
                let id = program
                    .attach(&cgroup_dir, CgroupAttachMode::Single)
                    .map_err(prog_err)?;
                program
                    .take_link(id)
                    .map_err(prog_err)?
                    .try_into()
                    .map_err(|source| LoadError::Link { name, source })
            })
            .map_err(|e| match e {
                PinnedLinkError::Pin { what, path, source } => LoadError::Pin { what, path, source },
                PinnedLinkError::Program(source) => prog_err(source),
                PinnedLinkError::Attach(e) => e,
            })?;
            if updated == links::Attached::Updated {
                report.updated += 1;
            } else {
                report.created += 1;
            }
        }
        Ok(report)
    }
}

fn socket_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSockAddr, LoadError> {
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })
}

/// Why a pinned map was not adopted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// Only another capacity (a `--map-size-*` changed, or the map grew).
    Capacity,
    /// Another kind, key size, value size or flags.
    Shape,
    /// The same sizes, other fields (names, offsets or types, per the map's BTF).
    Layout,
    /// The pin could not be read as a map.
    Unreadable,
}

impl Mismatch {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Capacity => "capacity",
            Self::Shape => "shape",
            Self::Layout => "layout",
            Self::Unreadable => "unreadable",
        }
    }
}

/// A pinned map that was replaced by an empty one at load, losing its entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recreated {
    pub map: &'static str,
    pub mismatch: Mismatch,
    /// What the pinned map was, and what this build makes, in the terms of `mismatch`.
    pub pinned: String,
    pub built: String,
}

/// A map's key and value layouts, described from BTF.
fn layout(btf: &Btf<'_>, key: u32, value: u32) -> Result<String, layout::BtfError> {
    Ok(format!(
        "key {} value {}",
        btf.describe(key)?,
        btf.describe(value)?
    ))
}

/// aya reuses a pinned map by name without comparing its layout. A map from an older build
/// (another kind, key or value size, capacity, or fields: the kernel keeps the BTF a map was
/// made with, so a field renamed, retyped or moved within the same size shows) is unpinned
/// here so a new one is made; the old one lives on, still serving the old programs, until the
/// links switch over. A pin made without BTF (a kernel that refused the object's BTF makes
/// every map so) can only be checked by shape.
fn drop_incompatible_pins(pin_dir: &Path, sizes: MapSizes) -> Result<Vec<Recreated>, LoadError> {
    let object = aya_obj::Object::parse(EBPF_OBJECT)?;
    let object_btf = object.btf.as_ref().map(aya_obj::btf::Btf::to_bytes);
    let object_btf = object_btf
        .as_deref()
        .map(Btf::parse)
        .transpose()
        .map_err(|source| LoadError::ObjectBtf { map: "(all)", source })?;
    let mut recreated = Vec::new();
    for name in names::ALL {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let Some(def) = object.maps.get(name) else {
            continue;
        };
        let shape = (
            def.map_type(),
            def.key_size(),
            def.value_size(),
            sizes.of(name).unwrap_or(def.max_entries()),
            def.map_flags(),
        );
        let built_layout = match (def, &object_btf) {
            (aya_obj::Map::Btf(m), Some(btf)) => Some(
                layout(btf, m.def.btf_key_type_id, m.def.btf_value_type_id)
                    .map_err(|source| LoadError::ObjectBtf { map: name, source })?,
            ),
            _ => None,
        };
        let mismatch = match sys::pinned_map_info(&path) {
            Err(e) => Some((Mismatch::Unreadable, e.to_string(), format!("{shape:?}"))),
            Ok(info) => {
                let pinned_shape = (
                    info.map_type,
                    info.key_size,
                    info.value_size,
                    info.max_entries,
                    declared_flags(info.map_type, info.map_flags),
                );
                let only_capacity = (pinned_shape.0, pinned_shape.1, pinned_shape.2, pinned_shape.4)
                    == (shape.0, shape.1, shape.2, shape.4);
                if pinned_shape != shape && only_capacity {
                    Some((
                        Mismatch::Capacity,
                        pinned_shape.3.to_string(),
                        shape.3.to_string(),
                    ))
                } else if pinned_shape != shape {
                    Some((Mismatch::Shape, format!("{pinned_shape:?}"), format!("{shape:?}")))
                } else if let (Some(pinned), Some(built)) = (&info.btf, built_layout) {
                    let pinned = Btf::parse(&pinned.raw)
                        .and_then(|btf| layout(&btf, pinned.key_type, pinned.value_type))
                        .unwrap_or_else(|e| format!("unreadable BTF: {e}"));
                    (pinned != built).then_some((Mismatch::Layout, pinned, built))
                } else {
                    if info.btf.is_none() {
                        tracing::info!(map = name, "pinned map has no BTF: only its shape is checked");
                    }
                    None
                }
            }
        };
        let Some((mismatch, pinned, built)) = mismatch else {
            continue;
        };
        if mismatch == Mismatch::Capacity {
            tracing::info!(
                map = name,
                pinned = %pinned,
                built = %built,
                "pinned map has another capacity; recreating it (the agent refills or copies the \
                 maps it writes; an LRU map's entries are lost)"
            );
        } else {
            tracing::warn!(
                map = name,
                mismatch = mismatch.as_str(),
                pinned = %pinned,
                built = %built,
                "pinned map does not match this build (shape: type, key size, value size, max entries, flags); \
                 recreating it, its entries are lost"
            );
        }
        fs::remove_file(&path).map_err(|source| LoadError::Pin {
            what: "unpinning",
            path: path.clone(),
            source,
        })?;
        recreated.push(Recreated {
            map: name,
            mismatch,
            pinned,
            built,
        });
    }
    Ok(recreated)
}

/// What `cleanup` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// Whether there was a pin directory.
    pub removed: bool,
    /// tc attachments removed (TCX links and netlink filters).
    pub tc_detached: usize,
    /// netlink filters that could not be removed from here, each with why (they live in
    /// another network namespace: `cleanup` must run in the agent's).
    pub tc_left: Vec<String>,
}

/// Removes everything under `pin_dir`: tc attachments and cgroup links (detaching the
/// programs), then maps. netlink filters are removed through the device names they were
/// recorded with, so only in the network namespace the agent ran in.
pub fn cleanup(pin_dir: &Path) -> std::io::Result<Cleanup> {
    if !pin_dir.exists() {
        return Ok(Cleanup::default());
    }
    let (tc_detached, tc_left) = external::detach_all(pin_dir)?;
    let links = pin_dir.join("links");
    if links.exists() {
        for cgroup in fs::read_dir(&links)? {
            for link in fs::read_dir(cgroup?.path())? {
                sys::unpin_link(&link?.path())?;
            }
        }
        fs::remove_dir_all(&links)?;
    }
    fs::remove_dir_all(pin_dir)?;
    Ok(Cleanup {
        removed: true,
        tc_detached,
        tc_left,
    })
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use aya_obj::{
        EbpfSectionKind,
        generated::{BPF_F_NO_PREALLOC, bpf_map_type},
    };
    use proxy_common::{
        counters::Counter,
        maps::{
            AddrV4, AddrV6, AffinityKey, AffinityValue, Backend, CtKey, CtValue, NodeConfig, RevNat,
            ServiceKey, ServiceLabel, ServiceValue, SockFrontend, SockRevKey, SockRevValue, SourceRange,
        },
    };

    use super::*;
    use crate::datapath::external::TC_PROGRAMS;

    /// What the agent's reads and writes assume of one map: the types it uses for the map's
    /// keys and values, its kind, its default capacity and its flags.
    struct Expected {
        name: &'static str,
        kind: bpf_map_type,
        key: usize,
        value: usize,
        max_entries: u32,
        flags: u32,
    }

    const fn map<K, V>(name: &'static str, kind: bpf_map_type, max_entries: u32) -> Expected {
        Expected {
            name,
            kind,
            key: size_of::<K>(),
            value: size_of::<V>(),
            max_entries,
            flags: 0,
        }
    }

    /// A map the agent writes: a hash map allocated as it is written.
    const fn written<K, V>(name: &'static str, max_entries: u32) -> Expected {
        Expected {
            flags: BPF_F_NO_PREALLOC,
            ..map::<K, V>(name, bpf_map_type::BPF_MAP_TYPE_HASH, max_entries)
        }
    }

    /// The agent writes the trie's keys as aya's `Key` (a prefix length, then the data).
    type TrieKey<A> = aya::maps::lpm_trie::Key<SourceRange<A>>;

    fn expected() -> Vec<Expected> {
        use bpf_map_type::*;
        let mut maps = vec![
            written::<ServiceKey<AddrV4>, ServiceValue>(names::SERVICES_V4, capacity::SERVICES),
            written::<ServiceKey<AddrV6>, ServiceValue>(names::SERVICES_V6, capacity::SERVICES),
            written::<u32, Backend<AddrV4>>(names::BACKENDS_V4, capacity::BACKENDS),
            written::<u32, Backend<AddrV6>>(names::BACKENDS_V6, capacity::BACKENDS),
            written::<u32, RevNat<AddrV4>>(names::REV_NAT_V4, capacity::REV_NAT),
            written::<u32, RevNat<AddrV6>>(names::REV_NAT_V6, capacity::REV_NAT),
            map::<SockRevKey<AddrV4>, SockRevValue<AddrV4>>(
                names::SOCK_REV_V4,
                BPF_MAP_TYPE_LRU_HASH,
                capacity::SOCK_REV,
            ),
            map::<SockRevKey<AddrV6>, SockRevValue<AddrV6>>(
                names::SOCK_REV_V6,
                BPF_MAP_TYPE_LRU_HASH,
                capacity::SOCK_REV,
            ),
            // Socket-local storage: the key is a socket fd, the kernel requires no
            // preallocation and no capacity.
            Expected {
                flags: BPF_F_NO_PREALLOC,
                ..map::<i32, SockFrontend<AddrV4>>(names::SOCK_FRONTEND_V4, BPF_MAP_TYPE_SK_STORAGE, 0)
            },
            Expected {
                flags: BPF_F_NO_PREALLOC,
                ..map::<i32, SockFrontend<AddrV6>>(names::SOCK_FRONTEND_V6, BPF_MAP_TYPE_SK_STORAGE, 0)
            },
            map::<AffinityKey, AffinityValue>(names::AFFINITY, BPF_MAP_TYPE_LRU_HASH, capacity::AFFINITY),
            map::<CtKey<AddrV4>, CtValue<AddrV4>>(
                names::CONNTRACK_V4,
                BPF_MAP_TYPE_LRU_HASH,
                capacity::CONNTRACK,
            ),
            map::<CtKey<AddrV6>, CtValue<AddrV6>>(
                names::CONNTRACK_V6,
                BPF_MAP_TYPE_LRU_HASH,
                capacity::CONNTRACK,
            ),
            // The kernel requires no preallocation of an LPM trie.
            Expected {
                flags: BPF_F_NO_PREALLOC,
                ..map::<TrieKey<AddrV4>, u32>(
                    names::SOURCE_RANGES_V4,
                    BPF_MAP_TYPE_LPM_TRIE,
                    capacity::SOURCE_RANGES,
                )
            },
            Expected {
                flags: BPF_F_NO_PREALLOC,
                ..map::<TrieKey<AddrV6>, u32>(
                    names::SOURCE_RANGES_V6,
                    BPF_MAP_TYPE_LPM_TRIE,
                    capacity::SOURCE_RANGES,
                )
            },
            map::<u32, NodeConfig>(names::NODE, BPF_MAP_TYPE_ARRAY, 1),
            // One slot per counter, read as u64 per CPU.
            map::<u32, u64>(names::COUNTERS, BPF_MAP_TYPE_PERCPU_ARRAY, Counter::COUNT),
            Expected {
                flags: BPF_F_NO_PREALLOC,
                ..map::<u32, ServiceLabel>(names::SERVICE_LABELS, BPF_MAP_TYPE_HASH, capacity::SERVICE_LABELS)
            },
            // Key an ifindex, value `struct bpf_devmap_val` (ifindex, program fd).
            map::<u32, u64>(
                names::XDP_DEVICES,
                BPF_MAP_TYPE_DEVMAP_HASH,
                capacity::XDP_DEVICES,
            ),
        ];
        // A hash of maps holds inner map fds (u32) as its values.
        maps.extend(names::MAGLEV.map(|name| Expected {
            flags: BPF_F_NO_PREALLOC,
            ..map::<u32, u32>(name, BPF_MAP_TYPE_HASH_OF_MAPS, capacity::MAGLEV)
        }));
        maps
    }

    #[test]
    fn every_map_in_the_object_has_the_layout_the_agent_reads_and_writes() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
        let mut wrong = Vec::new();
        for e in expected() {
            let Some(def) = object.maps.get(e.name) else {
                wrong.push(format!("{}: not in the object", e.name));
                continue;
            };
            let want = (
                e.kind as u32,
                e.key as u32,
                e.value as u32,
                e.max_entries,
                e.flags,
            );
            let have = (
                def.map_type(),
                def.key_size(),
                def.value_size(),
                def.max_entries(),
                def.map_flags(),
            );
            if want != have {
                wrong.push(format!(
                    "{}: (type, key, value, max entries, flags) is {have:?} in the object, {want:?} in proxy-common",
                    e.name
                ));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn the_object_declares_exactly_the_maps_the_agent_pins() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
        // Data sections (.rodata, .bss) are the programs' globals, made by aya at load time and
        // never pinned; every declared map is.
        let mut declared: Vec<&str> = object
            .maps
            .iter()
            .filter(|(_, m)| matches!(m.section_kind(), EbpfSectionKind::BtfMaps | EbpfSectionKind::Maps))
            .map(|(name, _)| name.as_str())
            .collect();
        declared.sort_unstable();
        let mut pinned = names::ALL.to_vec();
        pinned.sort_unstable();
        assert_eq!(declared, pinned);
        // And the expectations above cover every one of them.
        let mut checked: Vec<&str> = expected().iter().map(|e| e.name).collect();
        checked.sort_unstable();
        assert_eq!(checked, pinned);
    }

    #[test]
    fn every_map_s_layout_is_described_from_the_object_s_btf_in_kinds_the_kernel_keeps() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
        let raw = object.btf.as_ref().expect("the object carries BTF").to_bytes();
        let btf = Btf::parse(&raw).expect("the object's BTF parses");
        for name in names::ALL {
            let Some(aya_obj::Map::Btf(map)) = object.maps.get(name) else {
                panic!("{name} is not a BTF map: its layout could not be checked on restart");
            };
            let described = layout(&btf, map.def.btf_key_type_id, map.def.btf_value_type_id)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            // Kinds outside the description's vocabulary (pointers, floats, anything aya may
            // rewrite for an older kernel) would make a pin and its build disagree.
            assert!(!described.contains(['*', '~', '(', '?']), "{name}: {described}");
        }
    }

    #[test]
    fn every_program_the_loader_names_is_in_the_object() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
        let named = SOCKET_PROGRAMS
            .iter()
            .copied()
            .chain(TC_PROGRAMS.iter().map(|p| p.name));
        let missing: Vec<&str> = named
            .filter(|name| !object.programs.contains_key(*name))
            .collect();
        assert!(missing.is_empty(), "not in the object: {missing:?}");
    }
}
