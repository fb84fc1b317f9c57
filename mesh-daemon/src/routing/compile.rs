//! Objects -> [`Routing`].
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use super::table::*;
use crate::{
    config::{
        hosts,
        istio::{
            Resource,
            networking::{self, Destination, VirtualServiceSpec},
        },
        objects::Objects,
    },
    state,
};

/// Istio's order among resources claiming the same thing: oldest first, then by name and
/// namespace (manifest files carry no creation time, so name decides there).
fn precedence<S>(
    r: &Resource<S>,
) -> (
    Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    String,
    String,
) {
    (
        r.metadata.creation_timestamp.clone(),
        r.name().to_owned(),
        r.namespace().to_owned(),
    )
}

pub fn compile(
    o: &Objects,
    slices: &state::SliceIndex<'_>,
    cluster_domain: &str,
    root_namespace: &str,
) -> Routing {
    let mut routing = Routing {
        root_namespace: root_namespace.to_owned(),
        ..Default::default()
    };
    let pod_labels: HashMap<&str, &BTreeMap<String, String>> = o
        .pods
        .values()
        .filter_map(|p| Some((p.metadata.uid.as_deref()?, p.metadata.labels.as_ref()?)))
        .collect();
    for (key, svc) in &o.services {
        let (ns, name) = key.split_once('/').unwrap_or(("default", key));
        let host = format!("{name}.{ns}.svc.{cluster_domain}");
        let mut info = ServiceInfo {
            host: host.clone(),
            namespace: ns.to_owned(),
            ports: Vec::new(),
            endpoints: BTreeMap::new(),
        };
        for port in svc.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
            let Ok(number) = u16::try_from(port.port) else {
                continue;
            };
            if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            info.ports.push(number);
            let eps =
                state::service_endpoints(slices, ns, name, port.name.as_deref().unwrap_or(""))
                    .into_iter()
                    .map(|e| {
                        let labels = e
                            .pod
                            .as_deref()
                            .and_then(|uid| pod_labels.get(uid))
                            .map(|l| (*l).clone())
                            .unwrap_or_default();
                        (e, labels)
                    })
                    .collect();
            info.endpoints.insert(number, eps);
        }
        routing.services.insert(host, Arc::new(info));
    }

    // DestinationRules, grouped by host and namespace, merged in precedence order.
    let mut drs: Vec<&Resource<networking::DestinationRuleSpec>> =
        o.destination_rules.values().collect();
    drs.sort_by_key(|r| precedence(r));
    let mut by_host_ns: BTreeMap<(String, String), DestinationPolicy> = BTreeMap::new();
    for dr in drs {
        let ns = dr.namespace();
        let host = hosts::fqdn(&dr.spec.host, ns, cluster_domain);
        let entry = by_host_ns
            .entry((host, ns.to_owned()))
            .or_insert_with(|| DestinationPolicy {
                rules: Vec::new(),
                namespace: ns.to_owned(),
                visibility: Visibility::from_export_to(&dr.spec.export_to, ns),
                traffic_policy: dr.spec.traffic_policy.clone(),
                subsets: BTreeMap::new(),
            });
        entry.rules.push(format!("{ns}/{}", dr.name()));
        for s in &dr.spec.subsets {
            entry
                .subsets
                .entry(s.name.clone())
                .or_insert_with(|| (s.labels.clone(), s.traffic_policy.clone()));
        }
    }
    for ((host, _), policy) in by_host_ns {
        if host.starts_with('*') && !routing.wildcard_rule_hosts.contains(&host) {
            routing.wildcard_rule_hosts.push(host.clone());
        }
        routing
            .destination_rules
            .entry(host)
            .or_default()
            .push(Arc::new(policy));
    }

    routing
        .wildcard_rule_hosts
        .sort_by_key(|h| std::cmp::Reverse(h.len()));

    // VirtualServices bound to the mesh, oldest first.
    let mut vss: Vec<&Resource<VirtualServiceSpec>> = o
        .virtual_services
        .values()
        .filter(|v| !v.spec.hosts.is_empty())
        .filter(|v| v.spec.gateways.is_empty() || v.spec.gateways.iter().any(|g| g == "mesh"))
        .collect();
    vss.sort_by_key(|r| precedence(r));
    for vs in vss {
        let ns = vs.namespace();
        let visibility = Visibility::from_export_to(&vs.spec.export_to, ns);
        for pattern in &vs.spec.hosts {
            let pattern = hosts::fqdn(pattern, ns, cluster_domain);
            // Exact hosts are a lookup; only wildcards scan the services.
            let matching: Vec<&Arc<ServiceInfo>> = if pattern.contains('*') {
                routing
                    .services
                    .values()
                    .filter(|s| hosts::matches(&pattern, &s.host))
                    .collect()
            } else {
                routing.services.get(&pattern).into_iter().collect()
            };
            let mut targets: Vec<(String, u16)> = matching
                .iter()
                .flat_map(|s| s.ports.iter().map(|p| (s.host.clone(), *p)))
                .collect();
            targets.sort();
            for (host, port) in targets {
                let routes = vs
                    .spec
                    .http
                    .iter()
                    .flat_map(|r| expand_delegate(o, r, ns))
                    .filter_map(|(r, route_ns)| {
                        compile_route(&r, &route_ns, port, cluster_domain, &routing)
                    })
                    .collect();
                let l4 = L4Context {
                    ns,
                    port,
                    cluster_domain,
                    routing: &routing,
                };
                let tls = vs.spec.tls.iter().filter_map(|r| l4.tls_route(r)).collect();
                let tcp = vs.spec.tcp.iter().filter_map(|r| l4.tcp_route(r)).collect();
                routing
                    .virtual_hosts
                    .entry((host, port))
                    .or_default()
                    .push(Arc::new(VirtualHost {
                        virtual_service: Some(format!("{ns}/{}", vs.name())),
                        visibility: visibility.clone(),
                        routes,
                        tls,
                        tcp,
                    }));
            }
        }
    }
    routing
}

