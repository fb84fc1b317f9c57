//! End-to-end: real eBPF redirection through real node daemons in the netns cluster.
//! Every assertion is on what a user would see: which pod answered, bytes and resets as
//! the client got them, the daemon's own counters and access log.

use std::time::Duration;

use serde_json::Value;
use sidelane_tests::{
    Cluster, PodRef, PodSpec, RunningClient, ServicePortSpec, ServiceRef, leftovers,
    scenario::metric, sys,
};

struct Setup {
    c: Cluster,
    client: PodRef,
    server: PodRef,
    svc: ServiceRef,
}

/// Two nodes; an enrolled client on node 1; the `api-server` Service backed by one pod on
/// node 2.
fn setup(client_spec: impl FnOnce(PodSpec) -> PodSpec) -> Setup {
    setup_with(client_spec, &[])
}

/// [`setup`] with daemon settings (environment variables).
fn setup_with(client_spec: impl FnOnce(PodSpec) -> PodSpec, settings: &[(&str, &str)]) -> Setup {
    let mut c = Cluster::new(2).expect("cluster");
    for (var, value) in settings {
        c.daemon_setting(var, value);
    }
    c.namespace("production", &[("sidelane.dev/mesh", "enabled")])
        .expect("ns");
    let server = c
        .add_pod(
            PodSpec::new("production", "api-server-v1", 2)
                .label("app", "api-server")
                .label("version", "v1")
                .serving(),
        )
        .expect("server pod");
    let client = c
        .add_pod(client_spec(
            PodSpec::new("production", "client", 1).label("app", "client"),
        ))
        .expect("client pod");
    let svc = c
        .add_service(
            "production",
            "api-server",
            &[("app", "api-server")],
            &[
                ServicePortSpec::new("http", 80, 8080),
                ServicePortSpec::new("tcp", 9000, 9000),
            ],
        )
        .expect("service");
    c.start().expect("daemons");
    Setup {
        c,
        client,
        server,
        svc,
    }
}

/// Connections node `n`'s daemon has accepted from redirected pods.
fn proxied(c: &Cluster, node: usize) -> u64 {
    let m = c.metrics(node).expect("metrics");
    metric(&m, "sidelane_outbound_connections_total", &[])
}

fn ok_from(responses: &[Value], pod: &str) -> usize {
    responses
        .iter()
        .filter(|r| r["status"] == 200 && r["pod"] == pod)
        .count()
}

#[test]
fn enrolled_pod_reaches_a_service_on_another_node_through_its_daemon() {
    let s = setup(|p| p);
    let c = &s.c;
    c.wait_enrolled(s.client, true).expect("client enrolled");
    let vip4 = c.service(s.svc).vip4.clone();
    let vip6 = c.service(s.svc).vip6.clone();
    let before = proxied(c, 1);

    let v4 = c
        .http(s.client, &format!("http://{vip4}/hello"), &["--count", "3"])
        .expect("v4");
    assert_eq!(ok_from(&v4, "api-server-v1"), 3, "{v4:?}");
    // Through the mTLS tunnel, the backend's node delivers from inside the backend's pod:
    // the backend sees its own pod address, not the node's (as ztunnel without its
    // source-address spoofing, or a sidecar's 127.0.0.6).
    assert_eq!(
        v4[0]["body"]["peer"]
            .as_str()
            .map(|p| p.contains("10.244.2.")),
        Some(true),
        "{v4:?}"
    );

    let v6 = c
        .http(
            s.client,
            &format!("http://[{vip6}]/hello"),
            &["--new-conn", "--count", "2"],
        )
        .expect("v6");
    assert_eq!(ok_from(&v6, "api-server-v1"), 2, "{v6:?}");
    assert!(
        v6[0]["body"]["peer"]
            .as_str()
            .is_some_and(|p| p.contains("fd00:244:2::")),
        "{v6:?}"
    );

    // One keep-alive connection for the three v4 requests, one per v6 request.
    assert_eq!(
        proxied(c, 1) - before,
        3,
        "node 1 daemon must have carried the connections"
    );
    // The port is named "http": the daemon routes each request (Istio's request metrics and
    // an HTTP access-log line), reporting source and destination workloads.
    let m = c.metrics(1).expect("metrics");
    assert_eq!(
        metric(
            &m,
            "istio_requests_total",
            &[
                "destination_service=\"api-server.production.svc.cluster.local\"",
                "source_workload=\"client\"",
                "destination_workload=\"api-server\"",
                "destination_version=\"v1\"",
                "response_code=\"200\"",
                "request_protocol=\"http\"",
            ]
        ),
        5,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "sidelane_bpf_connect_decisions",
            &["decision=\"redirected\""]
        ) >= 3,
        "{m}"
    );
    let log = c.daemon_log_with(
        1,
        &["\"GET /hello HTTP/1.1\" 200 - ", &format!(" {vip4}:80 ")],
    );
    assert!(
        log.contains("\"GET /hello HTTP/1.1\" 200 - ")
            && log.contains("outbound|80||api-server.production.svc.cluster.local"),
        "{log}"
    );
    assert!(log.contains(&format!(" {vip4}:80 ")), "{log}");
    // The destination node's daemon was not on the path (no inbound capture yet).
    assert_eq!(proxied(c, 2), 0);
}

