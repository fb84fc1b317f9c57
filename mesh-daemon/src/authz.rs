//! AuthorizationPolicy as the destination's node proxy enforces it on each connection it
//! delivers to a pod, with Istio's L4 semantics (as ztunnel applies them):
//!
//! - which policies apply: the root namespace's without a selector to every workload, with a
//!   selector to matching workloads in every namespace; a namespace's without a selector to
//!   its workloads, with one to its matching workloads; `targetRef(s)` policies are for
//!   waypoints and gateways, not for this proxy;
//! - the decision: a matching `CUSTOM` policy denies (there is no external authorizer to ask,
//!   so it fails closed), then a matching `DENY` denies, then if any `ALLOW` policy applies
//!   one of them must match; with none, the connection is allowed. `AUDIT` decides nothing.
//!   A policy annotated `istio.io/dry-run: "true"` is evaluated and logged, never enforced;
//! - what a rule can see: the source's proven identity (principal, namespace, service
//!   account), source and destination address, destination port. HTTP attributes (methods,
//!   paths, hosts, request principals, remote IPs, other `when` keys) are not visible on a
//!   connection: an `ALLOW` rule using them is dropped (it can never allow), and a `DENY` rule
//!   is kept without them, so it denies more than asked. This is Istio's fail-safe rule, and
//!   where Istio's ztunnel lets a DENY rule of only HTTP attributes match nothing (istio#61126),
//!   Sidelane lets it match everything, as a sidecar does on a TCP port.
//!
//! Rule structure: a policy matches when any rule does; a rule when every clause does (its
//! `from`, its `to`, each `when`); a clause when any of its alternatives does (an empty
//! clause always does); an alternative when every field it sets holds.
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
};

use serde::Serialize;

use crate::{
    config::{
        istio::{
            Resource,
            security::{
                AuthorizationAction, AuthorizationPolicySpec, Condition, Operation, Source,
            },
        },
        objects::Objects,
    },
    identity::Identity,
    routing::table::Cidr,
};

#[cfg(test)]
mod tests;

/// The annotation that makes a policy report what it would do instead of doing it.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Action {
    Allow,
    Deny,
    /// Would ask an external authorizer; none is configured, so a match denies.
    Custom,
}

impl Action {
    /// As Istio spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
            Self::Custom => "CUSTOM",
        }
    }
}

/// One AuthorizationPolicy as this proxy enforces it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    /// `namespace/name`.
    pub name: String,
    pub action: Action,
    /// `None`: every workload in scope (the namespace, or the mesh for the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    pub dry_run: bool,
    pub rules: Vec<Rule>,
    /// HTTP attributes the policy uses, which a connection cannot show: the policy is
    /// enforced without them (stricter than written).
    pub http_attributes: Vec<String>,
}

/// Every clause must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Rule {
    pub clauses: Vec<Clause>,
}

/// Any alternative may hold; none at all means the clause holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Clause {
    pub any_of: Vec<Match>,
}

/// Every field set must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Match {
    pub principals: Values<Text>,
    pub namespaces: Values<Text>,
    pub service_accounts: Values<ServiceAccount>,
    pub source_ips: Values<Cidr>,
    pub destination_ips: Values<Cidr>,
    pub destination_ports: Values<u16>,
}

/// A field's positive (`principals`) and negative (`notPrincipals`) values.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Values<T> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub any_of: Vec<T>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub none_of: Vec<T>,
}

impl<T> Default for Values<T> {
    fn default() -> Self {
        Self {
            any_of: Vec::new(),
            none_of: Vec::new(),
        }
    }
}

impl<T> Values<T> {
    fn new(any_of: Vec<T>, none_of: Vec<T>) -> Self {
        Self { any_of, none_of }
    }

    fn holds(&self, test: impl Fn(&T) -> bool) -> bool {
        (self.any_of.is_empty() || self.any_of.iter().any(&test)) && !self.none_of.iter().any(test)
    }
}

/// Istio's string patterns for principals and namespaces: `*` any non-empty value, `*x` a
/// suffix, `x*` a prefix, else exact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Text {
    Present,
    Prefix(String),
    Suffix(String),
    Exact(String),
}

