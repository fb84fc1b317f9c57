//! Istio's first level of validation: what its admission webhook rejects. A resource with
//! any violation here is rejected alone; everything else keeps applying.
//!
//! Rules and messages follow Istio's `pkg/config/validation` so that users see what
//! `istioctl validate` would tell them.
use std::{collections::BTreeSet, net::IpAddr};

use super::{
    networking::{
        ConnectionPoolSettings, Destination, DestinationRuleSpec, GatewaySpec, HttpRoute,
        LoadBalancerSettings, OutlierDetection, RouteDestination, ServiceEntrySpec, TrafficPolicy,
        VirtualServiceSpec,
    },
    security::{
        AuthorizationAction, AuthorizationPolicySpec, Operation, PeerAuthenticationSpec, Source,
    },
    types::{Duration, Percent, StringMatch},
};

/// One reason a resource is rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Field path, e.g. `spec.http[0].retries.retryOn`.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Envoy's retry conditions (x-envoy-retry-on and x-envoy-retry-grpc-on), as Istio accepts
/// them; HTTP status codes are accepted too.
pub const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// gRPC status names; a name's index is its code.
pub const GRPC_STATUS: &[&str] = &[
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

const CORS_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE",
];

#[derive(Default)]
struct V {
    out: Vec<Violation>,
}

impl V {
    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.out.push(Violation {
            field: field.into(),
            message: message.into(),
        });
    }

    /// Istio's ValidateDuration: at least 1ms, millisecond precision.
    fn duration(&mut self, field: &str, d: Option<&Duration>) {
        if let Some(d) = d {
            if d.0 < std::time::Duration::from_millis(1) {
                self.err(field, "duration must be greater than 1ms");
            } else if !d.0.subsec_nanos().is_multiple_of(1_000_000) {
                self.err(field, "only durations to ms precision are supported");
            }
        }
    }

    fn percent(&mut self, field: &str, p: Option<&Percent>) {
        if let Some(p) = p
            && !(0.0..=100.0).contains(&p.value)
        {
            self.err(
                field,
                format!("percentage {} must be in range [0, 100]", p.value),
            );
        }
    }

    fn port(&mut self, field: &str, port: Option<u32>) {
        if let Some(p) = port
            && !(1..=65535).contains(&p)
        {
            self.err(
                field,
                format!("port number {p} must be in the range 1..65535"),
            );
        }
    }

    fn string_match(&mut self, field: &str, m: Option<&StringMatch>, allow_empty_prefix: bool) {
        let Some(m) = m else { return };
        let set = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if set > 1 {
            self.err(field, "only one of exact, prefix or regex may be set");
        }
        if !allow_empty_prefix && m.prefix.as_deref() == Some("") {
            self.err(field, "prefix string match should not be empty");
        }
        if let Some(re) = &m.regex {
            self.regex(field, re);
        }
    }

    fn regex(&mut self, field: &str, re: &str) {
        if re.is_empty() {
            self.err(field, "regex string match should not be empty");
        } else if re.len() > 1024 {
            self.err(field, "regex is too large, max length allowed is 1024");
        } else if let Err(e) = regex::Regex::new(re) {
            self.err(
                field,
                format!("{e}; Istio uses RE2 style regex-based match (https://github.com/google/re2/wiki/Syntax)"),
            );
        }
    }

    fn destination(&mut self, field: &str, d: &Destination) {
        if d.host.is_empty() {
            self.err(format!("{field}.host"), "destination host is required");
        } else if d.host == "*" {
            self.err(format!("{field}.host"), "invalid destination host *");
        } else if let Err(e) = wildcard_domain(&d.host) {
            self.err(format!("{field}.host"), e);
        }
        if let Some(s) = &d.subset
            && !is_dns1123_label(s)
        {
            self.err(
                format!("{field}.subset"),
                format!("subset name is invalid: {s:?}"),
            );
        }
        if let Some(p) = &d.port {
            self.port(&format!("{field}.port.number"), Some(p.number.unwrap_or(0)));
        }
    }

    fn weights<'a>(
        &mut self,
        field: &str,
        routes: impl Iterator<Item = (&'a Destination, Option<i32>)>,
    ) {
        let mut total: i64 = 0;
        let mut n = 0;
        for (i, (dest, weight)) in routes.enumerate() {
            n += 1;
            self.destination(&format!("{field}[{i}].destination"), dest);
            let w = weight.unwrap_or(0);
            if w < 0 {
                self.err(
                    format!("{field}[{i}].weight"),
                    "weight must be non-negative",
                );
            }
            total += i64::from(w);
        }
        if n > 1 && total == 0 {
            self.err(field, "total destination weight = 0");
        }
    }
}

