//! The Kubernetes objects the test cluster would have in its API server, as YAML.
use std::collections::BTreeMap;

use serde_json::{Value, json};

pub struct PodObject<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub uid: &'a str,
    pub node: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub annotations: &'a BTreeMap<String, String>,
    pub ips: [&'a str; 2],
    pub service_account: &'a str,
}

pub fn namespace(name: &str, labels: &BTreeMap<String, String>) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

pub fn pod(p: &PodObject<'_>) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": p.name, "namespace": p.namespace, "uid": p.uid, "labels": p.labels, "annotations": p.annotations},
        "spec": {"nodeName": p.node, "serviceAccountName": p.service_account, "containers": [{"name": "app", "image": "sidelane-workload"}]},
        "status": {"phase": "Running", "podIP": p.ips[0], "podIPs": [{"ip": p.ips[0]}, {"ip": p.ips[1]}]},
    })
}

pub struct ServicePortObject<'a> {
    pub name: &'a str,
    pub port: u16,
    pub target: u16,
    pub app_protocol: Option<&'a str>,
}

pub fn service(
    name: &str,
    namespace: &str,
    selector: &BTreeMap<String, String>,
    vips: [&str; 2],
    ports: &[ServicePortObject<'_>],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| {
            let mut v =
                json!({"name": p.name, "port": p.port, "targetPort": p.target, "protocol": "TCP"});
            if let Some(a) = p.app_protocol {
                v["appProtocol"] = json!(a);
            }
            v
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": selector, "clusterIP": vips[0], "clusterIPs": vips, "ipFamilies": ["IPv4", "IPv6"],
                 "ipFamilyPolicy": "RequireDualStack", "ports": ports},
    })
}

pub struct EndpointObject<'a> {
    pub ip: &'a str,
    pub pod: &'a str,
    pub uid: &'a str,
    pub node: &'a str,
}

pub fn endpoint_slice(
    service: &str,
    namespace: &str,
    family: &str,
    ports: &[ServicePortObject<'_>],
    endpoints: &[EndpointObject<'_>],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| json!({"name": p.name, "port": p.target, "protocol": "TCP"}))
        .collect();
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            json!({
                "addresses": [e.ip],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": e.node,
                "targetRef": {"kind": "Pod", "name": e.pod, "namespace": namespace, "uid": e.uid},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-{}", family.to_lowercase()), "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": family,
        "ports": ports,
        "endpoints": endpoints,
    })
}

/// Multi-document YAML. JSON is YAML, so each object is one JSON line: no YAML emitter needed.
pub fn to_yaml(objects: &[Value]) -> String {
    objects.iter().map(|o| format!("---\n{o}\n")).collect()
}
