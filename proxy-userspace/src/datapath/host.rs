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
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    // SAFETY: ifreq is plain data; all zeroes is a valid (empty) request.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= request.ifr_name.len() || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a device name"));
    }
    for (dst, src) in request.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads ifr_name and writes ifr_hwaddr inside `request`, which
    // outlives the call; the socket fd is open for its duration.
    let ret = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SIOCGIFHWADDR,
            &raw mut request,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR filled the ifr_hwaddr member of the union.
    Ok(unsafe { request.ifr_ifru.ifru_hwaddr }.sa_family)
}

/// This process's network namespace, by inode (what `ip netns identify` compares).
pub(crate) fn current_netns() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(fs::metadata("/proc/self/ns/net")?.ino())
}
