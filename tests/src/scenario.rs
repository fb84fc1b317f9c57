//! The shape most end-to-end tests share: a `production` namespace in the mesh, versions of
//! one app serving on node 2, a `sleep` client on node 1; and the tutorial's files.
use std::collections::BTreeMap;

use serde_json::Value;

use crate::{Cluster, PodRef, PodSpec, Result, ServicePortSpec};

/// A file of the tutorial (`demo/tutorial/`), exactly as users apply it.
pub fn tutorial(file: &str) -> String {
    let path = format!("{}/../demo/tutorial/{file}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("tutorial file {path}: {e}"))
}

/// A two-node cluster with `backends` (pod name, `version` label) of app `app` serving on
/// node 2 and the `sleep` client on node 1, all in `production` (enrolled). Daemons are
/// not started: tests add services and configuration first.
pub fn production(app: &str, backends: &[(&str, &str)]) -> Result<(Cluster, PodRef)> {
    let mut c = Cluster::new(2)?;
    c.namespace("production", &[("istio-injection", "enabled")])?;
    for (name, version) in backends {
        c.add_pod(
            PodSpec::new("production", name, 2)
                .label("app", app)
                .label("version", version)
                .serving(),
        )?;
    }
    let client = c.add_pod(PodSpec::new("production", "sleep", 1).label("app", "sleep"))?;
    Ok((c, client))
}

/// Adds the Service `name` over app `app` with one HTTP port; returns its URL base.
pub fn http_service(c: &mut Cluster, name: &str, app: &str, port: u16) -> Result<String> {
    let svc = c.add_service(
        "production",
        name,
        &[("app", app)],
        &[ServicePortSpec::new("http", port, 8080)],
    )?;
    Ok(format!("http://{}:{port}", c.service(svc).vip4))
}

/// Starts the daemons and waits until the client is enrolled.
pub fn start(c: &mut Cluster, client: PodRef) -> Result<()> {
    c.start()?;
    c.wait_enrolled(client, true)
}

/// Each response's `field` when it answered 200, else its status (or error), counted.
pub fn tally(responses: &[Value], field: &str) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for r in responses {
        let key = match (r["status"].as_u64(), r[field].as_str()) {
            (Some(200), Some(v)) => v.to_owned(),
            (Some(s), _) => s.to_string(),
            _ => format!("error {}", r["error"]),
        };
        *t.entry(key).or_default() += 1;
    }
    t
}

/// Sum of a metric's samples whose labels contain every `label="value"` given.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}
