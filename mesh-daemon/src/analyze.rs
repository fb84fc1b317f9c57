//! `meshctl analyze`: what `istioctl analyze` reports, on the same objects the daemon reads.
//! Codes are Istio's where Istio has one (IST0101 ...), `SL....` for Sidelane's own.
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::{
    config::{hosts, istio::security::AuthorizationAction, objects::Objects},
    enrollment::NAMESPACE_OPT_IN,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Level {
    Error,
    Warning,
    Info,
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Level::Error => "Error",
            Level::Warning => "Warning",
            Level::Info => "Info",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Message {
    pub code: &'static str,
    pub name: &'static str,
    pub level: Level,
    /// `Kind namespace/name`.
    pub resource: String,
    pub namespace: String,
    pub origin: String,
    pub message: String,
}

impl std::fmt::Display for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} [{}] ({}", self.level, self.code, self.resource)?;
        if !self.origin.is_empty() {
            write!(f, " {}", self.origin)?;
        }
        write!(f, ") {}", self.message)
    }
}

pub struct Options<'a> {
    /// Only messages about this namespace.
    pub namespace: Option<&'a str>,
    pub cluster_domain: &'a str,
}

/// Namespaces Istio's injection analyzer leaves alone.
const SYSTEM_NAMESPACES: &[&str] = &[
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "istio-system",
    "local-path-storage",
];

/// The settings of a traffic policy the proxy does not apply (load balancing, connection
/// pools and outlier detection are applied).
fn ignored_policy(
    tp: &crate::config::istio::networking::TrafficPolicy,
    at: &str,
    out: &mut Vec<String>,
) {
    let mut check = |set: bool, what: &str| {
        if set {
            out.push(format!("{at}.{what}"));
        }
    };
    check(tp.tls.is_some(), "tls (client TLS origination)");
    check(tp.tunnel.is_some(), "tunnel");
    check(tp.proxy_protocol.is_some(), "proxyProtocol");
    if let Some(lb) = &tp.load_balancer {
        check(
            lb.locality_lb_setting.is_some(),
            "loadBalancer.localityLbSetting",
        );
        check(
            lb.warmup_duration_secs.is_some(),
            "loadBalancer.warmupDurationSecs",
        );
    }
    if let Some(pool) = &tp.connection_pool {
        check(
            pool.tcp
                .as_ref()
                .is_some_and(|t| t.max_connection_duration.is_some()),
            "connectionPool.tcp.maxConnectionDuration",
        );
        check(
            pool.http
                .as_ref()
                .is_some_and(|h| h.use_client_protocol.is_some()),
            "connectionPool.http.useClientProtocol",
        );
    }
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        check(pl.tls.is_some(), &format!("portLevelSettings[{i}].tls"));
    }
}

/// The parts of one Istio resource this build parses but does not act on, so that users
/// never mistake a setting for one in force. Keep in step with what the proxy applies.
fn not_enforced(o: &Objects, kind: &str, key: &str) -> Vec<String> {
    let mut out = Vec::new();
    match kind {
        "VirtualService" => {
            let Some(vs) = o.virtual_services.get(key) else {
                return out;
            };
            if vs.spec.gateways.iter().any(|g| g != "mesh") {
                out.push(
                    "spec.gateways (routes bound to gateways are not served: no gateway yet)"
                        .into(),
                );
            }
        }
        "DestinationRule" => {
            let Some(dr) = o.destination_rules.get(key) else {
                return out;
            };
            if let Some(tp) = &dr.spec.traffic_policy {
                ignored_policy(tp, "spec.trafficPolicy", &mut out);
            }
            for (i, sub) in dr.spec.subsets.iter().enumerate() {
                if let Some(tp) = &sub.traffic_policy {
                    ignored_policy(tp, &format!("spec.subsets[{i}].trafficPolicy"), &mut out);
                }
            }
            if dr.spec.workload_selector.is_some() {
                out.push("spec.workloadSelector".into());
            }
        }
        // Every field is enforced (with a CA configured, which analyze cannot see).
        "PeerAuthentication" => {}
        // What per-connection enforcement cannot see is reported as SL0003 instead.
        "AuthorizationPolicy" => {
            let Some(ap) = o.authorization_policies.get(key) else {
                return out;
            };
            if ap.spec.target_ref.is_some() || !ap.spec.target_refs.is_empty() {
                out.push(
                    "spec.targetRefs (policies for waypoints and gateways; Sidelane has neither)"
                        .into(),
                );
            }
            if ap.spec.action == Some(AuthorizationAction::Audit) {
                out.push("action AUDIT (no audit log)".into());
            }
        }
        _ => out.push(format!("{kind} (the whole resource)")),
    }
    out
}

