//! The upstream side of an HTTP/2 exchange, on the h2 crate without hyper's client around it.
//!
//! hyper's HTTP/2 client hands every request through a channel to the connection's task,
//! which opens the stream and spawns one more task per request to wait for the response and
//! pass it back through a oneshot: three tasks and two hand-offs per request, and the
//! spawned future copied into its task. Here the request's own task opens the stream and
//! awaits the response itself; the connection's task only moves frames. A request body is
//! still pumped by a task of its own (it may outlive the response head: gRPC streams both
//! ways), but requests without one, most of them, spawn nothing.
//!
//! Settings and conduct follow hyper's client, so nothing changes on the wire: 2 MiB stream
//! and 5 MiB connection windows, no server push, connection-specific headers removed, a
//! `Content-Length` added for bodies of known length, and a reset with `NO_ERROR` after the
//! response ends its body rather than failing it (RFC 9113 8.1).
use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use h2::client::{self, SendRequest};
use http::{
    HeaderValue, Method, Response, Uri, header,
    uri::{self, Authority, PathAndQuery, Scheme},
};
use hyper::body::Body as _;

pub use super::h2_body::H2Body;
use super::{h2_body::send_body, hop_by_hop, upstream_io::UpstreamIo};

/// The request body type the proxy forwards.
pub type RequestBody = super::http::Body;

const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_FRAME: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// A handle on one upstream HTTP/2 connection; clones share it.
#[derive(Clone)]
pub struct H2Conn {
    send: SendRequest<Bytes>,
    /// Set once the connection can take no new stream: its task ended, or it was told to
    /// go away, or its socket failed.
    closed: Arc<AtomicBool>,
}

/// Opens HTTP/2 on `io`. The returned future moves the connection's frames and must be
/// spawned; it ends when the connection closes (every handle and stream gone, or the peer
/// gone), and anything it owns with it.
pub async fn handshake(
    io: UpstreamIo,
) -> Result<(H2Conn, impl Future<Output = ()> + Send + 'static), h2::Error> {
    let (send, conn) = client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await?;
    let closed = Arc::new(AtomicBool::new(false));
    let done = closed.clone();
    let drive = async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
        }
        done.store(true, Ordering::Release);
    };
    Ok((H2Conn { send, closed }, drive))
}

impl H2Conn {
    /// Whether the connection can no longer take a request.
    ///
    /// A GOAWAY reaches the handles at once, but the connection's task lives on until the
    /// streams in flight are done (nginx sends one after every 1,000 requests by default):
    /// h2 is asked, so the pool stops lending the connection as soon as the frame is read.
    pub fn is_closed(&mut self) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return true;
        }
        // This handle never sends, so it holds no stream waiting to open and the poll
        // only reads the connection's error; the waker is never needed.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(Err(_)) = self.send.poll_ready(&mut cx) {
            self.closed.store(true, Ordering::Release);
            return true;
        }
        false
    }

    /// Sends a request (a copy of the borrowed head, the Host header as `:authority`,
    /// `target` as the path and query) and waits for the response head; the response body
    /// is read as it is polled.
    pub async fn send(
        &mut self,
        head: &http::request::Parts,
        target: &str,
        body: RequestBody,
    ) -> Result<Response<H2Body>, h2::Error> {
        let result = self.open(head, target, body).await;
        if let Err(e) = &result
            && (e.is_go_away() || e.is_io())
        {
            self.closed.store(true, Ordering::Release);
        }
        result
    }

    async fn open(
        &mut self,
        head: &http::request::Parts,
        target: &str,
        body: RequestBody,
    ) -> Result<Response<H2Body>, h2::Error> {
        std::future::poll_fn(|cx| self.send.poll_ready(cx)).await?;
        let req = request(head, target, &body);
        let end = body.is_end_stream();
        let (response, stream) = self.send.send_request(req, end)?;
        if !end {
            tokio::spawn(send_body(body, stream));
        }
        let (parts, recv) = response.await?.into_parts();
        let body = H2Body::new(recv, &parts.headers);
        Ok(Response::from_parts(parts, body))
    }
}

/// The request as HTTP/2 sends it: the URI carries the authority, and what HTTP/2 forbids
/// is gone (hop-by-hop headers are already removed, but an upgrade request keeps its own).
fn request(head: &http::request::Parts, target: &str, body: &RequestBody) -> http::Request<()> {
    let mut req = http::Request::new(());
    *req.method_mut() = head.method.clone();
    *req.headers_mut() = head.headers.clone();
    *req.version_mut() = http::Version::HTTP_2;
    let headers = req.headers_mut();
    hop_by_hop::strip_for_h2(headers);
    if let Some(uri) = h2_uri(headers.remove(header::HOST).as_ref(), target) {
        *req.uri_mut() = uri;
    }
    // As hyper does: a body of known length says so, unless it is an empty one on a method
    // whose requests carry none.
    if let Some(len) = body.size_hint().exact()
        && (len != 0
            || !matches!(
                head.method,
                Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
            ))
        && !req.headers().contains_key(header::CONTENT_LENGTH)
    {
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    req
}

/// The URI HTTP/2 sends as `:scheme`, `:authority` and `:path`: `Host` becomes the
/// authority. Put together from its parts, each parsed alone: formatting the whole URI and
/// parsing it again cost a tenth of the upstream side's instructions per request.
fn h2_uri(host: Option<&HeaderValue>, target: &str) -> Option<Uri> {
    let mut parts = uri::Parts::default();
    parts.path_and_query = Some(PathAndQuery::try_from(target).ok()?);
    if let Some(host) = host {
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(Authority::try_from(host.as_bytes()).ok()?);
    }
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests;
