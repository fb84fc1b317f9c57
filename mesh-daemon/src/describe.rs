//! `meshctl describe pod`: what `istioctl x describe pod` tells, from a snapshot. Whether the
//! pod is in the mesh and why, the Services it serves and, for each, the DestinationRule and
//! the subsets its labels match, the VirtualService routes that send to it, and what its
//! inbound connections meet: PeerAuthentication per port and the AuthorizationPolicies that
//! apply.
use std::collections::BTreeSet;

use serde::Serialize;

use crate::{
    proxy::protocol::Protocol,
    routing::view,
    state::{PodInfo, Snapshot},
};

#[derive(Debug, Serialize)]
pub struct PodDescription {
    /// `name.namespace`.
    pub pod: String,
    pub node: String,
    pub service_account: String,
    pub in_mesh: bool,
    /// Why it is (or is not) in the mesh.
    pub reason: String,
    /// Annotations that could not be read.
    pub problems: Vec<String>,
    pub services: Vec<ServiceDescription>,
    pub authorization_policies: Vec<PolicyDescription>,
}

#[derive(Debug, Serialize)]
pub struct ServiceDescription {
    /// The Service's host name.
    pub host: String,
    pub port: u16,
    pub port_name: String,
    /// The pod's port the Service port sends to.
    pub target_port: u16,
    /// As Istio decides it from the port (`auto`: sniffed).
    pub protocol: &'static str,
    /// What plaintext to that port meets (with a CA; through the tunnel, mTLS always).
    pub peer_authentication: &'static str,
    /// `namespace/name` of the DestinationRules that apply to clients in the pod's namespace.
    pub destination_rules: Vec<String>,
    /// Of their subsets, those whose labels the pod has.
    pub matching_subsets: Vec<String>,
    /// Of their subsets, those that leave this pod out.
    pub other_subsets: Vec<String>,
    /// Routes (from the pod's namespace) for this host and port: match and destinations.
    pub routes: Vec<RouteDescription>,
}

#[derive(Debug, Serialize)]
pub struct RouteDescription {
    pub virtual_service: String,
    pub matches: String,
    pub action: String,
}

#[derive(Debug, Serialize)]
pub struct PolicyDescription {
    pub name: String,
    pub action: &'static str,
    pub rules: usize,
    pub dry_run: bool,
    /// HTTP attributes its rules use, which connections do not show.
    pub http_attributes: Vec<String>,
}

/// The description of the pod `name` in `namespace`, if the snapshot has it.
pub fn pod(snap: &Snapshot, name: &str, namespace: &str) -> Option<PodDescription> {
    let pod = snap
        .pods_by_uid
        .values()
        .find(|p| p.name == name && p.namespace == namespace)?;
    Some(PodDescription {
        pod: format!("{name}.{namespace}"),
        node: pod.node_name.clone(),
        service_account: pod.service_account.clone(),
        in_mesh: pod.enrollment.enrolled,
        reason: pod.enrollment.reason.clone(),
        problems: pod.enrollment.problems.clone(),
        services: services(snap, pod),
        authorization_policies: snap
            .authz
            .applying(&pod.namespace, &pod.labels)
            .map(|p| PolicyDescription {
                name: p.name.clone(),
                action: p.action.as_str(),
                rules: p.rules.len(),
                dry_run: p.dry_run,
                http_attributes: p.http_attributes.clone(),
            })
            .collect(),
    })
}