/// A route of a root VirtualService that delegates is replaced by the delegate's routes,
/// each narrowed by the root's match; everything else stays as it is.
fn expand_delegate(
    o: &Objects,
    r: &networking::HttpRoute,
    ns: &str,
) -> Vec<(networking::HttpRoute, String)> {
    let Some(d) = &r.delegate else {
        return vec![(r.clone(), ns.to_owned())];
    };
    let dns = d.namespace.clone().unwrap_or_else(|| ns.to_owned());
    let Some(delegate) = o.virtual_services.get(&format!("{dns}/{}", d.name)) else {
        // Istio drops a route whose delegate does not exist.
        return vec![];
    };
    delegate
        .spec
        .http
        .iter()
        .map(|child| {
            let mut merged = child.clone();
            merged.matches = merge_matches(&r.matches, &child.matches);
            (merged, dns.clone())
        })
        .collect()
}

/// Every (root, child) pair, the child's conditions added to the root's.
fn merge_matches(
    root: &[networking::HttpMatchRequest],
    child: &[networking::HttpMatchRequest],
) -> Vec<networking::HttpMatchRequest> {
    match (root.is_empty(), child.is_empty()) {
        (true, _) => child.to_vec(),
        (false, true) => root.to_vec(),
        (false, false) => root
            .iter()
            .flat_map(|r| {
                child.iter().map(move |c| {
                    let mut m = r.clone();
                    if c.uri.is_some() {
                        m.uri = c.uri.clone();
                    }
                    if c.method.is_some() {
                        m.method = c.method.clone();
                    }
                    if c.authority.is_some() {
                        m.authority = c.authority.clone();
                    }
                    if c.scheme.is_some() {
                        m.scheme = c.scheme.clone();
                    }
                    m.headers.extend(c.headers.clone());
                    m.without_headers.extend(c.without_headers.clone());
                    m.query_params.extend(c.query_params.clone());
                    m.source_labels.extend(c.source_labels.clone());
                    m.port = c.port.or(m.port);
                    m.source_namespace = c.source_namespace.clone().or(m.source_namespace);
                    m.name = c.name.clone().or(m.name);
                    m
                })
            })
            .collect(),
    }
}

