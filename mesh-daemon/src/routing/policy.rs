//! A DestinationRule's traffic policy as it applies to one cluster (host, port, subset),
//! merged as Istio merges it, with Istio's and Envoy's defaults filled in.
//!
//! Merge order (Istio's `MergeTrafficPolicy`): the top-level policy, replaced by its
//! `portLevelSettings` entry for the port when there is one; then each of the subset's
//! `loadBalancer`, `connectionPool`, `outlierDetection` that is set; then the subset's own
//! port-level entry. A port-level entry replaces all of those settings at once: a field it
//! leaves out goes back to the default, it is not inherited.
use std::time::Duration;

use serde::Serialize;

use crate::config::istio::networking::{
    ConnectionPoolSettings, H2UpgradePolicy, LoadBalancerSettings, OutlierDetection, SimpleLb,
    TcpKeepalive, TrafficPolicy,
};

/// Istio's "unlimited" circuit-breaker value (2^32 - 1).
const UNLIMITED: u32 = u32::MAX;
/// Istio's default idle timeout for upstream HTTP connections and TCP proxying.
const DEFAULT_IDLE: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum HashKey {
    Header(String),
    /// A cookie; with a TTL, Envoy sets it on the response when the request had none.
    Cookie {
        name: String,
        path: Option<String>,
        ttl: Option<Duration>,
    },
    SourceIp,
    QueryParameter(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum LbPolicy {
    RoundRobin,
    /// Power of two choices: the less loaded of two random endpoints.
    LeastRequest,
    Random,
    /// Consistent hashing on a request key (a ring of virtual nodes).
    Hash(HashKey),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PoolLimits {
    /// `tcp.maxConnections`: upstream connections to all endpoints of the cluster.
    pub max_connections: u32,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection.
    pub max_pending_requests: u32,
    /// `http.http2MaxRequests`: requests in flight (any protocol, despite the name).
    pub max_requests: u32,
    /// `http.maxRetries`: retries in flight.
    pub max_retries: u32,
    /// `http.maxRequestsPerConnection`; `None` is unlimited.
    pub max_requests_per_connection: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct OutlierPolicy {
    /// Consecutive 5xx (including local-origin failures unless they are split out).
    pub consecutive_5xx: Option<u32>,
    /// Consecutive 502, 503 and 504.
    pub consecutive_gateway: Option<u32>,
    /// Consecutive connect failures, timeouts and resets; only with
    /// `splitExternalLocalOriginErrors`.
    pub consecutive_local_origin: Option<u32>,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
    /// Istio's `minHealthPercent`, Envoy's panic threshold: below this share of healthy
    /// endpoints, ejections are ignored. 0 (Istio's default) disables panic mode.
    pub min_health_percent: u32,
}

/// Everything about a cluster's upstream behaviour a DestinationRule decides.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClusterPolicy {
    pub lb: LbPolicy,
    pub connect_timeout: Duration,
    pub limits: PoolLimits,
    pub http_idle_timeout: Duration,
    pub tcp_idle_timeout: Duration,
    pub tcp_keepalive: Option<(Option<u32>, Option<Duration>, Option<Duration>)>,
    /// `h2UpgradePolicy: UPGRADE`: HTTP/1.1 requests go upstream over HTTP/2.
    pub h2_upgrade: bool,
    pub outlier: Option<OutlierPolicy>,
}

/// The four settings a policy layer may set, as merged so far.
#[derive(Clone, Copy, Default)]
struct Layers<'a> {
    lb: Option<&'a LoadBalancerSettings>,
    pool: Option<&'a ConnectionPoolSettings>,
    outlier: Option<&'a OutlierDetection>,
}

impl<'a> Layers<'a> {
    /// `policy` over `self`: its set fields win; then its port-level entry for `port`, if
    /// any, replaces all of them.
    fn over(self, policy: Option<&'a TrafficPolicy>, port: u16) -> Self {
        let Some(p) = policy else { return self };
        let mut out = Self {
            lb: p.load_balancer.as_ref().or(self.lb),
            pool: p.connection_pool.as_ref().or(self.pool),
            outlier: p.outlier_detection.as_ref().or(self.outlier),
        };
        if let Some(pl) = p
            .port_level_settings
            .iter()
            .find(|pl| pl.port.as_ref().and_then(|s| s.number) == Some(u32::from(port)))
        {
            out = Self {
                lb: pl.load_balancer.as_ref(),
                pool: pl.connection_pool.as_ref(),
                outlier: pl.outlier_detection.as_ref(),
            };
        }
        out
    }
}

impl ClusterPolicy {
    /// The policy for a cluster on `port`, from the DestinationRule's top-level policy and
    /// the subset's; `connect_timeout` is the mesh default (Istio's `connectTimeout`).
    pub fn resolve(
        top: Option<&TrafficPolicy>,
        subset: Option<&TrafficPolicy>,
        port: u16,
        connect_timeout: Duration,
    ) -> Self {
        let l = Layers::default().over(top, port).over(subset, port);
        let tcp = l.pool.and_then(|p| p.tcp.as_ref());
        let http = l.pool.and_then(|p| p.http.as_ref());
        let limit = |v: Option<i32>| v.and_then(|v| u32::try_from(v).ok()).filter(|v| *v > 0);
        Self {
            lb: lb_policy(l.lb),
            connect_timeout: tcp
                .and_then(|t| t.connect_timeout)
                .map_or(connect_timeout, |d| d.0),
            limits: PoolLimits {
                max_connections: limit(tcp.and_then(|t| t.max_connections)).unwrap_or(UNLIMITED),
                max_pending_requests: limit(http.and_then(|h| h.http1_max_pending_requests))
                    .unwrap_or(UNLIMITED),
                max_requests: limit(http.and_then(|h| h.http2_max_requests)).unwrap_or(UNLIMITED),
                max_retries: limit(http.and_then(|h| h.max_retries)).unwrap_or(UNLIMITED),
                max_requests_per_connection: limit(
                    http.and_then(|h| h.max_requests_per_connection),
                ),
            },
            http_idle_timeout: http
                .and_then(|h| h.idle_timeout)
                .map_or(DEFAULT_IDLE, |d| d.0),
            tcp_idle_timeout: tcp
                .and_then(|t| t.idle_timeout)
                .map_or(DEFAULT_IDLE, |d| d.0),
            tcp_keepalive: tcp
                .and_then(|t| t.tcp_keepalive.as_ref())
                .map(|k: &TcpKeepalive| (k.probes, k.time.map(|d| d.0), k.interval.map(|d| d.0))),
            h2_upgrade: http.and_then(|h| h.h2_upgrade_policy) == Some(H2UpgradePolicy::Upgrade),
            outlier: l.outlier.map(outlier_policy),
        }
    }
}

/// Istio's default, when nothing (or UNSPECIFIED) is set, is LEAST_REQUEST; a consistent
/// hash without a usable key is not one.
fn lb_policy(lb: Option<&LoadBalancerSettings>) -> LbPolicy {
    let Some(lb) = lb else {
        return LbPolicy::LeastRequest;
    };
    if let Some(h) = &lb.consistent_hash {
        let key = if let Some(name) = &h.http_header_name {
            Some(HashKey::Header(name.to_ascii_lowercase()))
        } else if let Some(c) = &h.http_cookie {
            Some(HashKey::Cookie {
                name: c.name.clone(),
                path: c.path.clone(),
                ttl: c.ttl.map(|d| d.0),
            })
        } else if h.use_source_ip == Some(true) {
            Some(HashKey::SourceIp)
        } else {
            h.http_query_parameter_name
                .clone()
                .map(HashKey::QueryParameter)
        };
        if let Some(key) = key {
            return LbPolicy::Hash(key);
        }
    }
    match lb.simple {
        Some(SimpleLb::RoundRobin) => LbPolicy::RoundRobin,
        // PASSTHROUGH would connect to the original destination; a Service VIP has no
        // endpoint of its own, so it is spread like RANDOM.
        Some(SimpleLb::Random | SimpleLb::Passthrough) => LbPolicy::Random,
        _ => LbPolicy::LeastRequest,
    }
}

/// Istio's translation to Envoy's outlier detection, with Envoy's defaults: 5 consecutive
/// 5xx unless set (0 turns it off); gateway and local-origin counting only when set (the
/// deprecated `consecutiveErrors` is gateway errors); 10s interval, 30s base ejection, at
/// most 10% ejected.
fn outlier_policy(o: &OutlierDetection) -> OutlierPolicy {
    let legacy = o
        .consecutive_errors
        .and_then(|v| u32::try_from(v).ok())
        .filter(|v| *v > 0);
    let split = o.split_external_local_origin_errors == Some(true);
    OutlierPolicy {
        consecutive_5xx: if legacy.is_some() {
            None
        } else {
            Some(o.consecutive5xx_errors.unwrap_or(5)).filter(|v| *v > 0)
        },
        consecutive_gateway: legacy.or(o.consecutive_gateway_errors.filter(|v| *v > 0)),
        consecutive_local_origin: split
            .then(|| o.consecutive_local_origin_failures.unwrap_or(5))
            .filter(|v| *v > 0),
        interval: o.interval.map_or(Duration::from_secs(10), |d| d.0),
        base_ejection_time: o
            .base_ejection_time
            .map_or(Duration::from_secs(30), |d| d.0),
        max_ejection_percent: o
            .max_ejection_percent
            .and_then(|v| u32::try_from(v).ok())
            .filter(|v| *v > 0)
            .map_or(10, |v| v.min(100)),
        min_health_percent: o
            .min_health_percent
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(0)
            .min(100),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(yaml: &str) -> TrafficPolicy {
        serde_yaml::from_str(yaml).expect("traffic policy")
    }

    const TEN: Duration = Duration::from_secs(10);

    #[test]
    fn defaults_are_istios() {
        let p = ClusterPolicy::resolve(None, None, 8080, TEN);
        assert_eq!(p.lb, LbPolicy::LeastRequest);
        assert_eq!(p.limits.max_connections, u32::MAX);
        assert_eq!(p.limits.max_requests_per_connection, None);
        assert_eq!(p.http_idle_timeout, Duration::from_secs(3600));
        assert_eq!(p.connect_timeout, TEN);
        assert!(!p.h2_upgrade);
        assert_eq!(p.outlier, None);
    }

    #[test]
    fn the_tutorial_policy() {
        let top = tp("
connectionPool:
  tcp: {maxConnections: 100}
  http: {h2UpgradePolicy: UPGRADE, http1MaxPendingRequests: 100, http2MaxRequests: 1000}
loadBalancer: {simple: ROUND_ROBIN}
outlierDetection: {consecutive5xxErrors: 5, interval: 30s, baseEjectionTime: 30s, maxEjectionPercent: 50}
");
        let p = ClusterPolicy::resolve(Some(&top), None, 8080, TEN);
        assert_eq!(p.lb, LbPolicy::RoundRobin);
        assert_eq!(p.limits.max_connections, 100);
        assert_eq!(p.limits.max_pending_requests, 100);
        assert_eq!(p.limits.max_requests, 1000);
        assert!(p.h2_upgrade);
        let o = p.outlier.expect("outlier detection");
        assert_eq!(o.consecutive_5xx, Some(5));
        assert_eq!(o.consecutive_gateway, None);
        assert_eq!(o.interval, Duration::from_secs(30));
        assert_eq!(o.max_ejection_percent, 50);
    }

    #[test]
    fn subsets_override_by_setting_and_port_levels_replace_everything() {
        let top = tp("
loadBalancer: {simple: ROUND_ROBIN}
connectionPool: {tcp: {maxConnections: 7}}
portLevelSettings:
- port: {number: 9090}
  loadBalancer: {simple: RANDOM}
");
        let subset = tp("loadBalancer: {consistentHash: {httpHeaderName: X-User}}");
        // The subset's load balancer wins; the top level's pool stays.
        let p = ClusterPolicy::resolve(Some(&top), Some(&subset), 8080, TEN);
        assert_eq!(p.lb, LbPolicy::Hash(HashKey::Header("x-user".into())));
        assert_eq!(p.limits.max_connections, 7);
        // On 9090 the top level's port entry replaced the pool too (back to unlimited).
        let p = ClusterPolicy::resolve(Some(&top), None, 9090, TEN);
        assert_eq!(p.lb, LbPolicy::Random);
        assert_eq!(p.limits.max_connections, u32::MAX);
    }

    #[test]
    fn outlier_defaults_follow_envoy() {
        let o = outlier_policy(&OutlierDetection::default());
        assert_eq!(o.consecutive_5xx, Some(5));
        assert_eq!(o.max_ejection_percent, 10);
        assert_eq!(o.base_ejection_time, Duration::from_secs(30));
        let legacy = outlier_policy(&OutlierDetection {
            consecutive_errors: Some(3),
            ..Default::default()
        });
        assert_eq!(legacy.consecutive_5xx, None);
        assert_eq!(legacy.consecutive_gateway, Some(3));
        let split = outlier_policy(&OutlierDetection {
            split_external_local_origin_errors: Some(true),
            consecutive5xx_errors: Some(0),
            ..Default::default()
        });
        assert_eq!(split.consecutive_5xx, None);
        assert_eq!(split.consecutive_local_origin, Some(5));
    }
}
