//! The Kubernetes API as a configuration source: one kube-rs reflector per kind, each
//! watching with back-off (so it resumes after a disconnect and relists after a 410 Gone),
//! and a batch of [`Objects`] rebuilt from the stores after every change. From there on,
//! the pipeline is the same as for the manifest directory.
use std::{sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::Serialize;
use tokio::sync::{Notify, mpsc};

use super::objects::Objects;

/// Changes usually come in bursts (a rollout touches many pods): rebuild once they settle.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// The core kinds: (API group, version, kind, plural). All must be listed before serving.
pub const CORE_KINDS: [(&str, &str, &str, &str); 5] = [
    ("", "v1", "Namespace", "namespaces"),
    ("", "v1", "Pod", "pods"),
    ("", "v1", "Service", "services"),
    ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
    ("", "v1", "Node", "nodes"),
];

/// The Istio kinds, at the apiVersion Sidelane watches (all served versions share a schema).
pub const ISTIO_KINDS: &[(&str, &str, &str, &str)] = &[
    (
        "networking.istio.io",
        "v1",
        "VirtualService",
        "virtualservices",
    ),
    (
        "networking.istio.io",
        "v1",
        "DestinationRule",
        "destinationrules",
    ),
    ("networking.istio.io", "v1", "Gateway", "gateways"),
    (
        "networking.istio.io",
        "v1",
        "ServiceEntry",
        "serviceentries",
    ),
    (
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        "peerauthentications",
    ),
    (
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
];

/// What an operator should check for a watch error, in words.
pub fn explain(kind: &str, resource: &str, e: &watcher::Error) -> String {
    let api = match e {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => Some(e),
        _ => None,
    };
    match api {
        Some(kube::Error::Api(s)) if s.code == 403 => format!(
            "watching {kind}: forbidden by RBAC ({}); grant the daemon's ServiceAccount get/list/watch on {resource} (deploy/rbac.yaml)",
            s.message
        ),
        Some(kube::Error::Api(s)) if s.code == 401 => format!(
            "watching {kind}: the API server rejected the daemon's credentials ({}); check its ServiceAccount token",
            s.message
        ),
        Some(kube::Error::Api(s)) if s.code == 404 => format!(
            "watching {kind}: the API server does not serve {resource} (is the CRD installed? kubectl apply -f deploy/crds/); treating it as empty"
        ),
        Some(e @ (kube::Error::HyperError(_) | kube::Error::Service(_))) => {
            let text = format!("{e}");
            if text.contains("certificate") || text.contains("tls") || text.contains("TLS") {
                format!(
                    "watching {kind}: TLS to the API server failed ({text}); check the cluster CA bundle and the server address"
                )
            } else {
                format!(
                    "watching {kind}: cannot reach the API server ({text}); retrying with back-off"
                )
            }
        }
        _ => format!("watching {kind}: {e}; retrying with back-off"),
    }
}

struct Watched {
    kind: &'static str,
    api_version: String,
    to_values: Box<dyn Fn() -> Vec<serde_json::Value> + Send + Sync>,
    ready: Box<dyn Fn() -> bool + Send + Sync>,
    /// Core kinds must be listed before the daemon serves; Istio CRDs may be absent.
    required: bool,
}

fn values<K>(store: &Store<K>, api_version: &str, kind: &str) -> Vec<serde_json::Value>
where
    K: Resource + Serialize + Clone,
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    store
        .state()
        .iter()
        .filter_map(|o| serde_json::to_value(o.as_ref()).ok())
        .map(|mut v| {
            // List items carry no apiVersion/kind; the pipeline needs them.
            if let Some(m) = v.as_object_mut() {
                m.insert("apiVersion".into(), api_version.into());
                m.insert("kind".into(), kind.into());
            }
            v
        })
        .collect()
}

fn watch_typed<K>(
    client: &Client,
    changed: &Arc<Notify>,
    kind: &'static str,
    resource: &'static str,
) -> Watched
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + Serialize
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store::<K>();
    let api: Api<K> = Api::all(client.clone());
    spawn_reflector(api, writer, changed.clone(), kind, resource);
    watched(kind, K::api_version(&()).into_owned(), reader, true)
}

/// What the batch builder needs from one reflector store.
fn watched<K>(kind: &'static str, api_version: String, reader: Store<K>, required: bool) -> Watched
where
    K: Resource + Serialize + Clone + Send + Sync + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Send + Sync,
{
    let av = api_version.clone();
    let r2 = reader.clone();
    Watched {
        kind,
        api_version,
        to_values: Box::new(move || values(&reader, &av, kind)),
        ready: Box::new(move || r2.wait_until_ready().now_or_never_ready()),
        required,
    }
}

/// `Store::wait_until_ready` as a poll: true once the first list has completed.
trait NowOrNever {
    fn now_or_never_ready(self) -> bool;
}

impl<F: std::future::Future> NowOrNever for F {
    fn now_or_never_ready(self) -> bool {
        futures::FutureExt::now_or_never(self).is_some()
    }
}

/// Runs a reflector for one kind: list, then watch with back-off, feeding `writer`, and
/// says when something changed.
fn spawn_reflector<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    changed: Arc<Notify>,
    kind: &'static str,
    resource: &'static str,
) where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Send + Sync,
{
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut last_error = String::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(_) => {
                    last_error.clear();
                    changed.notify_one();
                }
                Err(e) => {
                    let msg = explain(kind, resource, &e);
                    // One line per distinct problem, not one per retry.
                    if msg != last_error {
                        tracing::warn!("{msg}");
                        last_error = msg;
                    }
                }
            }
        }
    });
}

fn watch_istio(
    client: &Client,
    changed: &Arc<Notify>,
    group: &str,
    version: &str,
    kind: &'static str,
    plural: &'static str,
) -> Watched {
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    let writer = reflector::store::Writer::new(ar.clone());
    let reader = writer.as_reader();
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    spawn_reflector(api, writer, changed.clone(), kind, plural);
    watched(kind, ar.api_version.clone(), reader, false)
}

/// Watches the cluster and sends a fresh [`Objects`] after every change, starting once
/// every core kind has been listed.
pub fn watch(client: Client, tx: mpsc::Sender<Objects>) -> tokio::task::JoinHandle<()> {
    let changed = Arc::new(Notify::new());
    let [ns, pod, svc, eps, node] = CORE_KINDS;
    let mut watched = vec![
        watch_typed::<Namespace>(&client, &changed, ns.2, ns.3),
        watch_typed::<Pod>(&client, &changed, pod.2, pod.3),
        watch_typed::<Service>(&client, &changed, svc.2, svc.3),
        watch_typed::<EndpointSlice>(&client, &changed, eps.2, eps.3),
        watch_typed::<Node>(&client, &changed, node.2, node.3),
    ];
    for (group, version, kind, plural) in ISTIO_KINDS {
        watched.push(watch_istio(&client, &changed, group, version, kind, plural));
    }
    tokio::spawn(async move {
        loop {
            changed.notified().await;
            while tokio::time::timeout(DEBOUNCE, changed.notified())
                .await
                .is_ok()
            {}
            if !watched.iter().filter(|w| w.required).all(|w| (w.ready)()) {
                continue;
            }
            let mut objects = Objects::default();
            for w in &watched {
                for v in (w.to_values)() {
                    let name = v["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    let ns = v["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    let origin = format!("kubernetes:{}/{}/{ns}/{name}", w.api_version, w.kind);
                    objects.add_json(&origin, v);
                }
            }
            if tx.send(objects).await.is_err() {
                return;
            }
        }
    })
}