#[test]
fn tcp_half_close_and_reset_are_carried_through() {
    let s = setup(|p| p);
    let c = &s.c;
    c.wait_enrolled(s.client, true).expect("enrolled");
    let vip = format!("{}:9000", c.service(s.svc).vip4);

    // The client half-closes after sending; the server still answers, then closes.
    let r = c.tcp(s.client, &vip, "hello\\nworld\\n").expect("tcp");
    assert_eq!(
        r["received"].as_str(),
        Some("pod=api-server-v1 version=v1\necho:hello\necho:world\nbye\n"),
        "{r}"
    );
    // A reset by the server reaches the client as a reset, not as a clean close.
    let r = c.tcp(s.client, &vip, "RESET\\n").expect("tcp");
    assert_eq!(r["error"], "reset", "{r}");
    // Large transfers arrive intact in both directions.
    let r = c.tcp_bulk(s.client, &vip, 200_000).expect("tcp");
    assert_eq!(
        r["received"].as_str().map(str::len),
        Some("pod=api-server-v1 version=v1\n".len() + 5 + 200_000 + 1 + 4),
        "bytes lost"
    );
    let m = c.metrics(1).expect("metrics");
    assert!(
        metric(
            &m,
            "istio_tcp_received_bytes_total",
            &["destination_service_name=\"api-server\""]
        ) >= 200_000
    );
    assert!(
        metric(
            &m,
            "istio_tcp_sent_bytes_total",
            &["destination_service_name=\"api-server\""]
        ) >= 200_000
    );
}

/// As Istio's proxies do (`tcp_reporting_duration`), a long-lived connection's bytes reach
/// the metrics while it is open, and its totals are exact once it closes.
#[test]
fn tcp_bytes_are_reported_while_the_connection_is_open() {
    let s = setup_with(|p| p, &[("SIDELANE_TCP_REPORTING_INTERVAL", "200ms")]);
    let c = &s.c;
    c.wait_enrolled(s.client, true).expect("enrolled");
    let vip = format!("{}:9000", c.service(s.svc).vip4);
    let svc = ["destination_service_name=\"api-server\""];
    let mut held = c
        .spawn_exec(
            s.client,
            &[
                "tcp",
                "--addr",
                &vip,
                "--bulk",
                "100000",
                "--linger-ms",
                "3000",
                "--timeout-ms",
                "10000",
            ],
        )
        .expect("client");
    let sent = held.next_json().expect("sent");
    assert_eq!(sent["event"], "sent", "{sent}");
    let open = sys::wait_for("bytes reported", Duration::from_millis(2500), || {
        let m = c.metrics(1).ok()?;
        (metric(&m, "istio_tcp_received_bytes_total", &svc) >= 100_001).then_some(m)
    })
    .expect("the bytes of an open connection were not reported");
    assert_eq!(
        metric(&open, "istio_tcp_connections_closed_total", &svc),
        0,
        "reported before the client closed"
    );
    assert!(
        metric(&open, "istio_tcp_sent_bytes_total", &svc) > 0,
        "the server's answer so far"
    );

    let done = held.next_json().expect("result");
    let received = done["received"].as_str().map_or(0, str::len) as u64;
    let greeting = "pod=api-server-v1 version=v1\n".len() as u64;
    assert_eq!(received, greeting + 5 + 100_001 + 4, "{done:.200}");
    let m = c.metrics(1).expect("metrics");
    assert_eq!(metric(&m, "istio_tcp_connections_closed_total", &svc), 1);
    assert_eq!(
        metric(&m, "istio_tcp_received_bytes_total", &svc),
        100_001,
        "counted once, not again at the close"
    );
    assert_eq!(metric(&m, "istio_tcp_sent_bytes_total", &svc), received);
}