impl Text {
    fn parse(s: &str) -> Self {
        if s == "*" {
            Self::Present
        } else if let Some(rest) = s.strip_prefix('*') {
            Self::Suffix(rest.to_owned())
        } else if let Some(rest) = s.strip_suffix('*') {
            Self::Prefix(rest.to_owned())
        } else {
            Self::Exact(s.to_owned())
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Present => !value.is_empty(),
            Self::Prefix(p) => value.starts_with(p.as_str()),
            Self::Suffix(s) => value.ends_with(s.as_str()),
            Self::Exact(e) => value == e,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

/// What a policy may look at in one connection.
pub struct Connection<'a> {
    pub source: IpAddr,
    pub destination: SocketAddr,
    /// The client's proven identity; `None` for plaintext.
    pub identity: Option<&'a Identity>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// A `DENY` policy matched.
    Denied { policy: String },
    /// A `CUSTOM` policy matched, and there is no external authorizer to ask.
    Custom { policy: String },
    /// `ALLOW` policies apply and none matched.
    NotAllowed,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Denied { policy } => write!(f, "denied by DENY policy {policy}"),
            Self::Custom { policy } => write!(
                f,
                "denied by CUSTOM policy {policy} (no external authorizer configured)"
            ),
            Self::NotAllowed => f.write_str("no ALLOW policy matched"),
        }
    }
}

impl Denial {
    /// The action of the policy that decided: `DENY`, `CUSTOM`, or `ALLOW` (none matched).
    pub fn action(&self) -> &'static str {
        match self {
            Self::Denied { .. } => Action::Deny,
            Self::Custom { .. } => Action::Custom,
            Self::NotAllowed => Action::Allow,
        }
        .as_str()
    }

    /// `namespace/name` of the policy that matched; empty when no ALLOW policy did.
    pub fn policy(&self) -> &str {
        match self {
            Self::Denied { policy } | Self::Custom { policy } => policy,
            Self::NotAllowed => "",
        }
    }

    /// Envoy's `response_code_details` for an RBAC refusal, for the access log.
    pub fn details(&self) -> String {
        match self {
            Self::Denied { policy } | Self::Custom { policy } => {
                format!("rbac_access_denied_matched_policy[{policy}]")
            }
            Self::NotAllowed => "rbac_access_denied_matched_policy[none]".to_owned(),
        }
    }
}

/// The AuthorizationPolicies of a snapshot, ready to decide per workload and connection.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Authz {
    policies: Vec<Policy>,
    /// Indexes into `policies`: the root namespace's (they reach every namespace).
    mesh: Vec<usize>,
    /// Indexes into `policies` per namespace other than the root.
    namespaces: HashMap<String, Vec<usize>>,
}

impl Authz {
    pub fn compile(objects: &Objects, root_namespace: &str) -> Self {
        let mut out = Self::default();
        for r in objects.authorization_policies.values() {
            let Some(policy) = convert(r) else {
                continue;
            };
            let index = out.policies.len();
            if r.namespace() == root_namespace {
                out.mesh.push(index);
            } else {
                out.namespaces
                    .entry(r.namespace().to_owned())
                    .or_default()
                    .push(index);
            }
            out.policies.push(policy);
        }
        out
    }

    /// The policies that apply to a workload in `namespace` with `labels`.
    pub fn applying<'a>(
        &'a self,
        namespace: &'a str,
        labels: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a Policy> + Clone + 'a {
        let local = self
            .namespaces
            .get(namespace)
            .map_or(&[][..], Vec::as_slice);
        self.mesh
            .iter()
            .chain(local)
            .filter_map(|&i| self.policies.get(i))
            .filter(move |p| {
                p.selector
                    .as_ref()
                    .is_none_or(|s| crate::state::selects(s, labels))
            })
    }

    /// Whether `conn` may reach the workload in `namespace` with `labels`. Dry-run policies
    /// are evaluated too, and what they would have done is logged.
    pub fn check(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        conn: &Connection<'_>,
    ) -> Result<(), Denial> {
        if self.policies.is_empty() {
            return Ok(());
        }
        let facts = Facts::of(conn);
        let applying = self.applying(namespace, labels);
        if applying.clone().any(|p| p.dry_run) {
            let would = decide(applying.clone().filter(|p| p.dry_run), &facts);
            tracing::info!(
                source = %conn.source,
                destination = %conn.destination,
                result = match &would { Ok(()) => "allowed".to_owned(), Err(d) => d.to_string() },
                "dry-run AuthorizationPolicy"
            );
        }
        decide(applying.filter(|p| !p.dry_run), &facts)
    }
}

