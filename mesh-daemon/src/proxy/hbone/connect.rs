//! The client side of a tunnel: from the source pod's network namespace to the destination
//! pod's port 15008, mutual TLS as the source's identity, the destination's identity checked
//! ([`handshake`]), then one `CONNECT` stream per connection ([`stream`]). [`super::pool`]
//! decides which connection a stream goes on.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;

use super::{
    CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, HBONE_PORT, HboneError, MAX_FRAME, STREAM_WINDOW,
    stream::{Tunnel, TunnelRead, TunnelWrite},
};
use crate::{
    identity::{Identity, certs::IdentityTls, tls::peer_identity},
    netns::{HostNetns, Netns},
    proxy::sockets::connect_in,
};

/// Where a tunnel goes and as whom.
pub struct TunnelTo<'a> {
    /// The destination pod's address and the port its connection is for.
    pub target: SocketAddr,
    /// Who the destination must prove to be.
    pub expected: &'a Identity,
    /// The source workload's certificate.
    pub source: &'a IdentityTls,
}

/// Opens a tunnel connection to the destination pod: TCP from the source pod, TLS, the
/// peer's identity checked, HTTP/2. Returns the handle streams are opened with, the local
/// address, and a flag set when the connection has ended.
pub async fn handshake(
    netns: &Netns,
    host: &HostNetns,
    to: &TunnelTo<'_>,
    connect_timeout: std::time::Duration,
) -> Result<(SendRequest<Bytes>, SocketAddr, Arc<AtomicBool>), HboneError> {
    let peer = SocketAddr::new(to.target.ip(), HBONE_PORT);
    let tcp = connect_in(netns, host, peer, connect_timeout).await?;
    let local = tcp.local_addr().unwrap_or(peer);
    let name = ServerName::IpAddress(to.target.ip().into());
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsConnector::from(to.source.client.clone()).connect(name, tcp),
    )
    .await
    .map_err(|_| HboneError::Timeout {
        peer,
        during: "the TLS handshake",
    })?
    .map_err(|source| HboneError::Tls { peer, source })?;
    let found = peer_identity(tls.get_ref().1.peer_certificates())
        .map_err(|source| HboneError::Peer { peer, source })?;
    if &found != to.expected {
        return Err(HboneError::WrongIdentity {
            peer,
            expected: to.expected.clone(),
            found,
        });
    }
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .enable_push(false)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|source| HboneError::H2 { peer, source })?;
    let closed = Arc::new(AtomicBool::new(false));
    let ended = closed.clone();
    // Ends once every stream is done and every handle dropped (or the peer goes away).
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%peer, error = %e, "tunnel connection ended");
        }
        ended.store(true, Ordering::Release);
    });
    Ok((send, local, closed))
}

/// Opens one `CONNECT` stream for `to.target` on a tunnel connection.
pub async fn stream(send: SendRequest<Bytes>, to: &TunnelTo<'_>) -> Result<Tunnel, HboneError> {
    let peer = SocketAddr::new(to.target.ip(), HBONE_PORT);
    let h2 = |source| HboneError::H2 { peer, source };
    let mut send = send.ready().await.map_err(h2)?;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(to.target.to_string())
        .body(())
        .map_err(|_| HboneError::Refused {
            peer,
            target: to.target,
            status: StatusCode::BAD_REQUEST,
        })?;
    let (response, stream) = send.send_request(request, false).map_err(h2)?;
    let response = tokio::time::timeout(HANDSHAKE_TIMEOUT, response)
        .await
        .map_err(|_| HboneError::Timeout {
            peer,
            during: "the answer to CONNECT",
        })?
        .map_err(h2)?;
    if response.status() != StatusCode::OK {
        return Err(HboneError::Refused {
            peer,
            target: to.target,
            status: response.status(),
        });
    }
    Ok(Tunnel {
        read: TunnelRead::new(response.into_body()),
        write: TunnelWrite::new(stream),
        slot: None,
    })
}
