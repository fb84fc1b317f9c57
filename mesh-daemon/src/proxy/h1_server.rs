//! The downstream side of HTTP/1.1: a client connection read and written by the task that
//! serves it, one read buffer for the connection's life.
//!
//! hyper's server read each request into a fresh buffer (its read to notice a client leaving
//! happened while the request head still borrowed the last one) and ran a dispatcher between
//! the socket and the service. Here the head is parsed in place, its header values are
//! slices of the buffer, and the buffer is reused once the request is dropped.
//!
//! What it speaks (RFC 9112): keep-alive (HTTP/1.1 unless `close`, HTTP/1.0 only with
//! `keep-alive`) and pipelining (one request at a time, in order); request bodies by
//! `Content-Length` or chunked (trailers passed on); `Expect: 100-continue` answered at once
//! and removed, as Envoy does by default; responses framed by their `Content-Length`, a known
//! size, chunked (trailers only to a client that sent `TE: trailers`) or, for HTTP/1.0
//! clients, until close; no body for HEAD, 1xx, 204 and 304; a `Date` where the response has
//! none. A client that leaves while its request is being answered cancels the answer; one
//! that sends nothing for an hour (Envoy's idle timeout) has its connection closed. A
//! malformed head gets 400, a head over 60 KiB 431 (Envoy's limit), and the connection
//! closes. A 101 to an upgrade request (WebSocket) turns the connection into a tunnel to the
//! upstream (`upgrade`). HTTP/2 is recognised by its preface and left to the caller.
use std::{
    future::Future,
    io,
    pin::{Pin, pin},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{TcpStream, tcp::OwnedReadHalf},
};

use super::{
    h1_codec::{
        self, BodyState, BoxError, FieldSpans, Framing, H1Error, MAX_HEAD, MAX_HEADERS, RecentNames,
    },
    hop_by_hop,
    idle::IdleDeadline,
    upgrade::{Tunnel, Upgraded},
};

/// What a client sends first on an HTTP/2 connection with prior knowledge.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const READ_BUF: usize = 8 * 1024;
/// An unread request body is read and dropped up to this much after the response, so the
/// connection can carry the next request; past it the connection is closed.
const DRAIN_LIMIT: u64 = 64 * 1024;

/// A client connection before its protocol is known.
pub struct Accepted {
    io: TcpStream,
    buf: BytesMut,
}

/// What a client connection turned out to speak.
pub enum Speaks {
    Http1(Accepted),
    /// HTTP/2 with prior knowledge: the connection, replaying what was read of it.
    Http2(Prefixed),
    /// The client left (or failed) before sending anything recognisable.
    Nothing,
}

impl Accepted {
    /// Reads until the first bytes tell HTTP/2's preface from anything else.
    pub async fn detect(io: TcpStream) -> Speaks {
        let mut this = Accepted {
            io,
            buf: BytesMut::with_capacity(READ_BUF),
        };
        loop {
            let n = this.buf.len().min(H2_PREFACE.len());
            if this.buf[..n] != H2_PREFACE[..n] {
                return Speaks::Http1(this);
            }
            if n == H2_PREFACE.len() {
                return Speaks::Http2(Prefixed {
                    prefix: this.buf.freeze(),
                    io: this.io,
                });
            }
            let read = std::future::poll_fn(|cx| {
                tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf)
            })
            .await;
            match read {
                Ok(0) if !this.buf.is_empty() => return Speaks::Http1(this),
                Ok(0) | Err(_) => return Speaks::Nothing,
                Ok(_) => {}
            }
        }
    }
}

