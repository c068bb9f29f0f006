//! `probe`: connect to a Service the way a workload does, from a given cgroup and network
//! namespace, and report which backend answered and which peer address the socket showed.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{cgroup, netns};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum ProbeMode {
    /// TCP connect, one HTTP/1.0 GET, read the reply body; peer from getpeername().
    Tcp,
    /// Unconnected UDP: sendto() then recvfrom(); peer is the reply's source address.
    Udp,
    /// Connected UDP: connect(), send(), recv(); peer from getpeername().
    UdpConnected,
    /// Connected UDP on one long-lived socket, as a resolver keeps it; a new socket is opened
    /// only after an attempt fails.
    UdpSession,
    /// Unconnected UDP on one long-lived socket: sendto() and recvfrom() every time, as a
    /// resolver that never connects; a new socket only after an attempt fails.
    UdpSharedUnconnected,
}

impl ProbeMode {
    /// The `--mode` value that selects this mode.
    pub const fn flag(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::UdpConnected => "udp-connected",
            Self::UdpSession => "udp-session",
            Self::UdpSharedUnconnected => "udp-shared-unconnected",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// Service address and port, e.g. 10.96.0.10:80 or [fd00:10:96::10]:80.
    pub target: SocketAddr,
    #[arg(long, value_enum, default_value = "tcp")]
    pub mode: ProbeMode,
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// Join this cgroup first (the one the socket programs are attached to, or a child).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Enter this network namespace first (a path such as /run/netns/NAME).
    #[arg(long)]
    pub netns: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// Pause between attempts.
    #[arg(long, default_value_t = 0)]
    pub interval_ms: u64,
    /// One JSON object per attempt instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The outcome of one attempt.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attempt {
    pub n: u32,
    pub ok: bool,
    /// The reply body or datagram, as text.
    pub reply: Option<String>,
    /// The peer address the application saw (getpeername, or recvfrom's source).
    pub peer: Option<String>,
    pub error: Option<String>,
    /// errno of a failed connect/send/receive.
    pub errno: Option<i32>,
    pub micros: u64,
}

fn attempt_once(args: &ProbeArgs, n: u32, session: &mut Option<UdpSocket>) -> Attempt {
    let started = Instant::now();
    let timeout = Duration::from_millis(args.timeout_ms);
    let result = match args.mode {
        ProbeMode::Tcp => tcp(args.target, timeout, n),
        ProbeMode::Udp => udp(args.target, timeout, n, false),
        ProbeMode::UdpConnected => udp(args.target, timeout, n, true),
        ProbeMode::UdpSession => udp_session(args.target, timeout, n, true, session),
        ProbeMode::UdpSharedUnconnected => udp_session(args.target, timeout, n, false, session),
    };
    let micros = started.elapsed().as_micros() as u64;
    match result {
        Ok((reply, peer)) => Attempt {
            n,
            ok: true,
            reply: Some(reply),
            peer: Some(peer.to_string()),
            error: None,
            errno: None,
            micros,
        },
        Err(e) => Attempt {
            n,
            ok: false,
            reply: None,
            peer: None,
            errno: e.raw_os_error(),
            error: Some(e.to_string()),
            micros,
        },
    }
}

fn tcp(target: SocketAddr, timeout: Duration, n: u32) -> std::io::Result<(String, SocketAddr)> {
    let mut stream = TcpStream::connect_timeout(&target, timeout)?;
    let peer = stream.peer_addr()?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("GET /probe/{n} HTTP/1.0\r\nHost: {target}\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let body = text.split_once("\r\n\r\n").map_or(text.as_ref(), |(_, b)| b);
    Ok((body.trim().to_string(), peer))
}

/// A UDP socket for `target`, connected to it if `connected`.
fn udp_socket(target: SocketAddr, timeout: Duration, connected: bool) -> std::io::Result<UdpSocket> {
    let bind: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(timeout))?;
    if connected {
        socket.connect(target)?;
    }
    Ok(socket)
}

/// One datagram and its answer: send()/recv() with the peer from getpeername() on a connected
/// socket, sendto()/recvfrom() with the reply's source as the peer otherwise.
fn exchange(
    socket: &UdpSocket,
    target: SocketAddr,
    n: u32,
    connected: bool,
) -> std::io::Result<(String, SocketAddr)> {
    let mut buf = [0u8; 1500];
    let request = format!("probe {n}");
    let (len, peer) = if connected {
        socket.send(request.as_bytes())?;
        (socket.recv(&mut buf)?, socket.peer_addr()?)
    } else {
        socket.send_to(request.as_bytes(), target)?;
        socket.recv_from(&mut buf)?
    };
    Ok((String::from_utf8_lossy(&buf[..len]).trim().to_string(), peer))
}

fn udp(
    target: SocketAddr,
    timeout: Duration,
    n: u32,
    connected: bool,
) -> std::io::Result<(String, SocketAddr)> {
    exchange(&udp_socket(target, timeout, connected)?, target, n, connected)
}

fn udp_session(
    target: SocketAddr,
    timeout: Duration,
    n: u32,
    connected: bool,
    session: &mut Option<UdpSocket>,
) -> std::io::Result<(String, SocketAddr)> {
    let socket = match session.take() {
        Some(socket) => socket,
        None => udp_socket(target, timeout, connected)?,
    };
    let result = exchange(&socket, target, n, connected);
    if result.is_ok() {
        *session = Some(socket);
    }
    result
}

/// Runs before any thread exists: joining a cgroup moves the whole process, and setns(2)
/// moves only the calling thread, which is then the only one.
pub fn run(args: &ProbeArgs) -> std::io::Result<()> {
    if let Some(cg) = &args.cgroup {
        cgroup::join(cg)?;
    }
    if let Some(ns) = &args.netns {
        netns::enter(ns)?;
    }
    let mut session = None;
    for n in 1..=args.count {
        let attempt = attempt_once(args, n, &mut session);
        if args.json {
            println!("{}", serde_json::to_string(&attempt).unwrap_or_default());
        } else if attempt.ok {
            println!(
                "{n:>4}  {}  peer {}  ({} us)",
                attempt.reply.as_deref().unwrap_or_default(),
                attempt.peer.as_deref().unwrap_or_default(),
                attempt.micros
            );
        } else {
            println!("{n:>4}  error: {}", attempt.error.as_deref().unwrap_or_default());
        }
        if args.interval_ms > 0 && n < args.count {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum as _;

    use super::*;

    #[test]
    fn flags_are_the_values_clap_accepts() {
        for mode in ProbeMode::value_variants() {
            assert_eq!(ProbeMode::from_str(mode.flag(), false), Ok(*mode));
        }
    }
}
