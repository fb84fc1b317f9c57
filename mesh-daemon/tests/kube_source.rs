//! The Kubernetes source against an in-process API server.
//!
//! No package registry reachable here ships a kube-apiserver, so these tests cannot start a
//! real one. Instead `FakeApiServer` speaks the parts of the Kubernetes list/watch protocol
//! the reflectors use, as the real server does: lists carry `metadata.resourceVersion`;
//! `?watch=true&resourceVersion=N` streams newline-delimited JSON events (chunked) for every
//! change after N, with BOOKMARK events when asked for; a resourceVersion older than the
//! compaction point gets an `ERROR` event with a 410 `Expired` Status, which forces a relist;
//! unknown resources answer 404 and forbidden ones 403, both with a Status body.
use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, body::Frame, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_daemon::config::{kube_source, objects::Objects};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};

#[derive(Default)]
struct State {
    rv: u64,
    /// Collection path -> object key -> object.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// (path, resourceVersion, event type, object), for watches resuming from an older rv.
    log: Vec<(String, u64, &'static str, Value)>,
    compacted: u64,
    forbidden: BTreeSet<String>,
    lists: BTreeMap<String, u32>,
    /// Refuse new watches (503), so a test can change the cluster while a client is away.
    paused: bool,
}

struct FakeApiServer {
    state: Mutex<State>,
    events: broadcast::Sender<(String, u64, &'static str, Value)>,
    /// Bumped to end every open watch, as a dropped connection would.
    disconnect: watch::Sender<u64>,
}

const SERVED: &[&str] = &[
    "/api/v1/namespaces",
    "/api/v1/pods",
    "/api/v1/services",
    "/api/v1/nodes",
    "/apis/discovery.k8s.io/v1/endpointslices",
    "/apis/networking.istio.io/v1/virtualservices",
    "/apis/networking.istio.io/v1/destinationrules",
    // Gateways, ServiceEntries and the security kinds are not served: a cluster without
    // those CRDs must still work.
];

fn collection(kind: &str) -> &'static str {
    match kind {
        "Namespace" => "/api/v1/namespaces",
        "Pod" => "/api/v1/pods",
        "Service" => "/api/v1/services",
        "Node" => "/api/v1/nodes",
        "EndpointSlice" => "/apis/discovery.k8s.io/v1/endpointslices",
        "VirtualService" => "/apis/networking.istio.io/v1/virtualservices",
        _ => "/apis/networking.istio.io/v1/destinationrules",
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

type Body = BoxBody<Bytes, Infallible>;

fn full(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap_or_default()
}

impl FakeApiServer {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            events: broadcast::channel(1024).0,
            disconnect: watch::channel(0).0,
        })
    }

    fn apply(&self, mut obj: Value) {
        let mut s = self.state.lock().expect("lock");
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let path = collection(obj["kind"].as_str().unwrap_or_default()).to_owned();
        let key = format!(
            "{}/{}",
            obj["metadata"]["namespace"].as_str().unwrap_or(""),
            obj["metadata"]["name"].as_str().unwrap_or("")
        );
        let ty = if s
            .objects
            .entry(path.clone())
            .or_default()
            .insert(key, obj.clone())
            .is_some()
        {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.log.push((path.clone(), rv, ty, obj.clone()));
        let _ = self.events.send((path, rv, ty, obj));
    }

    fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let mut s = self.state.lock().expect("lock");
        s.rv += 1;
        let rv = s.rv;
        let path = collection(kind).to_owned();
        if let Some(mut obj) = s
            .objects
            .entry(path.clone())
            .or_default()
            .remove(&format!("{namespace}/{name}"))
        {
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            s.log.push((path.clone(), rv, "DELETED", obj.clone()));
            let _ = self.events.send((path, rv, "DELETED", obj));
        }
    }

    /// Forgets history, as etcd compaction does: older resourceVersions now get 410.
    fn compact(&self) {
        let mut s = self.state.lock().expect("lock");
        s.compacted = s.rv;
        s.log.clear();
    }

    fn disconnect_watches(&self) {
        self.disconnect.send_modify(|g| *g += 1);
    }

