use super::*;
use crate::config::objects::Objects;

/// Two versions of api-server behind one Service, as the tutorial deploys them.
const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: production, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: api-v1, namespace: production, uid: 00000000-0000-4000-8000-000000000001, labels: {app: api-server, version: v1}}
spec: {containers: [{name: api, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-v2, namespace: production, uid: 00000000-0000-4000-8000-000000000002, labels: {app: api-server, version: v2}}
spec: {containers: [{name: api, image: x}]}
---
apiVersion: v1
kind: Service
metadata: {name: api-server, namespace: production}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-server-1, namespace: production, labels: {kubernetes.io/service-name: api-server}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.1.10]
  targetRef: {kind: Pod, uid: 00000000-0000-4000-8000-000000000001}
- addresses: [10.244.2.10]
  targetRef: {kind: Pod, uid: 00000000-0000-4000-8000-000000000002}
"#;

const HOST: &str = "api-server.production.svc.cluster.local";

fn routing(extra: &[&str]) -> Routing {
    let mut o = Objects::default();
    o.add_text("cluster.yaml", CLUSTER);
    for (i, t) in extra.iter().enumerate() {
        o.add_text(&format!("extra{i}.yaml"), t);
    }
    assert!(o.errors.is_empty(), "{:#?}", o.errors);
    compile(
        &o,
        &crate::state::SliceIndex::new(&o),
        "cluster.local",
        "istio-system",
    )
}

fn tutorial(f: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../demo/tutorial/{f}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("tutorial file")
}

fn clusters(vh: &VirtualHost, i: usize) -> Vec<(String, u32)> {
    match &vh.routes[i].action {
        RouteAction::Route(w) => w.iter().map(|w| (w.cluster.clone(), w.weight)).collect(),
        other => panic!("route {i} is {other:?}"),
    }
}

#[test]
fn the_tutorial_canary_compiles_to_three_routes_with_subset_clusters() {
    let r = routing(&[
        &tutorial("virtualservice.yaml"),
        &tutorial("destinationrule.yaml"),
    ]);
    let vh = r
        .virtual_host("production", HOST, 8080)
        .expect("virtual host");
    assert_eq!(vh.virtual_service.as_deref(), Some("production/api-server"));
    assert_eq!(vh.routes.len(), 3);
    assert!(matches!(&vh.routes[0].matches[0].uri, Some(Matcher::Prefix(p)) if p == "/api"));
    assert_eq!(
        clusters(&vh, 0),
        [
            (format!("outbound|8080|v1|{HOST}"), 90),
            (format!("outbound|8080|v2|{HOST}"), 10)
        ]
    );
    let (name, m) = &vh.routes[1].matches[0].headers[0];
    assert_eq!(name, "x-canary");
    assert!(
        m.as_ref()
            .is_some_and(|m| m.matches("true") && !m.matches("truex"))
    );
    assert_eq!(
        clusters(&vh, 2),
        [(format!("outbound|8080|v1|{HOST}"), 100)]
    );

    // Subset clusters hold the endpoints whose pods carry the subset's labels.
    let v1 = r.cluster("production", HOST, 8080, Some("v1")).expect("v1");
    let v2 = r.cluster("production", HOST, 8080, Some("v2")).expect("v2");
    assert_eq!(
        v1.endpoints
            .iter()
            .map(|e| e.addr.to_string())
            .collect::<Vec<_>>(),
        ["10.244.1.10:8080"]
    );
    assert_eq!(
        v2.endpoints
            .iter()
            .map(|e| e.addr.to_string())
            .collect::<Vec<_>>(),
        ["10.244.2.10:8080"]
    );
    assert_eq!(
        r.cluster("production", HOST, 8080, None)
            .expect("all")
            .endpoints
            .len(),
        2
    );
    // A subset no DestinationRule defines has no cluster (Envoy answers 503).
    assert!(r.cluster("production", HOST, 8080, Some("v3")).is_none());
    // Resolved once per snapshot: later requests share the first one's cluster, and a
    // different client namespace or subset is a different cluster.
    let again = r.cluster("production", HOST, 8080, Some("v1")).expect("v1");
    assert!(std::sync::Arc::ptr_eq(&v1, &again));
    assert!(!std::sync::Arc::ptr_eq(&v1, &v2));
    let other_ns = r.cluster("default", HOST, 8080, Some("v1"));
    assert!(other_ns.is_none_or(|c| !std::sync::Arc::ptr_eq(&v1, &c)));
}

#[test]
fn without_a_virtual_service_the_default_route_goes_to_the_whole_service() {
    let r = routing(&[]);
    let vh = r.virtual_host("production", HOST, 8080).expect("default");
    assert!(vh.virtual_service.is_none());
    assert_eq!(clusters(&vh, 0), [(format!("outbound|8080||{HOST}"), 100)]);
    assert!(r.virtual_host("production", HOST, 9999).is_none());
}

fn vs(name: &str, namespace: &str, extra: &str, subset: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  hosts: [api-server.production.svc.cluster.local]
  {extra}
  http: [{{route: [{{destination: {{host: api-server.production.svc.cluster.local, subset: {subset}}}}}]}}]
"
    )
}

