//! What `meshctl proxy-config` shows for one client namespace: the routes, clusters and
//! endpoints the proxy would use for that pod.
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::policy::{ClusterPolicy, HashKey, LbPolicy};
use super::table::{
    Cluster, L4Match, Matcher, RequestMatch, RouteAction, Routing, WeightedCluster,
};

#[derive(Debug, Serialize)]
pub struct RouteView {
    pub port: u16,
    pub host: String,
    pub route: String,
    pub matches: String,
    pub action: String,
    pub virtual_service: String,
}

#[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClusterView {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub subset: String,
    pub destination_rule: String,
    pub endpoints: usize,
    /// The merged traffic policy in brief: balancing, limits that are set, outlier detection.
    pub policy: String,
}

#[derive(Debug, Serialize)]
pub struct EndpointView {
    pub endpoint: String,
    pub status: &'static str,
    /// As `istioctl proxy-config endpoints` shows it: `FAILED` while outlier detection has
    /// the endpoint ejected, else `OK`.
    pub outlier_check: &'static str,
    pub cluster: String,
}

fn matcher(m: &Matcher) -> String {
    match m {
        Matcher::Exact(e) => e.clone(),
        Matcher::Prefix(p) => format!("{p}*"),
        Matcher::Regex(r) => format!("~{}", r.as_str()),
    }
}

fn request_match(m: &RequestMatch) -> String {
    let mut parts = Vec::new();
    if let Some(u) = &m.uri {
        parts.push(matcher(u));
    }
    if let Some(x) = &m.method {
        parts.push(format!("method={}", matcher(x)));
    }
    if let Some(x) = &m.authority {
        parts.push(format!("authority={}", matcher(x)));
    }
    for (k, v) in &m.headers {
        parts.push(
            v.as_ref()
                .map_or(k.clone(), |v| format!("{k}={}", matcher(v))),
        );
    }
    for (k, v) in &m.without_headers {
        parts.push(
            v.as_ref()
                .map_or(format!("!{k}"), |v| format!("{k}!={}", matcher(v))),
        );
    }
    for (k, v) in &m.query_params {
        parts.push(
            v.as_ref()
                .map_or(format!("?{k}"), |v| format!("?{k}={}", matcher(v))),
        );
    }
    if let Some(ns) = &m.source_namespace {
        parts.push(format!("from-ns={ns}"));
    }
    if !m.source_labels.is_empty() {
        let l: Vec<String> = m
            .source_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        parts.push(format!("from={}", l.join(",")));
    }
    if parts.is_empty() {
        "/*".into()
    } else {
        parts.join(" ")
    }
}

pub fn routes(r: &Routing, namespace: &str) -> Vec<RouteView> {
    let mut keys: Vec<(String, u16)> = r
        .services
        .values()
        .flat_map(|s| s.ports.iter().map(|p| (s.host.clone(), *p)))
        .collect();
    keys.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    let mut out = Vec::new();
    for (host, port) in keys {
        let Some(vh) = r.virtual_host(namespace, &host, port) else {
            continue;
        };
        for (i, route) in vh.routes.iter().enumerate() {
            let matches = if route.matches.is_empty() {
                "/*".to_owned()
            } else {
                route
                    .matches
                    .iter()
                    .map(request_match)
                    .collect::<Vec<_>>()
                    .join(" | ")
            };
            let action = match &route.action {
                RouteAction::Route(w) => weighted(w),
                RouteAction::Redirect(rd) => {
                    format!("redirect {}", serde_json::to_string(rd).unwrap_or_default())
                }
                RouteAction::DirectResponse(d) => format!("direct response {}", d.status),
            };
            out.push(RouteView {
                port,
                host: host.clone(),
                route: route.name.clone().unwrap_or_else(|| format!("#{i}")),
                matches,
                action,
                virtual_service: vh.virtual_service.clone().unwrap_or_else(|| "-".into()),
            });
        }
        if let Some(vh) = r.l4_virtual_host(namespace, &host, port) {
            let kinds = [("tls", &vh.tls), ("tcp", &vh.tcp)];
            for (kind, routes) in kinds {
                for (i, route) in routes.iter().enumerate() {
                    out.push(RouteView {
                        port,
                        host: host.clone(),
                        route: format!("{kind}#{i}"),
                        matches: l4_matches(&route.matches),
                        action: weighted(&route.clusters),
                        virtual_service: vh.virtual_service.clone().unwrap_or_else(|| "-".into()),
                    });
                }
            }
        }
    }
    out
}

fn weighted(w: &[WeightedCluster]) -> String {
    w.iter()
        .map(|w| format!("{} {}%", w.cluster, w.weight))
        .collect::<Vec<_>>()
        .join(", ")
}

