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
    assert_eq!(
        mounts,
        [
            "/sys/fs/bpf",
            "/sys/fs/cgroup",
            "/run/sidelane",
            mesh_daemon::settings::DEFAULT_CA_DIR,
            "/var/run/secrets/tokens",
        ]
    );
    let volume = |name: &str| {
        spec["volumes"]
            .as_sequence()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
            .expect("a volume")
    };
    // Istio's name for a plugged-in CA's secret, of which the daemon gets the root only.
    let cacerts = volume("cacerts");
    assert_eq!(cacerts["secret"]["secretName"], "cacerts");
    let items = cacerts["secret"]["items"].as_sequence().expect("items");
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["key"], mesh_daemon::identity::ca::ROOT_CERT);
    // The token the CA server reviews, where the daemon reads it.
    let token = &volume("ca-token")["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "sidelane-ca");
    assert_eq!(
        std::path::Path::new("/var/run/secrets/tokens").join(token["path"].as_str().expect("path")),
        std::path::Path::new(mesh_daemon::settings::DEFAULT_CA_TOKEN_FILE)
    );
    let env = c["env"].as_sequence().expect("env");
    assert!(
        env.iter().any(|e| e["name"] == "SIDELANE_CA_ADDR"),
        "certificates come from the CA server"
    );
}

#[test]
fn the_ca_server_alone_mounts_the_key_and_may_review_tokens() {
    let all = docs("ca.yaml");
    let role = all
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .expect("ClusterRole");
    let rules = role["rules"].as_sequence().expect("rules");
    assert!(rules.iter().any(|r| {
        r["resources"][0] == "tokenreviews"
            && r["verbs"]
                .as_sequence()
                .is_some_and(|v| v.len() == 1 && v[0] == "create")
    }));
    assert!(
        rules
            .iter()
            .filter(|r| r["resources"][0] != "tokenreviews")
            .all(|r| r["verbs"].as_sequence().is_some_and(|v| v.len() == 3)),
        "otherwise it only reads"
    );
    let deployment = all
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("Deployment");
    let spec = &deployment["spec"]["template"]["spec"];
    assert_eq!(spec["volumes"][0]["secret"]["secretName"], "cacerts");
    assert!(
        spec["volumes"][0]["secret"]["items"].is_null(),
        "the whole CA, key included"
    );
    let service = all
        .iter()
        .find(|d| d["kind"] == "Service")
        .expect("Service");
    let name = format!(
        "{}.{}.svc",
        service["metadata"]["name"].as_str().expect("name"),
        service["metadata"]["namespace"]
            .as_str()
            .expect("namespace")
    );
    assert_eq!(name, mesh_daemon::settings::DEFAULT_CA_SERVER_NAME);
    assert_eq!(service["spec"]["ports"][0]["port"], 15012);
}

/// An update runs the new daemon beside the old one, where it finds the old one's handover
/// socket, and the old one's drain ends before the kubelet's SIGKILL.
#[test]
fn the_daemonset_updates_by_handing_the_listeners_over() {
    let ds = docs("daemonset.yaml").remove(0);
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(rolling["maxSurge"], 1);
    assert_eq!(rolling["maxUnavailable"], 0);
    let spec = &ds["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    assert!(
        c["ports"].is_null(),
        "declared ports are host ports under hostNetwork: the surge pod could not schedule"
    );
    let socket_dir = std::path::Path::new(mesh_daemon::settings::DEFAULT_HANDOVER_SOCKET)
        .parent()
        .and_then(|d| d.to_str())
        .expect("a directory");
    let mount = c["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .find(|m| m["mountPath"] == socket_dir)
        .expect("the handover socket's directory is mounted");
    let volume = spec["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("its volume");
    assert_eq!(
        volume["hostPath"]["path"], socket_dir,
        "shared by the old and the new daemon's pods"
    );
    let grace = spec["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("a grace period");
    let drain = <mesh_daemon::settings::Settings as clap::Parser>::parse_from([
        "mesh-daemon",
        "--node-name",
        "n",
    ])
    .drain_timeout
    .0;
    assert!(drain.as_secs() < grace, "drain {drain:?}, grace {grace}s");
}
