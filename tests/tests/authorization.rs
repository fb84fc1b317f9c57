//! End-to-end: AuthorizationPolicy, enforced by the destination pod's node daemon on every
//! connection it delivers, with Istio's L4 semantics. What a user sees: the allowed client
//! gets its answer, a refused TCP client a reset, a refused HTTP client the 403 a sidecar
//! would send, plaintext from outside the mesh has no principal to be allowed by, and a
//! policy applied later cuts the open connections it no longer allows.
use std::time::Duration;

use sidelane_tests::{Cluster, PodRef, PodSpec, ServicePortSpec, scenario::metric, sys::wait_for};

struct Setup {
    c: Cluster,
    /// Service account `sleep`, node 1.
    sleep: PodRef,
    /// Service account `batch`, node 1.
    batch: PodRef,
    /// Namespace `legacy`, outside the mesh, node 1.
    outsider: PodRef,
    /// The db Service's TCP port.
    db_tcp: String,
    /// The db Service's HTTP port.
    db_http: String,
    /// The db pod's own TCP address.
    db_pod_tcp: String,
}

fn setup() -> Setup {
    let mut c = Cluster::new(2).expect("cluster");
    c.namespace("production", &[("istio-injection", "enabled")])
        .expect("namespace");
    c.namespace("legacy", &[]).expect("namespace");
    c.add_pod(
        PodSpec::new("production", "db-v1", 2)
            .label("app", "db")
            .service_account("db")
            .serving(),
    )
    .expect("db");
    let sleep = c
        .add_pod(PodSpec::new("production", "sleep", 1).service_account("sleep"))
        .expect("sleep");
    let batch = c
        .add_pod(PodSpec::new("production", "batch", 1).service_account("batch"))
        .expect("batch");
    let outsider = c
        .add_pod(PodSpec::new("legacy", "curl", 1))
        .expect("outsider");
    let db = c
        .add_service(
            "production",
            "db",
            &[("app", "db")],
            &[
                ServicePortSpec::new("tcp-db", 9000, 9000),
                ServicePortSpec::new("http", 80, 8080),
            ],
        )
        .expect("service");
    let vip = c.service(db).vip4.clone();
    let db_ip = c
        .pods
        .iter()
        .find(|p| p.spec.name == "db-v1")
        .map(|p| p.ip4.clone())
        .expect("db pod");
    c.start().expect("daemons");
    c.wait_enrolled(sleep, true).expect("sleep enrolled");
    c.wait_enrolled(batch, true).expect("batch enrolled");
    Setup {
        c,
        sleep,
        batch,
        outsider,
        db_tcp: format!("{vip}:9000"),
        db_http: format!("http://{vip}:80/"),
        db_pod_tcp: format!("{db_ip}:9000"),
    }
}

/// Whether `from` got the db's echo over TCP at `addr`.
fn echoed(c: &Cluster, from: PodRef, addr: &str) -> bool {
    let r = c
        .tcp_with(from, addr, &["--send", "hi", "--timeout-ms", "2000"])
        .expect("tcp client");
    r["received"].as_str().unwrap_or("").contains("echo:hi")
}

/// The status `from` got for one HTTP request to `url`.
fn status(c: &Cluster, from: PodRef, url: &str) -> u64 {
    let r = c.http(from, url, &[]).expect("http client");
    r.first().and_then(|r| r["status"].as_u64()).unwrap_or(0)
}

fn denied(c: &Cluster, labels: &[&str]) -> u64 {
    metric(
        &c.metrics(2).expect("node 2 metrics"),
        "sidelane_authorization_denied_total",
        labels,
    )
}

const ALLOW_SLEEP: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: db-from-sleep
  namespace: production
spec:
  selector:
    matchLabels:
      app: db
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/production/sa/sleep"]
"#;

