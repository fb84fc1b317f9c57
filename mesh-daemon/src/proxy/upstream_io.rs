//! An upstream connection's bytes: a TCP socket to the destination, or a stream in the mTLS
//! tunnel to its pod. The HTTP pool, the TCP proxy and WebSocket tunnels all hold one.
use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpStream, tcp},
};

use super::{
    ProxyInputs,
    forward::{Duplex, Half},
    h1_codec,
    hbone::{
        HboneError,
        connect::TunnelTo,
        stream::{Tunnel, TunnelRead, TunnelWrite},
    },
    sockets::{SocketError, connect_in},
};
use crate::{
    identity::{Identity, certs::CertError},
    netns::Netns,
    state::Snapshot,
};

pub enum UpstreamIo {
    Tcp(TcpStream),
    /// Boxed: a tunnel stream is several times a socket's size.
    Tunnel(Box<Tunnel>),
}

pub enum UpRead<'a> {
    Tcp(tcp::ReadHalf<'a>),
    Tunnel(&'a mut TunnelRead),
}

pub enum UpWrite<'a> {
    Tcp(tcp::WriteHalf<'a>),
    Tunnel(&'a mut TunnelWrite),
}

impl UpstreamIo {
    pub fn split(&mut self) -> (UpRead<'_>, UpWrite<'_>) {
        match self {
            Self::Tcp(s) => {
                let (r, w) = s.split();
                (UpRead::Tcp(r), UpWrite::Tcp(w))
            }
            Self::Tunnel(t) => (UpRead::Tunnel(&mut t.read), UpWrite::Tunnel(&mut t.write)),
        }
    }

    /// Whether an idle connection can no longer carry a request: the peer closed or reset
    /// it (no system call).
    pub fn peer_closed(&self) -> bool {
        match self {
            Self::Tcp(s) => h1_codec::peer_closed(s),
            Self::Tunnel(t) => t.read.ended(),
        }
    }
}

impl Duplex for UpstreamIo {
    type Read<'a> = UpRead<'a>;
    type Write<'a> = UpWrite<'a>;

    fn halves(&mut self) -> (UpRead<'_>, UpWrite<'_>) {
        self.split()
    }

    fn abort(&mut self) {
        match self {
            Self::Tcp(s) => super::forward::abort(s),
            Self::Tunnel(t) => t.write.reset(),
        }
    }
}

/// Dispatches an I/O call to whichever variant `$self` is.
macro_rules! either {
    ($self:expr, $io:ident => $call:expr) => {
        match $self {
            Self::Tcp($io) => $call,
            Self::Tunnel($io) => $call,
        }
    };
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tunnel(t) => Pin::new(&mut t.read).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tunnel(t) => Pin::new(&mut t.write).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tunnel(t) => Pin::new(&mut t.write).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        matches!(self, Self::Tcp(_))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Tunnel(t) => Pin::new(&mut t.write).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tunnel(t) => Pin::new(&mut t.write).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for UpRead<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        either!(self.get_mut(), r => Pin::new(r).poll_read(cx, buf))
    }
}

impl AsyncWrite for UpWrite<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        either!(self.get_mut(), w => Pin::new(w).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        either!(self.get_mut(), w => Pin::new(w).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        matches!(self, Self::Tcp(_))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(self.get_mut(), w => Pin::new(w).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(self.get_mut(), w => Pin::new(w).poll_shutdown(cx))
    }
}

impl Half for UpRead<'_> {
    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Self::Tcp(r) => r.tcp(),
            Self::Tunnel(_) => None,
        }
    }
}

impl Half for UpWrite<'_> {
    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Self::Tcp(w) => w.tcp(),
            Self::Tunnel(_) => None,
        }
    }
}

/// Who proved what on a tunnelled connection.
#[derive(Debug, Clone)]
pub struct Principals {
    /// This side's identity (the source pod's).
    pub own: Identity,
    /// The identity the destination proved.
    pub peer: Identity,
}

/// An upstream connection just opened.
pub struct Dialed {
    pub io: UpstreamIo,
    /// The address the connection leaves from, in the source pod.
    pub local: Option<SocketAddr>,
    /// `Some` when it goes through the mTLS tunnel.
    pub principals: Option<Principals>,
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// Boxed: the error names identities, and results of this type are common.
    #[error("mTLS tunnel: {0}")]
    Tunnel(Box<HboneError>),
    /// Plaintext would bypass mTLS, so the connection fails instead.
    #[error("no certificate for the source pod: {0}")]
    Certificate(#[from] CertError),
    #[error("no CA to issue the source pod's certificate")]
    NoCa,
}

impl DialError {
    /// The destination's daemon refused the tunnel because AuthorizationPolicy denies it.
    pub fn denied_by_policy(&self) -> bool {
        matches!(self, Self::Tunnel(e) if matches!(**e, HboneError::Refused { status, .. } if status == http::StatusCode::UNAUTHORIZED))
    }
}

impl From<HboneError> for DialError {
    fn from(e: HboneError) -> Self {
        Self::Tunnel(Box::new(e))
    }
}

/// Connects from the pod `source_uid` (inside `netns`) to `addr`: through the mTLS tunnel
/// when `addr` is a pod in the mesh (on a port it has not excluded) and the mesh has a CA,
/// else directly.
pub async fn dial(
    inputs: &ProxyInputs,
    netns: &Netns,
    snap: &Snapshot,
    source_uid: &str,
    addr: SocketAddr,
    limit: Duration,
) -> Result<Dialed, DialError> {
    if let Some(Principals {
        own,
        peer: expected,
    }) = principals(inputs, snap, source_uid, addr)
    {
        let certs = inputs.certs.as_ref().ok_or(DialError::NoCa)?;
        let source = certs.get(&own).await?;
        let to = TunnelTo {
            target: addr,
            expected: &expected,
            source: &source,
        };
        let opened = inputs
            .tunnels
            .open(netns, &inputs.host, source_uid, &to, limit)
            .await;
        let (tunnel, local) = opened.inspect_err(|_| {
            inputs.metrics.tunnel_failures.inc();
        })?;
        return Ok(Dialed {
            io: UpstreamIo::Tunnel(Box::new(tunnel)),
            local: Some(local),
            principals: Some(Principals {
                own,
                peer: expected,
            }),
        });
    }
    let s = connect_in(netns, &inputs.host, addr, limit).await?;
    Ok(Dialed {
        local: s.local_addr().ok(),
        io: UpstreamIo::Tcp(s),
        principals: None,
    })
}

/// Who each side of a connection from the pod `source_uid` to `addr` will prove to be, when
/// it goes through the mTLS tunnel: `addr` is a pod in the mesh (on a port it has not
/// excluded) and the mesh has a CA.
pub fn principals(
    inputs: &ProxyInputs,
    snap: &Snapshot,
    source_uid: &str,
    addr: SocketAddr,
) -> Option<Principals> {
    let certs = inputs.certs.as_ref()?;
    let dst = snap.pods_by_ip.get(&addr.ip())?;
    let enrollment = &dst.enrollment;
    if !enrollment.enrolled || enrollment.exclusions.inbound_ports.contains(&addr.port()) {
        return None;
    }
    let src = snap.pods_by_uid.get(source_uid);
    Some(Principals {
        own: certs.identity(
            src.map_or("", |p| p.namespace.as_str()),
            src.map_or("default", |p| p.service_account.as_str()),
        ),
        peer: certs.identity(&dst.namespace, &dst.service_account),
    })
}
