//! HTTP on the outbound path: each request is routed on its own (VirtualService match,
//! weighted destination, subset cluster, endpoint) and forwarded over a per-pod connection
//! pool whose sockets live in the pod's network namespace.
use std::{
    borrow::Cow,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use tokio::net::TcpStream;

use super::{
    ProxyInputs, access_log,
    cluster_state::{self, Choice, ClusterState, InFlight, Outcome, PodClusters, Slot, take_slot},
    cors::Decision,
    h1_server::{self, Speaks},
    h2_server, hop_by_hop,
    idle::{self, IdleDeadline},
    observed::{Completion, Counted, Observed, PodSeries, SeriesCache},
    pool::{Lease, PodPool, PoolError, SendError, UpstreamBody, Want},
    protocol::Protocol,
    replay::Replayable,
    upgrade,
};
use crate::{
    config::istio::{networking::HeaderOperations, validate::GRPC_STATUS},
    netns::Netns,
    routing::{
        HttpRoute, RequestMatch, RouteAction, WeightedCluster,
        eval::{RequestView, pick_weighted, query_param, redirect_location, rewrite_path},
        policy::{HashKey, LbPolicy},
        retry::{Failure, RetryPolicy},
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
    pub const OVERFLOW: &str = "UO";
    pub const UPSTREAM_RESET: &str = "UR";
    /// Retries were used up on a failure the policy would have retried.
    pub const RETRY_LIMIT: &str = "URX";
    pub const DELAY_INJECTED: &str = "DI";
}

/// One pod's HTTP side: its upstream connection pool and what its proxy remembers about
/// each cluster (balancing, outlier detection, circuit breakers; the TCP path shares it).
pub struct PodHttp {
    pub(super) inputs: Arc<ProxyInputs>,
    pool: Arc<PodPool>,
    pub clusters: PodClusters,
    /// Request metric series of this pod's requests, for connections that have not used
    /// them yet.
    pub series: PodSeries,
}

impl PodHttp {
    pub fn new(pod_uid: &str, netns: Arc<Netns>, inputs: Arc<ProxyInputs>) -> Self {
        Self {
            pool: PodPool::new(pod_uid, netns, inputs.clone()),
            inputs,
            clusters: PodClusters::default(),
            series: PodSeries::default(),
        }
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
    /// Request metric series this connection has used lately.
    pub series: SeriesCache,
}

/// Serves one client connection (HTTP/1.1, or HTTP/2 with prior knowledge) until it closes.
pub async fn serve(conn: Arc<Downstream>, client: TcpStream) {
    let idle = || IdleDeadline::new(idle::IDLE_TIMEOUT, conn.pod.inputs.shards.drain().signal());
    match h1_server::Accepted::detect(client).await {
        Speaks::Http1(accepted) => {
            h1_server::serve(accepted, idle(), |req| handle(&conn, req)).await;
        }
        Speaks::Http2(io) => h2_server::serve(io, idle(), |req| handle(&conn, req)).await,
        Speaks::Nothing => {}
    }
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

async fn handle<B>(conn: &Arc<Downstream>, req: Request<B>) -> Response<Body>
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Counted only when there is something to count: most requests have no body, and an
    // empty body boxes without allocating.
    let (req, request_bytes) = if req.body().is_end_stream() {
        (req.map(|_| empty()), None)
    } else {
        let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
        (req.map(|b| Counted::new(b, n.clone()).boxed()), Some(n))
    };
    let start = (SystemTime::now(), Instant::now());
    let snap = conn.pod.inputs.snapshot.load_full();
    let no_labels = Default::default();
    let (source_labels, source_ns) = conn
        .source
        .as_ref()
        .map_or((&no_labels, ""), |p| (&p.labels, p.namespace.as_str()));
    // Both shared with the request's own bytes (HTTP/2's authority, in the URI, is copied).
    let authority_value = req
        .headers()
        .get(header::HOST)
        .filter(|h| h.to_str().is_ok())
        .cloned()
        .or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        })
        .unwrap_or_else(|| HeaderValue::from_static(""));
    let authority = authority_value.to_str().unwrap_or_default();
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let target = req.uri().path_and_query().cloned();
    let path_and_query = target.as_ref().map_or("/", |p| p.as_str());
    let svc = &conn.service;
    let view = RequestView {
        path: req.uri().path(),
        query: req.uri().query(),
        method: req.method().as_str(),
        scheme: "http",
        authority,
        headers: req.headers(),
        port: svc.port,
        source_labels,
        source_namespace: source_ns,
    };
    let mut log = access_log::HttpEntry {
        start: start.0,
        method: req.method().clone(),
        // Both moved in once routing no longer borrows them.
        path: None,
        version: req.version(),
        status: 0,
        response_flags: "",
        duration_ms: 0,
        upstream_host: None,
        cluster: None,
        authority: HeaderValue::from_static(""),
        original_dst: conn.original_dst,
        downstream_peer: conn.peer,
        bytes_received: 0,
        bytes_sent: 0,
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
                let target = RequestTarget {
                    source_ns,
                    authority,
                    path_and_query,
                };
                act(conn, &snap, route, matched, &target, req, &mut log).await
            }
        },
    };
    if let Some((c, origin)) = cors_origin {
        c.annotate(response.headers_mut(), origin);
    }
    log.status = response.status().as_u16();
    log.authority = authority_value;
    log.path = target;
    let done = Completion {
        conn: conn.clone(),
        snap,
        // Istio's request_protocol: "grpc" for gRPC calls, "http" for every other request.
        request_protocol: if grpc { "grpc" } else { "http" },
        log,
        started: start.1,
        request_bytes,
        grpc_status: if grpc {
            grpc_status(response.headers())
        } else {
            None
        },
        tunnel: response
            .extensions()
            .get::<upgrade::Upgraded>()
            .map(upgrade::Upgraded::bytes),
    };
    response.map(|b| Observed::new(b, done).boxed())
}

