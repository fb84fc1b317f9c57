use super::*;

fn run(yaml: &str, namespace: Option<&str>) -> Vec<Message> {
    let mut o = Objects::default();
    o.add_text("t.yaml", yaml);
    analyze(
        &o,
        &Options {
            namespace,
            cluster_domain: "cluster.local",
        },
    )
}

fn codes(m: &[Message]) -> Vec<(&'static str, Level)> {
    m.iter()
        .filter(|m| m.code != "SL0002")
        .map(|m| (m.code, m.level))
        .collect()
}

const CLUSTER: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: production, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: api-server, namespace: production}
spec: {ports: [{name: http, port: 8080}]}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: api-server, namespace: production}
spec:
  host: api-server
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
";

#[test]
fn a_consistent_configuration_reports_only_what_is_not_enforced() {
    let vs = "
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: api-server, namespace: production}
spec:
  hosts: [api-server]
  http:
  - route:
    - {destination: {host: api-server, subset: v1}, weight: 90}
    - {destination: {host: api-server.production.svc.cluster.local, subset: v2}, weight: 10}
";
    let m = run(&format!("{CLUSTER}{vs}"), None);
    assert_eq!(codes(&m), vec![], "{m:#?}");
    assert!(m.iter().all(|m| m.level == Level::Info));
}

#[test]
fn missing_host_and_subset_are_ist0101() {
    let vs = "
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: api-server, namespace: production}
spec:
  hosts: [api-server]
  http:
  - route:
    - {destination: {host: api-server, subset: v3}}
  - route:
    - {destination: {host: ratings}}
";
    let m = run(&format!("{CLUSTER}{vs}"), None);
    assert_eq!(
        codes(&m),
        vec![("IST0101", Level::Error), ("IST0101", Level::Error)],
        "{m:#?}"
    );
    assert!(
        m.iter().any(|x| x.message.contains("\"api-server+v3\"")),
        "{m:#?}"
    );
    assert!(
        m.iter()
            .any(|x| x.message.contains("ratings.production.svc.cluster.local")),
        "{m:#?}"
    );
}

#[test]
fn two_virtual_services_for_one_host_are_ist0109_on_both() {
    let vs = |name: &str, host: &str| {
        format!(
            "
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: production}}
spec:
  hosts: [{host}]
  http: [{{route: [{{destination: {{host: api-server}}}}]}}]
"
        )
    };
    let m = run(
        &format!(
            "{CLUSTER}{}{}",
            vs("a", "api-server"),
            vs("b", "api-server.production.svc.cluster.local")
        ),
        None,
    );
    let conflicts: Vec<&Message> = m.iter().filter(|m| m.code == "IST0109").collect();
    assert_eq!(conflicts.len(), 2, "{m:#?}");
    assert!(
        conflicts[0]
            .message
            .contains("api-server.production.svc.cluster.local")
    );
}

#[test]
fn a_namespace_outside_the_mesh_is_ist0102_and_namespace_filter_applies() {
    let legacy = "
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: legacy}
spec: {ports: [{name: tcp, port: 5432}]}
";
    let m = run(&format!("{CLUSTER}{legacy}"), None);
    assert_eq!(codes(&m), vec![("IST0102", Level::Info)], "{m:#?}");
    let ist0102 = m.iter().find(|m| m.code == "IST0102").expect("IST0102");
    assert_eq!(ist0102.resource, "Namespace legacy");
    assert!(
        ist0102
            .message
            .contains("kubectl label namespace legacy sidelane.dev/mesh=enabled")
    );
    assert!(codes(&run(&format!("{CLUSTER}{legacy}"), Some("production"))).is_empty());
}

#[test]
fn rejected_objects_and_unknown_fields_are_reported() {
    let bad = "
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: bad, namespace: production}
spec:
  hosts: [api-server]
  http: [{route: [{destination: {host: api-server}}], timeout: forever}]
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: typo, namespace: production}
spec: {host: api-server, trafficPolicy: {loadBalancr: {simple: RANDOM}}}
";
    let m = run(&format!("{CLUSTER}{bad}"), None);
    let schema = m
        .iter()
        .find(|m| m.code == "IST0106")
        .expect("schema error");
    assert_eq!(schema.level, Level::Error);
    assert_eq!(schema.resource, "VirtualService production/bad");
    assert!(
        schema.message.starts_with("spec.http[0].timeout: "),
        "{schema}"
    );
    let unknown = m
        .iter()
        .find(|m| m.code == "SL0001")
        .expect("unknown field");
    assert!(
        unknown.message.contains("spec.trafficPolicy.loadBalancr"),
        "{unknown}"
    );
}

#[test]
fn settings_not_applied_yet_are_reported_field_by_field() {
    let vs = "
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: api-server, namespace: production}
spec:
  hosts: [api-server]
  http:
  - route: [{destination: {host: api-server, subset: v1}}]
    timeout: 5s
    retries: {attempts: 3, retryOn: 5xx}
    corsPolicy: {allowOrigins: [{exact: 'https://example.com'}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api-server, namespace: production}
spec:
  host: api-server
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    tls: {mode: SIMPLE}
  subsets:
  - name: v1
    labels: {version: v1}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: production}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: production}
spec: {}
";
    let m = run(&format!("{CLUSTER}{vs}"), None);
    let not_applied: Vec<&str> = m
        .iter()
        .filter(|m| m.code == "SL0002")
        .map(|m| m.message.split(':').next().unwrap_or(""))
        .collect();
    assert_eq!(
        not_applied,
        ["spec.trafficPolicy.tls (client TLS origination)"],
        "{m:#?}"
    );
    assert!(
        m.iter()
            .filter(|m| m.code == "SL0002")
            .all(|m| m.level == Level::Warning)
    );
}

#[test]
fn authorization_policies_say_what_a_connection_cannot_show() {
    let policies = "
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: production}
spec:
  rules:
  - to:
    - operation: {methods: [GET], ports: ['8080']}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: production}
spec:
  action: CUSTOM
  provider: {name: opa}
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint, namespace: production}
spec:
  targetRefs: [{kind: Service, group: '', name: reviews}]
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l4, namespace: production}
spec:
  action: DENY
  rules:
  - from:
    - source: {notNamespaces: [production]}
";
    let m = run(&format!("{CLUSTER}{policies}"), None);
    let about = |code: &str| -> Vec<&str> {
        m.iter()
            .filter(|m| m.code == code)
            .map(|m| m.resource.as_str())
            .collect()
    };
    assert_eq!(about("SL0003"), ["AuthorizationPolicy production/get-only"]);
    assert_eq!(about("SL0004"), ["AuthorizationPolicy production/ext"]);
    assert_eq!(about("SL0002"), ["AuthorizationPolicy production/waypoint"]);
    let http = m.iter().find(|m| m.code == "SL0003").expect("SL0003");
    assert!(
        http.message.contains("found: methods") && http.message.contains("omitted"),
        "{http:?}"
    );
}
