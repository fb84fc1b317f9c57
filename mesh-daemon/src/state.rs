//! The compiled, immutable view of the cluster the proxy and the reconciler read.
//!
//! A new [`Snapshot`] is built from scratch on every configuration change and swapped in
//! whole, so readers never see half a change and never take a lock.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Pod, discovery::v1::EndpointSlice};
use serde::Serialize;

use crate::{
    config::objects::{ObjectError, Objects, Unhandled},
    enrollment::{self, Enrollment},
    routing::Routing,
};

/// Whether a label selector (`matchLabels`, a subset's labels, a route's `sourceLabels`)
/// takes in a workload with `labels`: each key it names, with the same value. An empty
/// selector takes in every workload.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[derive(Debug, Clone, Serialize)]
pub struct PodInfo {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub node_name: String,
    pub service_account: String,
    /// Istio's canonical workload name: `app` (or `app.kubernetes.io/name`), else the pod name.
    pub workload: String,
    pub version: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub enrollment: Enrollment,
}

#[derive(Debug, Clone, Serialize)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// UID of the pod behind the address, when the EndpointSlice names one.
    pub pod: Option<String>,
}

/// One port of one Service, as clients address it.
#[derive(Debug, Clone, Serialize)]
pub struct ServicePort {
    pub name: String,
    pub namespace: String,
    /// `name.namespace.svc.<cluster domain>`, Istio's destination_service.
    pub hostname: String,
    pub port: u16,
    pub port_name: String,
    pub app_protocol: Option<String>,
    /// Ready endpoints of the same address family as the VIP (others if there are none).
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Default, Serialize)]
pub struct Snapshot {
    /// Counts rebuilds since start; shown by the admin API.
    pub generation: u64,
    pub pods_by_uid: HashMap<String, Arc<PodInfo>>,
    pub pods_by_ip: HashMap<IpAddr, Arc<PodInfo>>,
    pub services_by_vip: HashMap<SocketAddr, Arc<ServicePort>>,
    /// The Service port each endpoint address serves (the first by hostname when several
    /// do): the inbound side names the destination Service of every connection it takes.
    #[serde(skip)]
    pub services_by_endpoint: HashMap<SocketAddr, Arc<ServicePort>>,
    /// VirtualServices, DestinationRules and clusters, compiled.
    pub routing: Routing,
    /// PeerAuthentication, resolved per workload and port by the inbound side.
    pub peer_authn: crate::peer_authn::PeerAuthn,
    /// AuthorizationPolicy, decided per connection by the inbound side.
    pub authz: crate::authz::Authz,
    /// Istio resources accepted (kind, `namespace/name`, apiVersion, origin).
    pub istio: Vec<Unhandled>,
    /// Objects of kinds Sidelane does not read yet (Secret, Node).
    pub unhandled: Vec<Unhandled>,
    pub errors: Vec<ObjectError>,
}

impl Snapshot {
    pub fn compile(
        objects: &Objects,
        cluster_domain: &str,
        root_namespace: &str,
        generation: u64,
    ) -> Self {
        let slices = SliceIndex::new(objects);
        let istio = objects
            .istio_resources()
            .into_iter()
            .map(|(kind, key, api_version, origin, _)| Unhandled {
                api_version: api_version.into(),
                kind: kind.into(),
                key: key.into(),
                origin: origin.into(),
            })
            .collect();
        let mut snap = Snapshot {
            generation,
            routing: crate::routing::compile(objects, &slices, cluster_domain, root_namespace),
            peer_authn: crate::peer_authn::PeerAuthn::compile(objects, root_namespace),
            authz: crate::authz::Authz::compile(objects, root_namespace),
            istio,
            unhandled: objects.unhandled.clone(),
            errors: objects.errors.clone(),
            ..Default::default()
        };
        for pod in objects.pods.values() {
            let Some(info) = pod_info(objects, pod) else {
                continue;
            };
            let info = Arc::new(info);
            for ip in &info.ips {
                snap.pods_by_ip.insert(*ip, info.clone());
            }
            snap.pods_by_uid.insert(info.uid.clone(), info);
        }
        for (key, svc) in &objects.services {
            compile_service(&slices, key, svc, cluster_domain, &mut snap);
        }
        snap
    }

    /// The Service port a client dialled, if `dst` is a Service VIP.
    pub fn service(&self, dst: &SocketAddr) -> Option<&Arc<ServicePort>> {
        self.services_by_vip.get(dst)
    }

    /// Whether AuthorizationPolicy may decide differently under `next`: the policies changed,
    /// or a pod's labels did (a selector may now take it in or leave it out).
    pub fn authz_changed(&self, next: &Snapshot) -> bool {
        self.authz != next.authz
            || next.pods_by_uid.iter().any(|(uid, pod)| {
                self.pods_by_uid
                    .get(uid)
                    .is_some_and(|old| old.labels != pod.labels)
            })
    }

