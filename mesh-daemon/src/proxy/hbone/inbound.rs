//! The server side of the tunnel, one per enrolled pod: port 15008 on the pod's addresses,
//! mutual TLS as the pod's identity (the client's certificate required and its SPIFFE ID
//! read), HTTP/2, and for each `CONNECT` to one of the pod's own addresses that
//! AuthorizationPolicy allows (else 401) a connection to the application from inside the
//! pod, the bytes forwarded both ways.
use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;

use super::{
    CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, HBONE_PORT, MAX_FRAME, STREAM_WINDOW,
    pool::MAX_STREAMS,
    stream::{Tunnel, TunnelRead, TunnelWrite},
};
use crate::{
    identity::{Identity, certs::Certificates, tls::peer_identity},
    netns::Netns,
    proxy::{
        ProxyInputs,
        inbound::{Origin, authorize, connect_app, deliverable, refused, relay},
        pod_listeners::{Handler, PodListeners, Scope},
        sockets::SocketError,
    },
    state::PodInfo,
};

/// A pod's tunnel listeners and what serving them needs.
pub struct TunnelServer {
    pod_uid: String,
    netns: Arc<Netns>,
    inputs: Arc<ProxyInputs>,
    certs: Arc<Certificates>,
}

impl TunnelServer {
    pub fn new(
        pod_uid: String,
        netns: Arc<Netns>,
        inputs: Arc<ProxyInputs>,
        certs: Arc<Certificates>,
    ) -> Self {
        Self {
            pod_uid,
            netns,
            inputs,
            certs,
        }
    }

    /// Port 15008 on every address of the pod.
    pub fn bind(&self) -> Result<PodListeners, SocketError> {
        PodListeners::bind(
            &self.pod_uid,
            &self.netns,
            &self.inputs.host,
            Scope::Pod,
            HBONE_PORT,
        )
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let snap = self.inputs.snapshot.load_full();
        let Some(pod) = snap.pods_by_uid.get(&self.pod_uid).cloned() else {
            return;
        };
        let identity = self.certs.identity(&pod.namespace, &pod.service_account);
        let tls = match self.certs.get(&identity).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(pod = %self.pod_uid, error = %e, "no certificate for the tunnel");
                return;
            }
        };
        let accepted = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsAcceptor::from(tls.server.clone()).accept(tcp),
        )
        .await;
        let tls_stream = match accepted {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(pod = %self.pod_uid, %peer, error = %e, "tunnel TLS handshake failed");
                self.inputs.metrics.tunnel_refused.inc();
                return;
            }
            Err(_) => return,
        };
        let source = match peer_identity(tls_stream.get_ref().1.peer_certificates()) {
            Ok(id) => Arc::new(id),
            Err(e) => {
                tracing::debug!(pod = %self.pod_uid, %peer, error = %e, "tunnel peer has no identity");
                self.inputs.metrics.tunnel_refused.inc();
                return;
            }
        };
        let handshake = h2::server::Builder::new()
            .max_concurrent_streams(MAX_STREAMS)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake::<_, Bytes>(tls_stream)
            .await;
        let mut conn = match handshake {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(pod = %self.pod_uid, %peer, error = %e, "tunnel HTTP/2 handshake failed");
                return;
            }
        };
        let local = Arc::new(identity);
        // A client pools this connection for more tunnels; once the daemon drains, GOAWAY
        // sends those to the successor while the open ones finish here.
        let mut drain = self.inputs.shards.drain().signal();
        let mut draining = false;
        // Accepting drives the connection; each stream runs as a task of its own.
        loop {
            let next = if draining {
                conn.accept().await
            } else {
                tokio::select! {
                    next = conn.accept() => next,
                    () = std::future::poll_fn(|cx| drain.poll_started(cx)) => {
                        conn.graceful_shutdown();
                        draining = true;
                        continue;
                    }
                }
            };
            let Some(Ok((request, respond))) = next else {
                break;
            };
            let this = self.clone();
            let (pod, source, local) = (pod.clone(), source.clone(), local.clone());
            tokio::spawn(async move {
                this.stream(
                    request,
                    respond,
                    Peer {
                        addr: peer,
                        pod,
                        source,
                        local,
                    },
                )
                .await;
            });
        }
    }

    /// One tunnelled connection.
    async fn stream(
        &self,
        request: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer: Peer,
    ) {
        let target = match tunnel_target(&request, &peer.pod) {
            Ok(t) => t,
            Err(status) => {
                tracing::debug!(pod = %self.pod_uid, uri = %request.uri(), %status, "tunnel request refused");
                reply(&mut respond, status);
                return;
            }
        };
        let inputs = &self.inputs;
        let from = Origin {
            peer: peer.addr,
            principal: Some(&peer.source),
            local: Some(&peer.local),
        };
        // Policies as they are now, not as they were when the connection was accepted.
        let snap = inputs.snapshot.load_full();
        let pod = snap.pods_by_uid.get(&self.pod_uid).unwrap_or(&peer.pod);
        if let Err(denial) = authorize(&snap, pod, target, &from) {
            refused(inputs, &denial, target, &from);
            reply(&mut respond, StatusCode::UNAUTHORIZED);
            return;
        }
        drop(snap);
        let app = match connect_app(&self.netns, inputs, target).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(pod = %self.pod_uid, %target, error = %e, "cannot reach the application");
                reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                return;
            }
        };
        let Some(send) = reply(&mut respond, StatusCode::OK) else {
            return;
        };
        let tunnel = Tunnel {
            read: TunnelRead::new(request.into_body()),
            write: TunnelWrite::new(send),
            slot: None,
        };
        relay(inputs, &self.pod_uid, app, tunnel, target, &from).await;
    }
}

impl Handler for TunnelServer {
    fn pod_uid(&self) -> &str {
        &self.pod_uid
    }

    fn shards(&self) -> &Arc<crate::proxy::shards::Shards> {
        &self.inputs.shards
    }

    fn handle(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.connection(stream, peer)
    }
}

/// Who is at the other end of a tunnel connection.
struct Peer {
    addr: SocketAddr,
    /// This side's pod.
    pod: Arc<PodInfo>,
    source: Arc<Identity>,
    local: Arc<Identity>,
}

/// The address a `CONNECT` asks for, if this pod may be reached there: one of the pod's own
/// addresses, on any port but the tunnel's.
fn tunnel_target(
    request: &Request<h2::RecvStream>,
    pod: &PodInfo,
) -> Result<SocketAddr, StatusCode> {
    if request.method() != Method::CONNECT {
        return Err(StatusCode::METHOD_NOT_ALLOWED);
    }
    let target: SocketAddr = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse().ok())
        .ok_or(StatusCode::BAD_REQUEST)?;
    if !deliverable(pod, target) {
        return Err(StatusCode::BAD_REQUEST);
    }
    Ok(target)
}

fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) -> Option<h2::SendStream<Bytes>> {
    let response = Response::builder().status(status).body(()).ok()?;
    let end = status != StatusCode::OK;
    respond.send_response(response, end).ok()
}
