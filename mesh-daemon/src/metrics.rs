//! Prometheus metrics: Istio's standard TCP metrics (so Kiali and the Istio dashboards work
//! unchanged) and the daemon's own health under `sidelane_*`.
use std::{net::SocketAddr, sync::Arc};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::state::{PodInfo, ServicePort, Snapshot};

/// Istio's label set for TCP metrics, reported by the source side.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_cluster: &'static str,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_cluster: &'static str,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// Istio's cluster ID when none is configured: what `source_cluster` and
/// `destination_cluster` say for workloads of this (single) cluster.
pub const CLUSTER_ID: &str = "Kubernetes";

impl TcpLabels {
    /// Istio's labels for traffic from the pod `source_uid` to `upstream`, sent to `svc`.
    pub fn new(
        snap: &Snapshot,
        source_uid: &str,
        svc: Option<&ServicePort>,
        upstream: SocketAddr,
        request_protocol: &'static str,
    ) -> Self {
        let unknown = || "unknown".to_owned();
        let src = snap.pods_by_uid.get(source_uid);
        let dst = snap.pods_by_ip.get(&upstream.ip());
        let app = |p: Option<&Arc<PodInfo>>| p.map_or_else(unknown, |p| p.workload.clone());
        let version = |p: Option<&Arc<PodInfo>>| {
            p.and_then(|p| p.version.clone())
                .unwrap_or_else(|| "latest".into())
        };
        let ns = |p: Option<&Arc<PodInfo>>| p.map_or_else(unknown, |p| p.namespace.clone());
        let cluster = |p: Option<&Arc<PodInfo>>| p.map_or("unknown", |_| CLUSTER_ID);
        Self {
            reporter: "source",
            source_workload: app(src),
            source_workload_namespace: ns(src),
            source_principal: unknown(),
            source_app: app(src),
            source_version: version(src),
            source_canonical_service: app(src),
            source_canonical_revision: version(src),
            source_cluster: cluster(src),
            destination_workload: app(dst),
            destination_workload_namespace: ns(dst),
            destination_principal: unknown(),
            destination_app: app(dst),
            destination_version: version(dst),
            destination_service: svc
                .map_or_else(|| upstream.ip().to_string(), |s| s.hostname.clone()),
            destination_service_name: svc.map_or_else(unknown, |s| s.name.clone()),
            destination_service_namespace: svc.map_or_else(unknown, |s| s.namespace.clone()),
            destination_canonical_service: app(dst),
            destination_canonical_revision: version(dst),
            destination_cluster: cluster(dst),
            request_protocol,
            response_flags: "-",
            connection_security_policy: "unknown",
        }
    }
}

/// Istio's request metrics labels: the connection's plus the response code and, for gRPC
/// calls, the gRPC status (empty for other requests, as Istio's).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub base: TcpLabels,
    pub response_code: u16,
    pub grpc_response_status: String,
}

/// Handles on one label set's request series; they stay the registry's own series.
#[derive(Clone, Debug)]
pub struct RequestSeries {
    requests: Counter,
    duration_ms: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl RequestSeries {
    pub fn record(&self, duration_ms: f64, request_bytes: u64, response_bytes: u64) {
        self.requests.inc();
        self.duration_ms.observe(duration_ms);
        self.request_bytes.observe(request_bytes as f64);
        self.response_bytes.observe(response_bytes as f64);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub decision: &'static str,
}

/// Why an inbound connection was refused by AuthorizationPolicy, and when: `policy` is
/// `namespace/name` of the DENY or CUSTOM policy that matched, empty when no ALLOW policy
/// did; `phase` is `connect`, or `established` for a connection a later policy cut.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    pub action: &'static str,
    pub policy: String,
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: &'static str,
}

/// A cluster, named as Envoy names it (`outbound|port|subset|host`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster_name: String,
}