    /// A Service port whose endpoints include `addr`, if any.
    pub fn service_of_endpoint(&self, addr: &SocketAddr) -> Option<&Arc<ServicePort>> {
        self.services_by_endpoint.get(addr)
    }
}

fn pod_info(objects: &Objects, pod: &Pod) -> Option<PodInfo> {
    let meta = &pod.metadata;
    let uid = meta.uid.clone()?;
    let name = meta.name.clone()?;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let spec = pod.spec.as_ref();
    let labels = meta.labels.clone().unwrap_or_default();
    let annotations = meta.annotations.clone().unwrap_or_default();
    let ns_labels = objects
        .namespaces
        .get(&namespace)
        .and_then(|ns| ns.metadata.labels.as_ref());
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().filter_map(|p| p.ip.parse().ok()).collect())
        .unwrap_or_default();
    if let Some(ip) = status
        .and_then(|s| s.pod_ip.as_ref())
        .and_then(|ip| ip.parse().ok())
        && !ips.contains(&ip)
    {
        ips.insert(0, ip);
    }
    let workload = labels
        .get("app")
        .or_else(|| labels.get("app.kubernetes.io/name"))
        .cloned()
        .unwrap_or_else(|| name.clone());
    let version = labels
        .get("version")
        .or_else(|| labels.get("app.kubernetes.io/version"))
        .cloned();
    Some(PodInfo {
        enrollment: enrollment::decide(ns_labels, &labels, &annotations, host_network),
        uid,
        name,
        namespace,
        node_name: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        workload,
        version,
        labels,
        ips,
    })
}

fn compile_service(
    slices: &SliceIndex<'_>,
    key: &str,
    svc: &k8s_openapi::api::core::v1::Service,
    cluster_domain: &str,
    snap: &mut Snapshot,
) {
    let Some(spec) = svc.spec.as_ref() else {
        return;
    };
    let (namespace, name) = key.split_once('/').unwrap_or(("default", key));
    let mut vips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    vips.sort();
    vips.dedup();
    for port in spec.ports.iter().flatten() {
        if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
            continue;
        }
        let Ok(port_number) = u16::try_from(port.port) else {
            continue;
        };
        let port_name = port.name.clone().unwrap_or_default();
        let endpoints = service_endpoints(slices, namespace, name, &port_name);
        for vip in &vips {
            let same_family: Vec<Endpoint> = endpoints
                .iter()
                .filter(|e| e.addr.is_ipv4() == vip.is_ipv4())
                .cloned()
                .collect();
            let chosen = if same_family.is_empty() {
                endpoints.clone()
            } else {
                same_family
            };
            let service_port = Arc::new(ServicePort {
                name: name.into(),
                namespace: namespace.into(),
                hostname: format!("{name}.{namespace}.svc.{cluster_domain}"),
                port: port_number,
                port_name: port_name.clone(),
                app_protocol: port.app_protocol.clone(),
                endpoints: chosen,
            });
            for e in &service_port.endpoints {
                snap.services_by_endpoint
                    .entry(e.addr)
                    .and_modify(|known| {
                        if service_port.hostname < known.hostname {
                            *known = service_port.clone();
                        }
                    })
                    .or_insert_with(|| service_port.clone());
            }
            snap.services_by_vip
                .insert(SocketAddr::new(*vip, port_number), service_port);
        }
    }
}

/// EndpointSlices by (namespace, service name), built once per compilation so looking up a
/// Service's endpoints does not scan every slice in the cluster.
pub struct SliceIndex<'a>(HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>);

impl<'a> SliceIndex<'a> {
    pub fn new(objects: &'a Objects) -> Self {
        let mut m: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for (key, slice) in &objects.endpoint_slices {
            let ns = key.split_once('/').map_or("default", |(ns, _)| ns);
            if let Some(svc) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
            {
                m.entry((ns, svc.as_str())).or_default().push(slice);
            }
        }
        Self(m)
    }
}

/// Ready endpoints of one Service port (by port name, as EndpointSlices name them), sorted
/// and without duplicates.
pub fn service_endpoints(
    index: &SliceIndex<'_>,
    namespace: &str,
    name: &str,
    port_name: &str,
) -> Vec<Endpoint> {
    let mut endpoints = Vec::new();
    for slice in index.0.get(&(namespace, name)).into_iter().flatten() {
        let Some(target) = slice.ports.iter().flatten().find_map(|p| {
            (p.name.as_deref().unwrap_or_default() == port_name)
                .then_some(p.port)
                .flatten()
        }) else {
            continue;
        };
        let Ok(target) = u16::try_from(target) else {
            continue;
        };
        for ep in &slice.endpoints {
            // Kubernetes: a nil `ready` means ready.
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            let pod = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.uid.clone());
            for a in &ep.addresses {
                if let Ok(ip) = a.parse::<IpAddr>() {
                    endpoints.push(Endpoint {
                        addr: SocketAddr::new(ip, target),
                        pod: pod.clone(),
                    });
                }
            }
        }
    }
    endpoints.sort_by_key(|e| e.addr);
    endpoints.dedup_by_key(|e| e.addr);
    endpoints
}

