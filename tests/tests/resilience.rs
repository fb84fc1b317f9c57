//! End-to-end: resilience with Istio's semantics. Workloads are told to fail, stall or
//! refuse (a pod whose server is not running refuses connections), and what the client
//! sees is checked: retries, per-try timeouts, load balancing, outlier ejection and return,
//! circuit-breaker overflow, and HTTP/2 upgrade.
use std::{collections::BTreeMap, time::Duration};

use serde_json::Value;
use sidelane_tests::{
    Cluster, PodRef, ServicePortSpec,
    scenario::{self, tutorial},
};

struct Setup {
    c: Cluster,
    client: PodRef,
    url: String,
}

/// api-server pods on node 2 (name, version, whether its server keeps running: one that
/// does not is still an endpoint, and refuses connections, as a crashed server would), a
/// client on node 1, and `config` (DestinationRule, VirtualService) applied before the
/// daemons start.
fn setup(pods: &[(&str, &str, bool)], config: &str) -> Setup {
    // Backends are the first pods added, in order.
    let backends: Vec<(&str, &str)> = pods.iter().map(|(n, v, _)| (*n, *v)).collect();
    let (mut c, client) = scenario::production("api-server", &backends).expect("cluster");
    for (i, (_, _, serving)) in pods.iter().enumerate() {
        if !serving {
            c.stop_server(PodRef(i));
        }
    }
    let url = scenario::http_service(&mut c, "api-server", "api-server", 8080).expect("service");
    // The same pods' raw TCP echo, for the TCP policies.
    c.add_service(
        "production",
        "db",
        &[("app", "api-server")],
        &[ServicePortSpec::new("tcp-db", 9000, 9000)],
    )
    .expect("tcp service");
    if !config.is_empty() {
        c.write_file("config.yaml", config).expect("config");
    }
    scenario::start(&mut c, client).expect("daemons");
    Setup { c, client, url }
}

impl Setup {
    fn get(&self, path: &str, args: &[&str]) -> Vec<Value> {
        self.c
            .http(self.client, &format!("{}{path}", self.url), args)
            .expect("http")
    }