#[test]
fn an_allow_policy_admits_only_the_principals_it_names() {
    let s = setup();
    let c = &s.c;
    // No policy: everyone gets through, plaintext too (PERMISSIVE).
    assert!(echoed(c, s.batch, &s.db_tcp));
    assert!(echoed(c, s.outsider, &s.db_pod_tcp));

    c.write_file("authz.yaml", ALLOW_SLEEP).expect("policy");
    wait_for("the ALLOW policy applied", Duration::from_secs(10), || {
        (!echoed(c, s.batch, &s.db_tcp)).then_some(())
    })
    .expect("batch refused");
    let from_batch = [
        "reporter=\"destination\"",
        "source_principal=\"spiffe://cluster.local/ns/production/sa/batch\"",
    ];
    let delivered = |c: &Cluster| {
        metric(
            &c.metrics(2).expect("metrics"),
            "istio_tcp_connections_opened_total",
            &from_batch,
        )
    };
    let delivered_before = delivered(c);
    let refused_before = denied(c, &["action=\"ALLOW\"", "phase=\"connect\""]);
    assert!(echoed(c, s.sleep, &s.db_tcp), "the named principal");
    assert!(!echoed(c, s.batch, &s.db_tcp), "refused again");
    assert!(
        !echoed(c, s.outsider, &s.db_pod_tcp),
        "plaintext has no principal to be allowed by"
    );

    // HTTP: the 403 the destination's sidecar would send, not retried into a 503.
    assert_eq!(status(c, s.sleep, &s.db_http), 200);
    assert_eq!(status(c, s.batch, &s.db_http), 403);

    assert_eq!(
        delivered(c),
        delivered_before,
        "nothing of batch's reached the app"
    );
    assert_eq!(
        denied(c, &["action=\"ALLOW\"", "phase=\"connect\""]),
        refused_before + 3,
        "batch over TCP and HTTP and the outsider, each refused once (no retries): {}",
        c.metrics(2).expect("metrics")
    );

    let shown = c
        .meshctl(2, &["proxy-config", "authz", "db-v1.production"])
        .expect("meshctl");
    assert!(
        shown.contains("production/db-from-sleep") && shown.contains("ALLOW"),
        "{shown}"
    );
}

/// A TCP connection from `from` to `addr`, open (connected, nothing sent yet) for four
/// seconds, then sending `word`.
struct Held(sidelane_tests::RunningClient);

fn hold(c: &Cluster, from: PodRef, addr: &str, word: &str) -> Held {
    let send = format!("{word}\\n");
    let mut client = c
        .spawn_exec(
            from,
            &["tcp", "--addr", addr, "--send", &send, "--hold-ms", "4000"],
        )
        .expect("client");
    let connected = client.next_json().expect("connected");
    assert_eq!(connected["event"], "connected", "{connected}");
    Held(client)
}

impl Held {
    /// What the client saw in the end.
    fn finish(mut self) -> serde_json::Value {
        self.0.next_json().expect("result")
    }
}

const DENY_SLEEP_TCP: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: no-sleep-on-tcp
  namespace: production
spec:
  selector:
    matchLabels:
      app: db
  action: DENY
  rules:
  - from:
    - source:
        serviceAccounts: ["sleep"]
    to:
    - operation:
        ports: ["9000"]
"#;

#[test]
fn a_deny_policy_applied_later_cuts_the_open_connections_it_matches() {
    let s = setup();
    let c = &s.c;
    let held = hold(c, s.sleep, &s.db_tcp, "late");
    let bystander = hold(c, s.batch, &s.db_tcp, "still");
    c.write_file("authz.yaml", DENY_SLEEP_TCP).expect("policy");
    let done = held.finish();
    assert!(
        !done["received"]
            .as_str()
            .unwrap_or("")
            .contains("echo:late")
            && done["error"].is_string(),
        "the open connection was cut: {done}"
    );
    let other = bystander.finish();
    assert!(
        other["received"]
            .as_str()
            .unwrap_or("")
            .contains("echo:still"),
        "a connection the policy does not match stays open: {other}"
    );
    assert!(
        denied(
            c,
            &[
                "action=\"DENY\"",
                "policy=\"production/no-sleep-on-tcp\"",
                "phase=\"established\""
            ]
        ) >= 1
    );

    // New connections: refused on the denied port only.
    assert!(!echoed(c, s.sleep, &s.db_tcp));
    assert_eq!(
        status(c, s.sleep, &s.db_http),
        200,
        "port 8080 is not denied"
    );
    assert!(echoed(c, s.batch, &s.db_tcp));
    assert!(
        denied(
            c,
            &[
                "action=\"DENY\"",
                "policy=\"production/no-sleep-on-tcp\"",
                "phase=\"connect\""
            ]
        ) >= 1
    );
}

const ALLOW_GET_ONLY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: get-only
  namespace: production
spec:
  selector:
    matchLabels:
      app: db
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: ["GET"]
"#;

#[test]
fn an_allow_rule_on_http_attributes_fails_safe_by_allowing_nothing() {
    let s = setup();
    let c = &s.c;
    assert_eq!(status(c, s.sleep, &s.db_http), 200);
    c.write_file("authz.yaml", ALLOW_GET_ONLY).expect("policy");
    wait_for("the policy applied", Duration::from_secs(10), || {
        (status(c, s.sleep, &s.db_http) == 403).then_some(())
    })
    .expect("HTTP refused");
    assert!(!echoed(c, s.sleep, &s.db_tcp), "TCP refused too");
    let dir = c.config_dir().to_string_lossy().into_owned();
    let out = c
        .meshctl(1, &["analyze", "-f", &dir])
        .expect("meshctl analyze");
    assert!(
        out.contains("production/get-only") && out.contains("methods"),
        "analyze explains why: {out}"
    );
}