/// RFC 1123 label: lower-case alphanumerics and '-', at most 63, alphanumeric at both ends.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A host name, optionally starting with `*.` or being `*`; short names are allowed.
fn wildcard_domain(host: &str) -> Result<(), String> {
    if host == "*" {
        return Ok(());
    }
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let rest = host.strip_prefix("*.").unwrap_or(host);
    if rest.len() > 255 {
        return Err(format!("host {host:?}: domain name too long"));
    }
    for label in rest.trim_end_matches('.').split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!("host {host:?}: {label:?} is not a valid DNS label"));
        }
    }
    Ok(())
}

pub fn virtual_service(vs: &VirtualServiceSpec) -> Vec<Violation> {
    let mut v = V::default();
    let delegate = vs.hosts.is_empty();
    if delegate {
        if !vs.gateways.is_empty() {
            v.err(
                "spec.gateways",
                "delegate virtual service must have no gateways specified",
            );
        }
        if !vs.tls.is_empty() {
            v.err(
                "spec.tls",
                "delegate virtual service must have no tls route specified",
            );
        }
        if !vs.tcp.is_empty() {
            v.err(
                "spec.tcp",
                "delegate virtual service must have no tcp route specified",
            );
        }
    }
    let to_mesh = vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == "mesh");
    for (i, h) in vs.hosts.iter().enumerate() {
        if let Err(e) = wildcard_domain(h) {
            v.err(format!("spec.hosts[{i}]"), e);
        } else if h == "*" && to_mesh {
            v.err(
                format!("spec.hosts[{i}]"),
                "wildcard host * is not allowed for virtual services bound to the mesh gateway",
            );
        }
    }
    let mut seen = BTreeSet::new();
    for (i, h) in vs.hosts.iter().enumerate() {
        if !seen.insert(h.as_str()) {
            v.err(
                format!("spec.hosts[{i}]"),
                format!("duplicate hosts in virtual service: {h}"),
            );
        }
    }
    if vs.http.is_empty() && vs.tcp.is_empty() && vs.tls.is_empty() {
        v.err(
            "spec",
            "http, tcp or tls must be provided in virtual service",
        );
    }
    for (i, r) in vs.http.iter().enumerate() {
        http_route(&mut v, &format!("spec.http[{i}]"), r, delegate);
    }
    for (i, r) in vs.tcp.iter().enumerate() {
        let f = format!("spec.tcp[{i}]");
        for (j, m) in r.matches.iter().enumerate() {
            v.port(&format!("{f}.match[{j}].port"), m.port);
            for (k, s) in m.destination_subnets.iter().enumerate() {
                subnet(
                    &mut v,
                    &format!("{f}.match[{j}].destinationSubnets[{k}]"),
                    s,
                );
            }
        }
        if r.route.is_empty() {
            v.err(format!("{f}.route"), "TCP route is required");
        }
        l4_weights(&mut v, &format!("{f}.route"), &r.route);
    }
    for (i, r) in vs.tls.iter().enumerate() {
        let f = format!("spec.tls[{i}]");
        if r.matches.is_empty() {
            v.err(
                format!("{f}.match"),
                "TLS route must have at least one match condition",
            );
        }
        for (j, m) in r.matches.iter().enumerate() {
            if m.sni_hosts.is_empty() {
                v.err(
                    format!("{f}.match[{j}].sniHosts"),
                    "TLS match must have at least one SNI host",
                );
            }
            for (k, sni) in m.sni_hosts.iter().enumerate() {
                // Istio's validateSniHost: each SNI host must fall within a host of the
                // VirtualService, compared as written.
                let covered = vs.hosts.iter().any(|h| {
                    crate::config::hosts::matches(h, sni)
                        || (h.starts_with('*') && sni.starts_with('*') && sni.ends_with(&h[1..]))
                });
                if !covered {
                    v.err(
                        format!("{f}.match[{j}].sniHosts[{k}]"),
                        format!(
                            "sni host {sni:?} is not a compatible subset of any of the virtual service hosts: [{}]",
                            vs.hosts.join(", ")
                        ),
                    );
                }
            }
            v.port(&format!("{f}.match[{j}].port"), m.port);
        }
        if r.route.is_empty() {
            v.err(format!("{f}.route"), "TLS route is required");
        }
        l4_weights(&mut v, &format!("{f}.route"), &r.route);
    }
    v.out
}