    /// Replaces the applied configuration and waits until the daemon on node 1 routes by it
    /// (its compiled routing changed: a periodic resync alone bumps the generation).
    fn reconfigure(&self, config: &str) {
        let routing = || self.c.admin_json(1, "/config_dump").expect("dump")["routing"].clone();
        let before = routing();
        self.c.write_file("config.yaml", config).expect("config");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while routing() == before {
            assert!(std::time::Instant::now() < deadline, "config not reloaded");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Pod name (or status, or error) of each response, counted.
fn by_pod(responses: &[Value]) -> BTreeMap<String, usize> {
    scenario::tally(responses, "pod")
}

const DR_PLAIN: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api-server, namespace: production}
spec:
  host: api-server
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
";

#[test]
fn the_tutorial_retry_policy_recovers_refused_connections_and_leaves_503_alone() {
    let pods = [
        ("api-v1", "v1", true),
        ("api-v2", "v2", true),
        ("api-dead", "v1", false),
    ];
    let resilience = tutorial("virtualservice-resilience.yaml");
    let s = setup(&pods, &format!("{DR_PLAIN}---\n{resilience}"));
    // One endpoint in three refuses connections: connect-failure is retried elsewhere.
    let t = by_pod(&s.get("/", &["--count", "60"]));
    assert_eq!(
        t.get("api-v1").copied().unwrap_or(0) + t.get("api-v2").copied().unwrap_or(0),
        60,
        "{t:?}"
    );
    // Without retries the refusals reach the client as 503 (UF).
    let no_retries = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api-server, namespace: production}
spec:
  hosts: [api-server]
  http:
  - route: [{destination: {host: api-server}}]
    retries: {attempts: 0}
";
    s.reconfigure(&format!("{DR_PLAIN}---\n{no_retries}"));
    let t = by_pod(&s.get("/", &["--count", "30"]));
    assert_eq!(t.get("503").copied(), Some(10), "{t:?}");
    let log = s.c.daemon_log_with(1, &["503 UF"]);
    assert!(log.contains("\"GET / HTTP/1.1\" 503 UF"), "{log}");

    // v1 answers 503: the tutorial's conditions do not include it, so it reaches the client.
    s.c.behave(s.client, "api-v1", "status=503")
        .expect("v1 fails");
    s.reconfigure(&format!("{DR_PLAIN}---\n{resilience}"));
    let t = by_pod(&s.get("/", &["--count", "30"]));
    assert!(t.get("503").copied().unwrap_or(0) >= 5, "{t:?}");
    // retryOn 5xx turns each of them into a success from another endpoint.
    let on_5xx = resilience.replace(
        "retryOn: connect-failure,refused-stream,unavailable,cancelled,retriable-4xx",
        "retryOn: 5xx",
    );
    assert!(on_5xx.contains("retryOn: 5xx"), "{on_5xx}");
    s.reconfigure(&format!("{DR_PLAIN}---\n{on_5xx}"));
    let t = by_pod(&s.get("/", &["--count", "30"]));
    assert_eq!(t, BTreeMap::from([("api-v2".to_owned(), 30)]));
    let m = s.c.metrics(1).expect("metrics");
    assert!(
        m.lines()
            .any(|l| l.starts_with("sidelane_upstream_retries_total{") && !l.ends_with(" 0")),
        "{m}"
    );
}

#[test]
fn a_stalled_endpoint_costs_one_per_try_timeout_then_another_answers() {
    let vs = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api-server, namespace: production}
spec:
  hosts: [api-server]
  http:
  - route: [{destination: {host: api-server}}]
    timeout: 3s
    retries: {attempts: 2, perTryTimeout: 300ms, retryOn: 5xx}
";
    let s = setup(
        &[("api-v1", "v1", true), ("api-v2", "v2", true)],
        &format!("{DR_PLAIN}---\n{vs}"),
    );
    s.c.behave(s.client, "api-v1", "delay_ms=5000")
        .expect("v1 stalls");
    for r in s.get("/", &["--count", "6"]) {
        assert_eq!(r["pod"], "api-v2", "{r}");
        let ms = r["ms"].as_u64().unwrap_or(u64::MAX);
        // Either v2 at once, or v1's per-try timeout (300 ms) and then v2.
        assert!(ms < 1500, "took {ms} ms: {r}");
    }
}

#[test]
fn round_robin_spreads_evenly_and_a_hash_key_sticks_to_one_endpoint() {
    let pods = [
        ("api-a", "v1", true),
        ("api-b", "v1", true),
        ("api-c", "v1", true),
    ];
    let s = setup(&pods, DR_PLAIN);
    let t = by_pod(&s.get("/", &["--count", "300"]));
    for p in ["api-a", "api-b", "api-c"] {
        let n = t.get(p).copied().unwrap_or(0);
        assert!((95..=105).contains(&n), "{p} got {n} of 300: {t:?}");
    }
    let hashed = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api-server, namespace: production}
spec:
  host: api-server
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
";
    s.reconfigure(hashed);
    let mut homes = std::collections::BTreeSet::new();
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let t = by_pod(&s.get(
            "/",
            &["--count", "15", "--header", &format!("x-user: {user}")],
        ));
        assert_eq!(t.len(), 1, "{user} moved between endpoints: {t:?}");
        homes.extend(t.into_keys());
    }
    assert!(homes.len() >= 2, "six users all hashed to {homes:?}");

    // A cookie with a TTL: the first response hands one out, and it keeps the client on one
    // endpoint from then on.
    let cookie = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api-server, namespace: production}
spec:
  host: api-server
  trafficPolicy:
    loadBalancer: {consistentHash: {httpCookie: {name: session, path: /, ttl: 60s}}}
";
    s.reconfigure(cookie);
    let first = s.get("/", &[]).remove(0);
    let set = first["headers"]["set-cookie"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        set.starts_with("session=\"") && set.contains("Max-Age=60") && set.contains("Path=/"),
        "{first}"
    );
    let value = set.split(';').next().unwrap_or("").to_owned();
    let t = by_pod(&s.get(
        "/",
        &["--count", "20", "--header", &format!("cookie: {value}")],
    ));
    assert_eq!(t.len(), 1, "the cookie did not stick: {t:?}");
    assert_eq!(t.keys().next().map(String::as_str), first["pod"].as_str());
}

