//! The client side of a tunnel: from the source pod's network namespace to the destination
//! pod's port 15008, mutual TLS as the source's identity, the destination's identity checked,
//! then one `CONNECT` stream for the connection.
use std::net::SocketAddr;

use bytes::Bytes;
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

/// Opens a tunnel for one connection. A new TLS connection each time: pooling tunnels on
/// shared connections is the next step.
pub async fn open(
    netns: &Netns,
    host: &HostNetns,
    to: &TunnelTo<'_>,
    connect_timeout: std::time::Duration,
) -> Result<(Tunnel, SocketAddr), HboneError> {
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
    let h2 = |source| HboneError::H2 { peer, source };
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .enable_push(false)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(h2)?;
    // Ends once the stream is done and `send` is dropped.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "tunnel connection ended");
        }
    });
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
    Ok((
        Tunnel {
            read: TunnelRead::new(response.into_body()),
            write: TunnelWrite::new(stream),
        },
        local,
    ))
}
