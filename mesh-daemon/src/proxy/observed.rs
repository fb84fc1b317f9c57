//! Request telemetry recorded when the response ends, as Envoy records it: the duration to
//! the last byte, the bytes each way, then `istio_requests_total`, the duration and size
//! histograms and the access-log line. A client that goes away early still gets its line
//! (flag DC, downstream connection termination).
use std::{
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::{
    access_log,
    http::{Body, Downstream, grpc_status},
    upgrade::TunnelBytes,
    upstream_io::principals,
};
use crate::{
    metrics::{RequestLabels, RequestSeries, TcpLabels},
    state::{ServicePort, Snapshot},
};

/// A body that counts the bytes passing through it into a shared counter.
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl<B> HttpBody for Counted<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What picks a request's metric series, besides the connection it came on (which fixes
/// the source and the Service): the snapshot the labels were read from, the endpoint, and
/// the outcome.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct SeriesKey {
    generation: u64,
    upstream: IpAddr,
    response_code: u16,
    response_flags: &'static str,
    request_protocol: &'static str,
    grpc_status: Option<u8>,
}

/// The series a downstream connection has recorded into lately. A keep-alive connection
/// sends request after request to the same few endpoints with the same outcome, so its
/// requests find their series here instead of building two dozen labels and hashing them
/// four times each.
#[derive(Default)]
pub struct SeriesCache(Mutex<Vec<(SeriesKey, RequestSeries)>>);

/// Enough for a connection spread over a handful of endpoints and outcomes.
const SERIES_PER_CONNECTION: usize = 8;

impl SeriesCache {
    fn get(&self, key: SeriesKey, build: impl FnOnce() -> RequestSeries) -> RequestSeries {
        let mut entries = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(i) = entries.iter().position(|(k, _)| *k == key) {
            return entries[i].1.clone();
        }
        let series = build();
        if entries.len() == SERIES_PER_CONNECTION {
            entries.remove(0);
        }
        entries.push((key, series.clone()));
        series
    }
}

/// The series of one pod's requests across all its connections: a client that opens a
/// connection per request finds its series here instead of building them. An entry holds
/// the Service its connection was sent to, so that the Service's address, part of the key,
/// is not reused while the entry lives.
#[derive(Default)]
pub struct PodSeries(Mutex<PodSeriesEntries>);

#[derive(Default)]
struct PodSeriesEntries {
    /// The snapshot generation of every entry: a newer snapshot may relabel any of them.
    generation: u64,
    // foldhash: looked up once per new client connection, keys not chosen by a client.
    by_key: hashbrown::HashMap<(usize, SeriesKey), (Arc<ServicePort>, RequestSeries)>,
}

/// Beyond this many series a pod's entries are dropped and found again as used: the metric
/// families hold the series themselves, this only saves building their labels.
const SERIES_PER_POD: usize = 4096;

impl PodSeries {
    fn get(
        &self,
        service: &Arc<ServicePort>,
        key: SeriesKey,
        build: impl FnOnce() -> RequestSeries,
    ) -> RequestSeries {
        let mut entries = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if key.generation < entries.generation {
            // A request that began under an older snapshot: rare, not worth keeping.
            drop(entries);
            return build();
        }
        if key.generation > entries.generation || entries.by_key.len() >= SERIES_PER_POD {
            entries.by_key.clear();
            entries.generation = key.generation;
        }
        let id = (Arc::as_ptr(service) as usize, key);
        if let Some((_, series)) = entries.by_key.get(&id) {
            return series.clone();
        }
        let series = build();
        entries.by_key.insert(id, (service.clone(), series.clone()));
        series
    }
}

/// Everything recorded for one request once its response is over.
pub struct Completion {
    pub conn: Arc<Downstream>,
    pub snap: Arc<Snapshot>,
    pub request_protocol: &'static str,
    pub log: access_log::HttpEntry,
    pub started: Instant,
    /// `None` for a request that came without a body.
    pub request_bytes: Option<Arc<AtomicU64>>,
    /// The `grpc-status` the response carried, in its head (trailers-only) or trailers.
    pub grpc_status: Option<u8>,
    /// After a 101, the bytes the tunnel carried: the request's and the response's, as
    /// Envoy counts an upgraded stream's.
    pub tunnel: Option<Arc<TunnelBytes>>,
}

/// What Envoy reports as a gRPC call's status when the response carried none: the gRPC
/// spec's mapping from the HTTP status (`Grpc::Utility::httpToGrpcStatus`).
fn grpc_status_from_http(status: u16) -> u8 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

