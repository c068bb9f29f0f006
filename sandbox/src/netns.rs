//! Named network namespaces (`ip netns add`), entered per thread with setns(2).

use std::{
    ffi::OsStr,
    fs::{self, File},
    io,
    path::{Path, PathBuf},
    process::Command,
};

use nix::sched::{CloneFlags, setns};

use bpf_kube_proxy::datapath::host;

/// Runs `ip ARGS...`, turning a failure into an error that carries ip's own message.
pub fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Moves the calling thread into the network namespace at `path`. Only the network namespace
/// changes, so bpffs and cgroup2 stay the host's (`ip netns exec` would remount /sys).
pub fn enter(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    setns(file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// `program` to be run in the network namespace at `path`, and in no other namespace of it:
/// nsenter rather than `ip netns exec`, which remounts /sys, so pins and cgroups stay shared.
pub fn command_in(path: &Path, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", path.display())).arg(program);
    cmd
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace with its loopback up and no IPv6 duplicate address detection on
    /// the devices it will get. Sandbox devices are seconds old when used, and while a
    /// device's link-local address is tentative the kernel sends no neighbour solicitation
    /// for a packet from an address of another device (a forwarded or translated packet), so
    /// the first second of IPv6 traffic through a router namespace would be lost.
    pub fn create(name: &str) -> io::Result<Self> {
        ip(&["netns", "add", name])?;
        let ns = Self {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.run(|| {
            for conf in ["all", "default"] {
                fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/accept_dad"), "0")?;
            }
            Ok(())
        })?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A veth pair: `port` here, `eth0` in `peer`.
    pub fn veth_to(&self, port: &str, peer: &Netns) -> io::Result<()> {
        self.ip(&[
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            peer.name(),
        ])
    }

    /// `ethtool -K device ...` inside this namespace.
    pub fn offload(&self, device: &str, offload: host::Offload, on: bool) -> io::Result<()> {
        let device = device.to_string();
        self.run(move || host::set_offload(&device, offload, on))
    }

    /// `program` to be run inside this namespace (see [`command_in`]).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        command_in(&self.path(), program)
    }

    /// Runs `f` on a fresh thread inside this namespace (sockets it creates stay in it).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        host::in_netns(&File::open(self.path())?, f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            tracing::warn!("removing netns {}: {e}", self.name);
        }
    }
}
