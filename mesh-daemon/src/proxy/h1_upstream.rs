//! The upstream side of an HTTP/1.1 exchange, written and read by the request's own task.
//!
//! hyper's client connection runs as a task of its own, fed by a channel: each request woke
//! that task, which woke the request's task with the response head and again for every body
//! chunk. A node proxy makes one such exchange per request, so this codec writes the request
//! and reads the response straight from the upstream socket inside the task that serves the
//! client connection (the downstream write happens in the same poll). HTTP/2 stays on hyper.
//!
//! What it speaks (RFC 9112): request bodies by `Content-Length` or chunked; response bodies
//! by length, chunked (trailers passed on) or until close; no body for HEAD, 1xx, 204 and
//! 304; interim 1xx responses (`100 Continue`) skipped; the connection kept only when the
//! response allows it and was read to its end.
use std::{
    future::Future as _,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, SizeHint};
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

use super::{hop_by_hop, pool::ConnSlot};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Envoy's default `max_response_headers_kb` is 60.
const MAX_HEAD: usize = 60 * 1024;
const MAX_HEADERS: usize = 100;
/// A chunk-size line longer than this is not a chunk size.
const MAX_CHUNK_LINE: usize = 1024;
/// Request body frames up to this size ride in the same write as what precedes them.
const COALESCE: usize = 16 * 1024;
const READ_RESERVE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("upstream I/O: {0}")]
    Io(#[from] io::Error),
    #[error("upstream closed the connection before the response ended")]
    Closed,
    #[error("malformed response from upstream: {0}")]
    Malformed(&'static str),
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("request body: {0}")]
    RequestBody(BoxError),
    #[error("request body does not match its content-length")]
    LengthMismatch,
}

impl From<httparse::Error> for H1Error {
    fn from(_: httparse::Error) -> Self {
        H1Error::Malformed("response head")
    }
}

/// One upstream HTTP/1.1 connection. Holding it holds its cluster connection slot; dropping
/// it closes the socket, frees the slot and tells requests waiting for one.
pub struct H1Conn {
    io: TcpStream,
    read: BytesMut,
    write: Vec<u8>,
    _slot: ConnSlot,
}

impl H1Conn {
    pub fn new(io: TcpStream, slot: ConnSlot) -> Self {
        Self {
            io,
            read: BytesMut::new(),
            write: Vec::new(),
            _slot: slot,
        }
    }

    /// Whether an idle connection can no longer carry a request: the peer closed or reset
    /// it. Asks the reactor, not the socket: its readiness carries the peer's FIN or RST
    /// (EPOLLRDHUP, EPOLLHUP) without a syscall, where a probing read would cost one per
    /// request (the readiness left over from reading the last response is seldom cleared).
    pub fn is_closed(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let ready = std::pin::pin!(self.io.ready(tokio::io::Interest::READABLE));
        match ready.poll(&mut cx) {
            Poll::Ready(Ok(r)) => r.is_read_closed() || r.is_error(),
            Poll::Ready(Err(_)) => true,
            Poll::Pending => false,
        }
    }

    /// Sends a request (its head borrowed, so retries need no copy; `target` is the
    /// request-target, the path and query) and reads the response head; the body is read as
    /// the returned response's body is polled. `home` gets the connection back once that
    /// body has ended cleanly on a connection that may carry another request.
    pub async fn send<B, H>(
        mut self,
        head: &http::request::Parts,
        target: &str,
        body: B,
        home: H,
    ) -> Result<Response<H1Body<H>>, H1Error>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
        H: Home,
    {
        let head_only = head.method == Method::HEAD;
        let framing = self.encode_head(head, target, &body);
        let sent = match self.write_body(body, framing).await {
            // An upstream may answer before reading the whole body and close (413, 401):
            // its answer is what the client should see, so a failed write looks for one.
            Err(H1Error::Io(e)) => Err(e),
            Err(e) => return Err(e),
            Ok(()) => Ok(()),
        };
        let (resp, framing, keep) = match self.read_head().await {
            Ok(head) => head,
            Err(e) => return Err(sent.err().map_or(e, H1Error::Io)),
        };
        let body_framing = if head_only
            || resp.status().is_informational()
            || resp.status() == StatusCode::NO_CONTENT
            || resp.status() == StatusCode::NOT_MODIFIED
        {
            Framing::Empty
        } else {
            framing
        };
        // A connection whose request was not sent whole cannot carry another one.
        let keep = keep && sent.is_ok() && resp.status() != StatusCode::SWITCHING_PROTOCOLS;
        let state = match body_framing {
            Framing::Empty => State::Done,
            Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Close => State::UntilClose,
        };
        let mut body = H1Body {
            conn: Some(self),
            state,
            keep: keep && body_framing != Framing::Close,
            home: Some(home),
        };
        body.finish_if_done();
        Ok(resp.map(|()| body))
    }