impl Completion {
    fn record(mut self, response_bytes: u64, complete: bool) {
        if !complete && self.log.response_flags.is_empty() {
            self.log.response_flags = "DC";
        }
        let elapsed = self.started.elapsed();
        // The endpoint that answered, or the original destination if none did.
        let upstream = self.log.upstream_host.unwrap_or(self.conn.original_dst);
        let (tunnel_up, tunnel_down) = self.tunnel.as_ref().map_or((0, 0), |t| {
            (
                t.to_upstream.load(Ordering::Relaxed),
                t.to_client.load(Ordering::Relaxed),
            )
        });
        let response_bytes = response_bytes + tunnel_down;
        let request_bytes = tunnel_up
            + self
                .request_bytes
                .as_ref()
                .map_or(0, |n| n.load(Ordering::Relaxed));
        let key = SeriesKey {
            generation: self.snap.generation,
            upstream: upstream.ip(),
            response_code: self.log.status,
            response_flags: if self.log.response_flags.is_empty() {
                "-"
            } else {
                self.log.response_flags
            },
            request_protocol: self.request_protocol,
            grpc_status: (self.request_protocol == "grpc").then(|| {
                self.grpc_status
                    .unwrap_or_else(|| grpc_status_from_http(self.log.status))
            }),
        };
        let conn = &self.conn;
        let series = conn.series.get(key, || {
            conn.pod.series.get(&conn.service, key, || {
                let mut base = TcpLabels::new(
                    &self.snap,
                    &conn.source_uid,
                    Some(&conn.service),
                    upstream,
                    key.request_protocol,
                );
                base.response_flags = key.response_flags;
                let inputs = &conn.pod.inputs;
                if let Some(p) = principals(inputs, &self.snap, &conn.source_uid, upstream) {
                    base.source_principal = p.own.to_string();
                    base.destination_principal = p.peer.to_string();
                }
                inputs.metrics.request_series(&RequestLabels {
                    base,
                    response_code: key.response_code,
                    grpc_response_status: key
                        .grpc_status
                        .map_or_else(String::new, |s| s.to_string()),
                })
            })
        });
        series.record(
            elapsed.as_secs_f64() * 1000.0,
            request_bytes,
            response_bytes,
        );
        self.log.duration_ms = elapsed.as_millis();
        self.log.bytes_received = request_bytes;
        self.log.bytes_sent = response_bytes;
        access_log::log_http(&self.log);
    }
}

/// The response body as the client receives it; records the request when it ends (or is
/// dropped unfinished).
pub struct Observed {
    inner: Body,
    sent: u64,
    done: Option<Completion>,
}

impl Observed {
    pub fn new(inner: Body, done: Completion) -> Self {
        let mut this = Self {
            inner,
            sent: 0,
            done: Some(done),
        };
        // A body with nothing in it never gets polled to its end by some clients. A 101's
        // is polled once its tunnel has closed: the request lasts as long.
        if this.inner.is_end_stream()
            && this.done.as_ref().is_some_and(|d| d.tunnel.is_none())
            && let Some(d) = this.done.take()
        {
            d.record(0, true);
        }
        this
    }
}

impl HttpBody for Observed {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(status) = grpc_status(trailers)
                    && let Some(d) = self.done.as_mut()
                {
                    d.grpc_status = Some(status);
                }
                if self.inner.is_end_stream() {
                    let sent = self.sent;
                    if let Some(d) = self.done.take() {
                        d.record(sent, true);
                    }
                }
            }
            Poll::Ready(None) => {
                let sent = self.sent;
                if let Some(d) = self.done.take() {
                    d.record(sent, true);
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            d.record(self.sent, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::metrics::Metrics;

    fn service(name: &str) -> Arc<ServicePort> {
        Arc::new(ServicePort {
            name: name.into(),
            namespace: "default".into(),
            hostname: format!("{name}.default.svc.cluster.local"),
            port: 80,
            port_name: "http".into(),
            app_protocol: None,
            endpoints: Vec::new(),
        })
    }

    fn key(generation: u64, response_code: u16) -> SeriesKey {
        SeriesKey {
            generation,
            upstream: IpAddr::from([10, 244, 2, 10]),
            response_code,
            response_flags: "-",
            request_protocol: "http",
            grpc_status: None,
        }
    }

    fn requests_to(metrics: &Metrics, service: &str, code: u16) -> usize {
        let text = metrics.encode();
        let host = format!("destination_service=\"{service}.default.svc.cluster.local\"");
        let code = format!("response_code=\"{code}\"");
        text.lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .filter(|l| l.contains(&host) && l.contains(&code))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<usize>().ok())
            .sum()
    }

    /// What a connection per request relies on: its requests count into the same series as
    /// the pod's earlier connections', built once, and never into another Service's or
    /// outcome's series.
    #[test]
    fn a_pods_connections_share_series_by_service_and_outcome() {
        let metrics = Metrics::new();
        let snap = Snapshot::default();
        let pod = PodSeries::default();
        let builds = Cell::new(0);
        let record = |svc: &Arc<ServicePort>, key: SeriesKey| {
            let series = pod.get(svc, key, || {
                builds.set(builds.get() + 1);
                metrics.request_series(&RequestLabels {
                    base: TcpLabels::new(
                        &snap,
                        "client-uid",
                        Some(svc),
                        "10.244.2.10:80".parse().expect("address"),
                        "http",
                    ),
                    response_code: key.response_code,
                    grpc_response_status: String::new(),
                })
            });
            series.record(1.0, 0, 10);
        };
        let (a, b) = (service("reviews"), service("ratings"));
        for _ in 0..3 {
            record(&a, key(1, 200));
        }
        record(&a, key(1, 503));
        record(&b, key(1, 200));
        assert_eq!(builds.get(), 3, "one build per Service and outcome");
        assert_eq!(requests_to(&metrics, "reviews", 200), 3);
        assert_eq!(requests_to(&metrics, "reviews", 503), 1);
        assert_eq!(requests_to(&metrics, "ratings", 200), 1);

        // A newer snapshot may label the same traffic differently: built again.
        record(&a, key(2, 200));
        assert_eq!(builds.get(), 4);
        // A request still under the older snapshot is recorded, not cached.
        record(&a, key(1, 200));
        record(&a, key(1, 200));
        assert_eq!(builds.get(), 6);
        assert_eq!(requests_to(&metrics, "reviews", 200), 6);
    }
}