#[cfg(test)]
mod tests {
    use super::*;

    const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: production, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: api-v1, namespace: production, uid: 11111111-1111-1111-1111-111111111111, labels: {app: api-server, version: v1}}
spec: {nodeName: n1, containers: [{name: api, image: x}]}
status: {podIP: 10.244.1.10, podIPs: [{ip: 10.244.1.10}, {ip: "fd00:244:1::10"}]}
---
apiVersion: v1
kind: Service
metadata: {name: api-server, namespace: production}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-server-v4, namespace: production, labels: {kubernetes.io/service-name: api-server}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.1.10]
  targetRef: {kind: Pod, uid: 11111111-1111-1111-1111-111111111111}
- addresses: [10.244.2.10]
  conditions: {ready: false}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-server-v6, namespace: production, labels: {kubernetes.io/service-name: api-server}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints:
- addresses: ["fd00:244:1::10"]
"#;

    #[test]
    fn services_resolve_to_ready_endpoints_of_the_vips_family() {
        let mut o = Objects::default();
        o.add_text("t.yaml", OBJECTS);
        assert!(o.errors.is_empty(), "{:?}", o.errors);
        let s = Snapshot::compile(&o, "cluster.local", "istio-system", 1);
        let v4 = s
            .service(&"10.96.0.10:80".parse().expect("addr"))
            .expect("v4 vip");
        assert_eq!(v4.hostname, "api-server.production.svc.cluster.local");
        let addrs: Vec<_> = v4.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, ["10.244.1.10:8080"]);
        let v6 = s
            .service(&"[fd00:96::10]:80".parse().expect("addr"))
            .expect("v6 vip");
        assert_eq!(v6.endpoints[0].addr.to_string(), "[fd00:244:1::10]:8080");
        assert!(s.service(&"10.96.0.10:81".parse().expect("addr")).is_none());

        let pod = &s.pods_by_uid["11111111-1111-1111-1111-111111111111"];
        assert!(pod.enrollment.enrolled);
        assert_eq!(pod.workload, "api-server");
        assert_eq!(pod.version.as_deref(), Some("v1"));
        assert_eq!(pod.ips.len(), 2);
    }

    #[test]
    fn endpoints_name_their_service_the_first_by_hostname() {
        let mut o = Objects::default();
        o.add_text("t.yaml", OBJECTS);
        // A second Service over the same pod, named later in the alphabet.
        o.add_text(
            "u.yaml",
            r#"
apiVersion: v1
kind: Service
metadata: {name: zz-api, namespace: production}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: zz-api-v4, namespace: production, labels: {kubernetes.io/service-name: zz-api}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.1.10]
"#,
        );
        let s = Snapshot::compile(&o, "cluster.local", "istio-system", 1);
        let of = |a: &str| {
            s.service_of_endpoint(&a.parse().expect("addr"))
                .map(|p| p.hostname.clone())
        };
        let api = Some("api-server.production.svc.cluster.local".to_owned());
        assert_eq!(of("10.244.1.10:8080"), api);
        assert_eq!(of("[fd00:244:1::10]:8080"), api);
        // Not ready, not a port any Service targets.
        assert_eq!(of("10.244.2.10:8080"), None);
        assert_eq!(of("10.244.1.10:9090"), None);
    }

    #[test]
    fn authorization_may_change_with_the_policies_or_a_pods_labels() {
        let compile = |extra: &str| {
            let mut o = Objects::default();
            o.add_text("t.yaml", OBJECTS);
            o.add_text("u.yaml", extra);
            Snapshot::compile(&o, "cluster.local", "istio-system", 1)
        };
        let base = compile("");
        let endpoints_only = compile(
            "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: production}\nspec: {clusterIP: 10.96.0.99, ports: [{port: 80}]}\n",
        );
        assert!(!base.authz_changed(&endpoints_only));
        let policy = compile(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: production}\nspec: {}\n",
        );
        assert!(base.authz_changed(&policy));
        let relabelled = {
            let mut o = Objects::default();
            o.add_text("t.yaml", &OBJECTS.replace("version: v1}", "version: v2}"));
            Snapshot::compile(&o, "cluster.local", "istio-system", 1)
        };
        assert!(base.authz_changed(&relabelled));
    }
}
