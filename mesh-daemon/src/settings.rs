//! The daemon's own settings: flags, each with an environment variable and a default.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;

/// Istio ambient's outbound capture port.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Proxy threads (`--proxy-threads`).
pub const DEFAULT_PROXY_THREADS: usize = 2;
/// Admin API, reachable on the node's loopback only (as Envoy's and ztunnel's).
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
/// Prometheus scrape endpoint.
pub const DEFAULT_METRICS_ADDR: &str = "[::]:15020";
/// Readiness probe endpoint.
pub const DEFAULT_READINESS_ADDR: &str = "[::]:15021";
/// Where programs, links and maps are pinned.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/sidelane";
pub const DEFAULT_HANDOVER_SOCKET: &str = "/run/sidelane/handover.sock";
/// Where istiod reads a plugged-in CA (the `cacerts` secret, mounted).
pub const DEFAULT_CA_DIR: &str = "/etc/cacerts";
/// The CA server's Service, as its certificate names it.
pub const DEFAULT_CA_SERVER_NAME: &str = "sidelane-ca.sidelane-system.svc";
/// Where the DaemonSet projects the service account token meant for the CA server.
pub const DEFAULT_CA_TOKEN_FILE: &str = "/var/run/secrets/tokens/sidelane-ca";
/// How often the pod scan runs when the pod cgroups cannot be watched (inotify unavailable
/// or out of watches): a new pod is then enrolled within this long after its first process
/// starts, instead of as soon as it starts.
pub const DEFAULT_SCAN_INTERVAL: Duration = Duration::from_millis(300);
/// Istio's default root (mesh config) namespace.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
/// Envoy's and Istio's default upstream connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Settings {
    /// A duration setting for which "0s" switches its behaviour off: `None` then.
    pub fn unless_zero(d: crate::config::istio::types::Duration) -> Option<Duration> {
        Some(d.0).filter(|t| !t.is_zero())
    }

    /// Whether `--compatibility-version` asks for a release older than `major.minor`.
    pub fn compat_before(&self, major: u32, minor: u32) -> bool {
        let Some(v) = &self.compatibility_version else {
            return false;
        };
        let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let (a, b) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
        (a, b) < (major, minor)
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSource {
    Dir,
    Kubernetes,
}

#[derive(Parser, Debug, Clone)]
#[command(name = "mesh-daemon", version, about = "Sidelane node daemon")]
pub struct Settings {
    /// Name of the Kubernetes node this daemon serves.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Where configuration comes from: `dir` (a directory of manifests, watched) or
    /// `kubernetes` (the API server, in-cluster or from KUBECONFIG).
    #[arg(
        long,
        env = "SIDELANE_CONFIG_SOURCE",
        value_enum,
        default_value = "dir"
    )]
    pub config_source: ConfigSource,

    /// Directory of Kubernetes YAML manifests (with `--config-source dir`).
    #[arg(
        long,
        env = "SIDELANE_CONFIG_DIR",
        required_if_eq("config_source", "dir")
    )]
    pub config_dir: Option<PathBuf>,

    /// cgroup (v2) whose sockets the programs see: the node's pods must be below it. Absolute
    /// inside the cgroup2 mount ("/kubepods.slice") or "/" for all of the node.
    #[arg(long, env = "SIDELANE_CGROUP", default_value = "/")]
    pub cgroup: String,

    /// bpffs directory for pinned programs, links and maps.
    #[arg(long, env = "SIDELANE_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,

    /// procfs of the node (a hostPID DaemonSet sees the node's processes here).
    #[arg(long, env = "SIDELANE_PROC", default_value = "/proc")]
    pub proc_root: PathBuf,

    #[arg(long, env = "SIDELANE_OUTBOUND_PORT", default_value_t = DEFAULT_OUTBOUND_PORT)]
    pub outbound_port: u16,

    /// Threads that serve the pods' connections, each with its own event loop (the node's
    /// cores belong to its pods: two keep a busy node's proxy off the critical path).
    #[arg(long, env = "SIDELANE_PROXY_THREADS", default_value_t = DEFAULT_PROXY_THREADS)]
    pub proxy_threads: usize,

    #[arg(long, env = "SIDELANE_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,

    #[arg(long, env = "SIDELANE_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,

    #[arg(long, env = "SIDELANE_READINESS_ADDR", default_value = DEFAULT_READINESS_ADDR)]
    pub readiness_addr: SocketAddr,

    /// Kubernetes cluster domain, for Service host names.
    #[arg(long, env = "SIDELANE_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// Namespace whose DestinationRules and PeerAuthentications apply mesh-wide.
    #[arg(long, env = "SIDELANE_ROOT_NAMESPACE", default_value = DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,

    /// Behave as this earlier Istio release did where a default has changed since
    /// (like Istio's `compatibilityVersion`); e.g. "1.27" restores the "-shadow" host suffix
    /// on mirrored requests.
    #[arg(long, env = "SIDELANE_COMPATIBILITY_VERSION")]
    pub compatibility_version: Option<String>,

    /// How long to wait for a client's first bytes on a port whose protocol is not declared
    /// (Istio's `protocolDetectionTimeout`): after it the connection is plain TCP. "0s", the
    /// default as in Istio, waits for as long as the client takes, so server-first protocols
    /// (MySQL, SMTP) on undeclared ports must be declared `tcp`.
    #[arg(
        long,
        env = "SIDELANE_PROTOCOL_DETECTION_TIMEOUT",
        default_value = "0s",
        value_parser = crate::config::istio::types::Duration::parse
    )]
    pub protocol_detection_timeout: crate::config::istio::types::Duration,

    /// How often the bytes of an open TCP connection are added to `istio_tcp_sent_bytes_total`
    /// and `istio_tcp_received_bytes_total` (Istio's `tcp_reporting_duration`, whose default
    /// this is): a long-lived connection's traffic shows as it flows. "0s": only when the
    /// connection closes.
    #[arg(
        long,
        env = "SIDELANE_TCP_REPORTING_INTERVAL",
        default_value = "5s",
        value_parser = crate::config::istio::types::Duration::parse
    )]
    pub tcp_reporting_interval: crate::config::istio::types::Duration,

    /// Where a running daemon offers its listeners to its successor (a Unix socket on a path
    /// both can reach: a hostPath in the DaemonSet). A new daemon takes the listeners over
    /// from the one running, which then drains: a restart or upgrade refuses no connection.
    #[arg(long, env = "SIDELANE_HANDOVER_SOCKET", default_value = DEFAULT_HANDOVER_SOCKET)]
    pub handover_socket: PathBuf,

    /// How long a daemon that stops (SIGTERM, or its listeners taken over) waits for its open
    /// connections to end before it exits and resets those left; "0s" waits until they end.
    /// Keep it below the pod's `terminationGracePeriodSeconds`.
    #[arg(
        long,
        env = "SIDELANE_DRAIN_TIMEOUT",
        default_value = "25s",
        value_parser = crate::config::istio::types::Duration::parse
    )]
    pub drain_timeout: crate::config::istio::types::Duration,

    /// The mesh's CA in Istio's `cacerts` layout (`ca-cert.pem`, `ca-key.pem`, optionally
    /// `root-cert.pem` and `cert-chain.pem`; `meshctl ca init` writes one). With it, traffic
    /// between enrolled pods goes through the mTLS tunnel; without it, it stays plaintext.
    #[arg(long, env = "SIDELANE_CA_DIR", default_value = DEFAULT_CA_DIR)]
    pub ca_dir: PathBuf,

    /// The CA server (`sidelane-ca`) as `host:port`: workload certificates are asked for
    /// there, and it signs only for identities of pods on this node. `--ca-dir` then needs
    /// only the roots (`root-cert.pem`). Without it, a node whose `--ca-dir` holds the CA key
    /// signs for itself.
    #[arg(long, env = "SIDELANE_CA_ADDR")]
    pub ca_addr: Option<String>,

    /// The name the CA server's certificate carries.
    #[arg(long, env = "SIDELANE_CA_SERVER_NAME", default_value = DEFAULT_CA_SERVER_NAME)]
    pub ca_server_name: String,

    /// This node's bearer token for the CA server, read at each request (a projected
    /// service account token rotates).
    #[arg(long, env = "SIDELANE_CA_TOKEN_FILE", default_value = DEFAULT_CA_TOKEN_FILE)]
    pub ca_token_file: PathBuf,

    /// The SPIFFE trust domain of workload identities.
    #[arg(long, env = "SIDELANE_TRUST_DOMAIN", default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Lifetime of workload certificates; each is renewed at half its life.
    #[arg(
        long,
        env = "SIDELANE_WORKLOAD_CERT_TTL",
        default_value = "24h",
        value_parser = crate::config::istio::types::Duration::parse
    )]
    pub workload_cert_ttl: crate::config::istio::types::Duration,

    /// Log format: "text" or "json".
    #[arg(long, env = "SIDELANE_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn compatibility_version_compares_releases() {
        let s = |v: &[&str]| {
            Settings::parse_from(
                ["mesh-daemon", "--node-name", "n", "--config-dir", "/x"]
                    .iter()
                    .chain(v)
                    .copied(),
            )
        };
        assert!(!s(&[]).compat_before(1, 28));
        assert!(s(&["--compatibility-version", "1.27"]).compat_before(1, 28));
        assert!(!s(&["--compatibility-version", "1.28"]).compat_before(1, 28));
        assert!(s(&["--compatibility-version", "1.9"]).compat_before(1, 28));
    }
}