#[test]
fn pods_outside_the_mesh_and_excluded_traffic_bypass_the_daemon() {
    let s = setup(|p| p.annotation("traffic.sidecar.istio.io/excludeOutboundPorts", "9000"));
    let mut c = s.c;
    c.namespace("legacy", &[]).expect("ns");
    let legacy = c
        .add_pod(PodSpec::new("legacy", "legacy-client", 1))
        .expect("pod");
    let opted_out = c
        .add_pod(
            PodSpec::new("production", "batch", 1).annotation("sidecar.istio.io/inject", "false"),
        )
        .expect("pod");
    let cidr = c
        .add_pod(PodSpec::new("production", "cidr-excluded", 1).annotation(
            "sidelane.dev/exclude-outbound-cidrs",
            "10.244.2.0/24,fd00:244:2::/64",
        ))
        .expect("pod");
    c.wait_enrolled(s.client, true).expect("client enrolled");
    c.wait_enrolled(cidr, true).expect("cidr pod enrolled");
    c.wait_enrolled(opted_out, false)
        .expect("opted-out pod stays out");
    let server_ip = c.pod(s.server).ip4.clone();
    let server_ip6 = c.pod(s.server).ip6.clone();
    let vip = c.service(s.svc).vip4.clone();

    // Not enrolled: direct to the pod IP works and the daemon never sees it; a VIP does not
    // work at all (no kube-proxy in this cluster), which shows nothing redirected it.
    for pod in [legacy, opted_out] {
        let before = proxied(&c, 1);
        let r = c
            .http(pod, &format!("http://{server_ip}:8080/"), &[])
            .expect("direct");
        assert_eq!(ok_from(&r, "api-server-v1"), 1, "{r:?}");
        assert!(
            c.http(pod, &format!("http://{vip}/"), &["--timeout-ms", "1500"])
                .expect("vip")[0]["error"]
                .is_string()
        );
        assert_eq!(
            proxied(&c, 1),
            before,
            "the daemon saw a pod outside the mesh"
        );
    }

    // Excluded port: 9000 goes direct, 8080 through the daemon.
    let before = proxied(&c, 1);
    let r = c
        .tcp(s.client, &format!("{server_ip}:9000"), "")
        .expect("tcp");
    assert!(
        r["received"]
            .as_str()
            .is_some_and(|t| t.starts_with("pod=api-server-v1")),
        "{r}"
    );
    assert_eq!(
        proxied(&c, 1),
        before,
        "excluded port went through the daemon"
    );
    let r = c
        .http(s.client, &format!("http://{server_ip}:8080/"), &[])
        .expect("http");
    assert_eq!(ok_from(&r, "api-server-v1"), 1);
    assert_eq!(
        proxied(&c, 1),
        before + 1,
        "non-excluded port must be proxied (passthrough)"
    );

    // Excluded CIDRs, both families: direct.
    let before = proxied(&c, 1);
    for url in [
        format!("http://{server_ip}:8080/"),
        format!("http://[{server_ip6}]:8080/"),
    ] {
        let r = c.http(cidr, &url, &[]).expect("http");
        assert_eq!(ok_from(&r, "api-server-v1"), 1, "{r:?}");
    }
    assert_eq!(
        proxied(&c, 1),
        before,
        "excluded CIDR went through the daemon"
    );

    // Loopback is never redirected: the server pod talks to itself.
    let before = proxied(&c, 2);
    let r = c
        .http(s.server, "http://127.0.0.1:8080/", &[])
        .expect("loopback");
    assert_eq!(ok_from(&r, "api-server-v1"), 1);
    let r = c
        .http(s.server, "http://[::1]:8080/", &[])
        .expect("loopback v6");
    assert_eq!(ok_from(&r, "api-server-v1"), 1);
    assert_eq!(proxied(&c, 2), before);
    let stats = c.admin_json(2, "/bpf/stats").expect("stats");
    assert!(stats["loopback"].as_u64() >= Some(2), "{stats}");
}

