//! End-to-end: `meshctl proxy-config` on a node shows what the tutorial's VirtualService and
//! DestinationRule compile to for a pod of that node, and `meshctl describe pod` what
//! applies to a pod.
use sidelane_tests::{Cluster, PodSpec, ServicePortSpec};

fn tutorial(f: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../demo/tutorial/{f}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("tutorial file")
}

#[test]
fn proxy_config_shows_the_tutorial_canary_for_a_pod() {
    let mut c = Cluster::new(1).expect("cluster");
    c.namespace("production", &[("istio-injection", "enabled")])
        .expect("ns");
    let mut ips = Vec::new();
    for (name, version) in [("api-server-v1", "v1"), ("api-server-v2", "v2")] {
        let p = c
            .add_pod(
                PodSpec::new("production", name, 1)
                    .label("app", "api-server")
                    .label("version", version)
                    .serving(),
            )
            .expect("pod");
        ips.push(c.pod(p).ip4.clone());
    }
    let client = c
        .add_pod(PodSpec::new("production", "sleep", 1))
        .expect("client");
    c.add_service(
        "production",
        "api-server",
        &[("app", "api-server")],
        &[ServicePortSpec::new("http", 8080, 8080)],
    )
    .expect("service");
    c.write_file("virtualservice.yaml", &tutorial("virtualservice.yaml"))
        .expect("vs");
    c.write_file("destinationrule.yaml", &tutorial("destinationrule.yaml"))
        .expect("dr");
    c.start().expect("daemon");
    c.wait_enrolled(client, true).expect("enrolled");
    let host = "api-server.production.svc.cluster.local";

    let routes = c
        .meshctl(1, &["proxy-config", "routes", "sleep.production"])
        .expect("routes");
    // The tutorial's spelling: `istioctl proxy-config routes <pod-name> -n production`.
    let spelled = c
        .meshctl(1, &["proxy-config", "routes", "sleep", "-n", "production"])
        .expect("routes");
    assert_eq!(spelled, routes);
    let lines: Vec<&str> = routes.lines().filter(|l| l.contains(host)).collect();
    assert_eq!(lines.len(), 3, "{routes}");
    assert!(
        lines[0].contains("/api*")
            && lines[0].contains(&format!("outbound|8080|v1|{host} 90%"))
            && lines[0].contains(&format!("outbound|8080|v2|{host} 10%"))
            && lines[0].ends_with("production/api-server"),
        "{routes}"
    );
    assert!(
        lines[1].contains("x-canary=true")
            && lines[1].contains(&format!("outbound|8080|v2|{host} 100%")),
        "{routes}"
    );

    let clusters = c
        .meshctl(
            1,
            &["proxy-config", "clusters", "sleep.production", "-o", "json"],
        )
        .expect("clusters");
    let clusters: serde_json::Value = serde_json::from_str(&clusters).expect("json");
    let by_subset = |s: &str| {
        clusters
            .as_array()
            .expect("array")
            .iter()
            .find(|c| c["subset"] == s)
            .map(|c| c["endpoints"].as_u64())
    };
    // Dual-stack: each pod is an IPv4 and an IPv6 endpoint.
    assert_eq!(by_subset(""), Some(Some(4)), "{clusters}");
    assert_eq!(by_subset("v1"), Some(Some(2)), "{clusters}");
    assert_eq!(by_subset("v2"), Some(Some(2)), "{clusters}");
    // The tutorial DestinationRule's policy, as the proxy applies it to every cluster.
    let table = c
        .meshctl(1, &["proxy-config", "clusters", "sleep.production"])
        .expect("clusters");
    let policy = "ROUND_ROBIN maxConnections=100 http1MaxPendingRequests=100 \
                  http2MaxRequests=1000 h2Upgrade outlier=5x5xx/30s max50%";
    assert!(
        table.lines().filter(|l| l.ends_with(policy)).count() == 3,
        "{table}"
    );

    let endpoints = c
        .meshctl(1, &["proxy-config", "endpoints", "sleep.production"])
        .expect("endpoints");
    let v1_line = endpoints
        .lines()
        .find(|l| l.contains(&format!("outbound|8080|v1|{host}")))
        .expect("v1 endpoint");
    assert!(
        v1_line.starts_with(&format!("{}:8080", ips[0])),
        "{endpoints}"
    );

    let missing = c.meshctl(1, &["proxy-config", "routes", "nobody.production"]);
    assert!(
        missing.is_err_and(|e| e.to_string().contains("404")),
        "unknown pods are an error"
    );

    // `istioctl x describe pod <pod> -n production`, as the tutorial runs it.
    let described = c
        .meshctl(1, &["describe", "pod", "api-server-v2", "-n", "production"])
        .expect("describe");
    for expected in [
        "Pod: api-server-v2.production",
        "In the mesh: yes",
        &format!("Service: {host}"),
        "Port: http 8080/HTTP targets pod port 8080",
        "DestinationRule: production/api-server",
        "Matching subsets: v2",
        "(Non-matching subsets v1)",
        "VirtualService: production/api-server",
        "AuthorizationPolicies: none",
    ] {
        assert!(
            described.contains(expected),
            "{expected:?} in:\n{described}"
        );
    }
    let missing = c.meshctl(1, &["describe", "pod", "nobody", "-n", "production"]);
    assert!(missing.is_err_and(|e| e.to_string().contains("404")));
}
