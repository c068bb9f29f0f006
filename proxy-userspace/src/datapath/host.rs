//! Host facts the datapath needs: where bpffs and cgroup v2 are, mounting bpffs when missing.

use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
};

use nix::{
    mount::{MsFlags, mount},
    sched::{CloneFlags, setns},
    sys::statfs::statfs,
};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{path} is not on a bpf filesystem and {DEFAULT_BPFFS} could not be mounted: {source}")]
    MountBpffs { path: PathBuf, source: nix::Error },
    #[error("{path} is not on a bpf filesystem (mount one there, or pick a --pin-dir under {DEFAULT_BPFFS})")]
    NotBpffs { path: PathBuf },
    #[error("creating {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("reading /proc/mounts: {0}")]
    Mounts(std::io::Error),
    #[error("no cgroup2 filesystem is mounted (see /proc/mounts); pass --cgroup")]
    NoCgroup2,
}

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Makes sure `pin_dir` exists on a bpf filesystem, mounting bpffs at /sys/fs/bpf if the
/// machine has none there (many minimal hosts and containers do not).
pub(crate) fn ensure_pin_dir(pin_dir: &Path) -> Result<(), HostError> {
    let default = Path::new(DEFAULT_BPFFS);
    if pin_dir.starts_with(default) && !is_bpffs(default) {
        fs::create_dir_all(default).map_err(|source| HostError::CreateDir {
            path: default.into(),
            source,
        })?;
        mount(
            Some("bpffs"),
            default,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| HostError::MountBpffs {
            path: pin_dir.into(),
            source,
        })?;
        tracing::info!("mounted bpffs at {DEFAULT_BPFFS}");
    }
    fs::create_dir_all(pin_dir).map_err(|source| HostError::CreateDir {
        path: pin_dir.into(),
        source,
    })?;
    if !is_bpffs(pin_dir) {
        return Err(HostError::NotBpffs { path: pin_dir.into() });
    }
    Ok(())
}

/// The first cgroup2 mount point in /proc/mounts: the node's cgroup root.
pub fn cgroup2_root() -> Result<PathBuf, HostError> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(HostError::Mounts)?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .ok_or(HostError::NoCgroup2)
}

/// Runs `f` on a fresh thread inside the network namespace `netns` (only the network namespace
/// changes, so bpffs and cgroup2 stay the host's). Sockets `f` creates stay in that namespace.
pub fn in_netns<T: Send>(netns: &File, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                setns(netns, CloneFlags::CLONE_NEWNET)?;
                f()
            })
            .join()
            .map_err(|_| io::Error::other("network namespace thread panicked"))?
    })
}

/// The link-layer type (`ARPHRD_*`, `dev->type`) of the device `name` in this process's
/// network namespace. Read with SIOCGIFHWADDR rather than from /sys/class/net, which shows the
/// namespace sysfs was mounted in, not necessarily the agent's.
pub(crate) fn device_type(name: &str) -> io::Result<u16> {
    let mut request = device_request(name)?;
    // SAFETY: SIOCGIFHWADDR reads ifr_name and writes ifr_hwaddr inside `request`.
    unsafe { device_ioctl(libc::SIOCGIFHWADDR, &mut request)? };
    // SAFETY: SIOCGIFHWADDR filled the ifr_hwaddr member of the union.
    Ok(unsafe { request.ifr_ifru.ifru_hwaddr }.sa_family)
}

/// A device request naming `name`, the rest zero.
fn device_request(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain data; all zeroes is a valid (empty) request.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= request.ifr_name.len() || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a device name"));
    }
    for (dst, src) in request.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(request)
}

/// Runs the device ioctl `command` on `request` through a socket of this network namespace.
///
/// # Safety
/// `request` must be what `command` reads and writes, and anything it points to must be
/// valid for the call.
unsafe fn device_ioctl(command: libc::c_ulong, request: &mut libc::ifreq) -> io::Result<()> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    // SAFETY: the caller's promise; the socket fd is open for the call's duration.
    let ret = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&socket), command, request) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The name of the driver behind the device `name` (`ethtool -i`: "veth", "virtio_net",
/// "mlx5_core"), asked in this process's network namespace like [`device_type`].
pub(crate) fn device_driver(name: &str) -> io::Result<String> {
    /// `struct ethtool_drvinfo` (linux/ethtool.h): the command, then the strings we read.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 32 * 4 + 12 + 20],
    }
    const ETHTOOL_GDRVINFO: u32 = 3;
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 32 * 4 + 12 + 20],
    };
    let mut request = device_request(name)?;
    request.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: SIOCETHTOOL reads ifr_name and the command at ifru_data, and writes the
    // ethtool_drvinfo there, which `info` is and which outlives the call.
    unsafe { device_ioctl(SIOCETHTOOL, &mut request)? };
    let end = info
        .driver
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(info.driver.len());
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// A device feature `ethtool -K` switches, through the ioctl commands that take one value.
#[derive(Clone, Copy, Debug)]
pub enum Offload {
    /// `tx-checksumming`: off, a sender fills in whole checksums. A veth sender otherwise
    /// leaves them partial (CHECKSUM_PARTIAL), which XDP cannot see and a frame XDP sends on
    /// loses, so the receiver finds them wrong; a wire never carries partial checksums.
    TxChecksum,
    /// `generic-receive-offload`: on a veth, also NAPI on its receive side, without which the
    /// veth drops the frames XDP on its peer sends it.
    Gro,
}

/// Turns `offload` of the device `name` in this network namespace on or off (`ethtool -K`).
pub fn set_offload(name: &str, offload: Offload, on: bool) -> io::Result<()> {
    /// `struct ethtool_value` (linux/ethtool.h).
    #[repr(C)]
    struct Value {
        cmd: u32,
        data: u32,
    }
    const ETHTOOL_STXCSUM: u32 = 0x17;
    const ETHTOOL_SGRO: u32 = 0x2c;
    let mut value = Value {
        cmd: match offload {
            Offload::TxChecksum => ETHTOOL_STXCSUM,
            Offload::Gro => ETHTOOL_SGRO,
        },
        data: u32::from(on),
    };
    let mut request = device_request(name)?;
    request.ifr_ifru.ifru_data = (&raw mut value).cast();
    // SAFETY: SIOCETHTOOL reads ifr_name and the ethtool_value at ifru_data, which `value` is
    // and which outlives the call.
    unsafe { device_ioctl(SIOCETHTOOL, &mut request) }
}

/// `SIOCETHTOOL` (linux/sockios.h).
const SIOCETHTOOL: libc::c_ulong = 0x8946;

/// This process's network namespace, by inode (what `ip netns identify` compares).
pub(crate) fn current_netns() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(fs::metadata("/proc/self/ns/net")?.ino())
}
