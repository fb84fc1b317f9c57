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

use super::{ProxyInputs, access_log, protocol::Protocol, sockets::socket_in};
use crate::{
    metrics::{RequestLabels, TcpLabels},
    netns::Netns,
    routing::{
        RouteAction,
        eval::{RequestView, pick_weighted},
    },
    state::{PodInfo, ServicePort},
};

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Envoy's response flags for requests the proxy answers itself.
mod flags {
    pub const NO_ROUTE: &str = "NR";
    pub const NO_CLUSTER: &str = "NC";
    pub const NO_HEALTHY_UPSTREAM: &str = "UH";
    pub const UPSTREAM_CONNECT_FAILURE: &str = "UF";
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
    h1: Client<PodConnector, Incoming>,
    h2: Client<PodConnector, Incoming>,
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

async fn handle(conn: &Downstream, mut req: Request<Incoming>) -> Response<Body> {
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
    let route = snap
        .routing
        .virtual_host(source_ns, &svc.hostname, svc.port)
        .and_then(|vh| vh.select(&view).cloned());
    let response = match route.map(|r| r.action) {
        None => {
            log.response_flags = flags::NO_ROUTE;
            local(StatusCode::NOT_FOUND, "")
        }
        Some(RouteAction::DirectResponse(d)) => {
            let body = d.body.and_then(|b| b.string).unwrap_or_default();
            let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
            *r.status_mut() = StatusCode::from_u16(d.status as u16).unwrap_or(StatusCode::OK);
            r
        }
        Some(RouteAction::Redirect(rd)) => {
            let scheme = rd.scheme.as_deref().unwrap_or("http");
            let host = rd.authority.unwrap_or_else(|| authority.clone());
            let path = rd.uri.unwrap_or(path_and_query.clone());
            let mut r = local(
                StatusCode::from_u16(rd.redirect_code.unwrap_or(301) as u16)
                    .unwrap_or(StatusCode::MOVED_PERMANENTLY),
                "",
            );
            if let Ok(v) = HeaderValue::from_str(&format!("{scheme}://{host}{path}")) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        Some(RouteAction::Route(clusters)) => {
            let dest = pick_weighted(&clusters, fastrand::u32(..)).cloned();
            let cluster = dest.as_ref().and_then(|d| {
                snap.routing
                    .cluster(source_ns, &d.host, d.port, d.subset.as_deref())
            });
            match cluster {
                None => {
                    log.response_flags = flags::NO_CLUSTER;
                    local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream")
                }
                Some(c) => {
                    log.cluster = c.name.clone();
                    // Prefer the address family the client used for the VIP.
                    let family: Vec<_> = c
                        .endpoints
                        .iter()
                        .filter(|e| e.addr.is_ipv4() == conn.original_dst.is_ipv4())
                        .collect();
                    let candidates = if family.is_empty() {
                        c.endpoints.iter().collect()
                    } else {
                        family
                    };
                    if candidates.is_empty() {
                        log.response_flags = flags::NO_HEALTHY_UPSTREAM;
                        local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream")
                    } else {
                        let ep = candidates[fastrand::usize(..candidates.len())].addr;
                        log.upstream_host = Some(ep);
                        if !req.headers().contains_key(header::HOST)
                            && let Ok(v) = HeaderValue::from_str(&authority)
                        {
                            req.headers_mut().insert(header::HOST, v);
                        }
                        match format!("http://{ep}{path_and_query}").parse::<Uri>() {
                            Err(_) => local(StatusCode::BAD_REQUEST, "bad request path"),
                            Ok(uri) => {
                                *req.uri_mut() = uri;
                                *req.version_mut() = http::Version::HTTP_11;
                                let client = match conn.protocol {
                                    Protocol::Http2 => &conn.pod.h2,
                                    _ => &conn.pod.h1,
                                };
                                match client.request(req).await {
                                    Ok(resp) => resp.map(|b| b.map_err(Into::into).boxed()),
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
                        }
                    }
                }
            }
        }
    };
    log.status = response.status().as_u16();
    log.duration_ms = start.1.elapsed().as_millis();
    let upstream = log.upstream_host.unwrap_or(conn.original_dst);
    let mut base = TcpLabels::new(
        &snap,
        &conn.source_uid,
        Some(&conn.service),
        upstream,
        match conn.protocol {
            Protocol::Http2 => "http2",
            _ => "http",
        },
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
