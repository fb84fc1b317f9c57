//! The daemon's HTTP endpoints: admin API (node loopback), Prometheus metrics, readiness.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::{Request, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpListener, sync::watch};

use crate::{
    datapath::StatsMap,
    metrics::Metrics,
    reconcile::{LiveProxies, WorkloadStatus},
    routing::view,
    state::Snapshot,
};

/// `?pod=name.namespace` as (name, namespace); no namespace means `default`.
fn pod_param(query: Option<&str>) -> (&str, &str) {
    let pod = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("pod="))
        .unwrap_or_default();
    pod.split_once('.').unwrap_or((pod, "default"))
}

/// The content type of what prometheus-client encodes.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Everything the endpoints read.
pub struct AdminState {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub workloads: Arc<ArcSwap<Vec<WorkloadStatus>>>,
    pub proxies: LiveProxies,
    pub metrics: Arc<Metrics>,
    pub stats: StatsMap,
    pub ready: watch::Receiver<bool>,
    pub node_name: String,
    /// The workload certificates this node has issued (none without a CA).
    pub certs: Option<Arc<crate::identity::certs::Certificates>>,
}

impl AdminState {
    fn respond(&self, path: &str, query: Option<&str>) -> (StatusCode, &'static str, String) {
        const JSON: &str = "application/json";
        const TEXT: &str = "text/plain; charset=utf-8";
        let json = |v: serde_json::Result<String>| match v {
            Ok(s) => (StatusCode::OK, JSON, s),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, TEXT, e.to_string()),
        };
        match path {
            "/healthz/ready" => {
                if *self.ready.borrow() {
                    (StatusCode::OK, TEXT, "ready\n".into())
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n".into())
                }
            }
            "/metrics" | "/stats/prometheus" => {
                let m = &self.metrics;
                m.access_log_dropped
                    .set(crate::proxy::access_log::dropped() as i64);
                for (decision, n) in self.stats.read() {
                    m.bpf_decisions
                        .get_or_create(&crate::metrics::DecisionLabels { decision })
                        .set(n as i64);
                }
                (StatusCode::OK, OPENMETRICS, m.encode())
            }
            "/config_dump" => json(serde_json::to_string_pretty(&*self.snapshot.load_full())),
            "/proxy_config/routes"
            | "/proxy_config/clusters"
            | "/proxy_config/endpoints"
            | "/proxy_config/authz" => {
                let snap = self.snapshot.load_full();
                let (name, ns) = pod_param(query);
                let Some((uid, info)) = snap
                    .pods_by_uid
                    .iter()
                    .find(|(_, p)| p.name == name && p.namespace == ns)
                else {
                    return (
                        StatusCode::NOT_FOUND,
                        TEXT,
                        format!("pod {name}.{ns} is not in this daemon's configuration\n"),
                    );
                };
                let r = &snap.routing;
                let ns = info.namespace.as_str();
                json(match path {
                    "/proxy_config/routes" => serde_json::to_string_pretty(&view::routes(r, ns)),
                    "/proxy_config/clusters" => {
                        serde_json::to_string_pretty(&view::clusters(r, ns))
                    }
                    "/proxy_config/authz" => serde_json::to_string_pretty(
                        &snap.authz.applying(ns, &info.labels).collect::<Vec<_>>(),
                    ),
                    _ => {
                        let http = self.proxies.get(uid);
                        let ejected = |cluster: &str| {
                            http.as_ref()
                                .map_or_else(Vec::new, |h| h.clusters.ejected(cluster))
                        };
                        serde_json::to_string_pretty(&view::endpoints(r, ns, ejected))
                    }
                })
            }
            "/describe" => {
                let (name, ns) = pod_param(query);
                match crate::describe::pod(&self.snapshot.load(), name, ns) {
                    Some(d) => json(serde_json::to_string_pretty(&d)),
                    None => (
                        StatusCode::NOT_FOUND,
                        TEXT,
                        format!("pod {name}.{ns} is not in this daemon's configuration\n"),
                    ),
                }
            }
            "/workloads" => json(serde_json::to_string_pretty(&*self.workloads.load_full())),
            "/certs" => json(serde_json::to_string_pretty(&certs_view(
                self.certs.as_deref(),
            ))),
            "/bpf/stats" => json(serde_json::to_string_pretty(
                &self
                    .stats
                    .read()
                    .into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>(),
            )),
            "/" => (
                StatusCode::OK,
                TEXT,
                format!(
                    "sidelane node daemon on {}\nendpoints: /healthz/ready /metrics /config_dump /workloads /bpf/stats \
                     /proxy_config/{{routes,clusters,endpoints}}?pod=NAME.NAMESPACE\n",
                    self.node_name
                ),
            ),
            _ => (StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
        }
    }
}

/// Which endpoints a listener exposes: the metrics and readiness ports must not leak the
/// configuration to whoever can reach the node.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Exposure {
    Admin,
    Metrics,
    Readiness,
}

impl Exposure {
    fn allows(self, path: &str) -> bool {
        match self {
            Exposure::Admin => true,
            Exposure::Metrics => matches!(path, "/metrics" | "/stats/prometheus"),
            Exposure::Readiness => path == "/healthz/ready",
        }
    }
}

/// Binds `addr`; the dual-stack wildcard `[::]` falls back to `0.0.0.0` on nodes where IPv6
/// is disabled, rather than keeping the daemon from starting.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Err(e) if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
            tracing::info!(%addr, error = %e, "IPv6 unavailable; listening on {v4}");
            TcpListener::bind(v4).await
        }
        other => other,
    }
}

pub async fn serve(listener: TcpListener, state: Arc<AdminState>, exposure: Exposure) {
    serve_with(listener, move |path, query| {
        if exposure.allows(path) {
            state.respond(path, query)
        } else {
            (StatusCode::NOT_FOUND, "text/plain", "not found\n".into())
        }
    })
    .await;
}

/// Plain HTTP on `listener`, each request answered by `respond(path, query)` with a status,
/// a content type and a body; until the task is dropped.
pub async fn serve_with<F>(listener: TcpListener, respond: F)
where
    F: Fn(&str, Option<&str>) -> (StatusCode, &'static str, String) + Send + Sync + 'static,
{
    let respond = Arc::new(respond);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let respond = respond.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (status, ctype, body) = respond(req.uri().path(), req.uri().query());
                let resp = Response::builder()
                    .status(status)
                    .header("content-type", ctype)
                    .body(Full::new(Bytes::from(body)))
                    .unwrap_or_default();
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// What `/certs` shows of each workload certificate (ztunnel's `certificates` view, in
/// short): whose, from when, until when, and the chain's issuers.
fn certs_view(certs: Option<&crate::identity::certs::Certificates>) -> serde_json::Value {
    let Some(certs) = certs else {
        return serde_json::json!({"mtls": false, "certificates": []});
    };
    let when = |t: std::time::SystemTime| httpdate::fmt_http_date(t);
    let issued: Vec<serde_json::Value> = certs
        .issued()
        .iter()
        .map(|c| {
            serde_json::json!({
                "identity": c.identity.to_string(),
                "valid_from": when(c.not_before),
                "expires": when(c.not_after),
                "chain_length": c.chain.len(),
            })
        })
        .collect();
    serde_json::json!({
        "mtls": true,
        "trust_domain": certs.trust_domain(),
        "signer": certs.signer().describe(),
        "roots": certs.roots().len(),
        "certificates": issued,
    })
}
