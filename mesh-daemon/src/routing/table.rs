//! The compiled forms, ready for per-request evaluation.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use serde::Serialize;

use crate::{
    config::hosts,
    config::istio::{
        networking::{
            Headers, HttpDirectResponse, HttpFaultInjection, HttpRedirect, TrafficPolicy,
        },
        types::{Duration, Percent, StringMatch},
    },
    state::Endpoint,
};

use super::{
    memo::{self, ClusterQuery, HostPort},
    policy::ClusterPolicy,
    retry::RetryPolicy,
};

/// Who may see a resource (`exportTo`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Visibility {
    All,
    Namespaces(BTreeSet<String>),
}

impl Visibility {
    pub fn from_export_to(export_to: &[String], own_namespace: &str) -> Self {
        if export_to.is_empty() || export_to.iter().any(|e| e == "*") {
            return Visibility::All;
        }
        Visibility::Namespaces(
            export_to
                .iter()
                .map(|e| {
                    if e == "." {
                        own_namespace.to_owned()
                    } else {
                        e.clone()
                    }
                })
                .collect(),
        )
    }

    pub fn allows(&self, namespace: &str) -> bool {
        match self {
            Visibility::All => true,
            Visibility::Namespaces(ns) => ns.contains(namespace),
        }
    }
}

/// A compiled string match.
#[derive(Clone, Debug, Serialize)]
pub enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(#[serde(serialize_with = "regex_str")] regex::Regex),
}

fn regex_str<S: serde::Serializer>(r: &regex::Regex, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

impl Matcher {
    /// `None` for an empty `StringMatch` (which matches anything in Istio).
    pub fn compile(m: &StringMatch, ignore_case: bool) -> Option<Self> {
        let lower = |s: &String| {
            if ignore_case {
                s.to_lowercase()
            } else {
                s.clone()
            }
        };
        if let Some(e) = &m.exact {
            Some(Matcher::Exact(lower(e)))
        } else if let Some(p) = &m.prefix {
            Some(Matcher::Prefix(lower(p)))
        } else {
            // Envoy matches the whole value against the regex (RE2 full match).
            let re = m.regex.as_ref()?;
            let re = if ignore_case {
                format!("(?i)^(?:{re})$")
            } else {
                format!("^(?:{re})$")
            };
            regex::Regex::new(&re).ok().map(Matcher::Regex)
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            Matcher::Exact(e) => value == e,
            Matcher::Prefix(p) => value.starts_with(p.as_str()),
            Matcher::Regex(r) => r.is_match(value),
        }
    }
}

/// One `match` block: every condition must hold.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RequestMatch {
    pub name: Option<String>,
    pub uri: Option<Matcher>,
    pub ignore_uri_case: bool,
    pub scheme: Option<Matcher>,
    pub method: Option<Matcher>,
    pub authority: Option<Matcher>,
    /// Header name (lower case) and matcher; `None` means "present".
    pub headers: Vec<(String, Option<Matcher>)>,
    /// Headers that must not match (or, with `None`, must be absent).
    pub without_headers: Vec<(String, Option<Matcher>)>,
    pub query_params: Vec<(String, Option<Matcher>)>,
    pub port: Option<u16>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
}

/// A route's `corsPolicy` as Envoy's CORS filter applies it: lists joined once, origins
/// compiled once.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Cors {
    pub allow_origins: Vec<Matcher>,
    pub allow_methods: String,
    pub allow_headers: String,
    pub expose_headers: String,
    /// Seconds, as `Access-Control-Max-Age` carries them.
    pub max_age: Option<String>,
    pub allow_credentials: bool,
    /// Istio's `unmatchedPreflights`: FORWARD (the default) sends a preflight from an origin
    /// that is not allowed on to the service; IGNORE answers it here, without CORS headers.
    pub forward_unmatched_preflights: bool,
}

/// A route's `rewrite`, its regex compiled once and its `\1` references turned into the
/// regex crate's `${1}`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Rewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
    #[serde(serialize_with = "regex_rewrite_str")]
    pub uri_regex: Option<(regex::Regex, String)>,
}

fn regex_rewrite_str<S: serde::Serializer>(
    r: &Option<(regex::Regex, String)>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match r {
        Some((re, to)) => s.serialize_str(&format!("{} -> {to}", re.as_str())),
        None => s.serialize_none(),
    }
}

