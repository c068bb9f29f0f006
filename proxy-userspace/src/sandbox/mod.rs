//! A throw-away world for the demo and the privileged tests: network namespaces joined by a
//! bridge (a "node" with "pods"), a child cgroup whose processes the socket programs serve, and
//! small servers that say which backend answered. Everything is removed on drop, and nothing
//! is attached to the host's own interfaces or root cgroup.

pub mod cgroup;
pub mod netns;
pub mod probe;
pub mod servers;
pub mod topology;

/// A short random suffix so parallel runs never share a name (interface names are limited to
/// 15 bytes, so it stays at 6 hex digits).
pub fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:06x}", (nanos ^ std::process::id().rotate_left(16)) & 0xff_ffff)
}