#[test]
fn unlabelling_the_namespace_stops_redirection_of_new_connections() {
    let s = setup(|p| p);
    let mut c = s.c;
    c.wait_enrolled(s.client, true).expect("enrolled");
    let vip = c.service(s.svc).vip4.clone();
    let server_ip = c.pod(s.server).ip4.clone();
    assert_eq!(
        ok_from(
            &c.http(s.client, &format!("http://{vip}/"), &[])
                .expect("http"),
            "api-server-v1"
        ),
        1
    );

    // How soon the daemons notice is not timed here (a loaded 2-core runner took 1.3 s once);
    // `wait_enrolled` bounds it, and the manifest watcher's own test covers event-driven reloads.
    c.namespace("production", &[]).expect("unlabel");
    c.wait_enrolled(s.client, false)
        .expect("client leaves the mesh");
    let before = proxied(&c, 1);
    let r = c
        .http(s.client, &format!("http://{server_ip}:8080/"), &[])
        .expect("direct");
    assert_eq!(ok_from(&r, "api-server-v1"), 1);
    assert_eq!(proxied(&c, 1), before, "still redirected after unlabelling");

    // A connection established through the daemon survives the namespace leaving the mesh.
    c.namespace("production", &[("istio-injection", "enabled")])
        .expect("relabel");
    c.wait_enrolled(s.client, true)
        .expect("client back in the mesh");
    let before = proxied(&c, 1);
    let vip_tcp = format!("{}:9000", c.service(s.svc).vip4);
    let mut held = c
        .spawn_exec(
            s.client,
            &[
                "tcp",
                "--addr",
                &vip_tcp,
                "--send",
                "still here\\n",
                "--hold-ms",
                "1500",
            ],
        )
        .expect("client");
    let connected = held.next_json().expect("connected");
    assert_eq!(connected["event"], "connected", "{connected}");
    assert_eq!(
        proxied(&c, 1),
        before + 1,
        "the held connection goes through the daemon"
    );
    c.namespace("production", &[]).expect("unlabel");
    c.wait_enrolled(s.client, false)
        .expect("client leaves the mesh");
    let done = held.next_json().expect("result");
    assert_eq!(
        done["received"].as_str(),
        Some("pod=api-server-v1 version=v1\necho:still here\nbye\n"),
        "an established connection was dropped by a configuration change: {done}"
    );

    // And back, with the Istio label this time.
    c.namespace("production", &[("istio-injection", "enabled")])
        .expect("relabel");
    c.wait_enrolled(s.client, true)
        .expect("client back in the mesh");
    let before = proxied(&c, 1);
    assert_eq!(
        ok_from(
            &c.http(s.client, &format!("http://{vip}/"), &[])
                .expect("http"),
            "api-server-v1"
        ),
        1
    );
    assert_eq!(proxied(&c, 1), before + 1);
}

