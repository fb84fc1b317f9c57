//! HTTP on the outbound path: each request is routed on its own (VirtualService match,
//! weighted destination, subset cluster, endpoint) and forwarded over a per-pod connection
//! pool whose sockets live in the pod's network namespace.
use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use tokio::net::TcpStream;

use super::{
    ProxyInputs, access_log, balance::pick_endpoint, cors::Decision, protocol::Protocol,
    sockets::socket_in,
};
use crate::{
    config::istio::{networking::HeaderOperations, validate::GRPC_STATUS},
    metrics::{RequestLabels, TcpLabels},
    netns::Netns,
    routing::{
        HttpRoute, RequestMatch, RouteAction, WeightedCluster,
        eval::{RequestView, pick_weighted, redirect_location, rewrite_path},
    },
    state::{PodInfo, ServicePort},
};

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Largest request body (by Content-Length) that is buffered to be mirrored.
const MIRROR_BODY_LIMIT: u64 = 1024 * 1024;
/// How long a mirrored request may take before it is dropped.
const MIRROR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Envoy's response flags for requests the proxy answers itself.
mod flags {
    pub const NO_ROUTE: &str = "NR";
    pub const NO_CLUSTER: &str = "NC";
    pub const NO_HEALTHY_UPSTREAM: &str = "UH";
    pub const UPSTREAM_CONNECT_FAILURE: &str = "UF";
    pub const UPSTREAM_TIMEOUT: &str = "UT";
    pub const FAULT_INJECTED: &str = "FI";
    pub const DELAY_INJECTED: &str = "DI";
}

/// Opens upstream connections from inside the pod's network namespace.
#[derive(Clone)]
pub struct PodConnector {
    netns: Arc<Netns>,
    inputs: Arc<ProxyInputs>,
}

impl tower_service::Service<Uri> for PodConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("not an endpoint address: {uri}")))?;
            let sock =
                socket_in(&this.netns, &this.inputs.host, addr).map_err(std::io::Error::other)?;
            let stream = tokio::time::timeout(this.inputs.connect_timeout, sock.connect(addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout")
                })??;
            stream.set_nodelay(true).ok();
            Ok(TokioIo::new(stream))
        })
    }
}

/// One pod's HTTP side: its upstream pools (HTTP/1.1 and HTTP/2).
pub struct PodHttp {
    inputs: Arc<ProxyInputs>,
    h1: Client<PodConnector, Body>,
    h2: Client<PodConnector, Body>,
}

impl PodHttp {
    pub fn new(netns: Arc<Netns>, inputs: Arc<ProxyInputs>) -> Self {
        let connector = PodConnector {
            netns,
            inputs: inputs.clone(),
        };
        let h1 = Client::builder(TokioExecutor::new()).build(connector.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        Self { inputs, h1, h2 }
    }
}

/// What every request of one downstream connection shares.
pub struct Downstream {
    pub pod: Arc<PodHttp>,
    pub source_uid: String,
    pub source: Option<Arc<PodInfo>>,
    pub service: Arc<ServicePort>,
    pub protocol: Protocol,
    pub original_dst: SocketAddr,
    pub peer: SocketAddr,
}

/// Serves one client connection (HTTP/1.1 or HTTP/2) until it closes.
pub async fn serve(conn: Arc<Downstream>, client: TcpStream) {
    let svc = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(&conn, req).await) }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(client), svc)
        .await;
}

