//! End-to-end: traffic between two enrolled pods travels in Istio's mTLS tunnel (HBONE:
//! HTTP/2 CONNECT inside mutual TLS to the destination pod's port 15008), each side proving
//! its SPIFFE identity. What a user can see: the bytes arrive, the wire between the nodes
//! carries none of them in the clear, and the destination's metrics name both identities
//! with `connection_security_policy="mutual_tls"`, as Kiali reads them.
use std::time::Duration;

use sidelane_tests::{
    Cluster, PodRef, PodSpec, ServicePortSpec, capture::Capture, scenario::metric, sys::wait_for,
};

const MARKER: &str = "sidelane-plaintext-marker-7f3a";
const TUNNEL_PORT: u16 = 15008;

struct Setup {
    c: Cluster,
    client: PodRef,
    db_addr: String,
    web_url: String,
}

/// A client (service account `sleep`) on node 1, a TCP backend (`db`) on node 2.
fn setup(before_start: impl FnOnce(&mut Cluster)) -> Setup {
    let mut c = Cluster::new(2).expect("cluster");
    c.namespace("production", &[("istio-injection", "enabled")])
        .expect("namespace");
    c.add_pod(
        PodSpec::new("production", "db-v1", 2)
            .label("app", "db")
            .label("version", "v1")
            .service_account("db")
            .serving(),
    )
    .expect("db");
    let client = c
        .add_pod(
            PodSpec::new("production", "sleep", 1)
                .label("app", "sleep")
                .service_account("sleep"),
        )
        .expect("client");
    let db = c
        .add_service(
            "production",
            "db",
            &[("app", "db")],
            &[ServicePortSpec::new("tcp-db", 9000, 9000)],
        )
        .expect("service");
    let db_addr = format!("{}:9000", c.service(db).vip4);
    let web = c
        .add_service(
            "production",
            "web",
            &[("app", "db")],
            &[ServicePortSpec::new("http", 80, 8080)],
        )
        .expect("service");
    let web_url = format!("http://{}:80", c.service(web).vip4);
    before_start(&mut c);
    c.start().expect("daemons");
    c.wait_enrolled(client, true).expect("client enrolled");
    Setup {
        c,
        client,
        db_addr,
        web_url,
    }
}

impl Setup {
    /// Sends the marker through the mesh while node 1's links are captured: what came back,
    /// and the TCP segments node 1 forwarded.
    fn send_marker(&self) -> (String, Vec<sidelane_tests::capture::Segment>) {
        let capture = Capture::start(self.c.node_netns(1)).expect("capture");
        let r = self
            .c
            .tcp(self.client, &self.db_addr, MARKER)
            .expect("tcp client");
        let segments = capture.segments().expect("captured");
        (r["received"].as_str().unwrap_or("").to_owned(), segments)
    }
}

/// The setup plus a pod outside the mesh (namespace `legacy`, on node 1), and the db pod's
/// own address.
fn with_outsider() -> (Setup, PodRef, String) {
    let mut s = setup(|c| {
        c.namespace("legacy", &[]).expect("namespace");
    });
    let c = &mut s.c;
    let pod = c
        .add_pod(PodSpec::new("legacy", "curl", 1))
        .expect("outsider");
    let db_ip = c
        .pods
        .iter()
        .find(|p| p.spec.name == "db-v1")
        .map(|p| p.ip4.clone())
        .expect("db pod");
    (s, pod, db_ip)
}

/// Whether plaintext from `from` to `addr` got the backend's echo.
fn greeted(c: &Cluster, from: PodRef, addr: &str) -> bool {
    let r = c
        .tcp_with(from, addr, &["--send", "hi", "--timeout-ms", "1500"])
        .expect("tcp client");
    r["received"].as_str().unwrap_or("").contains("echo:hi")
}

fn carries_marker(s: &sidelane_tests::capture::Segment) -> bool {
    s.payload
        .windows(MARKER.len())
        .any(|w| w == MARKER.as_bytes())
}