/// A cluster and which of its limits refused: `requests` (http2MaxRequests), `pending`
/// (http1MaxPendingRequests) or `connections` (maxConnections, TCP).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakerLabels {
    pub cluster_name: String,
    pub breaker: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_sent_bytes: Family<TcpLabels, Counter>,
    pub tcp_received_bytes: Family<TcpLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RequestLabels, Histogram>,
    pub request_bytes: Family<RequestLabels, Histogram>,
    pub response_bytes: Family<RequestLabels, Histogram>,
    /// Requests refused by a cluster's circuit breakers, by breaker.
    pub upstream_overflow: Family<BreakerLabels, Counter>,
    pub upstream_retries: Family<ClusterLabels, Counter>,
    pub outlier_ejections: Family<ClusterLabels, Counter>,
    pub enrolled_pods: Gauge,
    pub config_errors: Gauge,
    pub config_reloads: Family<ReloadLabels, Counter>,
    pub bpf_decisions: Family<DecisionLabels, Gauge>,
    pub outbound_connections: Counter,
    pub outbound_failures: Counter,
    /// Tunnel connections refused at the TLS handshake (no or untrusted client certificate).
    pub tunnel_refused: Counter,
    /// Tunnels this node could not open to another pod's daemon.
    pub tunnel_failures: Counter,
    /// TLS connections opened to other pods' tunnel ports (each carries many tunnels).
    pub tunnel_connections_opened: Counter,
    /// Plaintext connections to an enrolled pod refused by PeerAuthentication STRICT.
    pub inbound_plaintext_refused: Counter,
    /// Inbound connections refused or cut by AuthorizationPolicy.
    pub authorization_denied: Family<DenialLabels, Counter>,
    pub access_log_dropped: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let istio = registry.sub_registry_with_prefix("istio");
        let tcp_opened = Family::<TcpLabels, Counter>::default();
        let tcp_closed = Family::<TcpLabels, Counter>::default();
        let tcp_sent_bytes = Family::<TcpLabels, Counter>::default();
        let tcp_received_bytes = Family::<TcpLabels, Counter>::default();
        istio.register(
            "tcp_connections_opened",
            "Total number of TCP connections opened",
            tcp_opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "Total number of TCP connections closed",
            tcp_closed.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "Total bytes sent during response in case of a TCP connection",
            tcp_sent_bytes.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "Total bytes received during request in case of a TCP connection",
            tcp_received_bytes.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        istio.register("requests", "Total number of requests", requests.clone());
        let request_duration = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            // Istio's default buckets, in milliseconds.
            Histogram::new([
                0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                10000.0, 30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
            ])
        });
        istio.register(
            "request_duration_milliseconds",
            "Request duration in milliseconds",
            request_duration.clone(),
        );
        let size_buckets = || Histogram::new([1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7]);
        let request_bytes = Family::<RequestLabels, Histogram>::new_with_constructor(size_buckets);
        let response_bytes = Family::<RequestLabels, Histogram>::new_with_constructor(size_buckets);
        istio.register(
            "request_bytes",
            "Request body sizes in bytes",
            request_bytes.clone(),
        );
        istio.register(
            "response_bytes",
            "Response body sizes in bytes",
            response_bytes.clone(),
        );
        let own = registry.sub_registry_with_prefix("sidelane");
        let upstream_overflow = Family::<BreakerLabels, Counter>::default();
        own.register(
            "upstream_overflow",
            "Requests and connections refused by a cluster's connection-pool limits (503 UO)",
            upstream_overflow.clone(),
        );
        let upstream_retries = Family::<ClusterLabels, Counter>::default();
        own.register(
            "upstream_retries",
            "Retries sent by the retry policy",
            upstream_retries.clone(),
        );
        let outlier_ejections = Family::<ClusterLabels, Counter>::default();
        own.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection",
            outlier_ejections.clone(),
        );
        let enrolled_pods = Gauge::default();
        let config_errors = Gauge::default();
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        let bpf_decisions = Family::<DecisionLabels, Gauge>::default();
        let outbound_connections = Counter::default();
        let outbound_failures = Counter::default();
        own.register(
            "enrolled_pods",
            "Pods on this node whose outbound traffic is redirected",
            enrolled_pods.clone(),
        );
        own.register(
            "config_errors",
            "Objects rejected in the current configuration",
            config_errors.clone(),
        );
        own.register(
            "config_reloads",
            "Configuration reloads by result",
            config_reloads.clone(),
        );
        own.register(
            "bpf_connect_decisions",
            "Connect-hook decisions by the kernel programs since they were first loaded",
            bpf_decisions.clone(),
        );
        own.register(
            "outbound_connections",
            "Redirected connections accepted by the outbound proxy",
            outbound_connections.clone(),
        );
        own.register(
            "outbound_failures",
            "Redirected connections the proxy could not deliver",
            outbound_failures.clone(),
        );
        let tunnel_refused = Counter::default();
        own.register(
            "tunnel_refused",
            "Connections to the mTLS tunnel port refused at the handshake (no or untrusted client certificate)",
            tunnel_refused.clone(),
        );
        let tunnel_failures = Counter::default();
        own.register(
            "tunnel_failures",
            "mTLS tunnels to another pod that could not be opened",
            tunnel_failures.clone(),
        );
        let tunnel_connections_opened = Counter::default();
        own.register(
            "tunnel_connections_opened",
            "TLS connections opened to other pods' mTLS tunnel ports (each carries up to 100 tunnels)",
            tunnel_connections_opened.clone(),
        );
        let inbound_plaintext_refused = Counter::default();
        own.register(
            "inbound_plaintext_refused",
            "Plaintext connections to enrolled pods refused because PeerAuthentication is STRICT",
            inbound_plaintext_refused.clone(),
        );
        let authorization_denied = Family::<DenialLabels, Counter>::default();
        own.register(
            "authorization_denied",
            "Inbound connections refused (or, after a policy change, closed) by AuthorizationPolicy",
            authorization_denied.clone(),
        );
        let access_log_dropped = Gauge::default();
        own.register(
            "access_log_dropped",
            "Access-log lines dropped because stdout could not keep up",
            access_log_dropped.clone(),
        );
        Self {
            requests,
            request_duration,
            request_bytes,
            response_bytes,
            upstream_overflow,
            upstream_retries,
            outlier_ejections,
            access_log_dropped,
            registry,
            tcp_opened,
            tcp_closed,
            tcp_sent_bytes,
            tcp_received_bytes,
            enrolled_pods,
            config_errors,
            config_reloads,
            bpf_decisions,
            outbound_connections,
            outbound_failures,
            tunnel_refused,
            tunnel_failures,
            tunnel_connections_opened,
            inbound_plaintext_refused,
            authorization_denied,
        }
    }

    /// The four series one request updates, looked up together so that a caller can keep
    /// them: finding a series hashes every one of its two dozen labels.
    pub fn request_series(&self, labels: &RequestLabels) -> RequestSeries {
        RequestSeries {
            requests: self.requests.get_or_create_owned(labels),
            duration_ms: self.request_duration.get_or_create_owned(labels),
            request_bytes: self.request_bytes.get_or_create_owned(labels),
            response_bytes: self.response_bytes.get_or_create_owned(labels),
        }
    }

    /// A request or connection refused by `cluster`'s `breaker` (503 UO).
    pub fn count_overflow(&self, cluster: &str, breaker: &'static str) {
        self.upstream_overflow
            .get_or_create(&BreakerLabels {
                cluster_name: cluster.to_owned(),
                breaker,
            })
            .inc();
    }

    pub fn count_retry(&self, cluster: &str) {
        self.upstream_retries
            .get_or_create(&ClusterLabels {
                cluster_name: cluster.to_owned(),
            })
            .inc();
    }

    pub fn count_ejection(&self, cluster: &str) {
        self.outlier_ejections
            .get_or_create(&ClusterLabels {
                cluster_name: cluster.to_owned(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