fn local(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

async fn handle(conn: &Downstream, req: Request<Incoming>) -> Response<Body> {
    let start = (SystemTime::now(), Instant::now());
    let snap = conn.pod.inputs.snapshot.load_full();
    let no_labels = Default::default();
    let (source_labels, source_ns) = conn
        .source
        .as_ref()
        .map_or((&no_labels, ""), |p| (&p.labels, p.namespace.as_str()));
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    let svc = &conn.service;
    let view = RequestView {
        path: req.uri().path(),
        query: req.uri().query(),
        method: req.method().as_str(),
        scheme: "http",
        authority: &authority,
        headers: req.headers(),
        port: svc.port,
        source_labels,
        source_namespace: source_ns,
    };
    let mut log = access_log::HttpEntry {
        start: start.0,
        method: req.method().to_string(),
        path: path_and_query.clone(),
        protocol: format!("{:?}", req.version()),
        status: 0,
        response_flags: "",
        duration_ms: 0,
        upstream_host: None,
        cluster: String::new(),
        authority: authority.clone(),
        original_dst: conn.original_dst,
        downstream_peer: conn.peer,
    };
    let vh = snap
        .routing
        .virtual_host(source_ns, &svc.hostname, svc.port);
    // Borrowed from the snapshot's route table: nothing is copied per request.
    let mut cors_origin = None;
    let mut response = match vh.as_deref().and_then(|vh| vh.select(&view)) {
        None => {
            log.response_flags = flags::NO_ROUTE;
            local(StatusCode::NOT_FOUND, "")
        }
        // CORS comes before faults and routing, as Envoy's filters are ordered in Istio.
        Some((route, matched)) => match route
            .cors
            .as_ref()
            .map(|c| (c, c.decide(req.method(), req.headers(), empty)))
        {
            Some((_, Decision::Answer(preflight))) => preflight,
            decision => {
                if let Some((c, Decision::Annotate(origin))) = decision {
                    cors_origin = Some((c, origin));
                }
                act(conn, &snap, route, matched, source_ns, req, &mut log).await
            }
        },
    };
    if let Some((c, origin)) = cors_origin {
        c.annotate(response.headers_mut(), origin);
    }
    log.status = response.status().as_u16();
    log.duration_ms = start.1.elapsed().as_millis();
    let upstream = log.upstream_host.unwrap_or(conn.original_dst);
    let mut base = TcpLabels::new(
        &snap,
        &conn.source_uid,
        Some(&conn.service),
        upstream,
        // Istio's request_protocol: "grpc" for gRPC calls, "http" for every other request.
        if grpc { "grpc" } else { "http" },
    );
    base.response_flags = if log.response_flags.is_empty() {
        "-"
    } else {
        log.response_flags
    };
    let labels = RequestLabels {
        base,
        response_code: log.status,
    };
    let m = &conn.pod.inputs.metrics;
    m.requests.get_or_create(&labels).inc();
    m.request_duration
        .get_or_create(&labels)
        .observe(start.1.elapsed().as_secs_f64() * 1000.0);
    access_log::log_http(&log);
    response
}

fn empty() -> Body {
    http_body_util::Empty::new().map_err(|e| match e {}).boxed()
}

/// What the selected route does with the request: answer it, redirect it, or send it on.
async fn act(
    conn: &Downstream,
    snap: &crate::state::Snapshot,
    route: &HttpRoute,
    matched: Option<&RequestMatch>,
    source_ns: &str,
    req: Request<Incoming>,
    log: &mut access_log::HttpEntry,
) -> Response<Body> {
    let authority = log.authority.clone();
    let path_and_query = log.path.clone();
    match &route.action {
        RouteAction::DirectResponse(d) => {
            let body = d
                .body
                .as_ref()
                .and_then(|b| b.string.clone())
                .unwrap_or_default();
            let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
            *r.status_mut() = StatusCode::from_u16(d.status as u16).unwrap_or(StatusCode::OK);
            r
        }
        RouteAction::Redirect(rd) => {
            let mut r = local(
                StatusCode::from_u16(rd.redirect_code.unwrap_or(301) as u16)
                    .unwrap_or(StatusCode::MOVED_PERMANENTLY),
                "",
            );
            let location = redirect_location(rd, &authority, &path_and_query);
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        RouteAction::Route(clusters) => match inject_fault(route, log).await {
            Some(aborted) => aborted,
            None => {
                let upstream = Upstream {
                    conn,
                    snap,
                    source_ns,
                    route,
                    matched,
                    authority: &authority,
                    path_and_query: &path_and_query,
                };
                upstream.forward(clusters, req, log).await
            }
        },
    }
}

/// Everything forwarding one routed request needs.
struct Upstream<'a> {
    conn: &'a Downstream,
    snap: &'a crate::state::Snapshot,
    source_ns: &'a str,
    route: &'a HttpRoute,
    matched: Option<&'a RequestMatch>,
    authority: &'a str,
    path_and_query: &'a str,
}

impl Upstream<'_> {
    async fn forward(
        &self,
        clusters: &[WeightedCluster],
        mut req: Request<Incoming>,
        log: &mut access_log::HttpEntry,
    ) -> Response<Body> {
        let Some(dest) = pick_weighted(clusters, fastrand::u32(..)) else {
            log.response_flags = flags::NO_CLUSTER;
            return local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        };
        let Some(cluster) = self.snap.routing.cluster(
            self.source_ns,
            &dest.host,
            dest.port,
            dest.subset.as_deref(),
        ) else {
            log.response_flags = flags::NO_CLUSTER;
            return local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        };
        log.cluster = cluster.name.clone();
        let Some(ep) = pick_endpoint(&cluster, self.conn.original_dst.is_ipv4()) else {
            log.response_flags = flags::NO_HEALTHY_UPSTREAM;
            return local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        };
        log.upstream_host = Some(ep);

        let (path, authority) = self.rewritten();
        if let Ok(v) = HeaderValue::from_str(&authority) {
            req.headers_mut().insert(header::HOST, v);
        }
        let Ok(uri) = format!("http://{ep}{path}").parse::<Uri>() else {
            return local(StatusCode::BAD_REQUEST, "bad request path");
        };
        *req.uri_mut() = uri;
        *req.version_mut() = http::Version::HTTP_11;
        // Route-level operations first, then the chosen destination's, as Envoy applies them.
        let ops = [self.route.headers.as_ref(), dest.headers.as_ref()];
        for h in ops.iter().flatten() {
            apply_ops(req.headers_mut(), h.request.as_ref());
        }
        let req = self.mirror(req, &authority, &path).await;
        let sent = self.client().request(req);
        let result = match self.route.timeout {
            Some(t) => match tokio::time::timeout(t.0, sent).await {
                Ok(r) => r,
                Err(_) => {
                    log.response_flags = flags::UPSTREAM_TIMEOUT;
                    return local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout");
                }
            },
            None => sent.await,
        };
        match result {
            Ok(resp) => {
                let mut resp = resp.map(|b| b.map_err(Into::into).boxed());
                for h in ops.iter().flatten() {
                    apply_ops(resp.headers_mut(), h.response.as_ref());
                }
                resp
            }
            Err(e) => {
                tracing::debug!(%ep, error = %e, "upstream request failed");
                log.response_flags = flags::UPSTREAM_CONNECT_FAILURE;
                local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                )
            }
        }
    }

    fn client(&self) -> &Client<PodConnector, Body> {
        match self.conn.protocol {
            Protocol::Http2 => &self.conn.pod.h2,
            _ => &self.conn.pod.h1,
        }
    }

    /// Sends fire-and-forget copies to the route's mirrors and returns the request to send
    /// upstream. The body is buffered to be sent twice, up to [`MIRROR_BODY_LIMIT`] bytes of
    /// declared length; a larger or unsized body is not mirrored.
    async fn mirror(&self, req: Request<Incoming>, authority: &str, path: &str) -> Request<Body> {
        let hits: Vec<&(
            WeightedCluster,
            Option<crate::config::istio::types::Percent>,
        )> = self
            .route
            .mirrors
            .iter()
            // No percentage: all traffic is mirrored.
            .filter(|(_, pct)| pct.is_none_or(|p| fastrand::f64() * 100.0 < p.value))
            .collect();
        let length = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let bodiless = length.is_none() && req.headers().get(header::TRANSFER_ENCODING).is_none();
        let fits = bodiless || length.is_some_and(|l| l <= MIRROR_BODY_LIMIT);
        if hits.is_empty() || !fits {
            return req.map(|b| b.map_err(Into::into).boxed());
        }
        let (parts, body) = req.into_parts();
        let bytes = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                // The client broke off its own body; what reaches the upstream is cut short too.
                tracing::debug!(error = %e, "request body ended early");
                return Request::from_parts(
                    parts,
                    http_body_util::Empty::new().map_err(|e| match e {}).boxed(),
                );
            }
        };
        // Istio 1.28 leaves Host as it is; before, it appended "-shadow" to the host name.
        let shadow_host = if self.conn.pod.inputs.mirror_shadow_host {
            shadow_host(authority)
        } else {
            authority.to_owned()
        };
        for (wc, _) in hits {
            let Some(cluster) =
                self.snap
                    .routing
                    .cluster(self.source_ns, &wc.host, wc.port, wc.subset.as_deref())
            else {
                continue;
            };
            let Some(ep) = pick_endpoint(&cluster, self.conn.original_dst.is_ipv4()) else {
                continue;
            };
            let Ok(uri) = format!("http://{ep}{path}").parse::<Uri>() else {
                continue;
            };
            let mut copy = Request::new(Full::new(bytes.clone()).map_err(|e| match e {}).boxed());
            *copy.method_mut() = parts.method.clone();
            *copy.uri_mut() = uri;
            *copy.headers_mut() = parts.headers.clone();
            if let Ok(v) = HeaderValue::from_str(&shadow_host) {
                copy.headers_mut().insert(header::HOST, v);
            }
            let client = self.client().clone();
            // The copy's response is discarded and its failure or slowness never reaches the
            // client; the time limit only keeps stuck mirrors from piling up.
            tokio::spawn(async move {
                let _ = tokio::time::timeout(MIRROR_TIMEOUT, client.request(copy)).await;
            });
        }
        Request::from_parts(parts, Full::new(bytes).map_err(|e| match e {}).boxed())
    }

    /// The path and authority after the route's rewrite.
    fn rewritten(&self) -> (String, String) {
        match &self.route.rewrite {
            None => (self.path_and_query.to_owned(), self.authority.to_owned()),
            Some(rw) => (
                rewrite_path(
                    rw,
                    self.matched.and_then(|m| m.uri.as_ref()),
                    self.path_and_query,
                ),
                rw.authority
                    .clone()
                    .unwrap_or_else(|| self.authority.to_owned()),
            ),
        }
    }
}