/// A connection whose first bytes were already read: they are read again first.
pub struct Prefixed {
    prefix: Bytes,
    io: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The reading half of a connection, shared between the connection's loop and the body of
/// the request being answered (which may be read from another task, e.g. HTTP/2 upstream).
struct ReadSide {
    io: OwnedReadHalf,
    buf: BytesMut,
    /// The current request's body.
    body: BodyState,
    /// Which request the body belongs to: a body that outlives its exchange reads nothing.
    exchange: u64,
    names: RecentNames,
}

impl ReadSide {
    /// Reads what the socket has; `Ok(0)` is the client's end. Grows the buffer only when
    /// `grow` (a request still holding slices of it would make growing a copy).
    fn poll_fill(&mut self, cx: &mut Context<'_>, grow: bool) -> Poll<io::Result<usize>> {
        if !grow && self.buf.capacity() - self.buf.len() < READ_BUF / 4 {
            return Poll::Pending;
        }
        h1_codec::poll_fill(&mut self.io, &mut self.buf, cx, READ_BUF)
    }

    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let io = &mut self.io;
        h1_codec::poll_body_frame(&mut self.body, &mut self.buf, cx, |cx, buf| {
            h1_codec::poll_fill(io, buf, cx, READ_BUF)
        })
    }
}

type Shared = Arc<Mutex<ReadSide>>;

fn lock(shared: &Shared) -> MutexGuard<'_, ReadSide> {
    // Nothing panics while holding it; a poisoned lock still holds a consistent buffer.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A request's body, read from the client connection as it is polled.
pub struct RequestBody {
    /// `None` for a request without a body.
    shared: Option<Shared>,
    exchange: u64,
    ended: bool,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let Some(shared) = &self.shared else {
            return Poll::Ready(None);
        };
        let mut side = lock(shared);
        if side.exchange != self.exchange {
            return Poll::Ready(Some(Err(H1Error::Closed)));
        }
        let polled = side.poll_body(cx);
        let ended = side.body == BodyState::Done;
        drop(side);
        if ended || matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.shared.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() {
            return SizeHint::with_exact(0);
        }
        self.shared
            .as_ref()
            .and_then(|s| lock(s).body.exact_left())
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// A parsed request head and how its connection and body go on.
struct Head {
    request: Request<()>,
    framing: Framing,
    keep_alive: bool,
    continue_wanted: bool,
    trailers_wanted: bool,
}

/// Why a request head was refused; the status the client gets before the connection closes.
enum Refused {
    Malformed,
    TooLarge,
}

/// Serves an HTTP/1.1 connection until it closes, stays idle (no request in progress) past
/// `idle`'s timeout, or the daemon drains: each request goes to `service`, its response is
/// written back before the next request is read.
pub async fn serve<S, F, B>(accepted: Accepted, mut idle: IdleDeadline, mut service: S)
where
    S: FnMut(Request<RequestBody>) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let (read, mut write) = accepted.io.into_split();
    let shared = Arc::new(Mutex::new(ReadSide {
        io: read,
        buf: accepted.buf,
        body: BodyState::Done,
        exchange: 0,
        names: RecentNames::default(),
    }));
    let mut out = Vec::with_capacity(READ_BUF);
    loop {
        // A connection with no request in progress for this long is closed.
        let head = match idle.unless_idle(read_head(&shared)).await {
            Some(Ok(Some(head))) => head,
            Some(Ok(None)) | None => return,
            Some(Err(refused)) => {
                let status = match refused {
                    Refused::Malformed => "400 Bad Request",
                    Refused::TooLarge => "431 Request Header Fields Too Large",
                };
                out.clear();
                out.extend_from_slice(b"HTTP/1.1 ");
                out.extend_from_slice(status.as_bytes());
                out.extend_from_slice(b"\r\ncontent-length: 0\r\nconnection: close\r\n");
                super::date::write_field(&mut out);
                out.extend_from_slice(b"\r\n");
                let _ = write.write_all(&out).await;
                return;
            }
        };
        let exchange = {
            let mut side = lock(&shared);
            side.body = BodyState::new(head.framing);
            side.exchange
        };
        let has_body = head.framing.carries_body();
        if head.continue_wanted
            && has_body
            && write
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            return;
        }
        let head_request = head.request.method() == Method::HEAD;
        let version = head.request.version();
        let body = RequestBody {
            shared: has_body.then(|| shared.clone()),
            exchange,
            ended: !has_body,
        };
        let answer = pin!(service(head.request.map(|()| body)));
        let Some(response) = answer_unless_client_leaves(answer, &shared).await else {
            return;
        };
        if let Some(tunnel) = switched(&response) {
            encode_response(&mut out, &response, false, version, false);
            if write.write_all(&out).await.is_err() {
                return;
            }
            // Nothing else holds the read side now: the request had no body to read.
            let Ok(side) = Arc::try_unwrap(shared) else {
                return;
            };
            let side = side.into_inner().unwrap_or_else(PoisonError::into_inner);
            let Ok(client) = side.io.reunite(write) else {
                return;
            };
            // Boxed: inline, the tunnel's state would make every connection's future (moved
            // on each spawn) larger for the sake of the rare upgrade.
            Box::pin(tunnel.join(client, side.buf.freeze())).await;
            // The request ends with its tunnel: its telemetry is recorded as the (empty)
            // response body ends.
            let (_, mut body) = response.into_parts();
            while let Some(Ok(_)) =
                std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            {}
            return;
        }
        // A draining daemon keeps no connection for another request (Envoy's drain: the
        // response says `connection: close`).
        let keep_alive = head.keep_alive && !idle.draining();
        let (framing, keep) =
            encode_response(&mut out, &response, head_request, version, keep_alive);
        let (_, body) = response.into_parts();
        if h1_codec::write_body(&mut write, &mut out, body, framing, head.trailers_wanted)
            .await
            .is_err()
            || !keep
        {
            return;
        }
        if !finish_request_body(&shared).await {
            return;
        }
    }
}