/// A connection's facts in the form rules compare them.
struct Facts<'a> {
    conn: &'a Connection<'a>,
    /// `trust-domain/ns/<ns>/sa/<sa>` (Istio's principals carry no `spiffe://`), made only
    /// if a rule asks; empty for plaintext, so that only negative matches hold.
    principal: std::cell::OnceCell<String>,
    namespace: &'a str,
}

impl<'a> Facts<'a> {
    fn of(conn: &'a Connection<'a>) -> Self {
        Self {
            conn,
            principal: std::cell::OnceCell::new(),
            namespace: conn.identity.map_or("", |id| id.namespace.as_str()),
        }
    }

    fn principal(&self) -> &str {
        self.principal.get_or_init(|| {
            self.conn.identity.map_or_else(String::new, |id| {
                format!(
                    "{}/ns/{}/sa/{}",
                    id.trust_domain, id.namespace, id.service_account
                )
            })
        })
    }
}

/// CUSTOM, then DENY, then ALLOW, over the policies that apply.
fn decide<'p>(
    policies: impl Iterator<Item = &'p Policy> + Clone,
    facts: &Facts<'_>,
) -> Result<(), Denial> {
    let with = |action| policies.clone().filter(move |p| p.action == action);
    if let Some(p) = with(Action::Custom).find(|p| p.matches(facts)) {
        return Err(Denial::Custom {
            policy: p.name.clone(),
        });
    }
    if let Some(p) = with(Action::Deny).find(|p| p.matches(facts)) {
        return Err(Denial::Denied {
            policy: p.name.clone(),
        });
    }
    let mut allows = with(Action::Allow).peekable();
    if allows.peek().is_none() || allows.any(|p| p.matches(facts)) {
        Ok(())
    } else {
        Err(Denial::NotAllowed)
    }
}

impl Policy {
    fn matches(&self, facts: &Facts<'_>) -> bool {
        self.rules.iter().any(|r| {
            r.clauses
                .iter()
                .all(|c| c.any_of.is_empty() || c.any_of.iter().any(|m| m.matches(facts)))
        })
    }
}

impl Match {
    fn matches(&self, facts: &Facts<'_>) -> bool {
        let conn = facts.conn;
        self.destination_ports
            .holds(|p| *p == conn.destination.port())
            && self.source_ips.holds(|c| c.contains(conn.source))
            && self
                .destination_ips
                .holds(|c| c.contains(conn.destination.ip()))
            && self.principals.holds(|t| t.matches(facts.principal()))
            && self.namespaces.holds(|t| t.matches(facts.namespace))
            && self.service_accounts.holds(|sa| {
                conn.identity
                    .is_some_and(|id| id.namespace == sa.namespace && id.service_account == sa.name)
            })
    }
}

/// The enforceable form of one policy; `None` for policies this proxy does not take part
/// in (`targetRef(s)`, `AUDIT`).
pub fn convert(r: &Resource<AuthorizationPolicySpec>) -> Option<Policy> {
    let spec = &r.spec;
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        return None;
    }
    let action = match spec.action.unwrap_or(AuthorizationAction::Allow) {
        AuthorizationAction::Allow => Action::Allow,
        AuthorizationAction::Deny => Action::Deny,
        AuthorizationAction::Custom => Action::Custom,
        AuthorizationAction::Audit => return None,
    };
    let mut http_attributes = Vec::new();
    let mut rules = Vec::new();
    for rule in &spec.rules {
        let mut found = Vec::new();
        let converted = convert_rule(rule, r.namespace(), &mut found);
        // An ALLOW rule that needs HTTP attributes can never be shown to hold.
        if found.is_empty() || action != Action::Allow {
            rules.push(converted);
        }
        for f in found {
            if !http_attributes.contains(&f) {
                http_attributes.push(f);
            }
        }
    }
    let selector = spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .filter(|l| !l.is_empty());
    let dry_run = r
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DRY_RUN_ANNOTATION))
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    Some(Policy {
        name: format!("{}/{}", r.namespace(), r.name()),
        action,
        selector,
        dry_run,
        rules,
        http_attributes,
    })
}