#[test]
fn the_oldest_virtual_service_wins_a_shared_host_and_export_to_limits_visibility() {
    let r = routing(&[
        &vs("b-routes", "production", "", "v2"),
        &vs("a-routes", "production", "", "v1"),
    ]);
    let vh = r.virtual_host("production", HOST, 8080).expect("vh");
    // No creation times in files: name order decides, as Istio's tie-break does.
    assert_eq!(vh.virtual_service.as_deref(), Some("production/a-routes"));

    let r = routing(&[&vs("private", "production", "exportTo: [\".\"]", "v2")]);
    assert_eq!(
        r.virtual_host("production", HOST, 8080)
            .and_then(|v| v.virtual_service.clone())
            .as_deref(),
        Some("production/private")
    );
    assert!(
        r.virtual_host("frontend", HOST, 8080)
            .expect("default")
            .virtual_service
            .is_none()
    );
}

#[test]
fn destination_rules_come_from_the_client_namespace_first_then_the_service_then_root() {
    let dr = |ns: &str, subset_version: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api, namespace: {ns}}}
spec:
  host: api-server.production.svc.cluster.local
  subsets: [{{name: pick, labels: {{version: {subset_version}}}}}]
"
        )
    };
    let r = routing(&[
        &dr("frontend", "v2"),
        &dr("production", "v1"),
        &dr("istio-system", "v2"),
    ]);
    let addrs = |ns: &str| {
        r.cluster(ns, HOST, 8080, Some("pick"))
            .expect("cluster")
            .endpoints
            .iter()
            .map(|e| e.addr.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        addrs("frontend"),
        ["10.244.2.10:8080"],
        "client namespace first"
    );
    assert_eq!(
        addrs("backend"),
        ["10.244.1.10:8080"],
        "then the service's namespace"
    );
    let r = routing(&[&dr("istio-system", "v2")]);
    assert_eq!(
        r.cluster("backend", HOST, 8080, Some("pick"))
            .expect("root")
            .endpoints[0]
            .addr
            .to_string(),
        "10.244.2.10:8080",
        "then the root namespace"
    );
}

#[test]
fn short_names_resolve_in_the_virtual_services_namespace_and_delegates_inline() {
    let root = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: root, namespace: production}
spec:
  hosts: [api-server]
  http:
  - match: [{uri: {prefix: /api}}]
    delegate: {name: api-routes, namespace: production}
  - route: [{destination: {host: api-server}}]
";
    let delegate = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api-routes, namespace: production}