fn l4_weights(v: &mut V, field: &str, routes: &[RouteDestination]) {
    v.weights(field, routes.iter().map(|r| (&r.destination, r.weight)));
}

fn subnet(v: &mut V, field: &str, s: &str) {
    let (addr, prefix) = s.split_once('/').unwrap_or((s, ""));
    let ok = match addr.parse::<IpAddr>() {
        Ok(ip) => {
            prefix.is_empty()
                || prefix
                    .parse::<u8>()
                    .is_ok_and(|p| p <= if ip.is_ipv4() { 32 } else { 128 })
        }
        Err(_) => false,
    };
    if !ok {
        v.err(field, format!("{s:?} is not a valid IP address or CIDR"));
    }
}

fn http_route(v: &mut V, f: &str, r: &HttpRoute, delegate_vs: bool) {
    if r.delegate.is_some() && !delegate_vs {
        if r.redirect.is_some() {
            v.err(
                format!("{f}.redirect"),
                "root HTTP route must not specify redirect",
            );
        }
        if !r.route.is_empty() {
            v.err(
                format!("{f}.route"),
                "root HTTP route must not specify route",
            );
        }
    } else {
        if delegate_vs && r.delegate.is_some() {
            v.err(
                format!("{f}.delegate"),
                "delegate HTTP route cannot contain delegate",
            );
        }
        if r.redirect.is_some() {
            if !r.route.is_empty() {
                v.err(f, "HTTP route cannot contain both route and redirect");
            }
            if r.fault.is_some() {
                v.err(f, "HTTP route cannot contain both fault and redirect");
            }
            if r.rewrite.is_some() {
                v.err(
                    f,
                    "HTTP route rule cannot contain both rewrite and redirect",
                );
            }
            if r.direct_response.is_some() {
                v.err(
                    f,
                    "HTTP route rule cannot contain both direct_response and redirect",
                );
            }
        } else if r.direct_response.is_some() {
            if !r.route.is_empty() {
                v.err(
                    f,
                    "HTTP route cannot contain both route and direct_response",
                );
            }
            if r.fault.is_some() {
                v.err(
                    f,
                    "HTTP route cannot contain both fault and direct_response",
                );
            }
            if r.rewrite.is_some() {
                v.err(
                    f,
                    "HTTP route rule cannot contain both rewrite and direct_response",
                );
            }
        } else if r.route.is_empty() {
            v.err(f, "HTTP route, redirect or direct_response is required");
        }
    }
    if r.mirror.is_some() && !r.mirrors.is_empty() {
        v.err(f, "HTTP route cannot contain both mirror and mirrors");
    }
    for (j, m) in r.matches.iter().enumerate() {
        let mf = format!("{f}.match[{j}]");
        v.string_match(&format!("{mf}.uri"), m.uri.as_ref(), true);
        v.string_match(&format!("{mf}.scheme"), m.scheme.as_ref(), false);
        v.string_match(&format!("{mf}.method"), m.method.as_ref(), false);
        v.string_match(&format!("{mf}.authority"), m.authority.as_ref(), false);
        for (name, h) in &m.headers {
            header_name(v, &format!("{mf}.headers"), name);
            v.string_match(&format!("{mf}.headers.{name}"), Some(h), false);
        }
        for (name, h) in &m.without_headers {
            header_name(v, &format!("{mf}.withoutHeaders"), name);
            // "*" is Istio's presence match there, not a regex.
            if h.regex.as_deref() != Some("*") {
                v.string_match(&format!("{mf}.withoutHeaders.{name}"), Some(h), false);
            }
        }
        for (name, q) in &m.query_params {
            v.string_match(&format!("{mf}.queryParams.{name}"), Some(q), false);
        }
        v.port(&format!("{mf}.port"), m.port);
        if let Some(ns) = &m.source_namespace
            && !is_dns1123_label(ns)
        {
            v.err(
                format!("{mf}.sourceNamespace"),
                format!("sourceNamespace match {ns} is invalid"),
            );
        }
    }
    v.weights(
        &format!("{f}.route"),
        r.route.iter().map(|d| (&d.destination, d.weight)),
    );
    v.duration(&format!("{f}.timeout"), r.timeout.as_ref());
    if let Some(retry) = &r.retries {
        let rf = format!("{f}.retries");
        let attempts = retry.attempts.unwrap_or(0);
        if attempts < 0 {
            v.err(format!("{rf}.attempts"), "attempts cannot be negative");
        }
        if attempts == 0
            && (retry.per_try_timeout.is_some()
                || retry.retry_on.is_some()
                || retry.retry_remote_localities.is_some())
        {
            v.err(
                &rf,
                "http retry policy configured when attempts are set to 0 (disabled)",
            );
        }
        v.duration(
            &format!("{rf}.perTryTimeout"),
            retry.per_try_timeout.as_ref(),
        );
        v.duration(&format!("{rf}.backoff"), retry.backoff.as_ref());
        if let Some(on) = &retry.retry_on {
            for cond in on.split(',') {
                let cond = cond.trim();
                let status = cond.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c));
                if !status && !RETRY_ON.contains(&cond) {
                    v.err(
                        format!("{rf}.retryOn"),
                        format!("{cond:?} is not a valid retryOn policy"),
                    );
                }
            }
        }
    }
    if let Some(fault) = &r.fault {
        let ff = format!("{f}.fault");
        if fault.abort.is_none() && fault.delay.is_none() {
            v.err(
                &ff,
                "HTTP fault injection must have an abort and/or a delay",
            );
        }
        if let Some(d) = &fault.delay {
            v.percent(&format!("{ff}.delay.percentage"), d.percentage.as_ref());
            if let Some(p) = d.percent
                && !(0..=100).contains(&p)
            {
                v.err(
                    format!("{ff}.delay.percent"),
                    format!("percent {p} must be in range [0, 100]"),
                );
            }
            if d.fixed_delay.is_none() && d.exponential_delay.is_none() {
                v.err(format!("{ff}.delay"), "delay must have fixedDelay");
            }
            v.duration(&format!("{ff}.delay.fixedDelay"), d.fixed_delay.as_ref());
            if d.exponential_delay.is_some() {
                v.err(
                    format!("{ff}.delay.exponentialDelay"),
                    "exponentialDelay not supported yet",
                );
            }
        }
        if let Some(a) = &fault.abort {
            v.percent(&format!("{ff}.abort.percentage"), a.percentage.as_ref());
            if let Some(s) = a.http_status
                && !(200..=599).contains(&s)
            {
                v.err(
                    format!("{ff}.abort.httpStatus"),
                    format!("HTTP status {s} is not in range 200-599"),
                );
            }
            if let Some(g) = &a.grpc_status
                && !GRPC_STATUS.contains(&g.as_str())
            {
                v.err(
                    format!("{ff}.abort.grpcStatus"),
                    format!("gRPC status {g:?} is not supported, for example use \"NOT_FOUND\""),
                );
            }
            if a.http2_error.is_some() {
                v.err(
                    format!("{ff}.abort.http2Error"),
                    "HTTP/2 abort fault injection not supported yet",
                );
            }
        }
    }
    v.percent(
        &format!("{f}.mirrorPercentage"),
        r.mirror_percentage.as_ref(),
    );
    if let Some(p) = r.mirror_percent
        && p > 100
    {
        v.err(
            format!("{f}.mirrorPercent"),
            format!("mirror_percent must have a max value of 100 (it has {p})"),
        );
    }
    if let Some(m) = &r.mirror {
        v.destination(&format!("{f}.mirror"), m);
    }
    for (i, m) in r.mirrors.iter().enumerate() {
        v.destination(&format!("{f}.mirrors[{i}].destination"), &m.destination);
        v.percent(
            &format!("{f}.mirrors[{i}].percentage"),
            m.percentage.as_ref(),
        );
    }
    if let Some(rd) = &r.redirect {
        let rf = format!("{f}.redirect");
        if rd.uri.is_none()
            && rd.authority.is_none()
            && rd.port.is_none()
            && rd.derive_port.is_none()
            && rd.scheme.is_none()
        {
            v.err(&rf, "redirect must specify URI, authority, scheme, or port");
        }
        if let Some(c) = rd.redirect_code
            && !(300..=399).contains(&c)
        {
            v.err(
                format!("{rf}.redirectCode"),
                format!("{c} is not a valid redirect code, must be 3xx"),
            );
        }
        if let Some(s) = &rd.scheme
            && s != "http"
            && s != "https"
        {
            v.err(
                format!("{rf}.scheme"),
                "invalid redirect scheme, must be \"http\" or \"https\"",
            );
        }
        v.port(&format!("{rf}.port"), rd.port);
    }
    if let Some(dr) = &r.direct_response {
        if !(200..=599).contains(&dr.status) {
            v.err(
                format!("{f}.directResponse.status"),
                format!("HTTP status {} is not in range 200-599", dr.status),
            );
        }
        let size = dr.body.as_ref().map_or(0, |b| {
            b.string.as_ref().map_or(0, String::len) + b.bytes.as_ref().map_or(0, String::len)
        });
        if size > 1024 * 1024 {
            v.err(format!("{f}.directResponse.body"), "large direct_responses may impact control plane performance, must be less than 1MB");
        }
    }
    if let Some(rw) = &r.rewrite {
        let rf = format!("{f}.rewrite");
        if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
            v.err(
                &rf,
                "rewrite may only contain one of URI or UriRegexRewrite",
            );
        }
        if rw.uri.is_none() && rw.uri_regex_rewrite.is_none() && rw.authority.is_none() {
            v.err(
                &rf,
                "rewrite must specify at least one of URI, UriRegexRewrite, or authority",
            );
        }
        if let Some(rr) = &rw.uri_regex_rewrite {
            v.regex(&format!("{rf}.uriRegexRewrite.match"), &rr.pattern);
        }
    }
    if let Some(c) = &r.cors_policy {
        let cf = format!("{f}.corsPolicy");
        for (i, o) in c.allow_origins.iter().enumerate() {
            let empty = o
                .exact
                .as_deref()
                .or(o.prefix.as_deref())
                .or(o.regex.as_deref())
                .unwrap_or("")
                .is_empty();
            if empty {
                v.err(
                    format!("{cf}.allowOrigins[{i}]"),
                    "'' is not a valid match type for CORS allow origins",
                );
            }
            v.string_match(&format!("{cf}.allowOrigins[{i}]"), Some(o), false);
        }
        for m in &c.allow_methods {
            if !CORS_METHODS.contains(&m.as_str()) {
                v.err(
                    format!("{cf}.allowMethods"),
                    format!("{m:?} is not a supported HTTP method"),
                );
            }
        }
        v.duration(&format!("{cf}.maxAge"), c.max_age.as_ref());
        if let Some(age) = &c.max_age
            && age.0.subsec_nanos() != 0
        {
            v.err(
                format!("{cf}.maxAge"),
                "max_age duration is accurate only to seconds precision",
            );
        }
    }
}

