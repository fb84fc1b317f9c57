//! The install manifests in deploy/ parse, and grant exactly what the daemon watches.
use std::collections::BTreeSet;

use mesh_daemon::config::kube_source::{CORE_KINDS, ISTIO_KINDS};

fn docs(file: &str) -> Vec<serde_yaml::Value> {
    let path = format!("{}/../deploy/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("read manifest");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("valid YAML"))
        .collect()
}

#[test]
fn rbac_grants_read_access_to_exactly_the_watched_resources() {
    let role = docs("rbac.yaml")
        .into_iter()
        .find(|d| d["kind"] == "ClusterRole")
        .expect("ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        let verbs: Vec<&str> = rule["verbs"]
            .as_sequence()
            .expect("verbs")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(
            verbs,
            ["get", "list", "watch"],
            "the daemon only reads: {rule:?}"
        );
        for g in rule["apiGroups"].as_sequence().expect("groups") {
            for r in rule["resources"].as_sequence().expect("resources") {
                granted.insert(format!(
                    "{}/{}",
                    g.as_str().unwrap_or(""),
                    r.as_str().unwrap_or("")
                ));
            }
        }
    }
    let watched: BTreeSet<String> = CORE_KINDS
        .iter()
        .map(|(group, _, _, plural)| format!("{group}/{plural}"))
        .chain(
            ISTIO_KINDS
                .iter()
                .map(|(group, _, _, plural)| format!("{group}/{plural}")),
        )
        .collect();
    assert_eq!(granted, watched);
}

#[test]
fn the_daemonset_runs_on_every_node_with_the_host_views_it_needs() {
    let ds = docs("daemonset.yaml").remove(0);
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(
        spec["hostPID"], true,
        "pods are found through the node's /proc"
    );
    assert_eq!(spec["serviceAccountName"], "sidelane");
    let c = &spec["containers"][0];
    assert!(
        c["args"]
            .as_sequence()
            .expect("args")
            .iter()
            .any(|a| a == "kubernetes")
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 15021);
    assert_ne!(
        c["securityContext"]["privileged"], true,
        "only the bpffs init container is privileged"
    );
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert_eq!(mounts, ["/sys/fs/bpf", "/sys/fs/cgroup"]);
}
