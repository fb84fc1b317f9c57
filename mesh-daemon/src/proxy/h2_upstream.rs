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
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use h2::{
    Reason, RecvStream, SendStream,
    client::{self, SendRequest},
};
use http::{HeaderValue, Method, Response, header};
use hyper::body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;

use super::{hop_by_hop, http::content_length};

/// The request body type the proxy forwards.
pub type RequestBody = super::http::Body;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    io: TcpStream,
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
            tokio::spawn(pipe(body, stream));
        }
        let resp = response.await?;
        let length = content_length(resp.headers());
        Ok(resp.map(|recv| H2Body {
            recv,
            data_done: false,
            length,
        }))
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
    let authority = headers
        .remove(header::HOST)
        .and_then(|h| h.to_str().ok().map(str::to_owned));
    let uri = match authority {
        Some(a) => format!("http://{a}{target}").parse::<http::Uri>(),
        None => target.parse::<http::Uri>(),
    };
    if let Ok(uri) = uri {
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

/// Sends a request body on its stream, each chunk once the peer's window has room, and
/// stops when the peer resets the stream.
async fn pipe(body: RequestBody, stream: SendStream<Bytes>) {
    let mut pipe = Pipe {
        body,
        stream,
        waiting: None,
    };
    if let Err(PipeError::Body(e)) = std::future::poll_fn(|cx| pipe.poll(cx)).await {
        tracing::debug!(error = %e, "request body failed; resetting the upstream stream");
        pipe.stream.send_reset(Reason::INTERNAL_ERROR);
    }
}

struct Pipe {
    body: RequestBody,
    stream: SendStream<Bytes>,
    /// A chunk read from the body, waiting for window, and whether it ends the body.
    waiting: Option<(Bytes, bool)>,
}

enum PipeError {
    /// The stream is gone (reset, or its connection); nothing more to send.
    Stream,
    /// The request body failed: the upstream must not take what it got as whole.
    Body(BoxError),
}

impl Pipe {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PipeError>> {
        loop {
            if self.stream.poll_reset(cx).is_ready() {
                return Poll::Ready(Err(PipeError::Stream));
            }
            if let Some((data, end)) = self.waiting.take() {
                // While earlier chunks still wait in h2's buffer for window, capacity stays
                // at zero: the body is read no further ahead than the peer takes it.
                while self.stream.capacity() == 0 {
                    match self.stream.poll_capacity(cx) {
                        Poll::Pending => {
                            self.waiting = Some((data, end));
                            return Poll::Pending;
                        }
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(_)) | None) => {
                            return Poll::Ready(Err(PipeError::Stream));
                        }
                    }
                }
                if self.stream.send_data(data, end).is_err() {
                    return Poll::Ready(Err(PipeError::Stream));
                }
                if end {
                    return Poll::Ready(Ok(()));
                }
            }
            let frame = match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => {
                    let _ = self.stream.send_data(Bytes::new(), true);
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => return Poll::Ready(Err(PipeError::Body(e))),
                Some(Ok(frame)) => frame,
            };
            match frame.into_data() {
                Ok(data) => {
                    let end = self.body.is_end_stream();
                    if data.is_empty() {
                        if self.stream.send_data(data, end).is_err() {
                            return Poll::Ready(Err(PipeError::Stream));
                        }
                        if end {
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    // Window is claimed only once a chunk is in hand (claimed ahead, it would
                    // pin connection window another stream may need: hyper#4003), and one
                    // byte of it: h2 raises the claim to the chunk's length as it sends.
                    self.stream.reserve_capacity(1);
                    self.waiting = Some((data, end));
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        self.stream.reserve_capacity(0);
                        return Poll::Ready(
                            self.stream
                                .send_trailers(trailers)
                                .map_err(|_| PipeError::Stream),
                        );
                    }
                }
            }
        }
    }
}

/// An upstream HTTP/2 response body: data, then trailers, each frame's bytes handed back to
/// the peer's window as soon as it is passed on.
pub struct H2Body {
    recv: RecvStream,
    data_done: bool,
    /// What the response's `Content-Length` says, for the size hint.
    length: Option<u64>,
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.length = this.length.map(|l| l.saturating_sub(data.len() as u64));
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(ended_early(e)),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(trailers) => Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t)))),
            Err(e) => Poll::Ready(ended_early(e)),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(l) => SizeHint::with_exact(l),
            None => SizeHint::default(),
        }
    }
}

/// A reset with `NO_ERROR` after the response began means the server has said all it will
/// and wants no more of the request: the body ends there, it did not fail.
fn ended_early(e: h2::Error) -> Option<Result<Frame<Bytes>, h2::Error>> {
    if e.reason() == Some(Reason::NO_ERROR) {
        None
    } else {
        Some(Err(e))
    }
}

#[cfg(test)]
mod tests;
