use std::{collections::BTreeMap, net::SocketAddr};

use super::{Authz, Connection, Denial};
use crate::{config::objects::Objects, identity::Identity};

fn compiled(yaml: &str) -> Authz {
    let mut objects = Objects::default();
    objects.add_text("test.yaml", yaml);
    assert!(objects.errors.is_empty(), "{:?}", objects.errors);
    Authz::compile(&objects, "istio-system")
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A client: its address, and its namespace and service account when it came through mTLS.
struct Client {
    ip: &'static str,
    identity: Option<Identity>,
}

fn mtls(ip: &'static str, ns: &str, sa: &str) -> Client {
    Client {
        ip,
        identity: Some(Identity::new("cluster.local", ns, sa)),
    }
}

fn plain(ip: &'static str) -> Client {
    Client { ip, identity: None }
}

/// The decision for `client` reaching `app=<app>` in `ns` at `dst`.
fn check(a: &Authz, ns: &str, app: &str, client: &Client, dst: &str) -> Result<(), Denial> {
    let conn = Connection {
        source: client.ip.parse().expect("ip"),
        destination: dst.parse::<SocketAddr>().expect("addr"),
        identity: client.identity.as_ref(),
    };
    a.check(ns, &labels(&[("app", app)]), &conn)
}

const DST: &str = "10.0.0.9:8080";

#[test]
fn without_policies_everything_is_allowed() {
    let a = compiled("");
    assert_eq!(check(&a, "prod", "web", &plain("10.0.0.1"), DST), Ok(()));
}

#[test]
fn an_allow_policy_admits_only_what_it_matches() {
    let a = compiled(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-frontend, namespace: prod}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/prod/sa/frontend"]}
"#,
    );
    let ok = mtls("10.0.0.1", "prod", "frontend");
    let other = mtls("10.0.0.2", "prod", "batch");
    assert_eq!(check(&a, "prod", "web", &ok, DST), Ok(()));
    assert_eq!(
        check(&a, "prod", "web", &other, DST),
        Err(Denial::NotAllowed)
    );
    assert_eq!(
        check(&a, "prod", "web", &plain("10.0.0.1"), DST),
        Err(Denial::NotAllowed),
        "plaintext has no principal"
    );
    // The selector leaves other workloads, and other namespaces, alone.
    assert_eq!(check(&a, "prod", "db", &other, DST), Ok(()));
    assert_eq!(check(&a, "dev", "web", &other, DST), Ok(()));
}

#[test]
fn deny_wins_over_allow_and_an_empty_allow_denies_everything() {
    let a = compiled(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: prod}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all-web, namespace: prod}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-dev, namespace: prod}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: ["dev"]}
"#,
    );
    let dev = mtls("10.0.0.1", "dev", "default");
    let prod = mtls("10.0.0.2", "prod", "default");
    assert_eq!(check(&a, "prod", "web", &prod, DST), Ok(()));
    assert_eq!(
        check(&a, "prod", "web", &dev, DST),
        Err(Denial::Denied {
            policy: "prod/no-dev".into()
        })
    );
    assert_eq!(
        check(&a, "prod", "db", &prod, DST),
        Err(Denial::NotAllowed),
        "only allow-nothing applies to db"
    );
}

#[test]
fn root_namespace_policies_reach_every_namespace() {
    let a = compiled(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-plaintext, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from:
    - source: {notPrincipals: ["*"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-port, namespace: istio-system}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules:
  - to:
    - operation: {notPorts: ["5432"]}
"#,
    );
    let c = mtls("10.0.0.1", "a", "x");
    assert!(check(&a, "any", "web", &plain("10.0.0.1"), DST).is_err());
    assert_eq!(check(&a, "any", "web", &c, DST), Ok(()));
    assert!(check(&a, "other", "db", &c, DST).is_err());
    assert_eq!(check(&a, "other", "db", &c, "10.0.0.9:5432"), Ok(()));
}

#[test]
fn fields_within_a_source_all_hold_and_sources_are_alternatives() {
    let a = compiled(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: prod}
spec:
  rules:
  - from:
    - source:
        namespaces: ["prod"]
        ipBlocks: ["10.1.0.0/16"]
    - source:
        serviceAccounts: ["ops/admin", "robot"]
    to:
    - operation: {ports: ["8080"]}
"#,
    );
    let inside = mtls("10.1.2.3", "prod", "any");
    let outside = mtls("10.2.2.3", "prod", "any");
    assert_eq!(check(&a, "prod", "web", &inside, DST), Ok(()));
    assert!(check(&a, "prod", "web", &outside, DST).is_err());
    assert!(
        check(&a, "prod", "web", &inside, "10.0.0.9:9090").is_err(),
        "the to clause holds too"
    );
    assert_eq!(
        check(&a, "prod", "web", &mtls("10.9.9.9", "ops", "admin"), DST),
        Ok(())
    );
    assert_eq!(
        check(&a, "prod", "web", &mtls("10.9.9.9", "prod", "robot"), DST),
        Ok(()),
        "a bare service account is the policy's namespace's"
    );
    assert!(check(&a, "prod", "web", &mtls("10.9.9.9", "ops", "robot"), DST).is_err());
}

