//! The bpf(2) commands aya does not wrap: opening a pinned object by path, swapping the
//! program behind an existing link (BPF_LINK_UPDATE), which replaces programs on restart with
//! no instant where the hook is detached, detaching a link for good (BPF_LINK_DETACH), walking any map's keys without knowing its types,
//! batched reads, updates and deletes (BPF_MAP_*_BATCH, one syscall for many entries), reading the BTF a
//! pinned map was made with (aya's `MapInfo` keeps its BTF ids to itself), and running a
//! program on a synthetic packet (BPF_PROG_TEST_RUN), for the benchmark and the datapath tests.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya::{Pod, maps::MapInfo};

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `union bpf_attr` member for BPF_OBJ_GET.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` member for BPF_MAP_GET_NEXT_KEY.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

/// `union bpf_attr` member for the BPF_MAP_*_BATCH commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr` member for BPF_PROG_TEST_RUN.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// What one BPF_PROG_TEST_RUN reported.
#[derive(Clone, Debug)]
pub struct TestRun {
    /// The program's return value (a tc verdict for tc programs).
    pub retval: u32,
    /// Mean time per run, measured by the kernel, in nanoseconds.
    pub duration_ns: u32,
    /// The packet as the program left it (rewritten in place, or replaced by an answer).
    pub packet: Vec<u8>,
}

/// Room for a program to grow the packet it is given: the tc path's largest answer (an ICMP
/// error quoting an IPv6 header) adds less than this to the smallest packet it answers.
const TEST_RUN_GROWTH: usize = 256;

/// Runs `prog` `repeat` times on `packet` (an Ethernet frame, for tc programs), in the calling
/// thread's network namespace (route lookups see its routes). Note that the runs share one
/// packet buffer: a program that rewrites the packet sees its own rewrite next.
pub fn prog_test_run(prog: impl AsFd, packet: &[u8], repeat: u32) -> io::Result<TestRun> {
    let mut out = vec![0u8; packet.len() + TEST_RUN_GROWTH];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_fd().as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_size_out: out.len() as u32,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..Default::default()
    };
    // SAFETY: a test-run attr whose buffers are `packet` and `out`, with their lengths.
    unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }?;
    // The kernel sets data_size_out to the packet's length after the run (a packet that
    // outgrew the buffer is an ENOSPC error above).
    out.truncate(attr.data_size_out as usize);
    Ok(TestRun {
        retval: attr.retval,
        duration_ns: attr.duration,
        packet: out,
    })
}

/// `union bpf_attr` member for BPF_LINK_UPDATE.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// # Safety
/// `attr` must be the bpf_attr member `cmd` takes, and every address in it must point to
/// memory the kernel may read (or write, for outputs) for the length the command implies.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is valid for `cmd` (caller); its size is passed so the kernel reads no
    // further.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut::<T>(attr).cast::<libc::c_void>(),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens a pinned BPF object (map, program or link).
/// The kernel memory a map takes, as its `memlock` accounting says (`/proc/self/fdinfo`):
/// preallocated maps are charged in full when created, whatever they hold.
pub fn map_memory(map: BorrowedFd<'_>) -> io::Result<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", map.as_raw_fd()))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no memlock line in the map's fdinfo"))
}

pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: an obj-get attr whose pathname is `c_path`, NUL-terminated and alive here.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr) }?;
    // SAFETY: on success BPF_OBJ_GET returns a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `union bpf_attr` member for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_map_info` up to the BTF ids (the kernel fills as much as it is given).
#[repr(C)]
#[derive(Default)]
struct MapInfoHead {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    name: [u8; 16],
    ifindex: u32,
    btf_vmlinux_value_type_id: u32,
    netns_dev: u64,
    netns_ino: u64,
    btf_id: u32,
    btf_key_type_id: u32,
    btf_value_type_id: u32,
    btf_vmlinux_id: u32,
}

/// `struct bpf_btf_info`.
#[repr(C)]
#[derive(Default)]
struct BtfInfo {
    btf: u64,
    btf_size: u32,
    id: u32,
    name: u64,
    name_len: u32,
    kernel_btf: u32,
}

/// # Safety
/// `T` must be the info struct (or a head of it) of the object `fd` refers to, and any
/// address in it must point to memory the kernel may write for the length it names.
unsafe fn obj_info<T>(fd: impl AsFd, info: &mut T) -> io::Result<()> {
    let mut attr = InfoAttr {
        bpf_fd: fd.as_fd().as_raw_fd() as u32,
        info_len: std::mem::size_of::<T>() as u32,
        info: std::ptr::from_mut::<T>(info) as u64,
    };
    // SAFETY: `info` is `info_len` bytes the kernel may write, and matches the object (caller).
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }.map(drop)
}

/// A pinned map as the kernel made it.
#[derive(Debug)]
pub(crate) struct PinnedMapInfo {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
    /// The BTF the map was made with, if any.
    pub btf: Option<MapBtf>,
}

/// The BTF object a map was made with and its key and value types in it.
#[derive(Debug)]
pub(crate) struct MapBtf {
    pub raw: Vec<u8>,
    pub key_type: u32,
    pub value_type: u32,
}

