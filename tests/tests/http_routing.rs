//! End-to-end: the tutorial's VirtualService, exactly as written there, routes requests
//! through real eBPF redirection and the source node's daemon.
use std::collections::BTreeMap;

use serde_json::Value;
use sidelane_tests::{
    Cluster, PodRef,
    scenario::{self, tutorial},
};

struct Setup {
    c: Cluster,
    client: PodRef,
    url: String,
}

const VERSIONS: [(&str, &str); 2] = [("api-server-v1", "v1"), ("api-server-v2", "v2")];

/// api-server v1 and v2 on node 2, a client on node 1, the tutorial's Service port 8080 and
/// DestinationRule; `settings` are daemon environment variables.
fn setup_with(settings: &[(&str, &str)], files: &[(&str, String)]) -> Setup {
    let (mut c, client) = scenario::production("api-server", &VERSIONS).expect("cluster");
    for (var, value) in settings {
        c.daemon_setting(var, value);
    }
    let url = scenario::http_service(&mut c, "api-server", "api-server", 8080).expect("service");
    c.write_file("destinationrule.yaml", &tutorial("destinationrule.yaml"))
        .expect("dr");
    for (name, text) in files {
        c.write_file(name, text).expect("config");
    }
    scenario::start(&mut c, client).expect("daemons");
    Setup { c, client, url }
}

fn setup() -> Setup {
    setup_with(&[], &[])
}

/// Version (or status) of each response, counted.
fn tally(responses: &[Value]) -> BTreeMap<String, usize> {
    scenario::tally(responses, "version")
}

/// Applies a VirtualService file and waits until ten probe requests all see its effect.
fn apply(s: &Setup, name: &str, yaml: &str, probe: &[&str], expect: &str) {
    s.c.write_file(name, yaml).expect("write");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut args = vec!["--count", "10"];
    args.extend_from_slice(&probe[1..]);
    loop {
        let r =
            s.c.http(s.client, &format!("{}{}", s.url, probe[0]), &args)
                .expect("probe");
        if tally(&r) == BTreeMap::from([(expect.to_owned(), 10)]) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} never took effect: {r:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn the_tutorial_canary_routes_by_prefix_header_and_default() {
    let s = setup();
    let c = &s.c;
    // Before any VirtualService: both versions answer.
    let before = tally(
        &c.http(s.client, &format!("{}/", s.url), &["--count", "40"])
            .expect("http"),
    );
    assert!(
        before.contains_key("v1") && before.contains_key("v2"),
        "{before:?}"
    );

    apply(
        &s,
        "virtualservice.yaml",
        &tutorial("virtualservice.yaml"),
        &["/", "--header", "x-canary: true"],
        "v2",
    );
    // `x-canary: "true"` goes to v2, every time.
    let canary = tally(
        &c.http(
            s.client,
            &format!("{}/orders", s.url),
            &["--count", "30", "--header", "x-canary: true"],
        )
        .expect("http"),
    );
    assert_eq!(canary, BTreeMap::from([("v2".to_owned(), 30)]));
    // Anything else outside /api is the default route: v1.
    let default = tally(
        &c.http(s.client, &format!("{}/orders", s.url), &["--count", "30"])
            .expect("http"),
    );
    assert_eq!(default, BTreeMap::from([("v1".to_owned(), 30)]));
    // /api is the 90/10 canary (the first rule wins even with the header). Over 10,000
    // requests the observed split must be within two points of the weights.
    let api = tally(
        &c.http(
            s.client,
            &format!("{}/api/users", s.url),
            &["--count", "10000", "--header", "x-canary: true"],
        )
        .expect("http"),
    );
    let v2 = api.get("v2").copied().unwrap_or(0);
    assert_eq!(api.get("v1").copied().unwrap_or(0) + v2, 10_000, "{api:?}");
    assert!((800..=1200).contains(&v2), "90/10 split gave {api:?}");
}

#[test]
fn dangling_references_behave_as_in_istio() {
    let s = setup();
    let c = &s.c;
    // A subset no DestinationRule defines: accepted, and requests get 503 (no cluster).
    let missing_subset = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api-server, namespace: production}
spec:
  hosts: [api-server]
  http:
  - match: [{uri: {prefix: /only}}]
    route: [{destination: {host: api-server, subset: v3}}]
";
    apply(&s, "vs.yaml", missing_subset, &["/only"], "503");
    // A path no route matches: 404, as Envoy answers NR.
    let r = tally(
        &c.http(s.client, &format!("{}/elsewhere", s.url), &[])
            .expect("http"),
    );
    assert_eq!(r, BTreeMap::from([("404".to_owned(), 1)]));
    let log = c.daemon_log_with(
        1,
        &[
            "\"GET /only HTTP/1.1\" 503 NC",
            "\"GET /elsewhere HTTP/1.1\" 404 NR",
        ],
    );
    assert!(log.contains("\"GET /only HTTP/1.1\" 503 NC"), "{log}");
    assert!(log.contains("\"GET /elsewhere HTTP/1.1\" 404 NR"), "{log}");
    let m = c.metrics(1).expect("metrics");
    assert!(
        m.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("response_code=\"404\"")
            && l.contains("response_flags=\"NR\"")),
        "{m}"
    );
    // Sizes are recorded per request too (Istio's request and response byte histograms).
    for name in ["istio_request_bytes_count{", "istio_response_bytes_count{"] {
        assert!(m.lines().any(|l| l.starts_with(name)), "no {name} in {m}");
    }
}