    fn encode_head<B: Body>(
        &mut self,
        parts: &http::request::Parts,
        target: &str,
        body: &B,
    ) -> Framing {
        let w = &mut self.write;
        w.clear();
        w.extend_from_slice(parts.method.as_str().as_bytes());
        w.push(b' ');
        w.extend_from_slice(if target.is_empty() { "/" } else { target }.as_bytes());
        w.extend_from_slice(b" HTTP/1.1\r\n");
        write_headers(w, &parts.headers);
        // As hyper's client frames it: a declared length is kept, a body known to be empty
        // sends none, a known size is declared, anything else goes chunked.
        let framing = if let Some(n) = content_length(&parts.headers) {
            Framing::Length(n)
        } else if body.is_end_stream() {
            Framing::Empty
        } else if let Some(n) = body.size_hint().exact() {
            w.extend_from_slice(b"content-length: ");
            w.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            w.extend_from_slice(b"\r\n");
            Framing::Length(n)
        } else {
            w.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Framing::Chunked
        };
        w.extend_from_slice(b"\r\n");
        framing
    }

    /// Writes the encoded head and the body; small frames that are ready at once share
    /// the head's write.
    async fn write_body<B>(&mut self, mut body: B, framing: Framing) -> Result<(), H1Error>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let mut left = match framing {
            Framing::Length(n) => n,
            _ => u64::MAX,
        };
        let chunked = framing == Framing::Chunked;
        if matches!(framing, Framing::Length(_) | Framing::Chunked) {
            loop {
                let polled =
                    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx)))
                        .await;
                let next = match polled {
                    Poll::Ready(f) => f,
                    Poll::Pending => {
                        self.flush().await?;
                        body.frame().await
                    }
                };
                let Some(frame) = next else { break };
                let frame = frame.map_err(|e| H1Error::RequestBody(e.into()))?;
                match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) => {
                        if !chunked {
                            left = left
                                .checked_sub(data.len() as u64)
                                .ok_or(H1Error::LengthMismatch)?;
                        } else {
                            let mut hex = [0u8; 16];
                            self.write.extend_from_slice(hex_len(data.len(), &mut hex));
                            self.write.extend_from_slice(b"\r\n");
                        }
                        if data.len() <= COALESCE {
                            self.write.extend_from_slice(&data);
                        } else {
                            self.flush().await?;
                            self.io.write_all(&data).await?;
                        }
                        if chunked {
                            self.write.extend_from_slice(b"\r\n");
                        }
                    }
                    Err(frame) => {
                        if let (true, Ok(trailers)) = (chunked, frame.into_trailers()) {
                            self.write.extend_from_slice(b"0\r\n");
                            write_headers(&mut self.write, &trailers);
                            self.write.extend_from_slice(b"\r\n");
                            left = 0;
                            break;
                        }
                    }
                }
            }
            if chunked && left != 0 {
                self.write.extend_from_slice(b"0\r\n\r\n");
            } else if !chunked && left != 0 {
                return Err(H1Error::LengthMismatch);
            }
        }
        self.flush().await
    }

    async fn flush(&mut self) -> Result<(), H1Error> {
        if !self.write.is_empty() {
            self.io.write_all(&self.write).await?;
            self.write.clear();
        }
        Ok(())
    }

    /// Reads until a final (non-1xx, or 101) response head has arrived.
    async fn read_head(&mut self) -> Result<(Response<()>, Framing, bool), H1Error> {
        loop {
            if let Some(parsed) = self.parse_head()? {
                let (resp, framing, keep) = parsed;
                if resp.status().is_informational()
                    && resp.status() != StatusCode::SWITCHING_PROTOCOLS
                {
                    continue;
                }
                return Ok((resp, framing, keep));
            }
            if self.read.len() >= MAX_HEAD {
                return Err(H1Error::HeadTooLarge);
            }
            if std::future::poll_fn(|cx| self.poll_fill(cx)).await? == 0 {
                return Err(H1Error::Closed);
            }
        }
    }

    /// A response head from the read buffer, when a whole one is there.
    fn parse_head(&mut self) -> Result<Option<(Response<()>, Framing, bool)>, H1Error> {
        if self.read.is_empty() {
            return Ok(None);
        }
        // Left uninitialised: filling 100 empty headers first cost a 3 KiB write a response.
        let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            &self.read,
            &mut slots,
        )? {
            httparse::Status::Partial => return Ok(None),
            httparse::Status::Complete(len) => len,
        };
        let status = parsed
            .code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or(H1Error::Malformed("status code"))?;
        let version = if parsed.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let base = self.read.as_ptr() as usize;
        let mut spans = Vec::with_capacity(parsed.headers.len());
        for h in parsed.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| H1Error::Malformed("header name"))?;
            let at = h.value.as_ptr() as usize - base;
            spans.push((name, at, h.value.len()));
        }
        let head = self.read.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(spans.len());
        for (name, at, n) in spans {
            let value = HeaderValue::from_maybe_shared(head.slice(at..at + n))
                .map_err(|_| H1Error::Malformed("header value"))?;
            headers.append(name, value);
        }
        let framing = response_framing(&headers)?;
        let keep = keeps_alive(version, &headers);
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        *resp.version_mut() = version;
        *resp.headers_mut() = headers;
        Ok(Some((resp, framing, keep)))
    }

    /// Reads what the socket has into the read buffer; `Ok(0)` is the peer's end. Through
    /// `AsyncRead`, which takes a short read as the socket drained and clears its readiness:
    /// a `try_read` would leave it set, and the next response's first read would be a
    /// wasted `recvfrom` returning EAGAIN.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < READ_RESERVE / 4 {
            self.read.reserve(READ_RESERVE);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
    }
}