#[test]
fn tcp_between_enrolled_pods_crosses_the_wire_only_inside_mutual_tls() {
    let s = setup(|_| {});
    let (received, segments) = s.send_marker();
    assert!(
        received.contains("db-v1") && received.contains(&format!("echo:{MARKER}")),
        "the backend's greeting and echo: {received:?}"
    );
    let tunnelled: usize = segments
        .iter()
        .filter(|seg| seg.dst_port == TUNNEL_PORT || seg.src_port == TUNNEL_PORT)
        .map(|seg| seg.payload.len())
        .sum();
    assert!(
        tunnelled > 1000,
        "the TLS handshake and the data went to port {TUNNEL_PORT} ({tunnelled} bytes seen)"
    );
    let leaked: Vec<_> = segments.iter().filter(|seg| carries_marker(seg)).collect();
    assert!(leaked.is_empty(), "plaintext on the wire: {leaked:?}");

    let source = "source_principal=\"spiffe://cluster.local/ns/production/sa/sleep\"";
    let destination = "destination_principal=\"spiffe://cluster.local/ns/production/sa/db\"";
    let m2 = s.c.metrics(2).expect("node 2 metrics");
    let inbound = [
        "reporter=\"destination\"",
        source,
        destination,
        "connection_security_policy=\"mutual_tls\"",
        "destination_service=\"db.production.svc.cluster.local\"",
        "source_workload=\"sleep\"",
    ];
    assert_eq!(
        metric(&m2, "istio_tcp_connections_opened_total", &inbound),
        1,
        "{m2}"
    );
    // The client sent the marker; the greeting and echo came back.
    assert_eq!(
        metric(&m2, "istio_tcp_received_bytes_total", &inbound),
        MARKER.len() as u64
    );
    assert_eq!(
        metric(&m2, "istio_tcp_sent_bytes_total", &inbound),
        received.len() as u64
    );
    // Each node issued the certificate of its own pod's identity.
    for (node, sa) in [(1, "sleep"), (2, "db")] {
        let certs =
            s.c.meshctl(node, &["proxy-config", "certs"])
                .expect("meshctl");
        assert!(
            certs.contains(&format!("spiffe://cluster.local/ns/production/sa/{sa}")),
            "node {node}: {certs}"
        );
        assert!(
            certs.contains(&format!("signed by the CA server at {}", s.c.ca_addr())),
            "node {node}: {certs}"
        );
    }
    let m1 = s.c.metrics(1).expect("node 1 metrics");
    let outbound = ["reporter=\"source\"", source, destination];
    assert_eq!(
        metric(&m1, "istio_tcp_connections_closed_total", &outbound),
        1,
        "{m1}"
    );
}

#[test]
fn connections_between_two_pods_share_tls_connections() {
    let s = setup(|_| {});
    let capture = Capture::start(s.c.node_netns(1)).expect("capture");
    // Three at once, each open for a second, then one more after they have closed.
    let echoed = |r: sidelane_tests::Result<serde_json::Value>, word: &str| {
        let r = r.expect("tcp client");
        let received = r["received"].as_str().unwrap_or("").to_owned();
        assert!(
            received.contains(&format!("echo:{word}")),
            "{word}: {received:?}"
        );
    };
    std::thread::scope(|scope| {
        let clients: Vec<_> = ["one", "two", "three"]
            .into_iter()
            .map(|word| {
                let s = &s;
                scope.spawn(move || {
                    let r = s.c.tcp_with(
                        s.client,
                        &s.db_addr,
                        &["--send", word, "--linger-ms", "1000"],
                    );
                    (r, word)
                })
            })
            .collect();
        for c in clients {
            let (r, word) = c.join().expect("client thread");
            echoed(r, word);
        }
    });
    // A pool per proxy thread (two in the test daemons), so a connection's frames are
    // handled on the thread that serves it: at most one TLS connection each.
    let opened = |c: &Cluster| {
        let m1 = c.metrics(1).expect("node 1 metrics");
        metric(&m1, "sidelane_tunnel_connections_opened_total", &[])
    };
    let after_three = opened(&s.c);
    assert!(
        (1..=2).contains(&after_three),
        "{after_three} TLS connections for three at once"
    );
    echoed(s.c.tcp(s.client, &s.db_addr, "four"), "four");
    assert_eq!(opened(&s.c), after_three, "the fourth made a new one");
    let segments = capture.segments().expect("captured");
    let mut tls_connections: Vec<u16> = segments
        .iter()
        .filter(|seg| seg.dst_port == TUNNEL_PORT)
        .map(|seg| seg.src_port)
        .collect();
    tls_connections.sort_unstable();
    tls_connections.dedup();
    assert_eq!(
        tls_connections.len() as u64,
        after_three,
        "client ports to {TUNNEL_PORT}: {tls_connections:?}"
    );
    // Still one connection each for the application, as the destination counts them.
    let m2 = s.c.metrics(2).expect("node 2 metrics");
    let inbound = [
        "reporter=\"destination\"",
        "connection_security_policy=\"mutual_tls\"",
        "destination_service=\"db.production.svc.cluster.local\"",
    ];
    assert_eq!(
        metric(&m2, "istio_tcp_connections_opened_total", &inbound),
        4,
        "{m2}"
    );
}