#[test]
fn principal_patterns_and_when_conditions() {
    let a = compiled(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: prod}
spec:
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/team-*"]}
    when:
    - key: destination.port
      notValues: ["9000"]
    - key: source.ip
      values: ["10.0.0.0/8"]
"#,
    );
    let team = mtls("10.0.0.1", "team-a", "x");
    assert_eq!(check(&a, "prod", "web", &team, DST), Ok(()));
    assert!(check(&a, "prod", "web", &team, "10.0.0.9:9000").is_err());
    assert!(check(&a, "prod", "web", &mtls("192.168.0.1", "team-a", "x"), DST).is_err());
    assert!(check(&a, "prod", "web", &mtls("10.0.0.1", "ops", "x"), DST).is_err());
}

#[test]
fn http_attributes_make_allow_rules_vanish_and_deny_rules_broader() {
    let a = compiled(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: prod}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/prod/sa/frontend"]}
    to:
    - operation: {methods: ["GET"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-delete, namespace: prod}
spec:
  selector: {matchLabels: {app: api}}
  action: DENY
  rules:
  - to:
    - operation: {methods: ["DELETE"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-dev-posts, namespace: prod}
spec:
  selector: {matchLabels: {app: store}}
  action: DENY
  rules:
  - from:
    - source: {namespaces: ["dev"]}
    when:
    - key: request.headers[x-debug]
      values: ["1"]
"#,
    );
    let frontend = mtls("10.0.0.1", "prod", "frontend");
    assert_eq!(
        check(&a, "prod", "web", &frontend, DST),
        Err(Denial::NotAllowed),
        "an ALLOW rule with methods never holds on a connection"
    );
    assert!(
        check(&a, "prod", "api", &frontend, DST).is_err(),
        "a DENY of only HTTP attributes denies every connection"
    );
    assert!(check(&a, "prod", "store", &mtls("10.0.0.1", "dev", "x"), DST).is_err());
    assert_eq!(
        check(&a, "prod", "store", &frontend, DST),
        Ok(()),
        "the DENY keeps its L4 part"
    );
    let web = labels(&[("app", "web")]);
    let get_only = a
        .applying("prod", &web)
        .find(|p| p.name == "prod/get-only")
        .expect("compiled");
    assert!(get_only.rules.is_empty());
    assert_eq!(get_only.http_attributes, vec!["methods".to_owned()]);
}

#[test]
fn custom_fails_closed_audit_and_target_refs_decide_nothing_dry_run_is_not_enforced() {
    let a = compiled(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: prod}
spec:
  selector: {matchLabels: {app: web}}
  action: CUSTOM
  provider: {name: opa}
  rules:
  - to:
    - operation: {ports: ["8080"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: prod}
spec:
  action: AUDIT
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint, namespace: prod}
spec:
  targetRefs: [{kind: Service, group: "", name: db}]
  action: DENY
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: trial
  namespace: prod
  annotations: {istio.io/dry-run: "true"}
spec:
  action: DENY
  rules: [{}]
"#,
    );
    let c = mtls("10.0.0.1", "prod", "x");
    assert_eq!(
        check(&a, "prod", "web", &c, DST),
        Err(Denial::Custom {
            policy: "prod/ext".into()
        })
    );
    assert_eq!(check(&a, "prod", "web", &c, "10.0.0.9:9090"), Ok(()));
    assert_eq!(check(&a, "prod", "db", &c, DST), Ok(()));
}