/// Where a connection goes once its response has been read to the end and it may carry
/// another request.
pub trait Home: Send + Unpin + 'static {
    fn take_back(self, conn: H1Conn);
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    Close,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Length(u64),
    /// Before a chunk-size line.
    ChunkSize,
    /// Inside a chunk, this many bytes left.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    Trailers,
    UntilClose,
    Done,
}

/// A response body read from its upstream connection as it is polled.
pub struct H1Body<H: Home> {
    /// `None` once handed back (or given up).
    conn: Option<H1Conn>,
    state: State,
    keep: bool,
    home: Option<H>,
}

impl<H: Home> H1Body<H> {
    /// At the body's end: the connection goes home if it can carry another request.
    fn finish_if_done(&mut self) {
        if self.state != State::Done {
            return;
        }
        let Some(conn) = self.conn.take() else { return };
        // Bytes past the response are bytes nobody asked for: the connection is not clean.
        if self.keep
            && conn.read.is_empty()
            && let Some(home) = self.home.take()
        {
            home.take_back(conn);
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let buf = &mut conn.read;
            match self.state {
                State::Done => return Poll::Ready(None),
                State::Length(left) if !buf.is_empty() => {
                    let (frame, rest) = take_data(buf, left);
                    self.state = if rest == 0 {
                        State::Done
                    } else {
                        State::Length(rest)
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
                State::UntilClose if !buf.is_empty() => {
                    let all = buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(all))));
                }
                State::ChunkData(left) if !buf.is_empty() => {
                    let (frame, rest) = take_data(buf, left);
                    self.state = if rest == 0 {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(rest)
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
                State::ChunkSize => {
                    if let Some(size) = chunk_size(buf)? {
                        self.state = if size == 0 {
                            State::Trailers
                        } else {
                            State::ChunkData(size)
                        };
                        continue;
                    }
                }
                State::ChunkEnd if buf.len() >= 2 => {
                    if &buf[..2] != b"\r\n" {
                        return Poll::Ready(Some(Err(H1Error::Malformed("chunk end"))));
                    }
                    let _ = buf.split_to(2);
                    self.state = State::ChunkSize;
                    continue;
                }
                State::Trailers => {
                    if let Some(trailers) = trailers(buf)? {
                        self.state = State::Done;
                        if !trailers.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                        continue;
                    }
                }
                _ => {}
            }
            if conn.read.len() >= MAX_HEAD
                && matches!(self.state, State::ChunkSize | State::Trailers)
            {
                return Poll::Ready(Some(Err(H1Error::Malformed("chunk framing"))));
            }
            if ready!(conn.poll_fill(cx))? == 0 {
                if self.state == State::UntilClose {
                    self.state = State::Done;
                    continue;
                }
                return Poll::Ready(Some(Err(H1Error::Closed)));
            }
        }
    }
}

impl<H: Home> Body for H1Body<H> {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let polled = self.poll_next(cx);
        match &polled {
            Poll::Ready(Some(Err(_))) => {
                self.conn = None;
            }
            Poll::Ready(_) => self.finish_if_done(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// Up to `left` body bytes from the front of `buf`, without copying, and how many are left.
fn take_data(buf: &mut BytesMut, left: u64) -> (Frame<Bytes>, u64) {
    let n = left.min(buf.len() as u64);
    // n <= buf.len(), so it fits a usize.
    let data = buf
        .split_to(usize::try_from(n).unwrap_or(buf.len()))
        .freeze();
    (Frame::data(data), left - n)
}

/// A chunk-size line at the front of `buf`, consumed; `None` until a whole line is there.
fn chunk_size(buf: &mut BytesMut) -> Result<Option<u64>, H1Error> {
    let Some(end) = buf.iter().take(MAX_CHUNK_LINE).position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_CHUNK_LINE {
            Err(H1Error::Malformed("chunk size line"))
        } else {
            Ok(None)
        };
    };
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // Extensions after ';' are allowed and ignored.
    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
    let digits = digits.trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return Err(H1Error::Malformed("chunk size"));
    }
    let mut size = 0u64;
    for &d in digits {
        let v = (d as char)
            .to_digit(16)
            .ok_or(H1Error::Malformed("chunk size"))?;
        size = size * 16 + u64::from(v);
    }
    let _ = buf.split_to(end + 1);
    Ok(Some(size))
}

/// The trailer section after the last chunk (possibly empty), consumed with its closing
/// empty line; `None` until all of it is there.
fn trailers(buf: &mut BytesMut) -> Result<Option<HeaderMap>, H1Error> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let (len, fields) = match httparse::parse_headers(buf, &mut slots)? {
        httparse::Status::Partial => return Ok(None),
        httparse::Status::Complete(done) => done,
    };
    let mut map = HeaderMap::new();
    for f in fields {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(f.name.as_bytes()),
            HeaderValue::from_bytes(f.value),
        ) {
            map.append(name, value);
        }
    }
    let _ = buf.split_to(len);
    Ok(Some(map))
}