/// A response's `grpc-status` (in its head, or in trailers), if it has a readable one.
pub(super) fn grpc_status(headers: &http::HeaderMap) -> Option<u8> {
    // A name built once: looked up by `&str`, the name is parsed again on every response.
    const GRPC_STATUS_HEADER: http::HeaderName = http::HeaderName::from_static("grpc-status");
    headers
        .get(GRPC_STATUS_HEADER)
        .and_then(|v| v.to_str().ok()?.parse().ok())
}

pub(super) fn empty() -> Body {
    http_body_util::Empty::new().map_err(|e| match e {}).boxed()
}

/// Who sent the request and what it asked for, as the routing saw it.
struct RequestTarget<'a> {
    source_ns: &'a str,
    authority: &'a str,
    path_and_query: &'a str,
}

/// What the selected route does with the request: answer it, redirect it, or send it on.
async fn act(
    conn: &Downstream,
    snap: &crate::state::Snapshot,
    route: &HttpRoute,
    matched: Option<&RequestMatch>,
    target: &RequestTarget<'_>,
    req: Request<Body>,
    log: &mut access_log::HttpEntry,
) -> Response<Body> {
    let (authority, path_and_query) = (target.authority, target.path_and_query);
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
            let location = redirect_location(rd, authority, path_and_query);
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
                    source_ns: target.source_ns,
                    route,
                    matched,
                    authority,
                    path_and_query,
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
        mut req: Request<Body>,
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
        log.cluster = Some(cluster.clone());
        let state = self.conn.pod.clusters.get(&cluster.name);
        // The http2MaxRequests breaker: Envoy answers overflow at once, flagged UO.
        let Some(request_slot) = take_slot(&state.requests, cluster.policy.limits.max_requests)
        else {
            log.response_flags = flags::OVERFLOW;
            self.metrics().count_overflow(&cluster.name, "requests");
            return local(StatusCode::SERVICE_UNAVAILABLE, OVERFLOW_BODY);
        };

        let (path, authority) = self.rewritten();
        hop_by_hop::strip(req.headers_mut());
        // Most requests keep their Host: then it is not copied back in.
        let host = req.headers().get(header::HOST).map(HeaderValue::as_bytes);
        if host != Some(authority.as_bytes())
            && let Ok(v) = HeaderValue::from_str(&authority)
        {
            req.headers_mut().insert(header::HOST, v);
        }
        // Route-level operations first, then the chosen destination's, as Envoy applies them.
        let ops = [self.route.headers.as_ref(), dest.headers.as_ref()];
        for h in ops.iter().flatten() {
            apply_ops(req.headers_mut(), h.request.as_ref());
        }
        let mut hash = hash_key(&cluster.policy.lb, &req, || {
            cluster_state::source_hash(self.conn.source.as_deref(), &self.conn.source_uid)
        });
        // A hash cookie with a TTL that the client does not have yet: Envoy makes one up,
        // hashes on it, and hands it out with the response so the client sticks from then on.
        let new_cookie = match (&cluster.policy.lb, hash) {
            (
                LbPolicy::Hash(HashKey::Cookie {
                    name,
                    path,
                    ttl: Some(ttl),
                }),
                None,
            ) => {
                let value = format!("{:016x}", fastrand::u64(..));
                hash = Some(cluster_state::hash_key(value.as_bytes()));
                let path = path
                    .as_deref()
                    .map_or(String::new(), |p| format!("; Path={p}"));
                HeaderValue::from_str(&format!(
                    "{name}=\"{value}\"; Max-Age={}{path}; HttpOnly",
                    ttl.as_secs()
                ))
                .ok()
            }
            _ => None,
        };
        // Boxed, and only for routes that mirror: laid out inline, the mirroring future sat
        // beside the attempts' and made every request's future a kilobyte larger.
        let req = if self.route.mirrors.is_empty() {
            req
        } else {
            Box::pin(self.mirror(req, &authority, &path)).await
        };
        let attempts = Attempts {
            up: self,
            cluster: &cluster,
            state: &state,
            hash,
            path: &path,
        };
        // Pinned where it is: both arms below then share it instead of each keeping a copy
        // of a multi-kilobyte future (moved, i.e. memcpy'd, on every request).
        let result = {
            let sent = std::pin::pin!(attempts.run(req, request_slot, log));
            match self.route.timeout {
                Some(t) => tokio::time::timeout(t.0, sent).await.ok(),
                None => Some(sent.await),
            }
        };
        let Some(mut resp) = result else {
            log.response_flags = flags::UPSTREAM_TIMEOUT;
            return local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout");
        };
        hop_by_hop::strip(resp.headers_mut());
        if let Some(c) = new_cookie {
            resp.headers_mut().append(header::SET_COOKIE, c);
        }
        if log.response_flags.is_empty() || log.response_flags == flags::RETRY_LIMIT {
            for h in ops.iter().flatten() {
                apply_ops(resp.headers_mut(), h.response.as_ref());
            }
        }
        resp
    }

    /// Whether this cluster is spoken to in HTTP/2: http2/grpc ports, and HTTP/1.1 ports
    /// whose DestinationRule says `h2UpgradePolicy: UPGRADE`.
    fn uses_h2(&self, h2_upgrade: bool) -> bool {
        self.conn.protocol == Protocol::Http2 || h2_upgrade
    }

    fn metrics(&self) -> &crate::metrics::Metrics {
        &self.conn.pod.inputs.metrics
    }

    /// The route's retry policy, as the mesh's Istio version builds it.
    fn retry_policy(&self) -> Option<&RetryPolicy> {
        if self.conn.pod.inputs.retry_503_by_default {
            self.route.retry_before_1_24.as_ref()
        } else {
            self.route.retry.as_ref()
        }
    }

    /// Sends fire-and-forget copies to the route's mirrors and returns the request to send
    /// upstream. The body is buffered to be sent twice, up to [`MIRROR_BODY_LIMIT`] bytes of
    /// declared length; a larger or unsized body is not mirrored.
    async fn mirror(&self, req: Request<Body>, authority: &str, path: &str) -> Request<Body> {
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
        let length = content_length(req.headers());
        let bodiless = length.is_none() && req.headers().get(header::TRANSFER_ENCODING).is_none();
        let fits = bodiless || length.is_some_and(|l| l <= MIRROR_BODY_LIMIT);
        if hits.is_empty() || !fits {
            return req;
        }
        let (parts, body) = req.into_parts();
        let bytes = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                // The client broke off its own body; what reaches the upstream is cut short too.
                tracing::debug!(error = %e, "request body ended early");
                return Request::from_parts(parts, empty());
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
            let state = self.conn.pod.clusters.get(&cluster.name);
            let choice = Choice {
                v4: self.conn.original_dst.is_ipv4(),
                hash: None,
                tried: &[],
            };
            let Some((ep, in_flight)) = state.choose(&cluster, &choice) else {
                continue;
            };
            let body = Full::new(bytes.clone()).map_err(|e| match e {}).boxed();
            let mut copy = parts.clone();
            if let Ok(v) = HeaderValue::from_str(&shadow_host) {
                copy.headers.insert(header::HOST, v);
            }
            let pool = self.conn.pod.pool.clone();
            let h2 = self.uses_h2(cluster.policy.h2_upgrade);
            let path = path.to_owned();
            // The copy's response is discarded and its failure or slowness never reaches the
            // client; the time limit only keeps stuck mirrors from piling up.
            tokio::spawn(async move {
                let _in_flight = in_flight;
                let send = async {
                    let want = Want {
                        endpoint: ep,
                        h2,
                        policy: &cluster.policy,
                        state: &state,
                    };
                    let mut lease = pool.lease(&want).await.ok()?;
                    let resp = lease.send(&copy, &path, body).await.ok()?;
                    resp.into_body().collect().await.ok()
                };
                let _ = tokio::time::timeout(MIRROR_TIMEOUT, send).await;
            });
        }
        Request::from_parts(parts, Full::new(bytes).map_err(|e| match e {}).boxed())
    }

    /// The path and authority after the route's rewrite (borrowed when there is none).
    fn rewritten(&self) -> (Cow<'_, str>, Cow<'_, str>) {
        match &self.route.rewrite {
            None => (
                Cow::Borrowed(self.path_and_query),
                Cow::Borrowed(self.authority),
            ),
            Some(rw) => (
                Cow::Owned(rewrite_path(
                    rw,
                    self.matched.and_then(|m| m.uri.as_ref()),
                    self.path_and_query,
                )),
                rw.authority
                    .as_deref()
                    .map_or(Cow::Borrowed(self.authority), Cow::Borrowed),
            ),
        }
    }
}

