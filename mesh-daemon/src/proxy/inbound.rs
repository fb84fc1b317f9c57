//! The destination side of a connection to an enrolled pod: what arrives through the mTLS
//! tunnel (`hbone::inbound`) and plaintext captured by `sl_sk_lookup` (the listener here,
//! 15006 on the pod's loopback), both delivered to the application from inside the pod and
//! reported as Istio's destination reporter does. Plaintext meets PeerAuthentication first:
//! `STRICT` refuses it. Then AuthorizationPolicy decides ([`authorize`]); a connection it
//! refuses is reset (plaintext) or its `CONNECT` answered 401 (tunnel), and an open one
//! that a changed policy no longer allows is reset on both sides, as ztunnel does.
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime},
};

use mesh_common::INBOUND_PASS_PORTS;
use tokio::net::TcpStream;

use super::{
    ProxyInputs,
    access_log::{TcpEntry, log_tcp},
    forward::{Duplex, abort, forward},
    pod_listeners::{Handler, PodListeners, Scope},
    sockets::{SocketError, connect_in},
};
use crate::{
    authz::{self, Denial},
    identity::Identity,
    metrics::{DenialLabels, TcpLabels},
    netns::Netns,
    peer_authn::Mode,
    state::{PodInfo, Snapshot},
};

/// The plaintext inbound listener's port in each pod (Istio ambient's).
pub const INBOUND_PORT: u16 = 15006;

/// Idle timeout of an inbound connection (Istio's default TCP idle timeout).
const IDLE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Who is on the other end of an inbound connection.
pub struct Origin<'a> {
    pub peer: SocketAddr,
    /// The client's proven identity (through the tunnel), or `None` for plaintext.
    pub principal: Option<&'a Identity>,
    /// This pod's identity, when the tunnel proved it.
    pub local: Option<&'a Identity>,
}

impl Origin<'_> {
    fn connection(&self, target: SocketAddr) -> authz::Connection<'_> {
        authz::Connection {
            source: super::outbound::normalize(self.peer).ip(),
            destination: target,
            identity: self.principal,
        }
    }
}

/// Whether the snapshot's AuthorizationPolicies let `from` reach `target` in `pod`.
pub fn authorize(
    snap: &Snapshot,
    pod: &PodInfo,
    target: SocketAddr,
    from: &Origin<'_>,
) -> Result<(), Denial> {
    snap.authz
        .check(&pod.namespace, &pod.labels, &from.connection(target))
}

/// Counts and logs a connection AuthorizationPolicy refused before it reached the
/// application.
pub fn refused(inputs: &ProxyInputs, denial: &Denial, target: SocketAddr, from: &Origin<'_>) {
    tracing::debug!(peer = %from.peer, %target, %denial, "connection refused by AuthorizationPolicy");
    count_denial(inputs, denial, "connect");
    let details = denial.details();
    log_tcp(&TcpEntry {
        start: SystemTime::now(),
        duration_ms: 0,
        response_flags: "",
        termination: &details,
        received: 0,
        sent: 0,
        upstream_host: None,
        cluster: &inbound_cluster(target),
        upstream_local: None,
        original_dst: target,
        downstream_peer: &from.peer.to_string(),
    });
}

/// Envoy's name for the cluster of a pod's own port, as access logs show it.
fn inbound_cluster(target: SocketAddr) -> String {
    format!("inbound|{}||", target.port())
}

fn count_denial(inputs: &ProxyInputs, denial: &Denial, phase: &'static str) {
    inputs
        .metrics
        .authorization_denied
        .get_or_create(&DenialLabels {
            action: denial.action(),
            policy: denial.policy().to_owned(),
            phase,
        })
        .inc();
}

/// Resolves once a policy change denies what `from` is doing to `target` in the pod
/// `pod_uid`; never while the policies allow it.
async fn revoked(
    inputs: &ProxyInputs,
    pod_uid: &str,
    target: SocketAddr,
    from: &Origin<'_>,
) -> Denial {
    let mut changes = inputs.policy_changes.clone();
    // A change between the connection's first check and this clone would otherwise go
    // unseen: look once at the start.
    changes.mark_changed();
    loop {
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
        let snap = inputs.snapshot.load();
        let Some(pod) = snap.pods_by_uid.get(pod_uid) else {
            continue;
        };
        if let Err(d) = authorize(&snap, pod, target, from) {
            return d;
        }
    }
}

/// Connects to the application at `target` from inside the pod.
pub async fn connect_app(
    netns: &Netns,
    inputs: &ProxyInputs,
    target: SocketAddr,
) -> Result<TcpStream, SocketError> {
    connect_in(netns, &inputs.host, target, inputs.connect_timeout).await
}