#[test]
fn five_consecutive_5xx_eject_an_endpoint_within_max_ejection_percent_until_its_time_is_up() {
    let dr = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api-server, namespace: production}
spec:
  host: api-server
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection:
      consecutive5xxErrors: 5
      interval: 1s
      baseEjectionTime: 3s
      maxEjectionPercent: 50
";
    let s = setup(&[("api-v1", "v1", true), ("api-v2", "v2", true)], dr);
    s.c.behave(s.client, "api-v1", "status=500")
        .expect("v1 fails");
    // Round robin alternates: v1's fifth 500 ejects it, then v2 takes everything.
    let t = by_pod(&s.get("/", &["--count", "30"]));
    assert_eq!(t.get("500").copied(), Some(5), "{t:?}");
    assert_eq!(t.get("api-v2").copied(), Some(25), "{t:?}");
    let m = s.c.metrics(1).expect("metrics");
    assert!(
        m.lines()
            .any(|l| l.starts_with("sidelane_outlier_ejections_total{") && l.ends_with(" 1")),
        "{m}"
    );
    // What `meshctl proxy-config endpoints` shows, as istioctl does: v1's outlier check failed.
    let eps: Value =
        s.c.admin_json(1, "/proxy_config/endpoints?pod=sleep.production")
            .expect("endpoints");
    let check = |ip: &str| {
        eps.as_array()
            .into_iter()
            .flatten()
            .find(|e| {
                e["endpoint"] == format!("{ip}:8080")
                    && e["cluster"]
                        .as_str()
                        .is_some_and(|c| c.contains("api-server"))
            })
            .map(|e| e["outlier_check"].clone())
    };
    assert_eq!(
        check(&s.c.pod(PodRef(0)).ip4),
        Some("FAILED".into()),
        "{eps}"
    );
    assert_eq!(check(&s.c.pod(PodRef(1)).ip4), Some("OK".into()), "{eps}");
    // v2 failing too cannot be ejected: that would be more than 50% of the endpoints.
    s.c.behave(s.client, "api-v2", "status=500")
        .expect("v2 fails");
    let t = by_pod(&s.get("/", &["--count", "10"]));
    assert_eq!(t, BTreeMap::from([("500".to_owned(), 10)]));
    // Healthy again, and after the ejection time v1 is back in the rotation.
    s.c.behave(s.client, "api-v1", "").expect("v1 healthy");
    s.c.behave(s.client, "api-v2", "").expect("v2 healthy");
    std::thread::sleep(Duration::from_millis(3200));
    let t = by_pod(&s.get("/", &["--count", "10"]));
    assert_eq!(
        t,
        BTreeMap::from([("api-v1".to_owned(), 5), ("api-v2".to_owned(), 5)])
    );
}

#[test]
fn requests_over_the_pool_limit_are_answered_503_uo() {
    let dr = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api-server, namespace: production}
spec:
  host: api-server
  trafficPolicy:
    connectionPool: {http: {http2MaxRequests: 1}}
";
    let s = setup(&[("api-v1", "v1", true)], dr);
    let url = format!("{}/delay/1", s.url);
    // One slow request holds the only slot while a second client asks.
    let mut slow =
        s.c.spawn_exec(s.client, &["http", "--url", &url])
            .expect("slow client");
    std::thread::sleep(Duration::from_millis(300));
    let r = s.get("/", &[]);
    assert_eq!(r[0]["status"], 503, "{r:?}");
    assert_eq!(slow.next_json().expect("slow answer")["status"], 200);
    let log = s.c.daemon_log_with(1, &["\"GET / HTTP/1.1\" 503 UO"]);
    assert!(log.contains("\"GET / HTTP/1.1\" 503 UO"), "{log}");
    // Once the slot is free, requests go through again.
    assert_eq!(s.get("/", &[])[0]["status"], 200);
    let m = s.c.metrics(1).expect("metrics");
    assert!(
        m.lines()
            .any(|l| l.starts_with("sidelane_upstream_overflow_total{")
                && l.contains("breaker=\"requests\"")
                && l.contains("outbound|8080||api-server.production.svc.cluster.local")
                && l.ends_with(" 1")),
        "{m}"
    );
}