/// The attempts of one request on one cluster: the first, then retries as the route's
/// policy allows, each on an endpoint the request has not tried yet when there is one.
struct Attempts<'a> {
    up: &'a Upstream<'a>,
    cluster: &'a crate::routing::Cluster,
    state: &'a Arc<ClusterState>,
    hash: Option<u64>,
    path: &'a str,
}

impl Attempts<'_> {
    async fn run(
        &self,
        req: Request<Body>,
        request_slot: Slot,
        log: &mut access_log::HttpEntry,
    ) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let body = Replayable::new(body);
        let policy = self.up.retry_policy();
        // An upgrade stays HTTP/1.1 (h2 has no `Upgrade`): Envoy does not move it either.
        let h2 =
            self.up.uses_h2(self.cluster.policy.h2_upgrade) && !upgrade::requested(&parts.headers);
        let pool = &self.up.conn.pod.pool;
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut retries = 0u32;
        loop {
            let choice = Choice {
                v4: self.up.conn.original_dst.is_ipv4(),
                hash: self.hash,
                tried: &tried,
            };
            let Some((ep, in_flight)) = self.state.choose(self.cluster, &choice) else {
                log.response_flags = flags::NO_HEALTHY_UPSTREAM;
                return local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
            };
            log.upstream_host = Some(ep);
            let Some(attempt_body) = body.attempt() else {
                log.response_flags = flags::UPSTREAM_RESET;
                return local(StatusCode::SERVICE_UNAVAILABLE, RESET_BODY);
            };
            let want = Want {
                endpoint: ep,
                h2,
                policy: &self.cluster.policy,
                state: self.state,
            };
            let attempt = async {
                let mut lease = match pool.lease(&want).await {
                    Ok(l) => l,
                    Err(PoolError::Overflow) => return Err(Failure::Overflow),
                    Err(PoolError::Connect(e)) if e.denied_by_policy() => {
                        return Err(Failure::Denied);
                    }
                    Err(e) => {
                        tracing::debug!(%ep, error = %e, "upstream connect failed");
                        return Err(Failure::ConnectFailure);
                    }
                };
                match lease.send(&parts, self.path, attempt_body).await {
                    Ok(resp) => Ok((resp, lease)),
                    Err(e) => {
                        tracing::debug!(%ep, error = %e, "upstream request failed");
                        lease.discard();
                        Err(classify(&e))
                    }
                }
            };
            let per_try = policy.and_then(|p| p.per_try_timeout);
            let attempt = std::pin::pin!(attempt);
            let result = match per_try {
                Some(t) => tokio::time::timeout(t, attempt)
                    .await
                    .unwrap_or(Err(Failure::PerTryTimeout)),
                None => attempt.await,
            };
            let (failure, outcome) = match &result {
                // Overflow is the proxy's own limit: nothing to hold against the endpoint.
                Err(Failure::Overflow) => {
                    log.response_flags = flags::OVERFLOW;
                    self.up
                        .metrics()
                        .count_overflow(&self.cluster.name, "pending");
                    return local(StatusCode::SERVICE_UNAVAILABLE, OVERFLOW_BODY);
                }
                // What the destination's sidecar would answer; nothing against the endpoint.
                Err(Failure::Denied) => return local(StatusCode::FORBIDDEN, RBAC_DENIED_BODY),
                Err(f) => (*f, Outcome::LocalOriginFailure),
                Ok((resp, _)) => {
                    let status = resp.status().as_u16();
                    let grpc = grpc_status(resp.headers());
                    (Failure::Response { status, grpc }, Outcome::Status(status))
                }
            };
            if self.state.report(self.cluster, ep, outcome) {
                self.up.metrics().count_ejection(&self.cluster.name);
            }
            let wants_retry = policy.is_some_and(|p| p.retries(failure));
            let may_retry = policy.is_some_and(|p| retries < p.attempts);
            if wants_retry && may_retry {
                // The maxRetries breaker: without a slot, no retry (Envoy counts it as
                // retry overflow and returns what it has).
                if let Some(_slot) =
                    take_slot(&self.state.retries, self.cluster.policy.limits.max_retries)
                {
                    retries += 1;
                    // Kept only for a retry's sake: most requests never need the list.
                    tried.push(ep);
                    self.up.metrics().count_retry(&self.cluster.name);
                    let pause =
                        policy.map_or(Duration::ZERO, |p| p.backoff(retries, fastrand::f64()));
                    drop(result);
                    tokio::time::sleep(pause).await;
                    continue;
                }
            }
            let exhausted = wants_retry && retries > 0;
            return match result {
                Ok((resp, lease)) => {
                    if exhausted {
                        log.response_flags = flags::RETRY_LIMIT;
                    }
                    // The connection, the endpoint's in-flight count and the cluster's
                    // request slot stay taken until the response body has been read.
                    let held = Held {
                        _lease: lease,
                        _in_flight: in_flight,
                        _slot: request_slot,
                    };
                    resp.map(|b| {
                        HeldBody {
                            inner: b,
                            held: Some(held),
                        }
                        .boxed()
                    })
                }
                Err(f) => {
                    let (flag, status, text) = match f {
                        Failure::PerTryTimeout => (
                            flags::UPSTREAM_TIMEOUT,
                            StatusCode::GATEWAY_TIMEOUT,
                            "upstream request timeout",
                        ),
                        Failure::ConnectFailure => (
                            flags::UPSTREAM_CONNECT_FAILURE,
                            StatusCode::SERVICE_UNAVAILABLE,
                            CONNECT_FAILURE_BODY,
                        ),
                        _ => (
                            flags::UPSTREAM_RESET,
                            StatusCode::SERVICE_UNAVAILABLE,
                            RESET_BODY,
                        ),
                    };
                    log.response_flags = flag;
                    local(status, text)
                }
            };
        }
    }
}