pub fn analyze(o: &Objects, opts: &Options<'_>) -> Vec<Message> {
    let mut out = Vec::new();
    let mut push =
        |code, name, level, resource: String, namespace: &str, origin: &str, message: String| {
            out.push(Message {
                code,
                name,
                level,
                resource,
                namespace: namespace.to_owned(),
                origin: origin.to_owned(),
                message,
            })
        };
    for e in &o.errors {
        let namespace = e
            .name
            .as_deref()
            .and_then(|n| n.split_once('/'))
            .map_or("", |(ns, _)| ns);
        let resource = match (&e.kind, &e.name) {
            (Some(k), Some(n)) => format!("{k} {n}"),
            (Some(k), None) => k.clone(),
            _ => "document".into(),
        };
        let message = match &e.field {
            Some(f) => format!(
                "{f}: {} (the object is rejected; the rest of the configuration applies)",
                e.message
            ),
            None => format!("{} (the object is rejected)", e.message),
        };
        push(
            "IST0106",
            "SchemaValidationError",
            Level::Error,
            resource,
            namespace,
            &e.origin,
            message,
        );
    }
    for (kind, key, _, origin, unknown) in o.istio_resources() {
        let ns = key.split_once('/').map_or("", |(ns, _)| ns);
        for field in unknown {
            push(
                "SL0001",
                "UnknownField",
                Level::Warning,
                format!("{kind} {key}"),
                ns,
                origin,
                format!(
                    "{field} is not a field of {kind}; Kubernetes drops it and Sidelane ignores it (typo?)"
                ),
            );
        }
        for what in not_enforced(o, kind, key) {
            push(
                "SL0002",
                "NotEnforced",
                Level::Warning,
                format!("{kind} {key}"),
                ns,
                origin,
                format!("{what}: validated, but this Sidelane build does not apply it yet"),
            );
        }
    }

    for (key, ap) in &o.authorization_policies {
        let Some(policy) = crate::authz::convert(ap) else {
            continue;
        };
        let resource = format!("AuthorizationPolicy {key}");
        let ns = ap.namespace();
        if !policy.http_attributes.is_empty() {
            let consequence = match policy.action {
                crate::authz::Action::Allow => {
                    "within an ALLOW policy, rules matching HTTP attributes are omitted"
                }
                _ => "the policy is enforced without its HTTP rules",
            };
            push(
                "SL0003",
                "HttpAttributesOnConnections",
                Level::Warning,
                resource.clone(),
                ns,
                &ap.origin,
                format!(
                    "AuthorizationPolicy is enforced per connection at the destination's node, which does not see HTTP attributes (found: {}); {consequence}. This is more restrictive than requested",
                    policy.http_attributes.join(", ")
                ),
            );
        }
        if policy.action == crate::authz::Action::Custom {
            push(
                "SL0004",
                "NoExternalAuthorizer",
                Level::Warning,
                resource,
                ns,
                &ap.origin,
                "CUSTOM action: no external authorizer is configured, so what the rules match is denied".into(),
            );
        }
    }

    // Every host a VirtualService may send to: Services and ServiceEntry hosts.
    let mut known_hosts: BTreeSet<String> = o
        .services
        .keys()
        .filter_map(|k| k.split_once('/'))
        .map(|(ns, name)| format!("{name}.{ns}.svc.{}", opts.cluster_domain))
        .collect();
    for se in o.service_entries.values() {
        known_hosts.extend(
            se.spec
                .hosts
                .iter()
                .map(|h| hosts::fqdn(h, se.namespace(), opts.cluster_domain)),
        );
    }
    let host_known = |h: &str| {
        known_hosts
            .iter()
            .any(|k| hosts::matches(h, k) || hosts::matches(k, h))
    };
    // Subsets by the FQDN of their DestinationRule's host.
    let mut subsets: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for dr in o.destination_rules.values() {
        let host = hosts::fqdn(&dr.spec.host, dr.namespace(), opts.cluster_domain);
        subsets
            .entry(host)
            .or_default()
            .extend(dr.spec.subsets.iter().map(|s| s.name.as_str()));
    }
    let mut claims: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (key, vs) in &o.virtual_services {
        let ns = vs.namespace();
        let resource = format!("VirtualService {key}");
        let mut not_found = |message: String| {
            push(
                "IST0101",
                "ReferencedResourceNotFound",
                Level::Error,
                resource.clone(),
                ns,
                &vs.origin,
                message,
            )
        };
        let mesh = vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh");
        if mesh {
            for h in &vs.spec.hosts {
                claims
                    .entry(hosts::fqdn(h, ns, opts.cluster_domain))
                    .or_default()
                    .push(key);
            }
        }
        for g in vs.spec.gateways.iter().filter(|g| *g != "mesh") {
            let (gns, gname) = g.split_once('/').unwrap_or((ns, g));
            if !o.gateways.contains_key(&format!("{gns}/{gname}")) {
                not_found(format!("Referenced gateway not found: {g:?}"));
            }
        }
        let destinations = vs
            .spec
            .http
            .iter()
            .flat_map(|r| {
                r.route
                    .iter()
                    .map(|d| &d.destination)
                    .chain(r.mirror.iter())
                    .chain(r.mirrors.iter().map(|m| &m.destination))
            })
            .chain(
                vs.spec
                    .tcp
                    .iter()
                    .flat_map(|r| r.route.iter().map(|d| &d.destination)),
            )
            .chain(
                vs.spec
                    .tls
                    .iter()
                    .flat_map(|r| r.route.iter().map(|d| &d.destination)),
            );
        for d in destinations {
            let fqdn = hosts::fqdn(&d.host, ns, opts.cluster_domain);
            if !host_known(&fqdn) {
                not_found(format!(
                    "Referenced host not found: {:?} (no Service or ServiceEntry {fqdn})",
                    d.host
                ));
            }
            if let Some(subset) = &d.subset
                && !subsets
                    .get(&fqdn)
                    .is_some_and(|s| s.contains(subset.as_str()))
            {
                not_found(format!(
                    "Referenced host+subset in destinationrule not found: \"{}+{subset}\" (requests routed there get 503 NR)",
                    d.host
                ));
            }
        }
    }
    for (host, vss) in claims.iter().filter(|(_, v)| v.len() > 1) {
        for key in vss {
            let vs = &o.virtual_services[*key];
            let others: Vec<&str> = vss.iter().filter(|k| *k != key).copied().collect();
            push(
                "IST0109",
                "ConflictingMeshGatewayVirtualServiceHosts",
                Level::Error,
                format!("VirtualService {key}"),
                vs.namespace(),
                &vs.origin,
                format!(
                    "The VirtualServices {} associated with mesh gateway define the same host {host} which can lead to undefined behavior. This can be fixed by merging the conflicting VirtualServices into a single resource.",
                    std::iter::once(*key)
                        .chain(others)
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            );
        }
    }
    // Namespaces with workloads but no opt-in label.
    let used: BTreeSet<&str> = o
        .pods
        .keys()
        .chain(o.services.keys())
        .filter_map(|k| k.split_once('/').map(|(ns, _)| ns))
        .collect();
    for ns in used {
        if SYSTEM_NAMESPACES.contains(&ns) {
            continue;
        }
        let labels = o
            .namespaces
            .get(ns)
            .and_then(|n| n.metadata.labels.as_ref());
        let enabled = labels.is_some_and(|l| {
            NAMESPACE_OPT_IN
                .iter()
                .any(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
        });
        if !enabled {
            push(
                "IST0102",
                "NamespaceNotInjected",
                Level::Info,
                format!("Namespace {ns}"),
                ns,
                "",
                format!(
                    "The namespace is not in the mesh. Run 'kubectl label namespace {ns} sidelane.dev/mesh=enabled' (or istio-injection=enabled) to add it."
                ),
            );
        }
    }
    if let Some(ns) = opts.namespace {
        out.retain(|m| m.namespace == ns);
    }
    out.sort_by(|a, b| {
        (a.level, &a.resource, a.code, &a.message).cmp(&(b.level, &b.resource, b.code, &b.message))
    });
    // One destination referenced by several routes is one finding.
    out.dedup();
    out
}

#[cfg(test)]
mod tests;