#[test]
fn http_between_enrolled_pods_crosses_the_wire_only_inside_mutual_tls() {
    let s = setup(|_| {});
    for extra in [&[][..], &["--h2"][..]] {
        let capture = Capture::start(s.c.node_netns(1)).expect("capture");
        let url = format!("{}/{MARKER}", s.web_url);
        let mut args = vec![
            "--count",
            "3",
            "--header",
            "x-marker: sidelane-plaintext-marker-7f3a",
        ];
        args.extend_from_slice(extra);
        let responses = s.c.http(s.client, &url, &args).expect("http client");
        let segments = capture.segments().expect("captured");
        assert_eq!(responses.len(), 3, "{extra:?}: {responses:?}");
        for r in &responses {
            assert_eq!(r["status"], 200, "{extra:?}: {r}");
            assert_eq!(r["pod"], "db-v1", "{extra:?}: {r}");
        }
        assert!(
            segments.iter().any(|seg| seg.dst_port == TUNNEL_PORT),
            "{extra:?}: the requests went through the tunnel"
        );
        let leaked: Vec<_> = segments.iter().filter(|seg| carries_marker(seg)).collect();
        assert!(
            leaked.is_empty(),
            "{extra:?}: plaintext on the wire: {leaked:?}"
        );
    }
    // An `http` port is HTTP/1.1 upstream whatever the client speaks, and the pool keeps the
    // connection: all six requests went through one tunnelled connection.
    let m2 = s.c.metrics(2).expect("node 2 metrics");
    let inbound = [
        "reporter=\"destination\"",
        "source_principal=\"spiffe://cluster.local/ns/production/sa/sleep\"",
        "connection_security_policy=\"mutual_tls\"",
        "destination_service=\"web.production.svc.cluster.local\"",
    ];
    assert_eq!(
        metric(&m2, "istio_tcp_connections_opened_total", &inbound),
        1,
        "{m2}"
    );
}

#[test]
fn without_a_ca_the_same_connection_is_plaintext_on_the_wire() {
    // The control for the test above: the capture does see the marker when nothing encrypts.
    let s = setup(|c| c.without_ca());
    let (received, segments) = s.send_marker();
    assert!(received.contains(&format!("echo:{MARKER}")), "{received:?}");
    assert!(
        segments.iter().any(carries_marker),
        "the marker in the clear"
    );
    assert!(
        !segments.iter().any(|seg| seg.dst_port == TUNNEL_PORT),
        "no tunnel without a CA"
    );
    // Without the tunnel the daemon connects from the client pod's namespace: the backend
    // sees the client pod's own address.
    let r = s.c.http(s.client, &s.web_url, &[]).expect("http client");
    assert_eq!(
        r[0]["body"]["peer"]
            .as_str()
            .map(|p| p.contains("10.244.1.")),
        Some(true),
        "{r:?}"
    );
}

#[test]
fn the_tunnel_port_refuses_a_peer_without_a_mesh_certificate() {
    let (s, outsider, db_ip) = with_outsider();
    let c = s.c;
    // Plaintext (and then a TLS handshake without a client certificate) at the tunnel port.
    let plain = c
        .tcp(outsider, &format!("{db_ip}:{TUNNEL_PORT}"), MARKER)
        .expect("tcp client");
    assert!(
        !plain["received"].as_str().unwrap_or("").contains("echo:"),
        "{plain}"
    );
    let m2 = c.metrics(2).expect("metrics");
    assert!(
        metric(&m2, "sidelane_tunnel_refused_total", &[]) >= 1,
        "the refusal counted: {m2}"
    );
    assert_eq!(
        metric(
            &m2,
            "istio_tcp_connections_opened_total",
            &["reporter=\"destination\""]
        ),
        0
    );
}