impl Rewrite {
    /// `None` for the regex when it does not compile (validation has rejected such routes).
    pub fn compile(rw: &crate::config::istio::networking::HttpRewrite) -> Self {
        let uri_regex = rw.uri_regex_rewrite.as_ref().and_then(|rr| {
            let replacement = rr.rewrite.chars().fold(String::new(), |mut out, c| {
                if out.ends_with('\\') && c.is_ascii_digit() {
                    out.pop();
                    out.push_str(&format!("${{{c}}}"));
                } else {
                    out.push(c);
                }
                out
            });
            regex::Regex::new(&rr.pattern)
                .ok()
                .map(|re| (re, replacement))
        });
        Self {
            uri: rw.uri.clone(),
            authority: rw.authority.clone(),
            uri_regex,
        }
    }
}

/// A weighted destination, already resolved to its cluster.
#[derive(Clone, Debug, Serialize)]
pub struct WeightedCluster {
    pub cluster: String,
    pub host: String,
    pub port: u16,
    pub subset: Option<String>,
    pub weight: u32,
    pub headers: Option<Headers>,
}

#[derive(Clone, Debug, Serialize)]
pub enum RouteAction {
    Route(Vec<WeightedCluster>),
    Redirect(HttpRedirect),
    DirectResponse(HttpDirectResponse),
}

#[derive(Clone, Debug, Serialize)]
pub struct HttpRoute {
    pub name: Option<String>,
    /// Empty: matches every request. Several: any one may match.
    pub matches: Vec<RequestMatch>,
    pub action: RouteAction,
    pub timeout: Option<Duration>,
    /// As Istio 1.24 and later build it (no `retries`: the default policy, without 503).
    pub retry: Option<RetryPolicy>,
    /// As earlier Istio built it (the default policy retries 503).
    pub retry_before_1_24: Option<RetryPolicy>,
    pub fault: Option<HttpFaultInjection>,
    pub mirrors: Vec<(WeightedCluster, Option<Percent>)>,
    pub rewrite: Option<Rewrite>,
    pub cors: Option<Cors>,
    pub headers: Option<Headers>,
}

/// The conditions of one `tls` or `tcp` match block: every one must hold.
#[derive(Clone, Debug, Default, Serialize)]
pub struct L4Match {
    /// TLS routes only: host patterns (`*.example.com`) the ClientHello's SNI must match.
    pub sni_hosts: Vec<String>,
    pub destination_subnets: Vec<Cidr>,
    pub port: Option<u16>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
}

/// An address range as written in `destinationSubnets` (`10.0.0.0/8`, `fd00::/64`, or a
/// single address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

/// A `tls` or `tcp` route: the first whose blocks (any of them) match picks the
/// destinations for the whole connection.
#[derive(Clone, Debug, Serialize)]
pub struct L4Route {
    /// Empty: matches every connection (only `tcp` routes may be written so).
    pub matches: Vec<L4Match>,
    pub clusters: Vec<WeightedCluster>,
}

/// The routes of one VirtualService for one host and port.
#[derive(Clone, Debug, Serialize)]
pub struct VirtualHost {
    /// `namespace/name` of the VirtualService, or `None` for the default route.
    pub virtual_service: Option<String>,
    pub visibility: Visibility,
    pub routes: Vec<HttpRoute>,
    /// `tls` routes, for connections that open with a TLS ClientHello.
    pub tls: Vec<L4Route>,
    /// `tcp` routes, for every other connection (and TLS ones no `tls` route took).
    pub tcp: Vec<L4Route>,
}

/// One DestinationRule as it applies to one host (several merged when they share a host
/// and a namespace).
#[derive(Clone, Debug, Serialize)]
pub struct DestinationPolicy {
    pub rules: Vec<String>,
    pub namespace: String,
    pub visibility: Visibility,
    pub traffic_policy: Option<TrafficPolicy>,
    /// Subset name -> (labels, subset traffic policy).
    pub subsets: BTreeMap<String, (BTreeMap<String, String>, Option<TrafficPolicy>)>,
}

/// An upstream cluster: a service port, optionally narrowed to a subset.
#[derive(Clone, Debug, Serialize)]
pub struct Cluster {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub subset: Option<String>,
    pub endpoints: Vec<Endpoint>,
    /// The DestinationRule's traffic policy for this cluster, merged and defaulted.
    pub policy: ClusterPolicy,
}

