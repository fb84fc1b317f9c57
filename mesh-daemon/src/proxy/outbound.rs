//! The outbound listener of one enrolled pod: bound on the pod's own loopback (where the
//! connect hooks send its connections), it looks up each connection's original destination,
//! picks the upstream, connects from inside the pod's namespace and forwards.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Instant, SystemTime},
};

use tokio::net::TcpStream;

use super::{
    ProxyInputs,
    access_log::{TcpEntry, log_tcp},
    cluster_state::{Choice, InFlight, Outcome, Slot, source_hash, take_slot},
    detect,
    forward::{abort, forward},
    http::{self, Downstream, PodHttp},
    pod_listeners::{PodListeners, Scope},
    protocol::Protocol,
    sockets::SocketError,
    upstream_io::{DialError, Dialed, UpstreamIo, dial},
};
use crate::{
    metrics::TcpLabels,
    netns::Netns,
    routing::{
        Cluster,
        eval::pick_weighted,
        l4::{self, ConnectionView},
        policy::{HashKey, LbPolicy},
    },
    state::{ServicePort, Snapshot},
};

/// Envoy's response flags, as Istio reports them.
mod flags {
    /// No healthy upstream.
    pub const NO_HEALTHY_UPSTREAM: &str = "UH";
    /// Upstream connection failure.
    pub const UPSTREAM_CONNECT_FAILURE: &str = "UF";
    /// No original destination could be found for a redirected connection.
    pub const NO_ROUTE: &str = "NR";
    /// The route names a subset no DestinationRule defines for this client.
    pub const NO_CLUSTER: &str = "NC";
    /// The cluster's `maxConnections` were all open.
    pub const OVERFLOW: &str = "UO";
    /// Closed by the TCP idle timeout (Envoy's "stream idle timeout" flag).
    pub const IDLE_TIMEOUT: &str = "SI";
}

/// Idle timeout of passthrough connections (Istio's default TCP idle timeout).
const PASSTHROUGH_IDLE: std::time::Duration = std::time::Duration::from_secs(3600);

/// A pod's outbound listeners (IPv4 and, where the pod has it, IPv6).
pub struct Outbound {
    pod_uid: String,
    netns: Arc<Netns>,
    listeners: PodListeners,
    inputs: Arc<ProxyInputs>,
    http: Arc<PodHttp>,
}

impl Outbound {
    /// Binds on the pod's loopback, where the connect hooks send its connections.
    pub fn bind(
        pod_uid: String,
        netns: Arc<Netns>,
        inputs: Arc<ProxyInputs>,
    ) -> Result<Self, SocketError> {
        let listeners = PodListeners::bind(
            &pod_uid,
            &netns,
            &inputs.host,
            Scope::Loopback,
            inputs.outbound_port,
        )?;
        Ok(Self::adopt(pod_uid, netns, inputs, listeners))
    }

    /// Serves listeners bound already (by the daemon that ran before, which handed them over).
    pub fn adopt(
        pod_uid: String,
        netns: Arc<Netns>,
        inputs: Arc<ProxyInputs>,
        listeners: PodListeners,
    ) -> Self {
        Self {
            http: Arc::new(PodHttp::new(&pod_uid, netns.clone(), inputs.clone())),
            pod_uid,
            netns,
            listeners,
            inputs,
        }
    }

    pub fn listeners(&self) -> &PodListeners {
        &self.listeners
    }

    /// The pod's HTTP side (pool, cluster state), for the admin API to look into.
    pub fn http(&self) -> Arc<PodHttp> {
        self.http.clone()
    }

    /// Accepts until the task is aborted (the pod left the mesh or the node).
    pub async fn run(self) {
        let this = Arc::new(Conn {
            http: self.http,
            pod_uid: self.pod_uid,
            netns: self.netns,
            inputs: self.inputs,
        });
        let shards = this.inputs.shards.clone();
        let pod_uid = this.pod_uid.clone();
        self.listeners
            .accept(&pod_uid, &shards, move |stream, peer| {
                let this = this.clone();
                // The connection's future is ~8 KiB (every protocol's path inline); spawned
                // as it is, it was copied nine times on its way into the task. Boxed inside
                // the task, it is written once.
                async move { Box::pin(this.handle(stream, peer)).await }
            })
            .await;
    }
}

