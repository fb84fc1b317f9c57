//! End-to-end: the manifest directory is watched; a bad object is rejected alone, reported,
//! and never stops the daemon from serving with the rest.
use std::time::Duration;

use sidelane_tests::{Cluster, PodSpec, ServicePortSpec, sys::wait_for};

const BAD_AND_GOOD: &str = "
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: api-server, namespace: production}
spec:
  hosts: [api-server]
  http:
  - route: [{destination: {host: api-server}}]
    timeout: 3x
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: api-server, namespace: production}
spec:
  host: api-server
  subsets: [{name: v1, labels: {version: v1}}]
";

fn config_errors(c: &Cluster) -> Option<u64> {
    let m = c.metrics(1).ok()?;
    m.lines()
        .find(|l| l.starts_with("sidelane_config_errors "))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
}

#[test]
fn a_rejected_object_is_reported_while_traffic_keeps_flowing() {
    let mut c = Cluster::new(1).expect("cluster");
    c.namespace("production", &[("sidelane.dev/mesh", "enabled")])
        .expect("ns");
    c.add_pod(
        PodSpec::new("production", "api-server-v1", 1)
            .label("app", "api-server")
            .label("version", "v1")
            .serving(),
    )
    .expect("server");
    let client = c
        .add_pod(PodSpec::new("production", "client", 1))
        .expect("client");
    let svc = c
        .add_service(
            "production",
            "api-server",
            &[("app", "api-server")],
            &[ServicePortSpec::new("http", 80, 8080)],
        )
        .expect("service");
    c.start().expect("daemon");
    c.wait_enrolled(client, true).expect("enrolled");
    let url = format!("http://{}/", c.service(svc).vip4);

    c.write_file("routing.yaml", BAD_AND_GOOD).expect("write");
    wait_for(
        "the bad object to be reported",
        Duration::from_secs(5),
        || (config_errors(&c)? == 1).then_some(()),
    )
    .expect("reported");
    let dump = c.admin_json(1, "/config_dump").expect("config_dump");
    let err = &dump["errors"][0];
    assert_eq!(err["kind"], "VirtualService", "{dump}");
    assert_eq!(err["name"], "production/api-server");
    assert_eq!(err["field"], "spec.http[0].timeout");
    let loaded: Vec<String> = dump["istio"]
        .as_array()
        .expect("istio")
        .iter()
        .map(|u| {
            format!(
                "{} {}",
                u["kind"].as_str().unwrap_or(""),
                u["key"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert!(
        loaded.contains(&"DestinationRule production/api-server".to_owned()),
        "{loaded:?}"
    );
    assert!(
        !loaded.iter().any(|l| l.starts_with("VirtualService")),
        "{loaded:?}"
    );
    let r = c.http(client, &url, &[]).expect("http");
    assert_eq!(r[0]["status"], 200, "{r:?}");

    // Fixing the file applies it: no errors left, the VirtualService is loaded.
    c.write_file(
        "routing.yaml",
        &BAD_AND_GOOD.replace("timeout: 3x", "timeout: 3s"),
    )
    .expect("write");
    wait_for("the fixed object to load", Duration::from_secs(5), || {
        (config_errors(&c)? == 0).then_some(())
    })
    .expect("fixed");
    let dump = c.admin_json(1, "/config_dump").expect("config_dump");
    assert!(
        dump["istio"]
            .as_array()
            .expect("istio")
            .iter()
            .any(|u| u["kind"] == "VirtualService" && u["key"] == "production/api-server"),
        "{dump}"
    );
    let r = c.http(client, &url, &[]).expect("http");
    assert_eq!(r[0]["status"], 200, "{r:?}");
}