/// RFC 7230 token characters.
fn header_name(v: &mut V, field: &str, name: &str) {
    let ok = !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || b"!#$%&'*+-.^_`|~".contains(&b)
                || b == b':' && name.starts_with(':')
        });
    if !ok {
        v.err(
            field,
            format!("header name {name:?} is not a valid HTTP header name"),
        );
    }
}

pub fn destination_rule(dr: &DestinationRuleSpec) -> Vec<Violation> {
    let mut v = V::default();
    if dr.host.is_empty() {
        v.err("spec.host", "host is required");
    } else if let Err(e) = wildcard_domain(&dr.host) {
        v.err("spec.host", e);
    }
    if let Some(tp) = &dr.traffic_policy {
        traffic_policy(&mut v, "spec.trafficPolicy", tp, true);
    }
    let mut names = BTreeSet::new();
    for (i, s) in dr.subsets.iter().enumerate() {
        let f = format!("spec.subsets[{i}]");
        if s.name.is_empty() {
            v.err(format!("{f}.name"), "subset name cannot be empty");
        } else if !is_dns1123_label(&s.name) {
            v.err(
                format!("{f}.name"),
                format!("subset name is invalid: {:?}", s.name),
            );
        } else if !names.insert(s.name.as_str()) {
            v.err(
                format!("{f}.name"),
                format!("duplicate subset names: {}", s.name),
            );
        }
        if let Some(tp) = &s.traffic_policy {
            traffic_policy(&mut v, &format!("{f}.trafficPolicy"), tp, true);
        }
    }
    v.out
}