/// What a response keeps taken until its body is done.
struct Held {
    _lease: Lease,
    _in_flight: InFlight,
    _slot: Slot,
}

/// An upstream response body that gives its connection and counters back at its end.
struct HeldBody {
    inner: UpstreamBody,
    held: Option<Held>,
}

impl hyper::body::Body for HeldBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            self.held = None;
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

const OVERFLOW_BODY: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";
const CONNECT_FAILURE_BODY: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure";
/// Envoy's RBAC filter's answer, which the destination's sidecar would have sent.
const RBAC_DENIED_BODY: &str = "RBAC: access denied";
const RESET_BODY: &str = "upstream connect error or disconnect/reset before headers. reset reason: connection termination";

/// A message's `Content-Length`, when it has one that reads as a number.
pub(super) fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// What kind of failure a request error is: an HTTP/2 stream the upstream refused, or any
/// other reset or disconnect before the response.
fn classify(e: &SendError) -> Failure {
    match e {
        SendError::H2(e) if e.reason() == Some(h2::Reason::REFUSED_STREAM) => {
            Failure::RefusedStream
        }
        // A GOAWAY fails only the streams it says the server never processed (and requests
        // that could not open one): safe to send again, and Envoy reports those as
        // refused streams too.
        SendError::H2(e) if e.is_go_away() && e.is_remote() => Failure::RefusedStream,
        _ => Failure::Reset,
    }
}

/// The request's consistent-hash key under `lb`, when it hashes and the key is there;
/// `source` (the client's address hashed) is only worked out when the policy asks for it.
fn hash_key<B>(lb: &LbPolicy, req: &Request<B>, source: impl FnOnce() -> u64) -> Option<u64> {
    let LbPolicy::Hash(key) = lb else {
        return None;
    };
    match key {
        HashKey::Header(name) => req
            .headers()
            .get(name.as_str())
            .map(|v| cluster_state::hash_key(v.as_bytes())),
        HashKey::Cookie { name, .. } => req
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                (k == name).then(|| cluster_state::hash_key(v.trim_matches('"').as_bytes()))
            }),
        HashKey::SourceIp => Some(source()),
        HashKey::QueryParameter(name) => {
            query_param(req.uri().query(), name).map(|v| cluster_state::hash_key(v.as_bytes()))
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