spec:
  http:
  - match: [{headers: {x-canary: {exact: \"true\"}}}]
    route: [{destination: {host: api-server, subset: v2}}]
  - route: [{destination: {host: api-server, subset: v1}}]
";
    let r = routing(&[root, delegate]);
    let vh = r.virtual_host("production", HOST, 8080).expect("vh");
    assert_eq!(vh.routes.len(), 3, "{vh:#?}");
    // The delegate's first route keeps the root's /api prefix and adds its header match.
    let m = &vh.routes[0].matches[0];
    assert!(matches!(&m.uri, Some(Matcher::Prefix(p)) if p == "/api"));
    assert_eq!(m.headers[0].0, "x-canary");
    assert_eq!(
        clusters(&vh, 0),
        [(format!("outbound|8080|v2|{HOST}"), 100)]
    );
    assert!(matches!(&vh.routes[1].matches[0].uri, Some(Matcher::Prefix(p)) if p == "/api"));
    assert_eq!(clusters(&vh, 2), [(format!("outbound|8080||{HOST}"), 100)]);
}

#[test]
fn regex_matches_the_whole_value_as_envoy_does() {
    let m = Matcher::compile(
        &crate::config::istio::types::StringMatch {
            regex: Some("/api/v[0-9]+".into()),
            ..Default::default()
        },
        false,
    )
    .expect("regex");
    assert!(m.matches("/api/v2"));
    assert!(!m.matches("/api/v2/users"));
}

#[test]
fn the_tutorial_resilience_and_mirror_virtual_services_compile() {
    let r = routing(&[&tutorial("virtualservice-resilience.yaml")]);
    let vh = r.virtual_host("production", HOST, 8080).expect("vh");
    let route = &vh.routes[0];
    assert_eq!(clusters(&vh, 0), [(format!("outbound|8080||{HOST}"), 100)]);
    assert_eq!(route.timeout.map(|t| t.0.as_secs()), Some(30));
    let retry = route.retry.as_ref().expect("retries");
    assert_eq!(retry.attempts, 3);
    assert_eq!(retry.per_try_timeout.map(|t| t.as_secs()), Some(10));
    assert!(retry.on.connect_failure && retry.on.retriable_4xx && !retry.on.server_error);

    let r = routing(&[
        &tutorial("virtualservice-mirror.yaml"),
        &tutorial("destinationrule.yaml"),
    ]);
    let vh = r.virtual_host("production", HOST, 8080).expect("vh");
    assert_eq!(
        clusters(&vh, 0),
        [(format!("outbound|8080|v1|{HOST}"), 100)]
    );
    let (mirror, pct) = &vh.routes[0].mirrors[0];
    assert_eq!(mirror.cluster, format!("outbound|8080|v2|{HOST}"));
    assert_eq!(pct.map(|p| p.value), Some(100.0));
}

#[test]
fn tls_and_tcp_routes_compile_per_port_and_leave_http_to_the_default_route() {
    let r = routing(&[r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api-l4, namespace: production}
spec:
  hosts: [api-server, "*.example.com"]
  tls:
  - match: [{sniHosts: ["*.example.com"], port: 8080}]
    route: [{destination: {host: api-server, subset: v2}}]
  - match: [{sniHosts: [login.example.com], port: 9999}]
    route: [{destination: {host: api-server}}]
  tcp:
  - match: [{destinationSubnets: [10.96.0.0/16]}]
    route:
    - {destination: {host: api-server, subset: v1}, weight: 75}
    - {destination: {host: api-server, subset: v2}, weight: 25}
"#]);
    let vh = r
        .l4_virtual_host("production", HOST, 8080)
        .expect("L4 routes");
    // The second TLS route names only another port: it does not exist on 8080.
    assert_eq!(vh.tls.len(), 1);
    assert_eq!(vh.tls[0].matches[0].sni_hosts, ["*.example.com"]);
    assert_eq!(
        vh.tls[0].clusters[0].cluster,
        "outbound|8080|v2|api-server.production.svc.cluster.local"
    );
    assert_eq!(
        vh.tcp[0]
            .clusters
            .iter()
            .map(|c| c.weight)
            .collect::<Vec<_>>(),
        [75, 25]
    );
    // TLS routes come first only for TLS connections.
    assert_eq!(r.l4_routes("production", HOST, 8080, true).count(), 2);
    assert_eq!(r.l4_routes("production", HOST, 8080, false).count(), 1);
    // No http routes: HTTP on this port keeps the default route.
    let http = r
        .virtual_host("production", HOST, 8080)
        .expect("default route");
    assert_eq!(http.virtual_service, None);
}

#[test]
fn a_wildcard_destination_rule_applies_unless_one_names_the_host() {
    let wildcard = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: everything, namespace: production}
spec:
  host: "*.production.svc.cluster.local"
  subsets: [{name: v2, labels: {version: v2}}]
"#;
    let r = routing(&[wildcard]);
    let c = r
        .cluster("production", HOST, 8080, Some("v2"))
        .expect("the wildcard rule's subset");
    assert_eq!(c.endpoints.len(), 1);
    let r = routing(&[wildcard, &tutorial("destinationrule.yaml")]);
    let dr = r.destination_rule("production", HOST).expect("rule");
    assert_eq!(dr.rules, ["production/api-server"]);
}