    fn lists(&self, path: &str) -> u32 {
        self.state
            .lock()
            .expect("lock")
            .lists
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    fn handle(self: &Arc<Self>, req: &Request<hyper::body::Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect();
        let mut s = self.state.lock().expect("lock");
        if s.forbidden.contains(&path) {
            return full(
                403,
                &status(
                    403,
                    "Forbidden",
                    &format!(
                        "{path} is forbidden: User \"system:serviceaccount:istio-system:sidelane\" cannot list resource"
                    ),
                ),
            );
        }
        if !SERVED.contains(&path.as_str()) {
            return full(
                404,
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            );
        }
        if query.get("watch").is_none_or(|w| w != "true" && w != "1") {
            *s.lists.entry(path.clone()).or_default() += 1;
            let items: Vec<Value> = s
                .objects
                .get(&path)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            return full(
                200,
                &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
            );
        }
        if s.paused {
            return full(
                503,
                &status(
                    503,
                    "ServiceUnavailable",
                    "the server is currently unable to handle the request",
                ),
            );
        }
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(s.rv);
        let (tx, rx) = mpsc::unbounded_channel::<Result<Frame<Bytes>, Infallible>>();
        let line = |ty: &str, obj: &Value| {
            Ok(Frame::data(Bytes::from(format!(
                "{}\n",
                json!({"type": ty, "object": obj})
            ))))
        };
        if from < s.compacted {
            let _ = tx.send(line(
                "ERROR",
                &status(
                    410,
                    "Expired",
                    &format!("too old resource version: {from} ({})", s.compacted),
                ),
            ));
        } else {
            for (p, rv, ty, obj) in &s.log {
                if *p == path && *rv > from {
                    let _ = tx.send(line(ty, obj));
                }
            }
            let bookmarks = query
                .get("allowWatchBookmarks")
                .is_some_and(|b| b == "true");
            let mut events = self.events.subscribe();
            let mut disconnect = self.disconnect.subscribe();
            let this = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                loop {
                    // A disconnect wins over anything sent after it, as on a real connection.
                    tokio::select! {
                        biased;
                        _ = disconnect.changed() => return,
                        e = events.recv() => match e {
                            Ok((p, _, ty, obj)) if p == path => { if tx.send(line(ty, &obj)).is_err() { return; } }
                            Ok(_) => {}
                            Err(_) => return,
                        },
                        _ = tick.tick(), if bookmarks => {
                            let rv = this.state.lock().map(|s| s.rv).unwrap_or(0);
                            let bm = json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}});
                            if tx.send(line("BOOKMARK", &bm)).is_err() { return; }
                        }
                    }
                }
            });
        }
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(StreamBody::new(stream).boxed())
            .unwrap_or_default()
    }

    async fn serve(self: Arc<Self>) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let this = self.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let r = this.handle(&req);
                        async move { Ok::<_, Infallible>(r) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        format!("http://{addr}")
    }
}

fn client(url: &str) -> kube::Client {
    let config = kube::Config::new(url.parse().expect("url"));
    kube::Client::try_from(config).expect("client")
}

/// The next batch for which `pred` holds, within a deadline.
async fn next_where(
    rx: &mut mpsc::Receiver<Objects>,
    what: &str,
    pred: impl Fn(&Objects) -> bool,
) -> Objects {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(o)) if pred(&o) => return o,
            Ok(Some(_)) => {}
            Ok(None) => panic!("source stopped while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

fn seed(api: &FakeApiServer) {
    api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}));
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "production", "labels": {"istio-injection": "enabled"}}}));
    api.apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api-server", "namespace": "production"},
                     "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 8080}]}}));
    api.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "api-v1", "namespace": "production", "uid": "00000000-0000-4000-8000-000000000001", "labels": {"app": "api-server", "version": "v1"}},
                     "spec": {"containers": [{"name": "api", "image": "x"}]}}));
    api.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "api-server", "namespace": "production"},
                     "spec": {"hosts": ["api-server"], "http": [{"route": [{"destination": {"host": "api-server"}}]}]}}));
}

#[tokio::test]
async fn lists_then_watches_adds_and_deletes() {
    let api = FakeApiServer::new();
    seed(&api);
    let url = api.clone().serve().await;
    let (tx, mut rx) = mpsc::channel(16);
    let _task = kube_source::watch(client(&url), tx);

    let o = next_where(&mut rx, "the initial lists", |o| {
        o.virtual_services.contains_key("production/api-server")
            && o.pods.contains_key("production/api-v1")
    })
    .await;
    assert!(o.errors.is_empty(), "{:?}", o.errors);
    assert!(o.namespaces.contains_key("production"));
    assert!(o.services.contains_key("production/api-server"));
    assert!(o.nodes.contains_key("node-1"));

    api.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "api-v2", "namespace": "production", "uid": "00000000-0000-4000-8000-000000000002"},
                     "spec": {"containers": [{"name": "api", "image": "x"}]}}));
    next_where(&mut rx, "the added pod", |o| {
        o.pods.contains_key("production/api-v2")
    })
    .await;
    api.delete("VirtualService", "production", "api-server");
    next_where(&mut rx, "the deleted VirtualService", |o| {
        o.virtual_services.is_empty() && o.pods.len() == 2
    })
    .await;

    // A bad object from the API is rejected alone, with its origin.
    api.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "bad", "namespace": "production"},
                     "spec": {"hosts": ["api-server"], "http": [{"route": [{"destination": {"host": "api-server"}}], "timeout": "soon"}]}}));
    let o = next_where(&mut rx, "the rejected object", |o| !o.errors.is_empty()).await;
    assert_eq!(o.errors[0].field.as_deref(), Some("spec.http[0].timeout"));
    assert!(
        o.errors[0]
            .origin
            .starts_with("kubernetes:networking.istio.io/v1/VirtualService/production/bad"),
        "{}",
        o.errors[0]
    );
    assert!(o.pods.len() == 2, "the rest still applies");
}

