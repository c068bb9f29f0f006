//! A throw-away world for the demo, the privileged tests and the benchmark: network namespaces
//! joined by a bridge (a "node" with "pods"), a child cgroup whose processes the socket
//! programs serve, and small servers that say which backend answered. Everything is removed
//! on drop, and nothing is attached to the host's own interfaces or root cgroup. None of it is
//! part of the `bpf-kube-proxy` binary.

pub mod cgroup;
pub mod netns;
pub mod probe;
pub mod servers;
pub mod topology;

use std::{io, path::PathBuf};

/// A short random suffix so parallel runs never share a name (interface names are limited to
/// 15 bytes, so it stays at 6 hex digits).
pub fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{:06x}", (nanos ^ std::process::id().rotate_left(16)) & 0xff_ffff)
}

/// The workspace binary `name` that cargo built beside the running executable: in its folder
/// (target/<profile>/), or the one above for a test executable in target/<profile>/deps/. The
/// environment variable `env` names another one.
pub fn workspace_binary(name: &str, env: &str) -> io::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(path.into());
    }
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|bin| bin.is_file())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{name} is not built beside {} (or set {env})", exe.display()),
            )
        })
}