/// An endpoint and the labels of the pod behind it (what subsets select on).
pub type LabelledEndpoint = (Endpoint, BTreeMap<String, String>);

/// A Service as routing sees it.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceInfo {
    pub host: String,
    pub namespace: String,
    pub ports: Vec<u16>,
    /// Endpoints by service port, with the labels of the pod behind each.
    pub endpoints: BTreeMap<u16, Vec<LabelledEndpoint>>,
}

#[derive(Debug, Default, Serialize)]
pub struct Routing {
    pub root_namespace: String,
    pub services: HashMap<String, Arc<ServiceInfo>>,
    /// (host, port) -> candidate VirtualServices, most precedent first. Looked up with a
    /// borrowed [`HostPort`] on every request.
    #[serde(serialize_with = "host_port_keys")]
    pub virtual_hosts: hashbrown::HashMap<(String, u16), Vec<Arc<VirtualHost>>>,
    /// host -> DestinationRules by namespace.
    pub destination_rules: HashMap<String, Vec<Arc<DestinationPolicy>>>,
    /// The wildcard keys of `destination_rules`, longest (most specific) first, so a lookup
    /// scans these few and not every rule.
    pub wildcard_rule_hosts: Vec<String>,
    /// Clusters resolved so far from this snapshot (see [`Routing::cluster`]).
    #[serde(skip)]
    pub clusters: memo::Clusters,
    /// Default routes built so far (see [`Routing::virtual_host`]).
    #[serde(skip)]
    pub default_routes: memo::DefaultRoutes,
}

/// JSON object keys must be strings: `(host, port)` is written `host:port`, sorted.
fn host_port_keys<S: serde::Serializer, V: Serialize>(
    m: &hashbrown::HashMap<(String, u16), V>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let sorted: BTreeMap<String, &V> = m
        .iter()
        .map(|((h, p), v)| (format!("{h}:{p}"), v))
        .collect();
    sorted.serialize(s)
}

pub fn cluster_name(port: u16, subset: Option<&str>, host: &str) -> String {
    format!("outbound|{port}|{}|{host}", subset.unwrap_or(""))
}

impl Routing {
    /// The VirtualService a client in `namespace` gets for `host:port` among those with
    /// routes of the kind `has` looks for: one with only `tcp` routes leaves the port's HTTP
    /// traffic to the default route, and the other way round, as Istio builds its listeners.
    fn applicable(
        &self,
        namespace: &str,
        host: &str,
        port: u16,
        has: impl Fn(&VirtualHost) -> bool,
    ) -> Option<&Arc<VirtualHost>> {
        self.virtual_hosts
            .get(&HostPort(host, port))
            .and_then(|c| c.iter().find(|v| has(v) && v.visibility.allows(namespace)))
    }

    /// The VirtualService whose `tls` or `tcp` routes a client in `namespace` gets for
    /// `host:port`, if any.
    pub fn l4_virtual_host(&self, namespace: &str, host: &str, port: u16) -> Option<&VirtualHost> {
        self.applicable(namespace, host, port, |v| {
            !v.tcp.is_empty() || !v.tls.is_empty()
        })
        .map(|v| &**v)
    }

    /// The L4 routes a client in `namespace` gets for `host:port`: the `tls` ones (when the
    /// connection is TLS) followed by the `tcp` ones. Empty when no VirtualService has any:
    /// the connection goes to the service itself.
    pub fn l4_routes(
        &self,
        namespace: &str,
        host: &str,
        port: u16,
        tls: bool,
    ) -> impl Iterator<Item = &L4Route> {
        let vh = self.applicable(namespace, host, port, |v| {
            !v.tcp.is_empty() || (tls && !v.tls.is_empty())
        });
        vh.into_iter().flat_map(move |v| {
            let tls_routes: &[L4Route] = if tls { &v.tls } else { &[] };
            tls_routes.iter().chain(v.tcp.iter())
        })
    }

    /// The routes a client in `namespace` gets for `host:port` (the default route when no
    /// VirtualService applies).
    pub fn virtual_host(&self, namespace: &str, host: &str, port: u16) -> Option<Arc<VirtualHost>> {
        if let Some(vh) = self.applicable(namespace, host, port, |v| !v.routes.is_empty()) {
            return Some(vh.clone());
        }
        self.default_routes
            .get_or_build(HostPort(host, port), || self.default_route(host, port))
    }