#[test]
fn a_killed_daemon_fails_closed_and_its_successor_adopts_the_pins() {
    let s = setup(|p| p);
    let mut c = s.c;
    c.wait_enrolled(s.client, true).expect("enrolled");
    let vip = c.service(s.svc).vip4.clone();
    let server_ip = c.pod(s.server).ip4.clone();

    c.kill_daemon(1);
    // The programs stay attached: the enrolled pod is still redirected, to nothing.
    let r = c
        .tcp(s.client, &format!("{server_ip}:9000"), "")
        .expect("tcp");
    assert_eq!(
        r["error"], "refused",
        "an enrolled pod bypassed the mesh while its daemon was down: {r}"
    );

    c.start_daemon(1).expect("restart");
    c.wait_enrolled(s.client, true).expect("re-enrolled");
    let r = c
        .http(s.client, &format!("http://{vip}/"), &["--count", "2"])
        .expect("http");
    assert_eq!(ok_from(&r, "api-server-v1"), 2, "{r:?}");
    let log = c.daemon_log(1);
    assert!(log.contains("adopted=true"), "{log}");
    assert_one_copy_of_each_program(&c, 1);
}

/// Exactly one copy of each program on the node's cgroup: a new daemon's links replaced the
/// old ones.
fn assert_one_copy_of_each_program(c: &Cluster, node: usize) {
    let out = std::process::Command::new("bpftool")
        .arg("-j")
        .arg("cgroup")
        .arg("show")
        .arg(c.node_cgroup(node))
        .output()
        .expect("bpftool");
    let progs: Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    let names: Vec<&str> = progs
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        ["sl_connect4", "sl_connect6", "sl_sockops"],
        "{names:?}"
    );
}

/// A rolling update with `maxSurge`: the new daemon starts beside the old one and takes its
/// listeners over. Nothing is refused or reset: a connection open across the handover keeps
/// flowing, a request in flight is answered (with `connection: close`, the old daemon
/// draining), new connections go to the new daemon, and the old one exits by itself once its
/// connections are done.
#[test]
fn a_successor_takes_the_listeners_over_and_the_old_daemon_drains() {
    let s = setup(|p| p);
    let mut c = s.c;
    c.wait_enrolled(s.client, true).expect("enrolled");
    let vip = c.service(s.svc).vip4.clone();
    let vip_tcp = format!("{vip}:9000");
    let mut held = c
        .spawn_exec(
            s.client,
            &[
                "tcp",
                "--addr",
                &vip_tcp,
                "--send",
                "across the handover\\n",
                "--hold-ms",
                "5000",
                "--timeout-ms",
                "20000",
            ],
        )
        .expect("tcp client");
    let connected = held.next_json().expect("connected");
    assert_eq!(connected["event"], "connected", "{connected}");
    // Long enough to be in flight when the successor has started.
    let mut slow = slow_request(&c, s.client, &vip, 4, 2);
    let first = c.daemon_pid(1);

    c.start_successor(1).expect("successor");
    assert_ne!(c.daemon_pid(1), first);
    let r = c
        .http(
            s.client,
            &format!("http://{vip}/"),
            &["--count", "3", "--new-conn"],
        )
        .expect("http");
    assert_eq!(ok_from(&r, "api-server-v1"), 3, "{r:?}");
    assert_eq!(
        proxied(&c, 1),
        3,
        "new connections went to the successor (its own count)"
    );

    let answered = slow.next_json().expect("slow answer");
    assert_eq!(answered["status"], 200, "{answered}");
    assert_eq!(answered["headers"]["connection"], "close", "{answered}");
    let done = held.next_json().expect("held result");
    assert_eq!(
        done["received"].as_str(),
        Some("pod=api-server-v1 version=v1\necho:across the handover\nbye\n"),
        "a connection open across the handover was cut: {done}"
    );
    assert_drained_and_exited(&mut c, 1, "took the listeners over");
    assert_one_copy_of_each_program(&c, 1);
}