fn compile_match(m: &networking::HttpMatchRequest) -> RequestMatch {
    let headers = |h: &BTreeMap<String, crate::config::istio::types::StringMatch>| {
        h.iter()
            .map(|(k, v)| {
                // `regex: "*"` in withoutHeaders and an empty match both mean "present".
                let presence = v.regex.as_deref() == Some("*")
                    || (v.exact.is_none() && v.prefix.is_none() && v.regex.is_none());
                let matcher = if presence {
                    None
                } else {
                    Matcher::compile(v, false)
                };
                (k.to_ascii_lowercase(), matcher)
            })
            .collect()
    };
    RequestMatch {
        name: m.name.clone(),
        uri: m
            .uri
            .as_ref()
            .and_then(|u| Matcher::compile(u, m.ignore_uri_case)),
        ignore_uri_case: m.ignore_uri_case,
        scheme: m.scheme.as_ref().and_then(|s| Matcher::compile(s, false)),
        method: m.method.as_ref().and_then(|s| Matcher::compile(s, false)),
        authority: m
            .authority
            .as_ref()
            .and_then(|s| Matcher::compile(s, false)),
        headers: headers(&m.headers),
        without_headers: headers(&m.without_headers),
        query_params: m
            .query_params
            .iter()
            .map(|(k, v)| {
                let presence = v.exact.is_none() && v.prefix.is_none() && v.regex.is_none();
                (
                    k.clone(),
                    if presence {
                        None
                    } else {
                        Matcher::compile(v, false)
                    },
                )
            })
            .collect(),
        port: m.port.and_then(|p| u16::try_from(p).ok()),
        source_labels: m.source_labels.clone(),
        source_namespace: m.source_namespace.clone(),
    }
}

/// A route's destination as a cluster: the host resolved in the route's namespace, the port
/// as written, else the service's only port, else the port the client dialled.
fn target(
    d: &Destination,
    weight: u32,
    headers: Option<networking::Headers>,
    ns: &str,
    port: u16,
    cluster_domain: &str,
    routing: &Routing,
) -> WeightedCluster {
    let host = hosts::fqdn(&d.host, ns, cluster_domain);
    let dport = d
        .port
        .as_ref()
        .and_then(|p| p.number)
        .and_then(|p| u16::try_from(p).ok())
        .or_else(|| {
            let ports = &routing.services.get(&host)?.ports;
            (ports.len() == 1).then(|| ports[0])
        })
        .unwrap_or(port);
    WeightedCluster {
        cluster: cluster_name(dport, d.subset.as_deref(), &host),
        host,
        port: dport,
        subset: d.subset.clone(),
        weight,
        headers,
    }
}

/// A lone destination without a weight takes all traffic; among several, a missing weight
/// is 0.
fn weight_of(w: Option<i32>, single: bool) -> u32 {
    w.unwrap_or(if single { 100 } else { 0 }).max(0) as u32
}

/// What compiling the `tls` and `tcp` routes of one VirtualService for one port needs.
struct L4Context<'a> {
    ns: &'a str,
    port: u16,
    cluster_domain: &'a str,
    routing: &'a Routing,
}

impl L4Context<'_> {
    fn destinations(&self, route: &[networking::RouteDestination]) -> Vec<WeightedCluster> {
        let single = route.len() == 1;
        route
            .iter()
            .map(|d| {
                target(
                    &d.destination,
                    weight_of(d.weight, single),
                    None,
                    self.ns,
                    self.port,
                    self.cluster_domain,
                    self.routing,
                )
            })
            .collect()
    }

    /// Keeps the blocks that apply on this port; `None` when blocks were written and none
    /// applies here.
    fn blocks(&self, written: usize, kept: Vec<L4Match>) -> Option<Vec<L4Match>> {
        (written == 0 || !kept.is_empty()).then_some(kept)
    }

    fn l4_match(
        &self,
        port: Option<u32>,
        subnets: &[String],
        source_labels: &BTreeMap<String, String>,
        source_namespace: &Option<String>,
        sni_hosts: Vec<String>,
    ) -> Option<L4Match> {
        if port.is_some_and(|p| p != u32::from(self.port)) {
            return None;
        }
        Some(L4Match {
            sni_hosts,
            destination_subnets: subnets.iter().filter_map(|s| Cidr::parse(s)).collect(),
            port: port.and_then(|p| u16::try_from(p).ok()),
            source_labels: source_labels.clone(),
            source_namespace: source_namespace.clone(),
        })
    }

    /// A route from its match blocks (`None` for a block naming another port) and its
    /// destinations; `None` when blocks were written and none applies on this port.
    fn l4_route(
        &self,
        written: usize,
        blocks: impl Iterator<Item = Option<L4Match>>,
        route: &[networking::RouteDestination],
    ) -> Option<L4Route> {
        let kept: Vec<L4Match> = blocks.flatten().collect();
        Some(L4Route {
            matches: self.blocks(written, kept)?,
            clusters: self.destinations(route),
        })
    }

    fn tls_route(&self, r: &networking::TlsRoute) -> Option<L4Route> {
        // Istio matches SNI hosts as written: a short name is not expanded.
        let blocks = r.matches.iter().map(|m| {
            self.l4_match(
                m.port,
                &m.destination_subnets,
                &m.source_labels,
                &m.source_namespace,
                m.sni_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            )
        });
        self.l4_route(r.matches.len(), blocks, &r.route)
    }

    fn tcp_route(&self, r: &networking::TcpRoute) -> Option<L4Route> {
        let blocks = r.matches.iter().map(|m| {
            self.l4_match(
                m.port,
                &m.destination_subnets,
                &m.source_labels,
                &m.source_namespace,
                vec![],
            )
        });
        self.l4_route(r.matches.len(), blocks, &r.route)
    }
}