#[tokio::test]
async fn resumes_after_a_disconnect_and_relists_after_410_gone() {
    let api = FakeApiServer::new();
    seed(&api);
    let url = api.clone().serve().await;
    let (tx, mut rx) = mpsc::channel(16);
    let _task = kube_source::watch(client(&url), tx);
    next_where(&mut rx, "the initial lists", |o| {
        o.pods.contains_key("production/api-v1")
    })
    .await;
    let lists = api.lists("/api/v1/pods");

    // A dropped connection: the watch resumes from its resourceVersion, no relist needed.
    api.disconnect_watches();
    api.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "after-disconnect", "namespace": "production", "uid": "00000000-0000-4000-8000-000000000003"},
                     "spec": {"containers": [{"name": "a", "image": "x"}]}}));
    next_where(&mut rx, "the pod added across a reconnect", |o| {
        o.pods.contains_key("production/after-disconnect")
    })
    .await;
    assert_eq!(
        api.lists("/api/v1/pods"),
        lists,
        "a plain reconnect must not relist"
    );

    // History compacted while the client was away: its resourceVersion gets 410, the
    // reflector relists and still sees everything.
    api.state.lock().expect("lock").paused = true;
    api.disconnect_watches();
    api.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "after-compaction", "namespace": "production", "uid": "00000000-0000-4000-8000-000000000004"},
                     "spec": {"containers": [{"name": "a", "image": "x"}]}}));
    api.delete("Pod", "production", "api-v1");
    api.compact();
    api.state.lock().expect("lock").paused = false;
    let o = next_where(&mut rx, "the state after a relist", |o| {
        o.pods.contains_key("production/after-compaction")
            && !o.pods.contains_key("production/api-v1")
    })
    .await;
    assert!(o.pods.contains_key("production/after-disconnect"));
    assert!(
        api.lists("/api/v1/pods") > lists,
        "a 410 must force a relist"
    );
}

#[tokio::test]
async fn forbidden_kinds_hold_back_the_configuration_until_rbac_allows_them() {
    let api = FakeApiServer::new();
    seed(&api);
    api.state
        .lock()
        .expect("lock")
        .forbidden
        .insert("/api/v1/pods".into());
    let url = api.clone().serve().await;
    let (tx, mut rx) = mpsc::channel(16);
    let _task = kube_source::watch(client(&url), tx);
    // Without pods the daemon would enrol nothing and tear down what runs: send nothing.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), rx.recv())
            .await
            .is_err(),
        "served a partial configuration"
    );
    api.state.lock().expect("lock").forbidden.clear();
    next_where(&mut rx, "the configuration once RBAC allows pods", |o| {
        o.pods.contains_key("production/api-v1")
    })
    .await;
}

#[test]
fn watch_errors_are_explained_in_words_an_operator_can_act_on() {
    let forbidden = kube::runtime::watcher::Error::InitialListFailed(kube::Error::Api(Box::new(
        kube::core::Status::failure("pods is forbidden", "Forbidden").with_code(403),
    )));
    let msg = kube_source::explain("Pod", "pods", &forbidden);
    assert!(
        msg.contains("forbidden by RBAC") && msg.contains("get/list/watch on pods"),
        "{msg}"
    );
    let missing = kube::runtime::watcher::Error::InitialListFailed(kube::Error::Api(Box::new(
        kube::core::Status::failure("not found", "NotFound").with_code(404),
    )));
    let msg = kube_source::explain("Gateway", "gateways", &missing);
    assert!(msg.contains("is the CRD installed"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_analyze_reads_the_cluster_when_given_no_files() {
    let api = FakeApiServer::new();
    seed(&api);
    // A route to a subset no DestinationRule defines: IST0101 from the cluster's objects.
    api.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "canary", "namespace": "production"},
                     "spec": {"hosts": ["api-server"], "http": [{"route": [{"destination": {"host": "api-server", "subset": "v2"}}]}]}}));
    let url = api.clone().serve().await;
    let dir = std::env::temp_dir().join(format!("sidelane-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = dir.join("config");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"{url}\"}}}}]\n\
             users: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: fake, user: u}}}}]\ncurrent-context: c\n"
        ),
    )
    .expect("kubeconfig");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["analyze", "-n", "production"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .await
        .expect("meshctl");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(79),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Error [IST0101] (VirtualService production/canary")
            && stdout.contains("\"api-server+v2\""),
        "{stdout}"
    );
}