/// How a response's body ends (RFC 9112 §6.3), apart from the status and method rules.
fn response_framing(headers: &HeaderMap) -> Result<Framing, H1Error> {
    if let Some(te) = headers.get(http::header::TRANSFER_ENCODING) {
        let last = te
            .as_bytes()
            .rsplit(|&b| b == b',')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        return Ok(if last.eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked
        } else {
            Framing::Close
        });
    }
    let mut length = None;
    for v in headers.get_all(http::header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|&b| b == b',') {
            let n = parse_decimal(part.trim_ascii()).ok_or(H1Error::Malformed("content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(H1Error::Malformed("conflicting content-length"));
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::Close, Framing::Length))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| parse_decimal(v.as_bytes()))
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// HTTP/1.1 keeps the connection unless told `close`; HTTP/1.0 only when told `keep-alive`.
fn keeps_alive(version: Version, headers: &HeaderMap) -> bool {
    let has = |token| hop_by_hop::lists(headers, &http::header::CONNECTION, token);
    if version == Version::HTTP_10 {
        has("keep-alive")
    } else {
        !has("close")
    }
}

fn write_headers(w: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        w.extend_from_slice(name.as_str().as_bytes());
        w.extend_from_slice(b": ");
        w.extend_from_slice(value.as_bytes());
        w.extend_from_slice(b"\r\n");
    }
}

fn hex_len(n: usize, out: &mut [u8; 16]) -> &[u8] {
    let digits = b"0123456789abcdef";
    let mut i = out.len();
    let mut n = n;
    loop {
        i -= 1;
        out[i] = digits[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &out[i..];
        }
    }
}

#[cfg(test)]
mod tests;