/// Reads the map pinned at `path`: its sizes and kind, and its BTF.
pub(crate) fn pinned_map_info(path: &Path) -> io::Result<PinnedMapInfo> {
    let map = obj_get(path)?;
    let mut info = MapInfoHead::default();
    // SAFETY: the kernel writes at most `info_len` bytes into `info`, which holds no address
    // (a pin of another kind of object fills it with that object's info, harmlessly).
    unsafe { obj_info(&map, &mut info) }?;
    let btf = if info.btf_id == 0 {
        None
    } else {
        let mut attr = [info.btf_id, 0, 0];
        // SAFETY: BPF_BTF_GET_FD_BY_ID reads the id (and next_id, open_flags: 0) only.
        let fd = unsafe { bpf(BPF_BTF_GET_FD_BY_ID, &mut attr) }?;
        // SAFETY: on success it returns a new file descriptor that we now own.
        let btf_fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // The first call, with no buffer, reports the size of the raw BTF.
        let mut btf_info = BtfInfo::default();
        // SAFETY: a BTF's info, with no buffer to write.
        unsafe { obj_info(&btf_fd, &mut btf_info) }?;
        let mut raw = vec![0u8; btf_info.btf_size as usize];
        let mut btf_info = BtfInfo {
            btf: raw.as_mut_ptr() as u64,
            btf_size: raw.len() as u32,
            ..Default::default()
        };
        // SAFETY: `raw` is `btf_size` bytes the kernel may write (a BTF object never changes).
        unsafe { obj_info(&btf_fd, &mut btf_info) }?;
        Some(MapBtf {
            raw,
            key_type: info.btf_key_type_id,
            value_type: info.btf_value_type_id,
        })
    };
    Ok(PinnedMapInfo {
        map_type: info.map_type,
        key_size: info.key_size,
        value_size: info.value_size,
        max_entries: info.max_entries,
        map_flags: info.map_flags,
        btf,
    })
}

/// Points an existing link at a new program of the same type and attach type.
pub(crate) fn link_update(link: impl AsFd, new_prog: impl AsFd) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_fd().as_raw_fd() as u32,
        new_prog_fd: new_prog.as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: a link-update attr; it holds only file descriptors.
    unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }.map(drop)
}

/// Detaches a pinned link at once and removes its pin. Removing the pin alone also detaches,
/// but only once bpffs frees the inode after an RCU grace period and the link's release runs
/// from a work queue: a program could still run for a moment after an uninstall returned.
/// A link the kernel already let go of (its device or cgroup gone) only loses its pin.
pub(crate) fn unpin_link(path: &Path) -> io::Result<()> {
    let link = obj_get(path)?;
    let mut attr = [link.as_raw_fd() as u32, 0];
    // SAFETY: BPF_LINK_DETACH reads the link fd (and flags, 0) only.
    if let Err(e) = unsafe { bpf(BPF_LINK_DETACH, &mut attr) }
        && e.raw_os_error() != Some(libc::ENOLINK)
    {
        return Err(e);
    }
    std::fs::remove_file(path)
}

/// Entries read per BPF_MAP_LOOKUP_BATCH call: large enough that a full 262 144-entry
/// conntrack map takes 64 calls, small enough that the buffers stay under a megabyte.
const LOOKUP_CHUNK: usize = 4096;

/// Reads every entry of a hash map, a chunk per syscall (BPF_MAP_LOOKUP_BATCH, Linux ≥ 5.6),
/// and hands each chunk's keys and values, as raw bytes, to `chunk`. `Ok(false)` when the map
/// has no batch lookup (an LPM trie, a kernel without it): nothing was read, walk it key by key.
pub(crate) fn lookup_batch(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    mut chunk: impl FnMut(&[u8], &[u8]),
) -> io::Result<bool> {
    let mut keys = vec![0u8; key_size * LOOKUP_CHUNK];
    let mut values = vec![0u8; value_size * LOOKUP_CHUNK];
    // The kernel's resume token: a hash map's is a bucket index (u32), other maps' a key.
    let mut token_in = vec![0u8; key_size.max(8)];
    let mut token_out = vec![0u8; key_size.max(8)];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: LOOKUP_CHUNK as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `keys` and `values` hold `count` entries of the map's key and value sizes
        // (caller), the tokens a key or a bucket index, as the kernel writes and reads.
        let result = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let read = (attr.count as usize).min(LOOKUP_CHUNK);
        match result {
            Ok(_) => {}
            // The last chunk: the kernel says ENOENT and still reports what it copied.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                chunk(&keys[..read * key_size], &values[..read * value_size]);
                return Ok(true);
            }
            Err(e)
                if first && matches!(e.raw_os_error(), Some(libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP)) =>
            {
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        chunk(&keys[..read * key_size], &values[..read * value_size]);
        // Each call moves on by at least one bucket of a table sized to its capacity: the walk
        // ends even if entries come and go meanwhile.
        std::mem::swap(&mut token_in, &mut token_out);
        first = false;
    }
}

