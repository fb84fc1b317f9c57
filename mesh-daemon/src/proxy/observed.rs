//! Request telemetry recorded when the response ends, as Envoy records it: the duration to
//! the last byte, the bytes each way, then `istio_requests_total`, the duration and size
//! histograms and the access-log line. A client that goes away early still gets its line
//! (flag DC, downstream connection termination).
use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::{access_log, http::Body};
use crate::metrics::{Metrics, RequestLabels};

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

/// Everything recorded for one request once its response is over.
pub struct Completion {
    pub metrics: Arc<Metrics>,
    pub labels: RequestLabels,
    pub log: access_log::HttpEntry,
    pub started: Instant,
    pub request_bytes: Arc<AtomicU64>,
}

impl Completion {
    fn record(mut self, response_bytes: u64, complete: bool) {
        if !complete && self.log.response_flags.is_empty() {
            self.log.response_flags = "DC";
            self.labels.base.response_flags = "DC";
        }
        let ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        let m = &self.metrics;
        m.requests.get_or_create(&self.labels).inc();
        m.request_duration.get_or_create(&self.labels).observe(ms);
        m.request_bytes
            .get_or_create(&self.labels)
            .observe(request_bytes as f64);
        m.response_bytes
            .get_or_create(&self.labels)
            .observe(response_bytes as f64);
        self.log.duration_ms = self.started.elapsed().as_millis();
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
        // A body with nothing in it never gets polled to its end by some clients.
        if this.inner.is_end_stream()
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