fn traffic_policy(v: &mut V, f: &str, tp: &TrafficPolicy, allow_ports: bool) {
    if let Some(lb) = &tp.load_balancer {
        load_balancer(v, &format!("{f}.loadBalancer"), lb);
    }
    if let Some(cp) = &tp.connection_pool {
        connection_pool(v, &format!("{f}.connectionPool"), cp);
    }
    if let Some(od) = &tp.outlier_detection {
        outlier_detection(v, &format!("{f}.outlierDetection"), od);
    }
    if !allow_ports && !tp.port_level_settings.is_empty() {
        v.err(
            format!("{f}.portLevelSettings"),
            "port level settings are not allowed here",
        );
    }
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        let pf = format!("{f}.portLevelSettings[{i}]");
        match p.port.as_ref().and_then(|p| p.number) {
            None => v.err(format!("{pf}.port"), "port must be specified"),
            n => v.port(&format!("{pf}.port.number"), n),
        }
        if let Some(lb) = &p.load_balancer {
            load_balancer(v, &format!("{pf}.loadBalancer"), lb);
        }
        if let Some(cp) = &p.connection_pool {
            connection_pool(v, &format!("{pf}.connectionPool"), cp);
        }
        if let Some(od) = &p.outlier_detection {
            outlier_detection(v, &format!("{pf}.outlierDetection"), od);
        }
    }
}