fn services(snap: &Snapshot, pod: &PodInfo) -> Vec<ServiceDescription> {
    // A dual-stack Service has a VIP per family: one entry per host and port.
    let mut seen = BTreeSet::new();
    let mut ports: Vec<_> = snap
        .services_by_vip
        .values()
        .filter_map(|svc| {
            let target = svc
                .endpoints
                .iter()
                .find(|e| e.pod.as_deref() == Some(&pod.uid) || pod.ips.contains(&e.addr.ip()))?
                .addr
                .port();
            seen.insert((svc.hostname.clone(), svc.port))
                .then_some((svc.clone(), target))
        })
        .collect();
    ports.sort_by(|a, b| (&a.0.hostname, a.0.port).cmp(&(&b.0.hostname, b.0.port)));
    let routes = view::routes(&snap.routing, &pod.namespace);
    ports
        .into_iter()
        .map(|(svc, target)| {
            let rule = snap.routing.destination_rule(&pod.namespace, &svc.hostname);
            let (matching, other): (Vec<_>, Vec<_>) = rule
                .map(|r| {
                    r.subsets
                        .iter()
                        .map(|(name, (labels, _))| {
                            (name.clone(), crate::state::selects(labels, &pod.labels))
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
                .into_iter()
                .partition(|(_, fits)| *fits);
            ServiceDescription {
                host: svc.hostname.clone(),
                port: svc.port,
                port_name: svc.port_name.clone(),
                target_port: target,
                protocol: match Protocol::declared(&svc.port_name, svc.app_protocol.as_deref()) {
                    Some(Protocol::Http) => "HTTP",
                    Some(Protocol::Http2) => "HTTP2",
                    Some(Protocol::Tls) => "TLS",
                    Some(Protocol::Tcp) => "TCP",
                    None => "auto",
                },
                peer_authentication: snap
                    .peer_authn
                    .mode(&pod.namespace, &pod.labels, target)
                    .as_str(),
                destination_rules: rule.map(|r| r.rules.clone()).unwrap_or_default(),
                matching_subsets: matching.into_iter().map(|(n, _)| n).collect(),
                other_subsets: other.into_iter().map(|(n, _)| n).collect(),
                routes: routes
                    .iter()
                    .filter(|r| r.host == svc.hostname && r.port == svc.port)
                    .map(|r| RouteDescription {
                        virtual_service: r.virtual_service.clone(),
                        matches: r.matches.clone(),
                        action: r.action.clone(),
                    })
                    .collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::{config::objects::Objects, state::Snapshot};

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: production, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: api-v2, namespace: production, uid: 22222222-2222-2222-2222-222222222222, labels: {app: api-server, version: v2}}
spec: {nodeName: node-2, serviceAccountName: api, containers: [{name: api, image: x}]}
status: {podIP: 10.244.2.10}
---
apiVersion: v1
kind: Service
metadata: {name: api-server, namespace: production}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 8080, targetPort: 9080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-server-v4, namespace: production, labels: {kubernetes.io/service-name: api-server}}
addressType: IPv4
ports: [{name: http, port: 9080}]
endpoints:
- addresses: [10.244.2.10]
  targetRef: {kind: Pod, uid: 22222222-2222-2222-2222-222222222222}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api-server, namespace: production}
spec:
  host: api-server
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api-server, namespace: production}
spec:
  hosts: [api-server]
  http:
  - match: [{headers: {x-canary: {exact: "true"}}}]
    route: [{destination: {host: api-server, subset: v2}}]
  - route: [{destination: {host: api-server, subset: v1}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: production}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-get, namespace: production}
spec:
  selector: {matchLabels: {app: api-server}}
  rules: [{to: [{operation: {methods: [GET]}}]}]
"#;

    #[test]
    fn a_pod_is_described_as_its_clients_and_its_policies_see_it() {
        let mut o = Objects::default();
        o.add_text("c.yaml", CLUSTER);
        assert!(o.errors.is_empty(), "{:?}", o.errors);
        let snap = Snapshot::compile(&o, "cluster.local", "istio-system", 1);
        assert!(super::pod(&snap, "api-v2", "staging").is_none());
        let d = super::pod(&snap, "api-v2", "production").expect("described");
        assert!(d.in_mesh, "{}", d.reason);
        assert_eq!(d.node, "node-2");
        let [svc] = d.services.as_slice() else {
            panic!("one service: {:?}", d.services);
        };
        assert_eq!(svc.host, "api-server.production.svc.cluster.local");
        assert_eq!(
            (svc.port, svc.target_port, svc.protocol),
            (8080, 9080, "HTTP")
        );
        assert_eq!(svc.peer_authentication, "STRICT");
        assert_eq!(svc.destination_rules, ["production/api-server"]);
        assert_eq!(svc.matching_subsets, ["v2"]);
        assert_eq!(svc.other_subsets, ["v1"]);
        assert_eq!(svc.routes.len(), 2, "{:?}", svc.routes);
        assert!(svc.routes[0].action.contains("|v2|"), "{:?}", svc.routes);
        let [policy] = d.authorization_policies.as_slice() else {
            panic!("one policy: {:?}", d.authorization_policies);
        };
        assert_eq!(policy.name, "production/api-get");
        assert_eq!(policy.action, "ALLOW");
        assert_eq!(policy.rules, 0, "its only rule needs HTTP attributes");
        assert_eq!(policy.http_attributes, ["methods"]);
    }
}