fn l4_matches(blocks: &[L4Match]) -> String {
    if blocks.is_empty() {
        return "*".into();
    }
    blocks
        .iter()
        .map(|m| {
            let mut parts: Vec<String> = m.sni_hosts.iter().map(|h| format!("sni={h}")).collect();
            if let Some(p) = m.port {
                parts.push(format!("port={p}"));
            }
            parts.extend(
                m.destination_subnets
                    .iter()
                    .map(|c| format!("dst={}/{}", c.addr, c.prefix)),
            );
            if let Some(ns) = &m.source_namespace {
                parts.push(format!("from-ns={ns}"));
            }
            parts.extend(m.source_labels.iter().map(|(k, v)| format!("from={k}={v}")));
            if parts.is_empty() {
                "*".into()
            } else {
                parts.join(" ")
            }
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Every cluster a client in `namespace` can reach (each Service port, plain and per
/// subset), resolved afresh, with the names of the DestinationRules behind it ("-": none).
fn each_cluster(r: &Routing, namespace: &str, mut f: impl FnMut(Cluster, String)) {
    for svc in r.services.values() {
        let dr = r.destination_rule(namespace, &svc.host);
        let subsets: Vec<Option<&str>> = std::iter::once(None)
            .chain(
                dr.iter()
                    .flat_map(|d| d.subsets.keys().map(|s| Some(s.as_str()))),
            )
            .collect();
        for port in &svc.ports {
            for subset in &subsets {
                if let Some(c) = r.resolve_cluster(namespace, &svc.host, *port, *subset) {
                    f(c, dr.map_or("-".into(), |d| d.rules.join(",")));
                }
            }
        }
    }
}

pub fn clusters(r: &Routing, namespace: &str) -> Vec<ClusterView> {
    let mut out = BTreeSet::new();
    each_cluster(r, namespace, |c, destination_rule| {
        out.insert(ClusterView {
            endpoints: c.endpoints.len(),
            policy: policy_summary(&c.policy),
            name: c.name,
            host: c.host,
            port: c.port,
            subset: c.subset.unwrap_or_default(),
            destination_rule,
        });
    });
    out.into_iter().collect()
}

/// `LEAST_REQUEST`, `ROUND_ROBIN maxConnections=100 outlier=5x5xx/30s`, ...: what
/// `proxy-config clusters` prints, Envoy's settings in Istio's words.
pub fn policy_summary(p: &ClusterPolicy) -> String {
    let mut parts = vec![match &p.lb {
        LbPolicy::RoundRobin => "ROUND_ROBIN".to_owned(),
        LbPolicy::LeastRequest => "LEAST_REQUEST".to_owned(),
        LbPolicy::Random => "RANDOM".to_owned(),
        LbPolicy::Hash(k) => format!(
            "HASH({})",
            match k {
                HashKey::Header(h) => format!("header {h}"),
                HashKey::Cookie { name, .. } => format!("cookie {name}"),
                HashKey::SourceIp => "source ip".to_owned(),
                HashKey::QueryParameter(q) => format!("query {q}"),
            }
        ),
    }];
    let l = &p.limits;
    for (name, v) in [
        ("maxConnections", l.max_connections),
        ("http1MaxPendingRequests", l.max_pending_requests),
        ("http2MaxRequests", l.max_requests),
        ("maxRetries", l.max_retries),
    ] {
        if v != u32::MAX {
            parts.push(format!("{name}={v}"));
        }
    }
    if let Some(n) = l.max_requests_per_connection {
        parts.push(format!("maxRequestsPerConnection={n}"));
    }
    if p.h2_upgrade {
        parts.push("h2Upgrade".into());
    }
    if let Some(o) = &p.outlier {
        let mut trips = Vec::new();
        if let Some(n) = o.consecutive_5xx {
            trips.push(format!("{n}x5xx"));
        }
        if let Some(n) = o.consecutive_gateway {
            trips.push(format!("{n}xgateway"));
        }
        if let Some(n) = o.consecutive_local_origin {
            trips.push(format!("{n}xlocal"));
        }
        parts.push(format!(
            "outlier={}/{}s max{}%",
            trips.join("+"),
            o.base_ejection_time.as_secs_f64(),
            o.max_ejection_percent
        ));
    }
    parts.join(" ")
}

/// Each cluster's endpoints, clusters in the order `clusters` lists them (by name).
/// `ejected` gives the endpoints the pod's proxy has ejected from a cluster now.
pub fn endpoints(
    r: &Routing,
    namespace: &str,
    ejected: impl Fn(&str) -> Vec<std::net::SocketAddr>,
) -> Vec<EndpointView> {
    let mut by_cluster = BTreeMap::new();
    each_cluster(r, namespace, |c, _| {
        let out = ejected(&c.name);
        let views = c.endpoints.iter().map(|e| EndpointView {
            endpoint: e.addr.to_string(),
            // Only ready endpoints are in a cluster: EDS health is always healthy here.
            status: "HEALTHY",
            outlier_check: if out.contains(&e.addr) {
                "FAILED"
            } else {
                "OK"
            },
            cluster: c.name.clone(),
        });
        by_cluster.insert(c.name.clone(), views.collect::<Vec<_>>());
    });
    by_cluster.into_values().flatten().collect()
}
