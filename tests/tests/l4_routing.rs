//! End-to-end: connections the mesh does not parse as HTTP. VirtualService `tcp` routes by
//! port and source with weights, `tls` routes by the SNI of a real ClientHello, and ports
//! that declare no protocol, sniffed as Istio does (HTTP routed per request, the rest TCP).
use std::collections::BTreeMap;

use sidelane_tests::{Cluster, PodRef, ServicePortSpec, scenario};

const ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: backend, namespace: production}
spec:
  host: "*.production.svc.cluster.local"
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: production}
spec:
  hosts: [db]
  tcp:
  - match: [{port: 9000, sourceLabels: {app: sleep}}]
    route:
    - {destination: {host: db, subset: v1}, weight: 50}
    - {destination: {host: db, subset: v2}, weight: 50}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: secure, namespace: production}
spec:
  hosts: [secure, "*.example.com"]
  tls:
  - match: [{sniHosts: [a.example.com]}]
    route: [{destination: {host: secure, subset: v1}}]
  - match: [{sniHosts: ["*.b.example.com"]}]
    route: [{destination: {host: secure, subset: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: plain, namespace: production}
spec:
  hosts: [plain]
  http:
  - match: [{headers: {x-canary: {exact: "true"}}}]
    route: [{destination: {host: plain, subset: v2}}]
  - route: [{destination: {host: plain, subset: v1}}]
"#;

struct Setup {
    c: Cluster,
    client: PodRef,
}

/// v1 and v2 of one backend on node 2 behind three Services, a client on node 1.
fn setup() -> Setup {
    let (mut c, client) =
        scenario::production("backend", &[("backend-v1", "v1"), ("backend-v2", "v2")])
            .expect("cluster");
    let backend = [("app", "backend")];
    c.add_service(
        "production",
        "db",
        &backend,
        &[ServicePortSpec::new("tcp-db", 9000, 9000)],
    )
    .expect("db");
    c.add_service(
        "production",
        "secure",
        &backend,
        &[ServicePortSpec::new("tls", 9443, 9000)],
    )
    .expect("secure");
    // Port names Istio does not recognise: the protocol is sniffed.
    c.add_service(
        "production",
        "plain",
        &backend,
        &[
            ServicePortSpec::new("web", 8080, 8080),
            ServicePortSpec::new("data", 9000, 9000),
        ],
    )
    .expect("plain");
    c.write_file("routes.yaml", ROUTES).expect("routes");
    scenario::start(&mut c, client).expect("daemons");
    Setup { c, client }
}

impl Setup {
    fn vip(&self, service: &str) -> String {
        self.c
            .services
            .iter()
            .find(|s| s.name == service)
            .map(|s| s.vip4.clone())
            .expect("service")
    }

    /// The version that greeted each of `n` connections made with `options`.
    fn greeters(&self, addr: &str, options: &[&str], n: usize) -> BTreeMap<String, usize> {
        let mut t = BTreeMap::new();
        for _ in 0..n {
            let r = self.c.tcp_with(self.client, addr, options).expect("tcp");
            let got = r["received"].as_str().unwrap_or("");
            let version = got
                .lines()
                .next()
                .and_then(|l| l.split("version=").nth(1))
                .map_or_else(|| format!("no greeting: {r}"), str::to_owned);
            *t.entry(version).or_default() += 1;
        }
        t
    }
}

#[test]
fn tcp_routes_split_connections_by_weight_for_the_matching_source_and_port() {
    let s = setup();
    let addr = format!("{}:9000", s.vip("db"));
    let t = s.greeters(&addr, &["--send", "ping\\n"], 40);
    let (v1, v2) = (t.get("v1").copied(), t.get("v2").copied());
    // 50/50 over 40 connections: 20 each expected, standard deviation about 3.2.
    assert_eq!(v1.unwrap_or(0) + v2.unwrap_or(0), 40, "{t:?}");
    assert!(v1.is_some_and(|n| (6..=34).contains(&n)), "{t:?}");
    // Bytes still flow both ways on a routed connection.
    let r = s.c.tcp(s.client, &addr, "ping\\n").expect("tcp");
    assert!(
        r["received"].as_str().unwrap_or("").contains("echo:ping"),
        "{r}"
    );
    let log = s.c.daemon_log_with(1, &["outbound|9000|v2|db.production"]);
    assert!(log.contains("outbound|9000|v1|db.production"), "{log}");
}

#[test]
fn tls_routes_follow_the_client_hello_sni() {
    let s = setup();
    let addr = format!("{}:9443", s.vip("secure"));
    let a = s.greeters(&addr, &["--tls-sni", "a.example.com"], 10);
    assert_eq!(a, BTreeMap::from([("v1".to_owned(), 10)]));
    let b = s.greeters(&addr, &["--tls-sni", "api.b.example.com"], 10);
    assert_eq!(b, BTreeMap::from([("v2".to_owned(), 10)]));
    // No TLS route takes another name, and no tcp route exists: the Service's endpoints.
    let other = s.greeters(&addr, &["--tls-sni", "c.example.com"], 30);
    assert!(
        other.contains_key("v1") && other.contains_key("v2"),
        "{other:?}"
    );
}

#[test]
fn undeclared_ports_are_sniffed_http_routed_per_request_and_the_rest_tcp() {
    let s = setup();
    let url = format!("http://{}:8080/", s.vip("plain"));
    let canary =
        s.c.http(
            s.client,
            &url,
            &["--count", "10", "--header", "x-canary: true"],
        )
        .expect("http");
    assert!(
        canary.iter().all(|r| r["version"] == "v2"),
        "the header route did not apply: {canary:?}"
    );
    let default = s.c.http(s.client, &url, &["--count", "10"]).expect("http");
    assert!(default.iter().all(|r| r["version"] == "v1"), "{default:?}");
    // HTTP/2 with prior knowledge is recognised by its preface.
    let h2 =
        s.c.http(s.client, &url, &["--h2", "--header", "x-canary: true"])
            .expect("h2");
    assert_eq!(h2[0]["version"], "v2", "{h2:?}");
    assert_eq!(h2[0]["proto"], "HTTP/2.0", "{h2:?}");
    // Request metrics exist only because the mesh saw HTTP.
    let m = s.c.metrics(1).expect("metrics");
    assert!(
        m.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("destination_service=\"plain.production.svc.cluster.local\"")),
        "{m}"
    );
    // A client-first protocol that is not HTTP goes through as bytes.
    let r =
        s.c.tcp(s.client, &format!("{}:9000", s.vip("plain")), "hello\\n")
            .expect("tcp");
    let got = r["received"].as_str().unwrap_or("");
    assert!(got.contains("echo:hello") && got.ends_with("bye\n"), "{r}");
}