fn load_balancer(v: &mut V, f: &str, lb: &LoadBalancerSettings) {
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        v.err(f, "only one of simple or consistentHash may be set");
    }
    if let Some(ch) = &lb.consistent_hash {
        let keys = [
            ch.http_header_name.is_some(),
            ch.http_cookie.is_some(),
            ch.use_source_ip == Some(true),
            ch.http_query_parameter_name.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if keys != 1 {
            v.err(
                format!("{f}.consistentHash"),
                "exactly one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName must be set",
            );
        }
        if let Some(c) = &ch.http_cookie
            && c.name.is_empty()
        {
            v.err(
                format!("{f}.consistentHash.httpCookie.name"),
                "name required for HttpCookie",
            );
        }
    }
}

fn connection_pool(v: &mut V, f: &str, cp: &ConnectionPoolSettings) {
    if cp.tcp.is_none() && cp.http.is_none() {
        v.err(f, "must have at least one field");
    }
    if let Some(h) = &cp.http {
        let hf = format!("{f}.http");
        for (name, val) in [
            ("http1MaxPendingRequests", h.http1_max_pending_requests),
            ("http2MaxRequests", h.http2_max_requests),
            ("maxRequestsPerConnection", h.max_requests_per_connection),
            ("maxRetries", h.max_retries),
            ("maxConcurrentStreams", h.max_concurrent_streams),
        ] {
            if val.is_some_and(|n| n < 0) {
                v.err(format!("{hf}.{name}"), format!("{name} cannot be negative"));
            }
        }
        v.duration(&format!("{hf}.idleTimeout"), h.idle_timeout.as_ref());
    }
    if let Some(t) = &cp.tcp {
        let tf = format!("{f}.tcp");
        if t.max_connections.is_some_and(|n| n < 0) {
            v.err(
                format!("{tf}.maxConnections"),
                "max connections must be non-negative",
            );
        }
        v.duration(&format!("{tf}.connectTimeout"), t.connect_timeout.as_ref());
        v.duration(
            &format!("{tf}.maxConnectionDuration"),
            t.max_connection_duration.as_ref(),
        );
        v.duration(&format!("{tf}.idleTimeout"), t.idle_timeout.as_ref());
        if let Some(k) = &t.tcp_keepalive {
            v.duration(&format!("{tf}.tcpKeepalive.time"), k.time.as_ref());
            v.duration(&format!("{tf}.tcpKeepalive.interval"), k.interval.as_ref());
        }
    }
}