    /// The route to the whole Service that a port without VirtualService gets.
    fn default_route(&self, host: &str, port: u16) -> Option<Arc<VirtualHost>> {
        self.services
            .get(host)
            .filter(|s| s.ports.contains(&port))
            .map(|_| {
                Arc::new(VirtualHost {
                    virtual_service: None,
                    visibility: Visibility::All,
                    routes: vec![HttpRoute {
                        name: Some("default".into()),
                        matches: vec![],
                        action: RouteAction::Route(vec![WeightedCluster {
                            cluster: cluster_name(port, None, host),
                            host: host.to_owned(),
                            port,
                            subset: None,
                            weight: 100,
                            headers: None,
                        }]),
                        timeout: None,
                        retry: Some(RetryPolicy::istio_default(false)),
                        retry_before_1_24: Some(RetryPolicy::istio_default(true)),
                        fault: None,
                        mirrors: vec![],
                        rewrite: None,
                        cors: None,
                        headers: None,
                    }],
                    tls: vec![],
                    tcp: vec![],
                })
            })
    }

    /// The DestinationRule a client in `namespace` gets for `host`: its own namespace's,
    /// else the service's namespace's, else the root namespace's; within a namespace, a rule
    /// for the exact host before the most specific wildcard (`*.production.svc.cluster.local`).
    pub fn destination_rule(&self, namespace: &str, host: &str) -> Option<&Arc<DestinationPolicy>> {
        let exact = self.destination_rules.get(host);
        let wildcards: Vec<&Vec<Arc<DestinationPolicy>>> = self
            .wildcard_rule_hosts
            .iter()
            .filter(|pattern| hosts::matches(pattern, host))
            .filter_map(|pattern| self.destination_rules.get(pattern))
            .collect();
        let service_ns = self.services.get(host).map(|s| s.namespace.as_str());
        [
            Some(namespace),
            service_ns,
            Some(self.root_namespace.as_str()),
        ]
        .into_iter()
        .flatten()
        .find_map(|ns| {
            exact
                .into_iter()
                .chain(wildcards.iter().copied())
                .find_map(|candidates| {
                    candidates
                        .iter()
                        .find(|d| d.namespace == ns && d.visibility.allows(namespace))
                })
        })
    }

    /// The cluster a client in `namespace` reaches for `host:port`, narrowed to `subset`.
    /// `None` when the subset is not defined for this client: Envoy answers such routes
    /// with 503 (no cluster). Resolved once per snapshot and shared.
    pub fn cluster(
        &self,
        namespace: &str,
        host: &str,
        port: u16,
        subset: Option<&str>,
    ) -> Option<Arc<Cluster>> {
        let query = ClusterQuery {
            namespace,
            host,
            port,
            subset,
        };
        self.clusters.get_or_build(query, || {
            self.resolve_cluster(namespace, host, port, subset)
                .map(Arc::new)
        })
    }

    /// [`Routing::cluster`] worked out afresh and not kept: for `meshctl proxy-config`,
    /// whose listing of every cluster for a namespace must not fill the request path's memo.
    pub(super) fn resolve_cluster(
        &self,
        namespace: &str,
        host: &str,
        port: u16,
        subset: Option<&str>,
    ) -> Option<Cluster> {
        let svc = self.services.get(host)?;
        let all = svc.endpoints.get(&port)?;
        let dr = self.destination_rule(namespace, host);
        let (labels, subset_policy) = match subset {
            None => (None, None),
            Some(s) => {
                let (labels, policy) = dr?.subsets.get(s)?;
                (Some(labels), policy.as_ref())
            }
        };
        let policy = ClusterPolicy::resolve(
            dr.and_then(|d| d.traffic_policy.as_ref()),
            subset_policy,
            port,
            crate::settings::DEFAULT_CONNECT_TIMEOUT,
        );
        let endpoints = all
            .iter()
            .filter(|(_, pod_labels)| {
                labels.is_none_or(|want| crate::state::selects(want, pod_labels))
            })
            .map(|(e, _)| e.clone())
            .collect();
        Some(Cluster {
            name: cluster_name(port, subset, host),
            host: host.to_owned(),
            port,
            subset: subset.map(str::to_owned),
            endpoints,
            policy,
        })
    }
}
