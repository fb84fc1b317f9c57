//! The server side of the tunnel, one per enrolled pod: port 15008 on the pod's addresses,
//! mutual TLS as the pod's identity (the client's certificate required and its SPIFFE ID
//! read), HTTP/2, and for each `CONNECT` to one of the pod's own addresses a connection to
//! the application from inside the pod, the bytes forwarded both ways.
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;

use super::{
    CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, HBONE_PORT, MAX_FRAME, STREAM_WINDOW,
    stream::{Tunnel, TunnelRead, TunnelWrite},
};
use crate::{
    identity::{Identity, certs::Certificates, tls::peer_identity},
    metrics::TcpLabels,
    netns::Netns,
    proxy::{
        ProxyInputs,
        access_log::{TcpEntry, log_tcp},
        forward::forward,
        pod_listeners::{PodListeners, Scope},
        sockets::{SocketError, connect_in},
    },
    state::{PodInfo, ServicePort, Snapshot},
};

/// Idle timeout of a tunnelled connection (Istio's default TCP idle timeout).
const IDLE: std::time::Duration = std::time::Duration::from_secs(3600);

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

    /// Accepts until the task is aborted (the pod left the mesh or the node).
    pub async fn run(self, listeners: PodListeners) {
        let this = Arc::new(self);
        let shards = this.inputs.shards.clone();
        let pod_uid = this.pod_uid.clone();
        listeners
            .accept(&pod_uid, &shards, move |stream, peer| {
                let this = this.clone();
                async move { Box::pin(this.handle(stream, peer)).await }
            })
            .await;
    }

    async fn handle(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let snap = self.inputs.snapshot.load_full();
        let Some(pod) = snap.pods_by_uid.get(&self.pod_uid).cloned() else {
            return;
        };
        let identity = self.certs.identity(&pod.namespace, &pod.service_account);
        let tls = match self.certs.get(&identity) {
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
        // Accepting drives the connection; each stream runs as a task of its own.
        while let Some(next) = conn.accept().await {
            let Ok((request, respond)) = next else { break };
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
        let start = (SystemTime::now(), Instant::now());
        let target = match tunnel_target(&request, &peer.pod) {
            Ok(t) => t,
            Err(status) => {
                tracing::debug!(pod = %self.pod_uid, uri = %request.uri(), %status, "tunnel request refused");
                reply(&mut respond, status);
                return;
            }
        };
        let inputs = &self.inputs;
        let app = match connect_in(&self.netns, &inputs.host, target, inputs.connect_timeout).await
        {
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
        let snap = inputs.snapshot.load_full();
        let labels = peer.labels(&snap, target);
        let m = &inputs.metrics;
        m.tcp_opened.get_or_create(&labels).inc();
        let received = m.tcp_received_bytes.get_or_create(&labels).clone();
        let sent = m.tcp_sent_bytes.get_or_create(&labels).clone();
        let tunnel = Tunnel {
            read: TunnelRead::new(request.into_body()),
            write: TunnelWrite::new(send),
        };
        let upstream_local = app.local_addr().ok();
        let out = forward(
            app,
            tunnel,
            IDLE,
            inputs.tcp_reporting_interval,
            |to_peer, to_app| {
                received.inc_by(to_app);
                sent.inc_by(to_peer);
            },
        )
        .await;
        m.tcp_closed.get_or_create(&labels).inc();
        let cluster = format!("inbound|{}||", target.port());
        log_tcp(&TcpEntry {
            start: start.0,
            duration_ms: start.1.elapsed().as_millis(),
            response_flags: if out.reset { "UR" } else { "" },
            received: out.sent_downstream,
            sent: out.sent_upstream,
            upstream_host: Some(target),
            cluster: &cluster,
            upstream_local,
            original_dst: target,
            downstream_peer: &peer.addr.to_string(),
        });
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

impl Peer {
    /// Istio's labels as the destination reports them.
    fn labels(&self, snap: &Snapshot, target: SocketAddr) -> TcpLabels {
        let source_uid = snap
            .pods_by_ip
            .get(&self.addr.ip())
            .map_or("", |p| p.uid.as_str());
        let svc = service_of(snap, target);
        let mut labels = TcpLabels::new(snap, source_uid, svc.as_deref(), target, "tcp");
        labels.reporter = "destination";
        labels.source_principal = self.source.to_string();
        labels.destination_principal = self.local.to_string();
        labels.connection_security_policy = "mutual_tls";
        labels
    }
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
    if !pod.ips.contains(&target.ip()) || target.port() == HBONE_PORT {
        return Err(StatusCode::BAD_REQUEST);
    }
    Ok(target)
}

/// The Service whose endpoint `target` is (the first by name, when several select the pod).
fn service_of(snap: &Snapshot, target: SocketAddr) -> Option<Arc<ServicePort>> {
    snap.services_by_vip
        .values()
        .filter(|s| s.endpoints.iter().any(|e| e.addr == target))
        .min_by(|a, b| a.hostname.cmp(&b.hostname))
        .cloned()
}

fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) -> Option<h2::SendStream<Bytes>> {
    let response = Response::builder().status(status).body(()).ok()?;
    let end = status != StatusCode::OK;
    respond.send_response(response, end).ok()
}
