//! Sockets opened inside a pod's network namespace, so traffic keeps the pod's address.
use std::net::SocketAddr;

use mesh_common::DAEMON_SOCKET_MARK;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::netns::{HostNetns, Netns, NetnsError};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("{what} {addr} in the pod's network namespace: {source}")]
    Io {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {addr} timed out after {after:?}")]
    ConnectTimeout {
        addr: SocketAddr,
        after: std::time::Duration,
    },
}

fn new_socket(addr: SocketAddr) -> std::io::Result<Socket> {
    let s = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    // The connect hooks skip marked sockets: the daemon never redirects itself.
    s.set_mark(DAEMON_SOCKET_MARK)?;
    Ok(s)
}

/// Binds a listener at `addr` inside `ns`. It is left unregistered, for the proxy thread
/// that will accept on it.
pub fn listen_in(
    ns: &Netns,
    host: &HostNetns,
    addr: SocketAddr,
) -> Result<std::net::TcpListener, SocketError> {
    let io = |source| SocketError::Io {
        what: "listening on",
        addr,
        source,
    };
    ns.run(host, || listening_socket(addr))?.map_err(io)
}

fn listening_socket(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = new_socket(addr)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    // Accepted sockets inherit it (Linux copies the listener's TCP options to each
    // connection): small HTTP/2 frames and responses go out at once rather than wait for
    // the client's delayed ACK, without a setsockopt per connection.
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// A socket inside `ns`, ready to connect to `dst` with the pod's own source address.
pub fn socket_in(ns: &Netns, host: &HostNetns, dst: SocketAddr) -> Result<TcpSocket, SocketError> {
    let s = ns
        .run(host, || new_socket(dst))?
        .map_err(|source| SocketError::Io {
            what: "creating a socket for",
            addr: dst,
            source,
        })?;
    // Set before connecting, it holds for the connection.
    s.set_tcp_nodelay(true).ok();
    Ok(TcpSocket::from_std_stream(s.into()))
}

/// Connects to `addr` from inside `ns` within `limit`, with Nagle off: the one way the
/// proxy opens upstream connections (HTTP pool and TCP alike).
pub async fn connect_in(
    ns: &Netns,
    host: &HostNetns,
    addr: SocketAddr,
    limit: std::time::Duration,
) -> Result<TcpStream, SocketError> {
    let sock = socket_in(ns, host, addr)?;
    let stream = tokio::time::timeout(limit, sock.connect(addr))
        .await
        .map_err(|_| SocketError::ConnectTimeout { addr, after: limit })?
        .map_err(|source| SocketError::Io {
            what: "connecting to",
            addr,
            source,
        })?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;

    use super::listening_socket;

    #[test]
    fn accepted_connections_have_nagle_off() {
        let l = listening_socket("127.0.0.1:0".parse().expect("addr")).expect("listener");
        let _client = TcpStream::connect(l.local_addr().expect("bound")).expect("connect");
        let (accepted, _) = l.accept().expect("accept");
        assert!(accepted.nodelay().expect("TCP_NODELAY"));
    }
}