/// Istio's translation of `corsPolicy` to Envoy's: the deprecated `allowOrigin` list is
/// exact matches; lists become comma-separated header values.
fn compile_cors(c: &networking::CorsPolicy) -> Cors {
    let allow_origins = c
        .allow_origins
        .iter()
        .filter_map(|m| Matcher::compile(m, false))
        .chain(c.allow_origin.iter().map(|o| Matcher::Exact(o.clone())))
        .collect();
    Cors {
        allow_origins,
        allow_methods: c.allow_methods.join(","),
        allow_headers: c.allow_headers.join(","),
        expose_headers: c.expose_headers.join(","),
        max_age: c.max_age.map(|d| d.0.as_secs().to_string()),
        allow_credentials: c.allow_credentials.unwrap_or(false),
        forward_unmatched_preflights: c.unmatched_preflights.as_deref() != Some("IGNORE"),
    }
}

/// The route as it applies on `port`; `None` when every match block names another port.
fn compile_route(
    r: &networking::HttpRoute,
    ns: &str,
    port: u16,
    cluster_domain: &str,
    routing: &Routing,
) -> Option<HttpRoute> {
    let matches: Vec<RequestMatch> = r
        .matches
        .iter()
        .filter(|m| m.port.is_none_or(|p| p == u32::from(port)))
        .map(compile_match)
        .collect();
    if !r.matches.is_empty() && matches.is_empty() {
        return None;
    }
    let target = |d: &Destination, weight: u32, headers| {
        target(d, weight, headers, ns, port, cluster_domain, routing)
    };
    let action = if let Some(rd) = &r.redirect {
        RouteAction::Redirect(rd.clone())
    } else if let Some(dr) = &r.direct_response {
        RouteAction::DirectResponse(dr.clone())
    } else {
        let single = r.route.len() == 1;
        RouteAction::Route(
            r.route
                .iter()
                .map(|d| {
                    target(
                        &d.destination,
                        weight_of(d.weight, single),
                        d.headers.clone(),
                    )
                })
                .collect(),
        )
    };
    let mut mirrors: Vec<_> = r
        .mirror
        .iter()
        .map(|m| {
            let pct = r.mirror_percentage.or(r.mirror_percent.map(|p| {
                crate::config::istio::types::Percent {
                    value: f64::from(p),
                }
            }));
            (target(m, 100, None), pct)
        })
        .collect();
    mirrors.extend(
        r.mirrors
            .iter()
            .map(|m| (target(&m.destination, 100, None), m.percentage)),
    );
    Some(HttpRoute {
        name: r.name.clone(),
        matches,
        action,
        timeout: r.timeout,
        retry: super::retry::RetryPolicy::from_route(r.retries.as_ref(), false),
        retry_before_1_24: super::retry::RetryPolicy::from_route(r.retries.as_ref(), true),
        fault: r.fault.clone(),
        mirrors,
        rewrite: r.rewrite.as_ref().map(Rewrite::compile),
        cors: r.cors_policy.as_ref().map(compile_cors),
        headers: r.headers.clone(),
    })
}

#[cfg(test)]
mod tests;