/// The upstream side of a connection switched by a 101 to an upgrade request, if this
/// response is one.
fn switched<B>(response: &Response<B>) -> Option<Tunnel> {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return None;
    }
    response
        .extensions()
        .get::<Upgraded>()
        .and_then(Upgraded::take)
}

/// Runs the service's answer; while it runs, reads the client's side (once the request body
/// is in) so that a client that leaves is noticed: then the answer is dropped, which cancels
/// whatever it was waiting on upstream. Pipelined bytes are kept for the next request.
async fn answer_unless_client_leaves<F: Future>(
    mut answer: Pin<&mut F>,
    shared: &Shared,
) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = answer.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        let mut side = lock(shared);
        // A body still being read is its reader's to poll; the socket has one read waker.
        if side.body != BodyState::Done {
            return Poll::Pending;
        }
        while side.buf.len() < MAX_HEAD {
            match side.poll_fill(cx, false) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(None),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => break,
            }
        }
        Poll::Pending
    })
    .await
}

/// After a response on a connection that stays open: the current request's body must be
/// read to its end before the next request starts. Returns whether the connection goes on.
async fn finish_request_body(shared: &Shared) -> bool {
    {
        let mut side = lock(shared);
        // Whoever still holds the body reads nothing more of this connection.
        side.exchange += 1;
        match side.body.exact_left() {
            Some(0) => return true,
            Some(n) if n > DRAIN_LIMIT => return false,
            _ => {}
        }
    }
    let mut drained = 0u64;
    std::future::poll_fn(|cx| {
        let mut side = lock(shared);
        loop {
            match side.poll_body(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    drained += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if drained > DRAIN_LIMIT {
                        return Poll::Ready(false);
                    }
                }
                Poll::Ready(None) => return Poll::Ready(true),
                Poll::Ready(Some(Err(_))) => return Poll::Ready(false),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
}

/// Reads and parses the next request head; `Ok(None)` when the client closed between
/// requests.
async fn read_head(shared: &Shared) -> Result<Option<Head>, Refused> {
    std::future::poll_fn(|cx| {
        let mut side = lock(shared);
        loop {
            if !side.buf.is_empty() {
                let side = &mut *side;
                match parse_head(&mut side.buf, &mut side.names) {
                    Ok(Some(head)) => return Poll::Ready(Ok(Some(head))),
                    Ok(None) if side.buf.len() >= MAX_HEAD => {
                        return Poll::Ready(Err(Refused::TooLarge));
                    }
                    Ok(None) => {}
                    Err(H1Error::HeadTooLarge) => return Poll::Ready(Err(Refused::TooLarge)),
                    Err(_) => return Poll::Ready(Err(Refused::Malformed)),
                }
            }
            match ready!(side.poll_fill(cx, true)) {
                // Gone between requests, or halfway through a head (which gets no answer).
                Ok(0) | Err(_) => return Poll::Ready(Ok(None)),
                Ok(_) => {}
            }
        }
    })
    .await
}

/// A request head from the front of `buf`, consumed; `None` until a whole one is there.
fn parse_head(buf: &mut BytesMut, names: &mut RecentNames) -> Result<Option<Head>, H1Error> {
    // Left uninitialised: filling 100 empty headers first cost a 3 KiB write a request.
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    ) {
        // The limit holds for a head that came in whole too, not only for one still coming.
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => return Err(H1Error::HeadTooLarge),
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(H1Error::HeadTooLarge),
        Err(e) => return Err(e.into()),
    };
    let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
        .map_err(|_| H1Error::Malformed("method"))?;
    let version = h1_codec::version(parsed.version);
    let base = buf.as_ptr();
    let target = parsed.path.unwrap_or_default();
    let target_at = (target.as_ptr() as usize - base as usize, target.len());
    let spans = FieldSpans::of(parsed.headers, base)?;
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target_at.0..target_at.0 + target_at.1))
        .map_err(|_| H1Error::Malformed("request target"))?;
    let (mut headers, facts) = spans.header_map(&head, names)?;

    let framing = match facts.chunked {
        // Both framings at once is how requests are smuggled; Envoy refuses them too.
        Some(_) if headers.contains_key(header::CONTENT_LENGTH) => {
            return Err(H1Error::Malformed("content-length with transfer-encoding"));
        }
        Some(true) if version == Version::HTTP_11 => Framing::Chunked,
        Some(_) => return Err(H1Error::Malformed("transfer-encoding")),
        None => facts
            .declared_length()?
            .map_or(Framing::Empty, Framing::Length),
    };
    let keep_alive = facts.keeps_alive(version);
    let continue_wanted = version == Version::HTTP_11 && facts.continue_expected;
    if continue_wanted {
        headers.remove(header::EXPECT);
    }
    let trailers_wanted = facts.trailers;
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(Head {
        request,
        framing,
        keep_alive,
        continue_wanted,
        trailers_wanted,
    }))
}