struct Conn {
    pod_uid: String,
    netns: Arc<Netns>,
    inputs: Arc<ProxyInputs>,
    /// This pod's HTTP connection pools.
    http: Arc<PodHttp>,
}

/// Where an opaque connection goes, once routed.
enum TcpTarget {
    /// Not a Service: to where the client was going.
    Passthrough(SocketAddr),
    /// A route named a subset no DestinationRule defines for this client.
    NoCluster,
    Cluster(Arc<Cluster>),
}

/// Connect attempts for a TCP connection, each on another endpoint when there is one: the
/// connect-failure retries the issue asks for, as Envoy's `max_connect_attempts` would.
const TCP_CONNECT_ATTEMPTS: usize = 3;

/// Why no upstream connection was made.
enum Unconnected {
    /// Envoy's response flag for it.
    Flag(&'static str),
    /// The destination's AuthorizationPolicy refused the tunnel: not retried elsewhere, not
    /// held against the endpoint (Envoy has no flag for it; the log's termination details
    /// say it).
    Denied,
}

/// An upstream connection and what it holds while open.
struct Connected {
    stream: Dialed,
    addr: SocketAddr,
    idle: std::time::Duration,
    /// The cluster's `maxConnections` slot and the endpoint's in-flight count.
    _held: Option<(Slot, InFlight)>,
}

impl Conn {
    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let start = (SystemTime::now(), Instant::now());
        let inputs = &self.inputs;
        inputs.metrics.outbound_connections.inc();
        let snap = inputs.snapshot.load_full();
        let Some(orig) = inputs.orig_dst.lookup(self.netns.cookie(), peer) else {
            tracing::warn!(pod = %self.pod_uid, %peer, "no original destination recorded for a redirected connection; closing it");
            inputs.metrics.outbound_failures.inc();
            abort(&client);
            log_tcp(&TcpEntry {
                termination: "",
                start: start.0,
                duration_ms: 0,
                response_flags: flags::NO_ROUTE,
                received: 0,
                sent: 0,
                upstream_host: None,
                cluster: "BlackHoleCluster",
                upstream_local: None,
                original_dst: peer,
                downstream_peer: &peer.to_string(),
            });
            return;
        };
        let orig = normalize(orig);
        let Some(svc) = snap.service(&orig).cloned() else {
            // Not a Service: passed through as bytes to where the client was going.
            return self
                .proxy_tcp(
                    &snap,
                    client,
                    peer,
                    orig,
                    None,
                    TcpTarget::Passthrough(orig),
                    start,
                )
                .await;
        };
        let protocol = match Protocol::declared(&svc.port_name, svc.app_protocol.as_deref()) {
            Some(p) => p,
            None => detect::sniff(&client, inputs.protocol_detection_timeout).await,
        };
        if protocol.is_http() {
            let down = Arc::new(Downstream {
                pod: self.http.clone(),
                source_uid: self.pod_uid.clone(),
                source: snap.pods_by_uid.get(&self.pod_uid).cloned(),
                service: svc.clone(),
                protocol,
                original_dst: orig,
                peer,
                series: Default::default(),
            });
            http::serve(down, client).await;
            return;
        }
        let sni = match protocol {
            Protocol::Tls => detect::sni(&client, inputs.protocol_detection_timeout).await,
            _ => None,
        };
        let target = self.route_tcp(&snap, &svc, orig, sni.as_deref());
        self.proxy_tcp(&snap, client, peer, orig, Some(&svc), target, start)
            .await;
    }

    /// The `tls` and `tcp` routes of the VirtualService for the service, else the service
    /// itself; then a destination by weight and an endpoint of its cluster.
    fn route_tcp(
        &self,
        snap: &Snapshot,
        svc: &ServicePort,
        orig: SocketAddr,
        sni: Option<&str>,
    ) -> TcpTarget {
        let source = snap.pods_by_uid.get(&self.pod_uid);
        let no_labels = BTreeMap::new();
        let (source_labels, source_ns) =
            source.map_or((&no_labels, ""), |p| (&p.labels, p.namespace.as_str()));
        let view = ConnectionView {
            destination: orig.ip(),
            port: svc.port,
            sni,
            source_labels,
            source_namespace: source_ns,
        };
        let routing = &snap.routing;
        let routes = routing.l4_routes(source_ns, &svc.hostname, svc.port, sni.is_some());
        let cluster = match l4::select(routes, &view) {
            None => routing.cluster(source_ns, &svc.hostname, svc.port, None),
            Some(route) => pick_weighted(&route.clusters, fastrand::u32(..))
                .and_then(|wc| routing.cluster(source_ns, &wc.host, wc.port, wc.subset.as_deref())),
        };
        cluster.map_or(TcpTarget::NoCluster, TcpTarget::Cluster)
    }