#[test]
fn rewrites_header_operations_and_timeouts_apply() {
    let s = setup();
    let c = &s.c;
    let vs = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api-server, namespace: production}
spec:
  hosts: [api-server]
  http:
  - match: [{uri: {prefix: /legacy/}}]
    rewrite: {uri: /v2/, authority: api.internal}
    headers:
      request: {set: {x-route: legacy}, remove: [x-drop]}
      response: {add: {x-served-by: sidelane}}
    route: [{destination: {host: api-server, subset: v1}}]
  - match: [{uri: {prefix: /delay/}}]
    timeout: 300ms
    route: [{destination: {host: api-server, subset: v1}}]
  - route: [{destination: {host: api-server, subset: v1}}]
";
    apply(&s, "vs.yaml", vs, &["/plain"], "v1");
    let r = c
        .http(
            s.client,
            &format!("{}/legacy/orders?id=7", s.url),
            &["--header", "x-drop: yes"],
        )
        .expect("http");
    let body = &r[0]["body"];
    // The matched prefix is replaced, the rest and the query kept.
    assert_eq!(body["path"], "/v2/orders", "{r:?}");
    assert_eq!(body["headers"]["host"], "api.internal", "{r:?}");
    assert_eq!(body["headers"]["x-route"], "legacy", "{r:?}");
    assert!(body["headers"].get("x-drop").is_none(), "{r:?}");

    // A backend slower than the route's timeout: 504 after the timeout, not after the delay.
    let r = c
        .http(s.client, &format!("{}/delay/2", s.url), &[])
        .expect("http");
    assert_eq!(r[0]["status"], 504, "{r:?}");
    let ms = r[0]["ms"].as_u64().unwrap_or(u64::MAX);
    assert!((300..1500).contains(&ms), "the timeout fired after {ms} ms");
    let log = c.daemon_log_with(1, &["\"GET /delay/2 HTTP/1.1\" 504 UT"]);
    assert!(log.contains("\"GET /delay/2 HTTP/1.1\" 504 UT"), "{log}");
}

#[test]
fn faults_delay_and_abort_the_share_of_requests_istio_would() {
    let s = setup();
    let c = &s.c;
    let vs = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api-server, namespace: production}
spec:
  hosts: [api-server]
  http:
  - match: [{uri: {prefix: /teapot}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: api-server, subset: v1}}]
  - match: [{uri: {prefix: /half}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 50}}}
    route: [{destination: {host: api-server, subset: v1}}]
  - match: [{uri: {prefix: /slow}}]
    fault: {delay: {fixedDelay: 400ms, percentage: {value: 100}}}
    route: [{destination: {host: api-server, subset: v1}}]
  - match: [{uri: {prefix: /unset}}]
    fault: {abort: {httpStatus: 500}}
    route: [{destination: {host: api-server, subset: v1}}]
  - route: [{destination: {host: api-server, subset: v1}}]
