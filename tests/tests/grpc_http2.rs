//! End-to-end: HTTP/2 and gRPC through the mesh. A real grpcio client and server (see
//! tests/grpc/echo.py) on a port named `grpc`, routed by VirtualService on gRPC metadata and
//! method path; fault aborts with a gRPC status; the server's own status codes (trailers)
//! reaching the client; HTTP/2 with prior knowledge on a port named `http2`.
use std::path::{Path, PathBuf};

use serde_json::Value;
use sidelane_tests::{Cluster, PodRef, RunningClient, ServicePortSpec, scenario};

const ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: production}
spec:
  host: echo
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    # One upstream connection for the subset, shared by every proxy thread.
    trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: production}
spec:
  hosts: [echo]
  http:
  - match: [{uri: {exact: /sidelane.Echo/Blocked}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
    route: [{destination: {host: echo, subset: v1}}]
  - match: [{headers: {x-canary: {exact: "true"}}}]
    route: [{destination: {host: echo, subset: v2}}]
  - route: [{destination: {host: echo, subset: v1}}]
"#;

fn echo_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("grpc/echo.py")
}

/// Fields drop in order: the gRPC servers stop before the cluster removes their cgroups.
struct Setup {
    _servers: Vec<RunningClient>,
    c: Cluster,
    client: PodRef,
}

fn setup() -> Setup {
    let versions = [("echo-v1", "v1"), ("echo-v2", "v2")];
    let (mut c, client) = scenario::production("echo", &versions).expect("cluster");
    // Backends are the first pods added, in order.
    let backends: Vec<(PodRef, &str, &str)> = versions
        .iter()
        .enumerate()
        .map(|(i, (name, version))| (PodRef(i), *name, *version))
        .collect();
    c.add_service(
        "production",
        "echo",
        &[("app", "echo")],
        &[
            ServicePortSpec::new("grpc", 50051, 50051),
            ServicePortSpec::new("http2-web", 8080, 8080),
        ],
    )
    .expect("service");
    c.write_file("routes.yaml", ROUTES).expect("routes");
    c.start().expect("daemons");
    let mut servers = Vec::new();
    for (pod, name, version) in backends {
        let mut s = c
            .spawn_in(
                pod,
                Path::new("python3"),
                &[
                    &echo_py().to_string_lossy(),
                    "serve",
                    "--pod",
                    name,
                    "--version",
                    version,
                ],
            )
            .expect("grpc server");
        let ready = s
            .next_json()
            .expect("grpc server started (is grpcio installed?)");
        assert_eq!(ready["event"], "serving", "{ready}");
        servers.push(s);
    }
    c.wait_enrolled(client, true).expect("enrolled");
    Setup {
        c,
        client,
        _servers: servers,
    }
}

impl Setup {
    fn vip(&self) -> String {
        self.c
            .services
            .iter()
            .find(|s| s.name == "echo")
            .map(|s| s.vip4.clone())
            .expect("service")
    }

    /// gRPC calls from the client pod, one JSON line each.
    fn grpc(&self, args: &[&str]) -> Vec<Value> {
        let target = format!("{}:50051", self.vip());
        let script = echo_py();
        let mut all = vec![&*script.to_string_lossy(), "call", "--target", &target]
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = self
            .c
            .run_in(self.client, Path::new("python3"), &all)
            .expect("grpc client");
        out.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

fn versions(calls: &[Value]) -> Vec<String> {
    calls
        .iter()
        .map(|r| {
            r["reply"]["version"]
                .as_str()
                .map_or_else(|| format!("{r}"), str::to_owned)
        })
        .collect()
}

#[test]
fn grpc_calls_are_routed_per_call_and_statuses_pass_through() {
    let s = setup();
    // gRPC metadata are HTTP/2 headers: the canary route matches them.
    let canary = s.grpc(&["--count", "10", "--metadata", "x-canary=true"]);
    assert_eq!(versions(&canary), vec!["v2"; 10], "{canary:?}");
    let plain = s.grpc(&["--count", "10"]);
    assert_eq!(versions(&plain), vec!["v1"; 10], "{plain:?}");
    // The abort answers with a gRPC status, not an HTTP error the client cannot read.
    let blocked = s.grpc(&["--method", "Blocked"]);
    assert_eq!(blocked[0]["code"], "UNAVAILABLE", "{blocked:?}");
    assert_eq!(blocked[0]["details"], "fault filter abort", "{blocked:?}");
    // A status the server sets travels in HTTP/2 trailers, which the mesh forwards.
    let failed = s.grpc(&["--method", "Fail", "--body", "RESOURCE_EXHAUSTED"]);
    assert_eq!(failed[0]["code"], "RESOURCE_EXHAUSTED", "{failed:?}");
    assert_eq!(
        failed[0]["details"], "echo-v1 was told to fail",
        "{failed:?}"
    );
    let m = s.c.metrics(1).expect("metrics");
    assert!(
        m.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("request_protocol=\"grpc\"")
            && l.contains("destination_service=\"echo.production.svc.cluster.local\"")
            && l.contains("source_cluster=\"Kubernetes\"")
            && l.contains("destination_cluster=\"Kubernetes\"")),
        "{m}"
    );
    // Istio's grpc_response_status: from the trailers (OK 0, RESOURCE_EXHAUSTED 8), or the
    // head of a trailers-only answer (the abort's UNAVAILABLE 14); all behind HTTP 200.
    let calls = |status: &str| {
        m.lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains("response_code=\"200\"")
                    && l.contains(&format!("grpc_response_status=\"{status}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert_eq!(
        (calls("0"), calls("8"), calls("14")),
        (20.0, 1.0, 1.0),
        "{m}"
    );
}

#[test]
fn http2_ports_speak_http2_upstream_whatever_the_client_speaks() {
    let s = setup();
    let url = format!("http://{}:8080/", s.vip());
    // Prior knowledge from the client: HTTP/2 end to end.
    let h2 = s.c.http(s.client, &url, &["--h2"]).expect("h2");
    assert_eq!(h2[0]["proto"], "HTTP/2.0", "{h2:?}");
    assert_eq!(h2[0]["body"]["proto"], "HTTP/2.0", "{h2:?}");
    // An HTTP/1.1 client on an http2 port: the upstream leg is HTTP/2, as in Istio.
    let h1 = s.c.http(s.client, &url, &[]).expect("h1");
    assert_eq!(h1[0]["proto"], "HTTP/1.1", "{h1:?}");
    assert_eq!(h1[0]["body"]["proto"], "HTTP/2.0", "{h1:?}");
    // Many streams on one client connection, each routed on its own.
    let many =
        s.c.http(
            s.client,
            &url,
            &["--h2", "--count", "20", "--header", "x-canary: true"],
        )
        .expect("h2");
    assert!(
        many.iter().all(|r| r["version"] == "v2"),
        "the canary route did not apply to every stream: {many:?}"
    );
}

/// Each proxy thread opens its own HTTP/2 connection to an endpoint, as each of Envoy's
/// workers has its own pool; at the cluster's `maxConnections` a thread shares another
/// thread's connection rather than wait for a slot that will not come.
#[test]
fn http2_clients_on_every_proxy_thread_share_the_one_allowed_connection() {
    let s = setup();
    let url = format!("http://{}:8080/", s.vip());
    let canary = ["--h2", "--header", "x-canary: true"];
    // The first client connection goes to the accepting thread, which opens the v2 subset's
    // one allowed upstream connection.
    let first = s.c.http(s.client, &url, &canary).expect("first");
    assert_eq!(first[0]["status"], 200, "{first:?}");
    // Let the daemon see that client leave, then hold a connection open on that thread: the
    // next client connection goes to the other thread (fewest open connections).
    std::thread::sleep(std::time::Duration::from_millis(200));
    let vip = format!("{}:8080", s.vip());
    let mut held =
        s.c.spawn_exec(s.client, &["tcp", "--addr", &vip, "--hold-ms", "3000"])
            .expect("held");
    let connected = held.next_json().expect("connected");
    assert_eq!(connected["event"], "connected", "{connected}");
    let second = s.c.http(s.client, &url, &canary).expect("second");
    assert_eq!(second[0]["status"], 200, "{second:?}");
    assert_eq!(second[0]["version"], "v2", "{second:?}");
    assert_eq!(second[0]["body"]["proto"], "HTTP/2.0", "{second:?}");
}
