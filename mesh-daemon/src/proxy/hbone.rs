//! HBONE, Istio ambient's mTLS tunnel: a connection between two enrolled pods travels as one
//! HTTP/2 `CONNECT` stream (`:authority` = the destination pod's address and port) inside
//! mutual TLS to the destination pod's port 15008, where the destination node's daemon
//! listens in the pod's network namespace. Each side presents its workload's certificate
//! and checks the other's SPIFFE ID.
pub mod connect;
pub mod inbound;
pub mod pool;
pub mod stream;

use std::net::SocketAddr;

use crate::identity::{Identity, certs::CertError, tls::PeerError};

use super::sockets::SocketError;

/// The tunnel port, in every enrolled pod (Istio ambient's).
pub const HBONE_PORT: u16 = 15008;

/// HTTP/2 windows of a tunnel connection: bulk transfers need more than the 64 KiB default
/// to keep a link busy. ztunnel's values.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
const MAX_FRAME: u32 = 1024 * 1024;

/// How long a TLS handshake, or the answer to a `CONNECT`, may take before the connection is
/// dropped.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("the workload certificate: {0}")]
    Certificate(#[from] CertError),
    #[error("TLS with {peer}: {source}")]
    Tls {
        peer: SocketAddr,
        source: std::io::Error,
    },
    #[error("{peer} did not answer within {HANDSHAKE_TIMEOUT:?}: {during}")]
    Timeout {
        peer: SocketAddr,
        during: &'static str,
    },
    #[error("{peer}: {source}")]
    Peer { peer: SocketAddr, source: PeerError },
    #[error("{peer} presented {found}, not {expected}")]
    WrongIdentity {
        peer: SocketAddr,
        expected: Identity,
        found: Identity,
    },
    #[error("{peer}: the tunnel connection this one waited for could not be made")]
    SharedAttempt { peer: SocketAddr },
    #[error("HTTP/2 with {peer}: {source}")]
    H2 { peer: SocketAddr, source: h2::Error },
    #[error("{peer} refused the tunnel to {target}: {status}")]
    Refused {
        peer: SocketAddr,
        target: SocketAddr,
        status: http::StatusCode,
    },
}