";
    apply(&s, "vs.yaml", vs, &["/teapot"], "418");
    // Half of 200 requests aborted: expect 100, standard deviation about 7.
    let half = tally(
        &c.http(s.client, &format!("{}/half", s.url), &["--count", "200"])
            .expect("http"),
    );
    let aborted = half.get("503").copied().unwrap_or(0);
    assert_eq!(
        aborted + half.get("v1").copied().unwrap_or(0),
        200,
        "{half:?}"
    );
    assert!((70..=130).contains(&aborted), "{half:?}");
    // A delay holds the request, then it goes through.
    let r = c
        .http(s.client, &format!("{}/slow", s.url), &[])
        .expect("http");
    assert_eq!(r[0]["version"], "v1", "{r:?}");
    assert!(r[0]["ms"].as_u64().is_some_and(|ms| ms >= 400), "{r:?}");
    // Without a percentage, Istio injects nothing.
    let unset = tally(
        &c.http(s.client, &format!("{}/unset", s.url), &["--count", "20"])
            .expect("http"),
    );
    assert_eq!(unset, BTreeMap::from([("v1".to_owned(), 20)]));
    let log = c.daemon_log_with(
        1,
        &[
            "\"GET /teapot HTTP/1.1\" 418 FI",
            "\"GET /slow HTTP/1.1\" 200 DI",
        ],
    );
    assert!(log.contains("\"GET /teapot HTTP/1.1\" 418 FI"), "{log}");
    assert!(log.contains("\"GET /slow HTTP/1.1\" 200 DI"), "{log}");
}

/// Requests the pod `name` has served, and the Host of the last one, asked of it directly.
fn seen(s: &Setup, name: &str) -> (u64, String) {
    let ip =
        s.c.pods
            .iter()
            .find(|p| p.spec.name == name)
            .map(|p| p.ip4.clone())
            .expect("pod");
    let r =
        s.c.http(s.client, &format!("http://{ip}:8080/__stats"), &[])
            .expect("stats");
    let b = &r[0]["body"];
    (
        b["requests"].as_u64().unwrap_or(0),
        b["last_host"].as_str().unwrap_or("").to_owned(),
    )
}