/// Encodes a response head for a client speaking `version`; returns how its body is
/// framed and whether the connection is kept for another request.
fn encode_response<B: Body>(
    out: &mut Vec<u8>,
    response: &Response<B>,
    head_request: bool,
    version: Version,
    keep_alive: bool,
) -> (Framing, bool) {
    let status = response.status();
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let headers = response.headers();
    let declared = h1_codec::write_fields(out, headers);
    if !headers.contains_key(header::DATE) {
        super::date::write_field(out);
    }
    let framing = if h1_codec::bodiless_response(head_request, status) {
        Framing::Empty
    } else if let Some(n) = declared {
        Framing::Length(n)
    } else {
        // An HTTP/1.0 client knows no chunked coding: its body runs until close.
        h1_codec::frame_undeclared(out, response.body(), true, version == Version::HTTP_11)
    };
    let says_close = hop_by_hop::lists(headers, &header::CONNECTION, "close");
    // What follows a 101 is not HTTP/1.1: a switched connection is joined to its upstream
    // (`upgrade`) or closed.
    let keep = keep_alive
        && !says_close
        && framing != Framing::Close
        && status != StatusCode::SWITCHING_PROTOCOLS;
    // A 101 says `connection: upgrade`, and the connection goes on as what it switched to.
    if !keep
        && !says_close
        && version == Version::HTTP_11
        && status != StatusCode::SWITCHING_PROTOCOLS
    {
        out.extend_from_slice(b"connection: close\r\n");
    } else if keep && version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (framing, keep)
}

#[cfg(test)]
mod tests;