/// The tutorial's "Enabling mTLS Between Services", unchanged: STRICT in the namespace and
/// mesh-wide.
const TUTORIAL_STRICT: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default
  namespace: production
spec:
  mtls:
    # STRICT: Only accept mTLS connections
    # PERMISSIVE: Accept both mTLS and plain text (migration mode)
    mode: STRICT
---
# Apply mTLS cluster-wide
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system  # Applies to all namespaces
spec:
  mtls:
    mode: STRICT
"#;

/// A workload-level exception: port 9000 of the db pods takes plaintext again.
const DB_PORT_DISABLED: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db-legacy-port, namespace: production}
spec:
  selector: {matchLabels: {app: db}}
  portLevelMtls:
    9000: {mode: DISABLE}
"#;

#[test]
fn peer_authentication_decides_whether_plaintext_from_outside_the_mesh_reaches_the_pod() {
    let (s, outsider, db_ip) = with_outsider();
    let c = s.c;
    let db = format!("{db_ip}:9000");

    let db6 = c
        .pods
        .iter()
        .find(|p| p.spec.name == "db-v1")
        .map(|p| format!("[{}]:9000", p.ip6))
        .expect("db pod");

    // PERMISSIVE (nothing set): plaintext reaches the application, through the daemon.
    assert!(
        greeted(&c, outsider, &db),
        "plaintext accepted under PERMISSIVE"
    );
    assert!(
        greeted(&c, outsider, &db6),
        "IPv6 plaintext accepted under PERMISSIVE"
    );
    let plaintext = [
        "reporter=\"destination\"",
        "connection_security_policy=\"none\"",
        "destination_app=\"db\"",
    ];
    let m2 = c.metrics(2).expect("metrics");
    assert_eq!(
        metric(&m2, "istio_tcp_connections_opened_total", &plaintext),
        2,
        "{m2}"
    );

    // STRICT: refused, while the mesh client still gets through the tunnel.
    c.write_file("peer-authentication.yaml", TUTORIAL_STRICT)
        .expect("policy");
    wait_for("STRICT applied", Duration::from_secs(10), || {
        (!greeted(&c, outsider, &db)).then_some(())
    })
    .expect("plaintext refused");
    let count = |name: &str, labels: &[&str]| metric(&c.metrics(2).expect("metrics"), name, labels);
    let (accepted, refused) = (
        count("istio_tcp_connections_opened_total", &plaintext),
        count("sidelane_inbound_plaintext_refused_total", &[]),
    );
    assert!(refused >= 1);
    assert!(!greeted(&c, outsider, &db6), "IPv6 refused too");
    let refused = count("sidelane_inbound_plaintext_refused_total", &[]);
    assert!(!greeted(&c, outsider, &db), "refused again");
    assert_eq!(
        count("istio_tcp_connections_opened_total", &plaintext),
        accepted,
        "nothing more reached the application"
    );
    assert_eq!(
        count("sidelane_inbound_plaintext_refused_total", &[]),
        refused + 1
    );
    let r = c.tcp(s.client, &s.db_addr, "mesh").expect("tcp client");
    assert!(
        r["received"].as_str().unwrap_or("").contains("echo:mesh"),
        "the mesh client under STRICT: {r}"
    );

    // A port-level exception for the db workload lets plaintext in on that port again.
    c.write_file("db-port.yaml", DB_PORT_DISABLED)
        .expect("policy");
    wait_for(
        "the port exception applied",
        Duration::from_secs(10),
        || greeted(&c, outsider, &db).then_some(()),
    )
    .expect("plaintext accepted on the excepted port");
}

#[test]
fn with_its_daemon_down_a_captured_pod_takes_no_plaintext_until_the_next_daemon_runs() {
    let (s, outsider, db_ip) = with_outsider();
    let mut c = s.c;
    let db = format!("{db_ip}:9000");
    assert!(greeted(&c, outsider, &db), "PERMISSIVE: plaintext accepted");
    c.kill_daemon(2);
    assert!(
        !greeted(&c, outsider, &db),
        "no daemon: the capture stays and drops (fail closed), nothing bypasses it"
    );
    c.start_daemon(2).expect("the next daemon");
    wait_for("capture served again", Duration::from_secs(10), || {
        greeted(&c, outsider, &db).then_some(())
    })
    .expect("plaintext accepted again");
}