/// Forwards between `client` and the application's connection `app` in the pod `pod_uid`
/// until both end (or a changed AuthorizationPolicy cuts it), with Istio's
/// destination-side TCP metrics and an access-log line.
pub async fn relay(
    inputs: &ProxyInputs,
    pod_uid: &str,
    app: TcpStream,
    client: impl Duplex,
    target: SocketAddr,
    from: &Origin<'_>,
) {
    let start = (SystemTime::now(), Instant::now());
    let snap = inputs.snapshot.load_full();
    let labels = labels(&snap, from, target);
    let m = &inputs.metrics;
    m.tcp_opened.get_or_create(&labels).inc();
    let received = m.tcp_received_bytes.get_or_create(&labels).clone();
    let sent = m.tcp_sent_bytes.get_or_create(&labels).clone();
    let upstream_local = app.local_addr().ok();
    let mut cut = None;
    let until = async {
        cut = Some(revoked(inputs, pod_uid, target, from).await);
    };
    let out = forward(
        client,
        app,
        IDLE,
        inputs.tcp_reporting_interval,
        |to_app, to_client| {
            received.inc_by(to_app);
            sent.inc_by(to_client);
        },
        until,
    )
    .await;
    m.tcp_closed.get_or_create(&labels).inc();
    let cluster = inbound_cluster(target);
    let details = cut.as_ref().map(|d| {
        tracing::debug!(peer = %from.peer, %target, denial = %d, "open connection closed: AuthorizationPolicy changed");
        count_denial(inputs, d, "established");
        d.details()
    });
    log_tcp(&TcpEntry {
        termination: details.as_deref().unwrap_or(""),
        start: start.0,
        duration_ms: start.1.elapsed().as_millis(),
        response_flags: if out.reset { "UR" } else { "" },
        received: out.sent_upstream,
        sent: out.sent_downstream,
        upstream_host: Some(target),
        cluster: &cluster,
        upstream_local,
        original_dst: target,
        downstream_peer: &from.peer.to_string(),
    });
}

/// Istio's labels as the destination reports them.
fn labels(snap: &Snapshot, from: &Origin<'_>, target: SocketAddr) -> TcpLabels {
    let source_uid = snap
        .pods_by_ip
        .get(&from.peer.ip())
        .map_or("", |p| p.uid.as_str());
    let svc = snap.service_of_endpoint(&target).cloned();
    let mut labels = TcpLabels::new(snap, source_uid, svc.as_deref(), target, "tcp");
    labels.reporter = "destination";
    match (from.principal, from.local) {
        (Some(source), Some(local)) => {
            labels.source_principal = source.to_string();
            labels.destination_principal = local.to_string();
            labels.connection_security_policy = "mutual_tls";
        }
        _ => labels.connection_security_policy = "none",
    }
    labels
}

/// The Service whose endpoint `target` is (the first by name, when several select the pod).
/// Whether a connection for `target` may be delivered into `pod`: one of its own addresses,
/// not one of the daemon's ports.
pub fn deliverable(pod: &PodInfo, target: SocketAddr) -> bool {
    pod.ips.contains(&target.ip()) && !INBOUND_PASS_PORTS.contains(&target.port())
}

/// A pod's plaintext inbound listeners.
pub struct PlaintextInbound {
    pod_uid: String,
    netns: Arc<Netns>,
    inputs: Arc<ProxyInputs>,
}

impl PlaintextInbound {
    pub fn new(pod_uid: String, netns: Arc<Netns>, inputs: Arc<ProxyInputs>) -> Self {
        Self {
            pod_uid,
            netns,
            inputs,
        }
    }

    /// On the pod's loopback: only what `sl_sk_lookup` hands over (and the pod itself) gets
    /// there.
    pub fn bind(&self) -> Result<PodListeners, SocketError> {
        PodListeners::bind(
            &self.pod_uid,
            &self.netns,
            &self.inputs.host,
            Scope::Loopback,
            INBOUND_PORT,
        )
    }

    async fn connection(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
        // Captured connections keep their destination: the accepted socket's own address.
        let Ok(target) = client.local_addr() else {
            return;
        };
        let target = super::outbound::normalize(target);
        let snap = self.inputs.snapshot.load_full();
        let Some(pod) = snap.pods_by_uid.get(&self.pod_uid).cloned() else {
            abort(&client);
            return;
        };
        if !deliverable(&pod, target) {
            // Someone in the pod dialled the listener itself.
            abort(&client);
            return;
        }
        let mode = snap
            .peer_authn
            .mode(&pod.namespace, &pod.labels, target.port());
        if mode == Mode::Strict {
            tracing::debug!(pod = %self.pod_uid, %peer, %target, "plaintext refused: PeerAuthentication STRICT");
            self.inputs.metrics.inbound_plaintext_refused.inc();
            abort(&client);
            return;
        }
        let from = Origin {
            peer,
            principal: None,
            local: None,
        };
        if let Err(denial) = authorize(&snap, &pod, target, &from) {
            refused(&self.inputs, &denial, target, &from);
            abort(&client);
            return;
        }
        let app = match connect_app(&self.netns, &self.inputs, target).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(pod = %self.pod_uid, %target, error = %e, "cannot reach the application");
                abort(&client);
                return;
            }
        };
        relay(&self.inputs, &self.pod_uid, app, client, target, &from).await;
    }
}

impl Handler for PlaintextInbound {
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