#[test]
fn the_tutorial_destination_rule_upgrades_http1_to_http2_upstream() {
    let s = setup(&[("api-v1", "v1", true)], &tutorial("destinationrule.yaml"));
    let r = s.get("/", &[]);
    assert_eq!(r[0]["proto"], "HTTP/1.1", "{r:?}");
    assert_eq!(r[0]["body"]["proto"], "HTTP/2.0", "{r:?}");
}

#[test]
fn tcp_connects_time_out_and_move_on_and_idle_connections_are_closed() {
    let dr = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: production}
spec:
  host: db
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool: {tcp: {connectTimeout: 200ms, idleTimeout: 1s}}
";
    // An endpoint nobody answers for (no pod has the address: the connect hangs) beside a
    // crashed one (refused) and a healthy one.
    let ghost = r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-ghost, namespace: production, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: tcp-db, port: 9000, protocol: TCP}]
endpoints:
- addresses: [10.244.2.250]
  conditions: {ready: true, serving: true, terminating: false}
"#;
    let s = setup(
        &[("api-v1", "v1", true), ("api-dead", "v1", false)],
        &format!("{dr}---\n{ghost}"),
    );
    let db =
        s.c.services
            .iter()
            .find(|v| v.name == "db")
            .map(|v| format!("{}:9000", v.vip4))
            .expect("db");
    let endpoints =
        s.c.admin_get(1, "/proxy_config/endpoints?pod=sleep.production")
            .expect("endpoints");
    assert!(endpoints.contains("10.244.2.250:9000"), "{endpoints}");
    for _ in 0..9 {
        let start = std::time::Instant::now();
        let r = s.c.tcp(s.client, &db, "ping\\n").expect("tcp");
        let got = r["received"].as_str().unwrap_or("");
        assert!(
            got.starts_with("pod=api-v1 ") && got.contains("echo:ping"),
            "{r}"
        );
        // At worst one connect timeout (200 ms) and one refusal before the healthy pod. The
        // bound is loose for loaded runners; it only has to stay under the 10 s default
        // connect timeout to show the DestinationRule's took effect.
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }
    // Quiet for longer than the idle timeout: the mesh closes the connection, so what the
    // client sends afterwards is never echoed.
    let mut held =
        s.c.spawn_exec(
            s.client,
            &[
                "tcp",
                "--addr",
                &db,
                "--send",
                "late\\n",
                "--hold-ms",
                "2000",
            ],
        )
        .expect("held client");
    let connected = held.next_json().expect("connected");
    assert_eq!(connected["event"], "connected", "{connected}");
    let r = held.next_json().expect("result");
    let got = r["received"].as_str().unwrap_or("");
    assert!(got.starts_with("pod=api-v1 "), "{r}");
    assert!(
        !got.contains("echo:late"),
        "the idle connection stayed open: {r}"
    );
    let log = s.c.daemon_log_with(1, &["SI"]);
    assert!(log.contains(" SI "), "{log}");
}

#[test]
fn connections_over_max_connections_wait_and_overflow_past_max_pending() {
    let dr = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api-server, namespace: production}
spec:
  host: api-server
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}
";
    let s = setup(&[("api-v1", "v1", true)], dr);
    let url = format!("{}/delay/1", s.url);
    // The one connection is busy for a second; one request may wait for it, a third
    // overflows at once.
    let mut first =
        s.c.spawn_exec(s.client, &["http", "--url", &url])
            .expect("first");
    std::thread::sleep(Duration::from_millis(200));
    let mut second =
        s.c.spawn_exec(s.client, &["http", "--url", &url])
            .expect("second");
    std::thread::sleep(Duration::from_millis(200));
    let third = s.get("/", &[]);
    assert_eq!(third[0]["status"], 503, "{third:?}");
    assert_eq!(first.next_json().expect("first")["status"], 200);
    let second = second.next_json().expect("second");
    assert_eq!(second["status"], 200, "{second}");
    // It waited for the first to finish: about two seconds in all.
    assert!(
        second["ms"].as_u64().is_some_and(|ms| ms >= 1500),
        "{second}"
    );
    let log = s.c.daemon_log_with(1, &["\"GET / HTTP/1.1\" 503 UO"]);
    assert!(log.contains("\"GET / HTTP/1.1\" 503 UO"), "{log}");
}
