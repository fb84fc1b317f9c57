//! The data path in user space: per-pod outbound listeners and TCP forwarding.
pub mod access_log;
pub mod cluster_state;
pub mod cors;
pub mod date;
pub mod detect;
pub mod drain;
pub mod forward;
pub mod h1_codec;
pub mod h1_server;
pub mod h1_upstream;
pub mod h2_body;
pub mod h2_server;
pub mod h2_upstream;
pub mod hbone;
pub mod hop_by_hop;
pub mod http;
pub mod idle;
pub mod inbound;
pub mod observed;
pub mod outbound;
pub mod pod_listeners;
pub mod pool;
pub mod protocol;
pub mod replay;
pub mod shards;
pub mod sockets;
pub mod splice;
pub mod upgrade;
pub mod upstream_io;

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::{
    datapath::OrigDstMap, identity::certs::Certificates, metrics::Metrics, netns::HostNetns,
    state::Snapshot,
};

/// What every proxy task may read: nothing more (no CA, no map writers).
pub struct ProxyInputs {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub orig_dst: OrigDstMap,
    pub metrics: Arc<Metrics>,
    pub host: HostNetns,
    pub connect_timeout: std::time::Duration,
    pub outbound_port: u16,
    /// Istio before 1.28 appended "-shadow" to a mirrored request's host.
    pub mirror_shadow_host: bool,
    /// Istio before 1.24: the default retry policy also retries 503.
    pub retry_503_by_default: bool,
    /// `None`: wait for a client's first bytes as long as it takes.
    pub protocol_detection_timeout: Option<std::time::Duration>,
    /// How often an open TCP connection's bytes are added to the metrics; `None`: when it
    /// closes.
    pub tcp_reporting_interval: Option<std::time::Duration>,
    /// The threads that serve the pods' connections.
    pub shards: Arc<shards::Shards>,
    /// Workload certificates for the mTLS tunnel; `None`: no CA configured, traffic between
    /// pods stays plaintext.
    pub certs: Option<Arc<Certificates>>,
    /// Tunnel connections to other pods, shared by the connections between two pods.
    pub tunnels: hbone::pool::TunnelPool,
    /// Changes each time AuthorizationPolicy may decide differently (policies or pod labels
    /// changed): open inbound connections then check themselves again.
    pub policy_changes: tokio::sync::watch::Receiver<u64>,
}