    /// An upstream connection for `cluster`: within its `maxConnections`, balanced by its
    /// policy, connect-failures counted for outlier detection and retried elsewhere.
    async fn connect_cluster(
        &self,
        snap: &Snapshot,
        cluster: &Cluster,
        v4: bool,
        last_tried: &mut Option<SocketAddr>,
    ) -> Result<Connected, Unconnected> {
        let state = self.http.clusters.get(&cluster.name);
        let policy = &cluster.policy;
        let Some(slot) = take_slot(&state.connections, policy.limits.max_connections) else {
            self.inputs
                .metrics
                .count_overflow(&cluster.name, "connections");
            return Err(Unconnected::Flag(flags::OVERFLOW));
        };
        // Of the hash keys only the source address exists for a TCP connection.
        let hash = match &policy.lb {
            LbPolicy::Hash(HashKey::SourceIp) => Some(source_hash(
                snap.pods_by_uid.get(&self.pod_uid).map(|p| &**p),
                &self.pod_uid,
            )),
            _ => None,
        };
        let mut tried = Vec::new();
        for _ in 0..TCP_CONNECT_ATTEMPTS {
            let choice = Choice {
                v4,
                hash,
                tried: &tried,
            };
            let Some((addr, in_flight)) = state.choose(cluster, &choice) else {
                break;
            };
            tried.push(addr);
            *last_tried = Some(addr);
            let stream = match self.connect(snap, addr, policy.connect_timeout).await {
                Ok(s) => s,
                Err(Unconnected::Denied) => return Err(Unconnected::Denied),
                Err(Unconnected::Flag(_)) => {
                    if state.report(cluster, addr, Outcome::LocalOriginFailure) {
                        self.inputs.metrics.count_ejection(&cluster.name);
                    }
                    continue;
                }
            };
            if let Some((probes, time, interval)) = policy.tcp_keepalive
                && let UpstreamIo::Tcp(stream) = &stream.io
            {
                let mut k = socket2::TcpKeepalive::new();
                if let Some(t) = time {
                    k = k.with_time(t);
                }
                if let Some(i) = interval {
                    k = k.with_interval(i);
                }
                if let Some(p) = probes {
                    k = k.with_retries(p);
                }
                let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&k);
            }
            return Ok(Connected {
                stream,
                addr,
                idle: policy.tcp_idle_timeout,
                _held: Some((slot, in_flight)),
            });
        }
        Err(Unconnected::Flag(if tried.is_empty() {
            flags::NO_HEALTHY_UPSTREAM
        } else {
            flags::UPSTREAM_CONNECT_FAILURE
        }))
    }

    #[allow(clippy::too_many_arguments)]
    async fn proxy_tcp(
        &self,
        snap: &Snapshot,
        client: TcpStream,
        peer: SocketAddr,
        orig: SocketAddr,
        svc: Option<&ServicePort>,
        target: TcpTarget,
        start: (SystemTime, Instant),
    ) {
        let inputs = &self.inputs;
        let downstream = format!("{peer}");
        let mut upstream_addr = None;
        let (cluster, upstream) = match target {
            TcpTarget::Passthrough(addr) => {
                upstream_addr = Some(addr);
                let connected =
                    self.connect(snap, addr, inputs.connect_timeout)
                        .await
                        .map(|stream| Connected {
                            stream,
                            addr,
                            idle: PASSTHROUGH_IDLE,
                            _held: None,
                        });
                ("PassthroughCluster".to_owned(), connected)
            }
            TcpTarget::NoCluster => (
                "BlackHoleCluster".to_owned(),
                Err(Unconnected::Flag(flags::NO_CLUSTER)),
            ),
            TcpTarget::Cluster(c) => {
                let connected = self
                    .connect_cluster(snap, &c, orig.is_ipv4(), &mut upstream_addr)
                    .await;
                (c.name.clone(), connected)
            }
        };
        let upstream_addr = upstream.as_ref().map(|c| c.addr).ok().or(upstream_addr);
        let mut labels = TcpLabels::new(
            snap,
            &self.pod_uid,
            svc,
            upstream_addr.unwrap_or(orig),
            "tcp",
        );
        let upstream = match upstream {
            Ok(u) => u,
            Err(why) => {
                let (flag, termination) = match why {
                    Unconnected::Flag(f) => (f, ""),
                    Unconnected::Denied => ("", "rbac_access_denied_by_destination"),
                };
                inputs.metrics.outbound_failures.inc();
                labels.response_flags = flag;
                inputs.metrics.tcp_opened.get_or_create(&labels).inc();
                inputs.metrics.tcp_closed.get_or_create(&labels).inc();
                abort(&client);
                log_tcp(&TcpEntry {
                    termination,
                    start: start.0,
                    duration_ms: start.1.elapsed().as_millis(),
                    response_flags: flag,
                    received: 0,
                    sent: 0,
                    upstream_host: upstream_addr,
                    cluster: &cluster,
                    upstream_local: None,
                    original_dst: orig,
                    downstream_peer: &downstream,
                });
                return;
            }
        };
        let m = &inputs.metrics;
        let upstream_local = upstream.stream.local;
        if let Some(p) = &upstream.stream.principals {
            labels.source_principal = p.own.to_string();
            labels.destination_principal = p.peer.to_string();
        }
        m.tcp_opened.get_or_create(&labels).inc();
        let Connected {
            stream,
            idle,
            _held,
            ..
        } = upstream;
        // The registry's own series, held for the connection's life.
        let received = m.tcp_received_bytes.get_or_create(&labels).clone();
        let sent = m.tcp_sent_bytes.get_or_create(&labels).clone();
        let out = forward(
            client,
            stream.io,
            idle,
            inputs.tcp_reporting_interval,
            |to_upstream, to_client| {
                received.inc_by(to_upstream);
                sent.inc_by(to_client);
            },
            std::future::pending(),
        )
        .await;
        m.tcp_closed.get_or_create(&labels).inc();
        log_tcp(&TcpEntry {
            termination: "",
            start: start.0,
            duration_ms: start.1.elapsed().as_millis(),
            response_flags: if out.reset {
                "UR"
            } else if out.idle_timeout {
                flags::IDLE_TIMEOUT
            } else {
                ""
            },
            received: out.sent_upstream,
            sent: out.sent_downstream,
            upstream_host: upstream_addr,
            cluster: &cluster,
            upstream_local,
            original_dst: orig,
            downstream_peer: &downstream,
        });
    }

    /// Connects to `addr`, through the mTLS tunnel when it is a pod in the mesh.
    async fn connect(
        &self,
        snap: &Snapshot,
        addr: SocketAddr,
        limit: std::time::Duration,
    ) -> Result<Dialed, Unconnected> {
        match dial(&self.inputs, &self.netns, snap, &self.pod_uid, addr, limit).await {
            Ok(d) => Ok(d),
            Err(e) if e.denied_by_policy() => {
                tracing::debug!(pod = %self.pod_uid, %addr, error = %e, "refused by the destination's AuthorizationPolicy");
                Err(Unconnected::Denied)
            }
            // The daemon's problem, not the endpoint's: entering the pod's namespace failed,
            // or it has no certificate to present.
            Err(e @ (DialError::Socket(SocketError::Netns(_)) | DialError::Certificate(_))) => {
                tracing::warn!(pod = %self.pod_uid, %addr, error = %e, "cannot open upstream connection");
                Err(Unconnected::Flag(flags::UPSTREAM_CONNECT_FAILURE))
            }
            Err(e) => {
                tracing::debug!(pod = %self.pod_uid, %addr, error = %e, "upstream connect failed");
                Err(Unconnected::Flag(flags::UPSTREAM_CONNECT_FAILURE))
            }
        }
    }
}

/// IPv4-mapped IPv6 destinations are IPv4 destinations.
pub fn normalize(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(v4.into(), a.port())),
        IpAddr::V4(_) => a,
    }
}
