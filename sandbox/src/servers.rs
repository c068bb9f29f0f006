//! Servers that answer with who they are and who they saw, so a client can tell which backend
//! it reached and a test can check the client address a backend observed.
//!
//! Sockets are created on a thread inside the pod's namespace and then served by tokio (a
//! socket keeps its namespace for life). Bound to `[::]`, they accept IPv4 and IPv6.

use std::{io, net::SocketAddr};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    task::JoinHandle,
};

use super::netns::Netns;

/// What a server answers, as JSON (the HTTP body, or the UDP datagram).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Identity {
    pub backend: String,
    /// The client address as the server saw it (IPv4-mapped addresses unmapped).
    pub client: String,
}

fn reply(backend: &str, peer: SocketAddr) -> String {
    let client = SocketAddr::new(peer.ip().to_canonical(), peer.port()).to_string();
    serde_json::to_string(&Identity {
        backend: backend.to_string(),
        client,
    })
    .unwrap_or_default()
}

/// Servers aborted on drop.
#[derive(Debug, Default)]
pub struct Servers {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Servers {
    /// An HTTP/1.0-style server on `[::]:port` in `netns` (must be called inside a tokio runtime).
    pub fn http(&mut self, netns: &Netns, port: u16, backend: &str) -> io::Result<()> {
        let std_listener = netns.run(|| {
            let l = std::net::TcpListener::bind(("::", port))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let backend = backend.to_string();
        self.tasks.push(tokio::spawn(async move {
            loop {
                let Ok((mut conn, peer)) = listener.accept().await else {
                    // Out of descriptors or the like: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let body = reply(&backend, peer);
                tokio::spawn(async move {
                    // Read the request head (bounded), then answer and close.
                    let mut buf = [0u8; 2048];
                    let mut seen = 0;
                    while seen < buf.len() {
                        match conn.read(&mut buf[seen..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => seen += n,
                        }
                        if buf[..seen].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(response.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        }));
        Ok(())
    }

    /// A UDP server on `[::]:port` in `netns` answering each datagram with its identity.
    pub fn udp(&mut self, netns: &Netns, port: u16, backend: &str) -> io::Result<()> {
        let std_socket = netns.run(|| {
            let s = std::net::UdpSocket::bind(("::", port))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })?;
        let socket = tokio::net::UdpSocket::from_std(std_socket)?;
        let backend = backend.to_string();
        self.tasks.push(tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((_, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let _ = socket.send_to(reply(&backend, peer).as_bytes(), peer).await;
            }
        }));
        Ok(())
    }
}