#[test]
fn the_tutorial_mirror_copies_traffic_to_v2_without_touching_the_responses() {
    let s = setup();
    let c = &s.c;
    apply(
        &s,
        "virtualservice-mirror.yaml",
        &tutorial("virtualservice-mirror.yaml"),
        &["/warmup"],
        "v1",
    );
    let (before, _) = seen(&s, "api-server-v2");
    let r = tally(
        &c.http(s.client, &format!("{}/mirrored", s.url), &["--count", "20"])
            .expect("http"),
    );
    // Every answer comes from v1; v2 only receives copies.
    assert_eq!(r, BTreeMap::from([("v1".to_owned(), 20)]));
    let authority = s.url.trim_start_matches("http://").to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let (n, host) = seen(&s, "api-server-v2");
        if n >= before + 20 {
            // Istio 1.28: the mirrored request keeps its Host (no "-shadow").
            assert_eq!(host, authority);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "v2 saw {} mirrored requests, not 20",
            n - before
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // A slow mirror target does not slow the primary, a resetting one does not fail it.
    c.behave(s.client, "api-server-v2", "delay_ms=2000")
        .expect("slow v2");
    let r = c
        .http(
            s.client,
            &format!("{}/slow-mirror", s.url),
            &["--count", "5"],
        )
        .expect("http");
    assert!(
        r.iter()
            .all(|r| r["version"] == "v1" && r["ms"].as_u64().is_some_and(|ms| ms < 1000)),
        "the slow mirror held the primary: {r:?}"
    );
    c.behave(s.client, "api-server-v2", "reset=1")
        .expect("resetting v2");
    let r = tally(
        &c.http(
            s.client,
            &format!("{}/reset-mirror", s.url),
            &["--count", "20"],
        )
        .expect("http"),
    );
    assert_eq!(r, BTreeMap::from([("v1".to_owned(), 20)]));

    // A mirror with nowhere to go (a subset nobody defines) never affects the primary.
    let dead = tutorial("virtualservice-mirror.yaml").replace(
        "host: api-server\n        subset: v2",
        "host: api-server\n        subset: v9",
    );
    assert!(dead.contains("subset: v9"), "{dead}");
    apply(&s, "virtualservice-mirror.yaml", &dead, &["/warmup"], "v1");
    let r = tally(
        &c.http(s.client, &format!("{}/after", s.url), &["--count", "20"])
            .expect("http"),
    );
    assert_eq!(r, BTreeMap::from([("v1".to_owned(), 20)]));
}

#[test]
fn cors_preflights_are_answered_by_the_mesh_and_responses_carry_the_policy() {
    let s = setup();
    let c = &s.c;
    let vs = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api-server, namespace: production}
spec:
  hosts: [api-server]
  http:
  - corsPolicy:
      allowOrigins: [{exact: \"https://app.example.com\"}]
      allowMethods: [GET, POST]
      allowHeaders: [content-type]
      exposeHeaders: [x-trace]
      maxAge: 24h
      allowCredentials: true
    route: [{destination: {host: api-server, subset: v1}}]
";
    apply(&s, "vs.yaml", vs, &["/"], "v1");
    let url = format!("{}/orders", s.url);
    let preflight = |origin: &str| {
        c.http(
            s.client,
            &url,
            &[
                "--method",
                "OPTIONS",
                "--header",
                &format!("origin: {origin}"),
                "--header",
                "access-control-request-method: POST",
            ],
        )
        .expect("preflight")
        .remove(0)
    };
    // An allowed origin's preflight is answered by the mesh: no workload wrote this body.
    let r = preflight("https://app.example.com");
    assert_eq!(r["status"], 200, "{r}");
    assert!(r["pod"].is_null(), "the preflight reached the service: {r}");
    let h = &r["headers"];
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["access-control-allow-methods"], "GET,POST");
    assert_eq!(h["access-control-allow-headers"], "content-type");
    assert_eq!(h["access-control-max-age"], "86400");
    assert_eq!(h["access-control-allow-credentials"], "true");
    // Another origin's preflight goes on to the service (unmatchedPreflights: FORWARD).
    let r = preflight("https://evil.example.org");
    assert_eq!(r["version"], "v1", "{r}");
    assert!(
        r["headers"].get("access-control-allow-origin").is_none(),
        "{r}"
    );
    // Actual requests: the allowed origin is told so, others are not.
    let get = |origin: &str| {
        c.http(s.client, &url, &["--header", &format!("origin: {origin}")])
            .expect("get")
            .remove(0)
    };
    let r = get("https://app.example.com");
    assert_eq!(r["version"], "v1", "{r}");
    assert_eq!(
        r["headers"]["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(r["headers"]["access-control-expose-headers"], "x-trace");
    let r = get("https://evil.example.org");
    assert_eq!(r["version"], "v1", "{r}");
    assert!(
        r["headers"].get("access-control-allow-origin").is_none(),
        "{r}"
    );
}

#[test]
fn a_delegate_virtual_service_serves_the_paths_its_root_hands_it() {
    let s = setup();
    let c = &s.c;
    // The root owns the host and hands /api to a delegate (no hosts of its own), which may
    // narrow the match further; what the root does not delegate stays with the root.
    let vs = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api-server, namespace: production}
spec:
  hosts: [api-server]
  http:
  - match: [{uri: {prefix: /api}}]
    delegate: {name: api-routes, namespace: production}
  - route: [{destination: {host: api-server, subset: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api-routes, namespace: production}
spec:
  http:
  - match: [{uri: {prefix: /api/v2}}]
    route: [{destination: {host: api-server, subset: v2}}]
  - route: [{destination: {host: api-server, subset: v1}}]
";
    apply(&s, "vs.yaml", vs, &["/api/users"], "v1");
    let at = |path: &str| {
        tally(
            &c.http(s.client, &format!("{}{path}", s.url), &["--count", "10"])
                .expect("http"),
        )
    };
    assert_eq!(at("/api/v2/users"), BTreeMap::from([("v2".to_owned(), 10)]));
    assert_eq!(at("/api/users"), BTreeMap::from([("v1".to_owned(), 10)]));
    assert_eq!(at("/home"), BTreeMap::from([("v2".to_owned(), 10)]));
}

/// The status of one request with `args` to `path`.
fn status(s: &Setup, path: &str, args: &[&str]) -> Value {
    s.c.http(s.client, &format!("{}{path}", s.url), args)
        .expect("http")
        .remove(0)
}

#[test]
fn every_match_field_selects_its_route_and_answers_come_from_the_route() {
    let s = setup();
    // Each route answers with its own status, so the status names the route that matched.
    let vs = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api-server, namespace: production}
spec:
  hosts: [api-server]
  http:
  - match: [{uri: {exact: /exact}}]
    directResponse: {status: 201, body: {string: "exact match"}}
  - match: [{uri: {regex: "/items/[0-9]+"}}]
    directResponse: {status: 202}
  - match: [{headers: {x-user: {prefix: adm}}}]
    directResponse: {status: 203}
  - match: [{headers: {x-id: {regex: "[a-f]+"}}}]
    directResponse: {status: 205}
  - match: [{method: {exact: DELETE}}]
    directResponse: {status: 206}
  - match: [{authority: {prefix: "api-server.production"}}]
    directResponse: {status: 207}
  - match: [{queryParams: {debug: {exact: "1"}}}]
    directResponse: {status: 208}
  - match: [{uri: {prefix: /a/}}, {uri: {prefix: /b/}}]
    directResponse: {status: 226}
  - match: [{uri: {prefix: /both}, headers: {x-flag: {exact: "on"}}}]
    directResponse: {status: 230}
  - match: [{uri: {prefix: /guarded}, withoutHeaders: {x-token: {}}}]
    directResponse: {status: 401}
  - match: [{uri: {prefix: /mine}, sourceLabels: {app: sleep}, sourceNamespace: production, port: 8080}]
    directResponse: {status: 231}
  - match: [{uri: {prefix: /theirs}, sourceLabels: {app: other}}]
    directResponse: {status: 232}
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, authority: new.example.com, redirectCode: 308}
  - match: [{uri: {prefix: /users/}}]
    rewrite: {uriRegexRewrite: {match: "^/users/([0-9]+)$", rewrite: "/v2/accounts/\\1"}}
    route: [{destination: {host: api-server, subset: v1}}]
  - route: [{destination: {host: api-server, subset: v2}}]
"#;
    apply(&s, "vs.yaml", vs, &["/exact"], "201");
    let cases: &[(&str, &[&str], u64)] = &[
        ("/exact", &[], 201),
        ("/exact/more", &[], 200), // exact is exact
        ("/items/42", &[], 202),
        ("/items/4x", &[], 200), // regex must match the whole path
        ("/", &["--header", "x-user: admin"], 203),
        ("/", &["--header", "x-user: root"], 200),
        ("/", &["--header", "x-id: cafe"], 205),
        ("/", &["--header", "x-id: cafe1"], 200),
        ("/", &["--method", "DELETE"], 206),
        (
            "/",
            &[
                "--header",
                "host: api-server.production.svc.cluster.local:8080",
            ],
            207,
        ),
        ("/?debug=1", &[], 208),
        ("/?debug=2", &[], 200),
        ("/a/x", &[], 226),
        ("/b/x", &[], 226),
        ("/both", &["--header", "x-flag: on"], 230),
        ("/both", &[], 200), // fields within a block all hold
        ("/guarded", &[], 401),
        ("/guarded", &["--header", "x-token: t"], 200),
        ("/mine", &[], 231),
        ("/theirs", &[], 200),
    ];
    for (path, args, want) in cases {
        let r = status(&s, path, args);
        assert_eq!(r["status"], *want, "{path} {args:?}: {r}");
        if *want == 200 {
            assert_eq!(r["version"], "v2", "{path} {args:?} fell through to: {r}");
        }
    }
    let r = status(&s, "/exact", &[]);
    assert!(
        r["body"].is_null(),
        "a direct response, not a workload: {r}"
    );
    // Redirects keep the query and take the new authority as written.
    let r = status(&s, "/old?page=2", &[]);
    assert_eq!(r["status"], 308, "{r}");
    assert_eq!(
        r["headers"]["location"],
        "http://new.example.com/new?page=2"
    );
    // A regex rewrite substitutes its groups before the request leaves.
    let r = status(&s, "/users/17", &[]);
    assert_eq!(r["version"], "v1", "{r}");
    assert_eq!(r["body"]["path"], "/v2/accounts/17", "{r}");
}

#[test]
fn mirror_percentage_copies_its_share_with_the_istio_127_shadow_host_when_asked() {
    let quarter = tutorial("virtualservice-mirror.yaml").replace("value: 100.0", "value: 25.0");
    assert!(quarter.contains("value: 25.0"), "{quarter}");
    let s = setup_with(
        &[("SIDELANE_COMPATIBILITY_VERSION", "1.27")],
        &[("virtualservice-mirror.yaml", quarter)],
    );
    let r = tally(
        &s.c.http(s.client, &format!("{}/m", s.url), &["--count", "400"])
            .expect("http"),
    );
    assert_eq!(r, BTreeMap::from([("v1".to_owned(), 400)]));
    // Copies are fire-and-forget: wait for the stragglers, then count. 25% of 400 is 100,
    // standard deviation about 9.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (copies, host) = seen(&s, "api-server-v2");
    assert!((60..=140).contains(&copies), "{copies} copies of 400");
    // Istio 1.27 and before: "-shadow" after the host, before the port.
    let vip = s.url.trim_start_matches("http://");
    let (ip, port) = vip.rsplit_once(':').expect("vip:port");
    assert_eq!(host, format!("{ip}-shadow:{port}"));
}

#[test]
fn hop_by_hop_headers_stay_on_their_connection_and_upstream_connections_are_reused() {
    // No DestinationRule: HTTP/1.1 upstream, where a forwarded `Connection: close` would end
    // the pooled connection after each request.
    let (mut c, client) = scenario::production("api-server", &VERSIONS).expect("cluster");
    let url = scenario::http_service(&mut c, "api-server", "api-server", 8080).expect("service");
    scenario::start(&mut c, client).expect("daemons");
    let r = c
        .http(
            client,
            &format!("{url}/hop"),
            &[
                "--count",
                "6",
                "--new-conn",
                "--header",
                "connection: close, x-hop",
                "--header",
                "x-hop: this connection only",
                "--header",
                "keep-alive: timeout=5",
                "--header",
                "x-end-to-end: kept",
            ],
        )
        .expect("http");
    assert_eq!(r.len(), 6, "{r:?}");
    for resp in &r {
        assert_eq!(resp["status"], 200, "{r:?}");
        let seen = &resp["body"]["headers"];
        for hop in ["connection", "x-hop", "keep-alive"] {
            assert!(seen.get(hop).is_none(), "{hop} reached the server: {seen}");
        }
        assert_eq!(seen["x-end-to-end"], "kept", "{seen}");
    }
    // Six client connections, each closed after its request; upstream, the pool kept at
    // most one connection per endpoint (two endpoints) open for all of them.
    let peers: std::collections::BTreeSet<&str> = r
        .iter()
        .filter_map(|x| x["body"]["peer"].as_str())
        .collect();
    assert!(
        peers.len() <= 2,
        "upstream connections not reused: {peers:?}"
    );
}

/// A WebSocket-style upgrade passes as Istio's Envoy lets it: the 101 reaches the client as
/// the upstream sent it, bytes then flow both ways (a FIN passed on as a FIN), and the
/// request is recorded once the tunnel has closed, with code 101 and the tunnel's bytes.
#[test]
fn an_upgraded_connection_carries_bytes_both_ways_until_each_side_closes() {
    let s = setup();
    let c = &s.c;
    let addr = s.url.trim_start_matches("http://");
    let sent = "hello through the tunnel\n";
    let request = format!(
        "GET /upgrade HTTP/1.1\\r\\nhost: api-server\\r\\nconnection: Upgrade\\r\\nupgrade: sidelane-echo\\r\\n\\r\\n{}",
        sent.replace('\n', "\\n")
    );
    // The FIN waits a moment: a client that closes before its 101 has left.
    let mut client = c
        .spawn_exec(
            s.client,
            &[
                "tcp",
                "--addr",
                addr,
                "--send",
                &request,
                "--linger-ms",
                "300",
            ],
        )
        .expect("tcp");
    let sent_event = client.next_json().expect("sent");
    assert_eq!(sent_event["event"], "sent", "{sent_event}");
    let r = client.next_json().expect("result");
    let got = r["received"].as_str().unwrap_or_default();
    let (head, tunnel) = got.split_once("\r\n\r\n").unwrap_or((got, ""));
    assert!(
        head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{r}"
    );
    let head = head.to_ascii_lowercase();
    assert!(head.contains("\r\nupgrade: sidelane-echo"), "{head}");
    assert!(head.contains("\r\nconnection: upgrade"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    assert!(
        tunnel.starts_with("pod=api-server-v")
            && [" version=v1\n", " version=v2\n"]
                .iter()
                .any(|v| tunnel.ends_with(&format!("{v}echo:hello through the tunnel\nbye\n"))),
        "{r}"
    );

    let sample = |m: &str, name: &str| -> f64 {
        m.lines()
            .filter(|l| l.starts_with(name) && l.contains("response_code=\"101\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let m = sidelane_tests::sys::wait_for(
        "the upgrade's metrics",
        std::time::Duration::from_secs(5),
        || {
            let m = c.metrics(1).ok()?;
            (sample(&m, "istio_requests_total{") == 1.0).then_some(m)
        },
    )
    .expect("one request with code 101, recorded when its tunnel closed");
    assert_eq!(
        sample(&m, "istio_request_bytes_sum{"),
        sent.len() as f64,
        "the tunnel's bytes to the upstream"
    );
    assert_eq!(
        sample(&m, "istio_response_bytes_sum{"),
        tunnel.len() as f64,
        "the tunnel's bytes to the client"
    );
}