fn convert_rule(
    rule: &crate::config::istio::security::Rule,
    namespace: &str,
    http: &mut Vec<String>,
) -> Rule {
    let mut clauses = Vec::new();
    if !rule.from.is_empty() {
        let any_of = rule
            .from
            .iter()
            .filter_map(|f| f.source.as_ref())
            .map(|s| source(s, namespace, http))
            .collect();
        clauses.push(Clause { any_of });
    }
    if !rule.to.is_empty() {
        let any_of = rule
            .to
            .iter()
            .filter_map(|t| t.operation.as_ref())
            .map(|o| operation(o, http))
            .collect();
        clauses.push(Clause { any_of });
    }
    for c in &rule.when {
        clauses.push(Clause {
            any_of: vec![condition(c, http)],
        });
    }
    Rule { clauses }
}

fn note(http: &mut Vec<String>, name: &str, values: &[String]) {
    if !values.is_empty() {
        http.push(name.to_owned());
    }
}

fn texts(values: &[String]) -> Vec<Text> {
    values.iter().map(|v| Text::parse(v)).collect()
}

fn cidrs(values: &[String]) -> Vec<Cidr> {
    values.iter().filter_map(|v| Cidr::parse(v)).collect()
}

fn ports(values: &[String]) -> Vec<u16> {
    values.iter().filter_map(|v| v.parse().ok()).collect()
}

fn accounts(values: &[String], namespace: &str) -> Vec<ServiceAccount> {
    values
        .iter()
        .map(|v| match v.split_once('/') {
            Some((ns, sa)) => ServiceAccount {
                namespace: ns.to_owned(),
                name: sa.to_owned(),
            },
            None => ServiceAccount {
                namespace: namespace.to_owned(),
                name: v.clone(),
            },
        })
        .collect()
}

fn source(s: &Source, namespace: &str, http: &mut Vec<String>) -> Match {
    note(http, "requestPrincipals", &s.request_principals);
    note(http, "notRequestPrincipals", &s.not_request_principals);
    note(http, "remoteIpBlocks", &s.remote_ip_blocks);
    note(http, "notRemoteIpBlocks", &s.not_remote_ip_blocks);
    Match {
        principals: Values::new(texts(&s.principals), texts(&s.not_principals)),
        namespaces: Values::new(texts(&s.namespaces), texts(&s.not_namespaces)),
        service_accounts: Values::new(
            accounts(&s.service_accounts, namespace),
            accounts(&s.not_service_accounts, namespace),
        ),
        source_ips: Values::new(cidrs(&s.ip_blocks), cidrs(&s.not_ip_blocks)),
        ..Match::default()
    }
}

fn operation(o: &Operation, http: &mut Vec<String>) -> Match {
    note(http, "hosts", &o.hosts);
    note(http, "notHosts", &o.not_hosts);
    note(http, "methods", &o.methods);
    note(http, "notMethods", &o.not_methods);
    note(http, "paths", &o.paths);
    note(http, "notPaths", &o.not_paths);
    Match {
        destination_ports: Values::new(ports(&o.ports), ports(&o.not_ports)),
        ..Match::default()
    }
}

fn condition(c: &Condition, http: &mut Vec<String>) -> Match {
    let mut m = Match::default();
    match c.key.as_str() {
        "source.ip" => m.source_ips = Values::new(cidrs(&c.values), cidrs(&c.not_values)),
        "destination.ip" => {
            m.destination_ips = Values::new(cidrs(&c.values), cidrs(&c.not_values));
        }
        "destination.port" => {
            m.destination_ports = Values::new(ports(&c.values), ports(&c.not_values));
        }
        "source.namespace" => m.namespaces = Values::new(texts(&c.values), texts(&c.not_values)),
        "source.principal" => m.principals = Values::new(texts(&c.values), texts(&c.not_values)),
        // Every other key needs the request.
        key => http.push(key.to_owned()),
    }
    m
}