fn outlier_detection(v: &mut V, f: &str, od: &OutlierDetection) {
    if od.consecutive_errors.is_some_and(|n| n < 0) {
        v.err(
            format!("{f}.consecutiveErrors"),
            "consecutive errors cannot be negative",
        );
    }
    v.duration(&format!("{f}.interval"), od.interval.as_ref());
    v.duration(
        &format!("{f}.baseEjectionTime"),
        od.base_ejection_time.as_ref(),
    );
    for (name, val) in [
        ("maxEjectionPercent", od.max_ejection_percent),
        ("minHealthPercent", od.min_health_percent),
    ] {
        if let Some(p) = val
            && !(0..=100).contains(&p)
        {
            v.err(
                format!("{f}.{name}"),
                format!("{name} {p} must be in range [0, 100]"),
            );
        }
    }
}

pub fn gateway(gw: &GatewaySpec) -> Vec<Violation> {
    let mut v = V::default();
    if gw.servers.is_empty() {
        v.err("spec.servers", "gateway must have at least one server");
    }
    let mut names = BTreeSet::new();
    for (i, s) in gw.servers.iter().enumerate() {
        let f = format!("spec.servers[{i}]");
        match &s.port {
            None => v.err(format!("{f}.port"), "port is required"),
            Some(p) => {
                v.port(&format!("{f}.port.number"), Some(p.number));
                if p.protocol.is_empty() {
                    v.err(format!("{f}.port.protocol"), "protocol must be set");
                }
                if p.name.is_empty() {
                    v.err(format!("{f}.port.name"), "port name must be set");
                } else if !names.insert(p.name.as_str()) {
                    v.err(
                        format!("{f}.port.name"),
                        format!(
                            "port names in servers must be unique: duplicate name {}",
                            p.name
                        ),
                    );
                }
            }
        }
        if s.hosts.is_empty() {
            v.err(
                format!("{f}.hosts"),
                "server config must contain at least one host",
            );
        }
        for (j, h) in s.hosts.iter().enumerate() {
            let host = h.split_once('/').map_or(h.as_str(), |(_, h)| h);
            if let Err(e) = wildcard_domain(host) {
                v.err(format!("{f}.hosts[{j}]"), e);
            }
        }
        let https = s
            .port
            .as_ref()
            .is_some_and(|p| p.protocol.eq_ignore_ascii_case("HTTPS"));
        if https && s.tls.is_none() {
            v.err(
                format!("{f}.tls"),
                "server must have TLS settings for HTTPS/TLS protocols",
            );
        }
        if let Some(t) = &s.tls {
            use super::networking::ServerTlsMode::{Mutual, OptionalMutual, Simple};
            if matches!(t.mode, Some(Simple | Mutual | OptionalMutual))
                && t.credential_name.is_none()
                && t.credential_names.is_empty()
                && (t.server_certificate.is_none() || t.private_key.is_none())
            {
                v.err(
                    format!("{f}.tls"),
                    "SIMPLE and MUTUAL TLS need credentialName, or serverCertificate and privateKey",
                );
            }
        }
    }
    v.out
}

pub fn service_entry(se: &ServiceEntrySpec) -> Vec<Violation> {
    use super::networking::Resolution;
    let mut v = V::default();
    if se.hosts.is_empty() {
        v.err("spec.hosts", "service entry must have at least one host");
    }
    for (i, h) in se.hosts.iter().enumerate() {
        if h == "*" {
            v.err(format!("spec.hosts[{i}]"), "invalid host *");
        } else if let Err(e) = wildcard_domain(h) {
            v.err(format!("spec.hosts[{i}]"), e);
        }
    }
    for (i, a) in se.addresses.iter().enumerate() {
        subnet(&mut v, &format!("spec.addresses[{i}]"), a);
    }
    if se.ports.is_empty() && se.workload_selector.is_none() {
        v.err("spec.ports", "service entry must have at least one port");
    }
    for (i, p) in se.ports.iter().enumerate() {
        v.port(&format!("spec.ports[{i}].number"), Some(p.number));
        if p.name.is_empty() {
            v.err(format!("spec.ports[{i}].name"), "port name must be set");
        }
    }
    if se.resolution == Some(Resolution::Static)
        && se.endpoints.is_empty()
        && se.workload_selector.is_none()
    {
        v.err(
            "spec.endpoints",
            "endpoints must be provided if service entry resolution mode is STATIC",
        );
    }
    if !se.endpoints.is_empty() && se.workload_selector.is_some() {
        v.err(
            "spec",
            "only one of endpoints or workloadSelector can be set",
        );
    }
    v.out
}