/// Whether a fault with this percentage hits this request. Istio leaves an unset percentage
/// unset in Envoy's fault filter, where it means 0%: no request is delayed or aborted.
fn fault_hits(p: Option<&crate::config::istio::types::Percent>) -> bool {
    p.is_some_and(|p| fastrand::f64() * 100.0 < p.value)
}

/// The route's fault injection, as Envoy's fault filter applies it before routing: first the
/// delay, then the abort. Returns the abort's response when the request is aborted.
async fn inject_fault(
    route: &HttpRoute,
    log: &mut access_log::HttpEntry,
) -> Option<Response<Body>> {
    let fault = route.fault.as_ref()?;
    if let Some(d) = &fault.delay
        && let Some(delay) = d.fixed_delay
        && fault_hits(d.percentage.as_ref())
    {
        tokio::time::sleep(delay.0).await;
        log.response_flags = flags::DELAY_INJECTED;
    }
    let a = fault.abort.as_ref()?;
    if !fault_hits(a.percentage.as_ref()) {
        return None;
    }
    log.response_flags = flags::FAULT_INJECTED;
    if let Some(code) = a.grpc_status.as_deref() {
        let n = GRPC_STATUS.iter().position(|c| *c == code).unwrap_or(2);
        let mut r = local(StatusCode::OK, "");
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        r.headers_mut().insert("grpc-status", HeaderValue::from(n));
        r.headers_mut().insert(
            "grpc-message",
            HeaderValue::from_static("fault filter abort"),
        );
        return Some(r);
    }
    let status = a
        .http_status
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    Some(local(status, "fault filter abort"))
}

/// Istio's header operations: set replaces, add appends, remove deletes.
fn apply_ops(headers: &mut http::HeaderMap, ops: Option<&HeaderOperations>) {
    let Some(ops) = ops else { return };
    for (k, v) in &ops.set {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            headers.insert(k, v);
        }
    }
    for (k, v) in &ops.add {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            headers.append(k, v);
        }
    }
    for k in &ops.remove {
        headers.remove(k.as_str());
    }
}

/// The Host Istio before 1.28 gave mirrored requests: "-shadow" after the host name, before
/// any port.
fn shadow_host(authority: &str) -> String {
    match authority.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{h}-shadow:{port}")
        }
        _ => format!("{authority}-shadow"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_host_goes_before_the_port() {
        assert_eq!(shadow_host("api-server:8080"), "api-server-shadow:8080");
        assert_eq!(shadow_host("api-server"), "api-server-shadow");
        assert_eq!(shadow_host("10.96.0.10:8080"), "10.96.0.10-shadow:8080");
    }
}