/// The kernel's ENOTSUPP (524), what a map without batch operations answers.
const ENOTSUPP: i32 = 524;

/// Every entry of a hash map, read in chunks with [`lookup_batch`]; `None` when the map has
/// no batch lookup.
pub(crate) fn lookup_all<K: Pod, V: Pod>(map: BorrowedFd<'_>) -> io::Result<Option<Vec<(K, V)>>> {
    let (key_size, value_size) = (size_of::<K>(), size_of::<V>());
    let mut out = Vec::new();
    let batched = lookup_batch(map, key_size, value_size, |keys, values| {
        for (key, value) in keys.chunks_exact(key_size).zip(values.chunks_exact(value_size)) {
            // SAFETY: each chunk holds exactly one `K` or `V`, and `Pod` types are plain data
            // for which every bit pattern is a value; the reads need no alignment.
            out.push(unsafe {
                (
                    key.as_ptr().cast::<K>().read_unaligned(),
                    value.as_ptr().cast::<V>().read_unaligned(),
                )
            });
        }
    })?;
    Ok(batched.then_some(out))
}

/// Writes one entry whose value's size is only known at run time (a Maglev table: aya's typed
/// maps need it at compile time).
///
/// # Safety
/// `K` must have the map's key size and `value` the map's value size: the kernel reads both.
pub(crate) unsafe fn update_elem<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    key: &K,
    value: &[V],
) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: std::ptr::from_ref(key) as u64,
        value: value.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: `key` and `value` are live and of the map's sizes (caller).
    unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(|_| ())
}

/// Deletes `keys` from a hash map, as many per syscall as it takes (BPF_MAP_DELETE_BATCH).
/// A key already gone (an LRU eviction, the datapath's own delete) is skipped. Returns how
/// many were deleted.
///
/// # Safety
/// `K` must have the map's key size: the kernel reads `keys.len()` of them.
pub(crate) unsafe fn delete_batch<K: Copy>(map: BorrowedFd<'_>, keys: &[K]) -> io::Result<usize> {
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: rest.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `rest` holds `count` keys of the map's key size (caller).
        let result = unsafe { bpf(BPF_MAP_DELETE_BATCH, &mut attr) };
        let done = (attr.count as usize).min(rest.len());
        deleted += done;
        match result {
            Ok(_) => break,
            // The kernel stops at a missing key, having deleted the ones before it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[(done + 1).min(rest.len())..],
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// Counts a hash map's entries: in chunks where the map has batch lookups, else by walking
/// its keys (one syscall per entry, at most `max_entries` steps: a walk that races deletions
/// may restart, and must still end).
pub(crate) fn map_entries(info: &MapInfo) -> io::Result<u64> {
    let map = info.fd().map_err(io::Error::other)?;
    let key_size = info.key_size() as usize;
    let mut count = 0u64;
    if lookup_batch(map.as_fd(), key_size, info.value_size() as usize, |keys, _| {
        count += (keys.len() / key_size) as u64;
    })? {
        return Ok(count);
    }
    let max_entries = info.max_entries();
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut first = true;
    while count < u64::from(max_entries) {
        let mut attr = NextKeyAttr {
            map_fd: map.as_fd().as_raw_fd() as u32,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            ..Default::default()
        };
        // SAFETY: `key` and `next` are the map's key size, as the kernel reads and writes.
        match unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        std::mem::swap(&mut key, &mut next);
        first = false;
        count += 1;
    }
    Ok(count)
}

/// Writes `keys[i] → values[i]` into a hash map in one syscall (Linux ≥ 5.6). On failure,
/// returns how many leading entries were written and the error, so the caller can retry the
/// rest one by one and name the entry that fails.
///
/// # Safety
/// `K` and `V` must have the map's key and value sizes: the kernel reads `keys.len()` of each.
pub(crate) unsafe fn map_update_batch<K: Copy, V: Copy>(
    map: impl AsFd,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `keys` and `values` hold `count` entries of the map's sizes (caller).
    match unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) } {
        Ok(_) => Ok(()),
        // The kernel reports in `count` how many elements it processed before failing.
        Err(e) => Err(((attr.count as usize).min(keys.len()), e)),
    }
}

/// Copies every entry of hash map `from` into hash map `to` (same key and value sizes), a
/// chunk of [`lookup_batch`] per BPF_MAP_UPDATE_BATCH: how a map that grew gets the entries of
/// the one it replaces. Returns how many entries were copied.
pub(crate) fn copy_entries(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
) -> io::Result<u64> {
    let mut copied = 0u64;
    let mut failed = None;
    let batched = lookup_batch(from, key_size, value_size, |keys, values| {
        let count = keys.len() / key_size;
        if failed.is_some() || count == 0 {
            return;
        }
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: count as u32,
            map_fd: to.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `keys` and `values` hold `count` entries of both maps' key and value sizes,
        // as `lookup_batch` read them from `from` (caller: same sizes as `to`).
        match unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) } {
            Ok(_) => copied += count as u64,
            Err(e) => failed = Some(e),
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    if !batched {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the map has no batch lookup (Linux 5.6+)",
        ));
    }
    Ok(copied)
}