pub fn peer_authentication(pa: &PeerAuthenticationSpec) -> Vec<Violation> {
    let mut v = V::default();
    let no_selector = pa
        .selector
        .as_ref()
        .is_none_or(|s| s.match_labels.is_empty());
    if no_selector && !pa.port_level_mtls.is_empty() {
        v.err(
            "spec.portLevelMtls",
            "mesh/namespace peer authentication cannot have port level mTLS (port-level settings need a selector)",
        );
    }
    for port in pa.port_level_mtls.keys() {
        if !(1..=65535).contains(&port.0) {
            v.err(
                format!("spec.portLevelMtls.{}", port.0),
                "port must be in range 1..65535",
            );
        }
    }
    v.out
}

pub fn authorization_policy(ap: &AuthorizationPolicySpec) -> Vec<Violation> {
    let mut v = V::default();
    let custom = ap.action == Some(AuthorizationAction::Custom);
    if custom && ap.provider.is_none() {
        v.err(
            "spec.provider",
            "must specify provider when using CUSTOM action",
        );
    }
    if !custom && ap.provider.is_some() {
        v.err(
            "spec.provider",
            "must not specify provider when not using CUSTOM action",
        );
    }
    if ap.selector.is_some() && (ap.target_ref.is_some() || !ap.target_refs.is_empty()) {
        v.err(
            "spec",
            "only one of targetRefs or workload selector can be set",
        );
    }
    if ap.action == Some(AuthorizationAction::Deny) && ap.rules.is_empty() {
        v.err(
            "spec.rules",
            "DENY action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request",
        );
    }
    for (i, r) in ap.rules.iter().enumerate() {
        let f = format!("spec.rules[{i}]");
        for (j, from) in r.from.iter().enumerate() {
            match &from.source {
                None => v.err(format!("{f}.from[{j}]"), "`from.source` must not be nil"),
                Some(s) => {
                    let identities = s.principals.len()
                        + s.not_principals.len()
                        + s.namespaces.len()
                        + s.not_namespaces.len();
                    let accounts = s.service_accounts.len() + s.not_service_accounts.len();
                    if identities > 0 && accounts > 0 {
                        v.err(
                            format!("{f}.from[{j}].source"),
                            "cannot set serviceAccounts with namespaces or principals",
                        );
                    }
                    if *s == Source::default() {
                        v.err(
                            format!("{f}.from[{j}].source"),
                            "`from.source` must not be empty",
                        );
                    }
                    for (k, b) in s
                        .ip_blocks
                        .iter()
                        .chain(&s.not_ip_blocks)
                        .chain(&s.remote_ip_blocks)
                        .chain(&s.not_remote_ip_blocks)
                        .enumerate()
                    {
                        subnet(&mut v, &format!("{f}.from[{j}].source.ipBlocks[{k}]"), b);
                    }
                }
            }
        }
        for (j, to) in r.to.iter().enumerate() {
            match &to.operation {
                None => v.err(format!("{f}.to[{j}]"), "`to.operation` must not be nil"),
                Some(o) => {
                    if *o == Operation::default() {
                        v.err(
                            format!("{f}.to[{j}].operation"),
                            "`to.operation` must not be empty",
                        );
                    }
                    for p in o.ports.iter().chain(&o.not_ports) {
                        if !p.parse::<u32>().is_ok_and(|n| (1..=65535).contains(&n)) {
                            v.err(
                                format!("{f}.to[{j}].operation.ports"),
                                format!("invalid port {p:?}"),
                            );
                        }
                    }
                }
            }
        }
        for (j, c) in r.when.iter().enumerate() {
            if c.key.is_empty() {
                v.err(format!("{f}.when[{j}].key"), "`key` must not be empty");
            }
            if c.values.is_empty() && c.not_values.is_empty() {
                v.err(
                    format!("{f}.when[{j}]"),
                    "at least one of `values` or `notValues` must be set",
                );
            }
        }
    }
    v.out
}