/// An HTTP request from `client` to `vip` that the backend answers after `secs` seconds,
/// started once node 1's daemon has accepted `accepted` connections in all (this one too).
fn slow_request(c: &Cluster, client: PodRef, vip: &str, secs: u32, accepted: u64) -> RunningClient {
    let url = format!("http://{vip}/delay/{secs}");
    let slow = c
        .spawn_exec(client, &["http", "--url", &url, "--timeout-ms", "20000"])
        .expect("http client");
    sys::wait_for(
        "the request to reach the daemon",
        Duration::from_secs(5),
        || (proxied(c, 1) == accepted).then_some(()),
    )
    .expect("the daemon accepted it");
    slow
}

/// The node's retiring daemon exits by itself, successfully, once its connections are done;
/// its log says `why` it stopped.
fn assert_drained_and_exited(c: &mut Cluster, node: usize, why: &str) {
    let exited = c
        .wait_retired(node, Duration::from_secs(15))
        .expect("the daemon exits once drained");
    assert!(
        exited.iter().all(std::process::ExitStatus::success),
        "{exited:?}"
    );
    let log = c.daemon_log(node);
    assert!(log.contains(why), "{log}");
    assert!(log.contains("drained: no connection left"), "{log}");
}

/// SIGTERM without a successor: new connections are refused at once (fail closed, no
/// bypass), the request in flight is answered, and the daemon exits when it is.
#[test]
fn sigterm_refuses_new_connections_and_lets_the_one_in_flight_finish() {
    let s = setup(|p| p);
    let mut c = s.c;
    c.wait_enrolled(s.client, true).expect("enrolled");
    let vip = c.service(s.svc).vip4.clone();
    let server_ip = c.pod(s.server).ip4.clone();
    let mut slow = slow_request(&c, s.client, &vip, 2, 1);

    c.terminate_daemon(1);
    let refused = sys::wait_for("new connections refused", Duration::from_secs(5), || {
        let r = c
            .tcp(s.client, &format!("{server_ip}:9000"), "")
            .expect("tcp");
        (r["error"] == "refused").then_some(r)
    });
    assert!(
        refused.is_ok(),
        "a draining daemon still accepted, or the pod bypassed it"
    );
    let answered = slow.next_json().expect("slow answer");
    assert_eq!(answered["status"], 200, "{answered}");
    assert_eq!(answered["pod"], "api-server-v1", "{answered}");
    assert_drained_and_exited(&mut c, 1, "SIGTERM: no longer accepting");
}

#[test]
fn pinned_maps_dump_with_field_names() {
    let s = setup(|p| p.annotation("sidelane.dev/exclude-outbound-ports", "5432"));
    let c = &s.c;
    c.wait_enrolled(s.client, true).expect("enrolled");
    let pin = format!("/sys/fs/bpf/sidelane/test-{}-node-1/sl_pods", c.id);
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned", &pin])
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: Value = serde_json::from_slice(&out.stdout).expect("json");
    let entry = &dump.as_array().expect("entries")[0];
    // BTF makes the value readable: named fields, not bytes.
    assert_eq!(
        entry["formatted"]["value"]["redirect_port"], 15001,
        "{dump}"
    );
    assert_eq!(
        entry["formatted"]["value"]["excluded_ports"][0], 5432,
        "{dump}"
    );

    // meshctl shows the same, and the daemon's view of the pod.
    let pods = c.meshctl(1, &["bpf", "pods"]).expect("meshctl bpf pods");
    assert!(
        pods.lines()
            .nth(1)
            .is_some_and(|l| l.contains("15001") && l.contains("[5432]")),
        "{pods}"
    );
    let status = c
        .meshctl(1, &["proxy-status"])
        .expect("meshctl proxy-status");
    let line = status
        .lines()
        .find(|l| l.starts_with("client.production"))
        .expect("client listed");
    assert!(
        line.contains("ENROLLED") && line.contains("sidelane.dev/mesh=enabled"),
        "{status}"
    );
}

#[test]
fn a_dropped_cluster_leaves_nothing_behind() {
    let s = setup(|p| p);
    let id = s.c.id.clone();
    assert!(
        !leftovers(&format!("sl{id}")).is_empty(),
        "the probe must see a live cluster"
    );
    drop(s);
    assert_eq!(leftovers(&format!("sl{id}")), Vec::<String>::new());
}