/// `meshctl ca request` on `node` with `token_file`: what it printed, or why it failed.
fn ask_ca(c: &Cluster, node: usize, identity: &str, token_file: &std::path::Path) -> String {
    let roots = c.roots_dir();
    let args = [
        "ca",
        "request",
        identity,
        "--ca-addr",
        &c.ca_addr(),
        "--ca-dir",
        &roots.to_string_lossy(),
        "--token-file",
        &token_file.to_string_lossy(),
    ];
    match c.meshctl(node, &args) {
        Ok(out) => out,
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_node_gets_certificates_only_for_the_pods_it_runs() {
    let s = setup(|_| {});
    let c = &s.c;
    // The daemons hold the root only: the CA key is the CA server's.
    assert!(
        !c.roots_dir()
            .join(mesh_daemon::identity::ca::CA_KEY)
            .exists()
    );
    // Traffic through the tunnel works, so each node got its pods' certificates.
    let r = c.tcp(s.client, &s.db_addr, "hi").expect("tcp client");
    assert!(
        r["received"].as_str().unwrap_or("").contains("echo:hi"),
        "{r}"
    );

    let sleep = "spiffe://cluster.local/ns/production/sa/sleep";
    let db = "spiffe://cluster.local/ns/production/sa/db";
    let node1 = c.node_token_file(1);
    let node2 = c.node_token_file(2);
    assert!(ask_ca(c, 1, sleep, &node1).contains(&format!("issued {sleep}")));
    assert!(ask_ca(c, 2, db, &node2).contains(&format!("issued {db}")));
    // Node 1 runs no db pod: taking node 1 over does not yield db's identity.
    let refused = ask_ca(c, 1, db, &node1);
    assert!(
        refused.contains("403") && refused.contains("no pod on node node-1 runs as"),
        "{refused}"
    );
    // Nor does a namespace or trust domain no pod of the node has.
    for other in [
        "spiffe://cluster.local/ns/kube-system/sa/sleep",
        "spiffe://evil.example/ns/production/sa/sleep",
    ] {
        assert!(ask_ca(c, 1, other, &node1).contains("403"), "{other}");
    }
    // A token the server does not know gets nothing.
    let forged = std::env::temp_dir().join(format!("sl-forged-{}", std::process::id()));
    std::fs::write(&forged, "not-a-node-token").expect("token file");
    let unknown = ask_ca(c, 1, sleep, &forged);
    let _ = std::fs::remove_file(&forged);
    assert!(unknown.contains("401"), "{unknown}");

    // The CA server counts what it did.
    let m = c.ca_metrics().expect("CA metrics");
    let count = |result: &str| {
        metric(
            &m,
            "sidelane_ca_requests_total",
            &[&format!("result=\"{result}\"")],
        )
    };
    assert_eq!(count("forbidden"), 3, "{m}");
    assert_eq!(count("unauthenticated"), 1, "{m}");
    assert!(
        count("signed") >= 4,
        "both daemons' and the two asked here: {m}"
    );
}

#[test]
fn in_a_cluster_the_api_server_vouches_for_a_nodes_token() {
    let s = setup(|c| c.ca_reviews_tokens());
    let c = &s.c;
    let r = c.tcp(s.client, &s.db_addr, "hi").expect("tcp client");
    assert!(
        r["received"].as_str().unwrap_or("").contains("echo:hi"),
        "certificates came through TokenReview: {r}"
    );
    let sleep = "spiffe://cluster.local/ns/production/sa/sleep";
    let db = "spiffe://cluster.local/ns/production/sa/db";
    let node1 = c.node_token_file(1);
    assert!(ask_ca(c, 1, sleep, &node1).contains(&format!("issued {sleep}")));
    let refused = ask_ca(c, 1, db, &node1);
    assert!(refused.contains("403"), "{refused}");
    // A token the API server does authenticate, but as a workload, not as the node daemons.
    let workload = ask_ca(c, 1, sleep, &c.workload_token_file());
    assert!(workload.contains("401"), "{workload}");
}
