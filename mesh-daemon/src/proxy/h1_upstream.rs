//! The upstream side of an HTTP/1.1 exchange, written and read by the request's own task.
//!
//! hyper's client connection runs as a task of its own, fed by a channel: each request woke
//! that task, which woke the request's task with the response head and again for every body
//! chunk. A node proxy makes one such exchange per request, so this codec writes the request
//! and reads the response straight from the upstream socket inside the task that serves the
//! client connection (the downstream write happens in the same poll). HTTP/2 is `h2_upstream`'s.
//!
//! What it speaks (RFC 9112): request bodies by `Content-Length` or chunked; response bodies
//! by length, chunked (trailers passed on) or until close; no body for HEAD, 1xx, 204 and
//! 304; interim 1xx responses (`100 Continue`) skipped; the connection kept only when the
//! response allows it and was read to its end; after a `101` to an upgrade request, the
//! connection handed to the client's side whole (`upgrade`).
use std::{
    pin::{Pin, pin},
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use futures::future::Either;
use http::{Method, Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::AsyncRead;

pub use super::h1_codec::H1Error;
use super::{
    h1_codec::{
        self, BodyState, BoxError, FieldSpans, Framing, HeadFacts, MAX_HEAD, MAX_HEADERS,
        RecentNames,
    },
    pool::ConnSlot,
    upgrade::{self, Upgraded},
    upstream_io::UpstreamIo,
};

const READ_RESERVE: usize = 16 * 1024;

/// One upstream HTTP/1.1 connection. Holding it holds its cluster connection slot; dropping
/// it closes the socket, frees the slot and tells requests waiting for one.
pub struct H1Conn {
    io: UpstreamIo,
    read: BytesMut,
    /// Boxed: a connection moves in and out of the pool and through the request's future,
    /// and each move would copy the names' map too.
    names: Box<RecentNames>,
    write: Vec<u8>,
    _slot: ConnSlot,
    /// The proxy thread whose event loop the socket is registered with.
    shard: Option<usize>,
}

impl H1Conn {
    pub fn new(io: UpstreamIo, slot: ConnSlot) -> Self {
        Self {
            io,
            read: BytesMut::new(),
            names: Box::default(),
            write: Vec::new(),
            _slot: slot,
            shard: super::shards::Shards::current(),
        }
    }

    /// Whether the socket is served by the calling thread's event loop.
    pub fn is_local(&self) -> bool {
        self.shard == super::shards::Shards::current()
    }

    /// Whether an idle connection can no longer carry a request: the peer closed or reset
    /// it (read from the reactor's readiness, no syscall).
    pub fn is_closed(&self) -> bool {
        self.io.peer_closed()
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
        let sent = {
            let (mut reader, mut writer) = self.io.split();
            let write = h1_codec::write_body(&mut writer, &mut self.write, body, framing, true);
            if framing.carries_body() {
                // An upstream may answer before it has read the whole body (413, 401, 417)
                // and then neither read on nor close: its answer is what the client should
                // see, now, as Envoy forwards it, not after the route's timeout.
                let mut write = pin!(write);
                let early = pin!(read_head(&mut reader, &mut self.read, &mut self.names));
                match futures::future::select(write.as_mut(), early).await {
                    Either::Left((written, _)) => Sent::Whole(written),
                    Either::Right((Ok(head), _)) => Sent::Early(head),
                    // Read again once the body is out: a closed or broken response is
                    // still there to be seen, and the write may have failed for it.
                    Either::Right((Err(_), _)) => Sent::Whole(write.await),
                }
            } else {
                Sent::Whole(write.await)
            }
        };
        let (resp, framing, keep, whole) = match sent {
            Sent::Early((resp, framing, keep)) => (resp, framing, keep, false),
            Sent::Whole(written) => {
                let written = match written {
                    // An upstream that answered early and closed (the write failed for it):
                    // its answer is still to be read.
                    Err(H1Error::Io(e)) => Err(e),
                    Err(e) => return Err(e),
                    Ok(()) => Ok(()),
                };
                match read_head(&mut self.io, &mut self.read, &mut self.names).await {
                    Ok((resp, framing, keep)) => (resp, framing, keep, written.is_ok()),
                    Err(e) => return Err(written.err().map_or(e, H1Error::Io)),
                }
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS && upgrade::requested(&head.headers) {
            // The connection leaves the pool for the client's side to join (`upgrade`).
            let mut resp = resp;
            let early = self.read.split().freeze();
            resp.extensions_mut()
                .insert(Upgraded::new(self.io, early, self._slot));
            return Ok(resp.map(|()| H1Body {
                conn: None,
                state: BodyState::Done,
                keep: false,
                home: None,
            }));
        }
        let body_framing = if h1_codec::bodiless_response(head_only, resp.status()) {
            Framing::Empty
        } else {
            framing
        };
        // A connection whose request was not sent whole cannot carry another one.
        let keep = keep && whole && resp.status() != StatusCode::SWITCHING_PROTOCOLS;
        let mut body = H1Body {
            conn: Some(self),
            state: BodyState::new(body_framing),
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
        // As hyper's client frames it: a declared length is kept, a body known to be empty
        // sends none, a known size is declared, anything else goes chunked.
        let framing = match h1_codec::write_fields(w, &parts.headers) {
            Some(n) => Framing::Length(n),
            None => h1_codec::frame_undeclared(w, body, false, true),
        };
        w.extend_from_slice(b"\r\n");
        framing
    }
}

/// A response head, how its body is framed, and whether it lets the connection be kept.
type ResponseHead = (Response<()>, Framing, bool);

/// How much of a request went out before its response head came.
enum Sent {
    /// All of it (or writing failed: `Err`).
    Whole(Result<(), H1Error>),
    /// The response came first; the rest of the body was not sent.
    Early(ResponseHead),
}

/// Reads until a final (non-1xx, or 101) response head has arrived.
async fn read_head<R: AsyncRead + Unpin>(
    io: &mut R,
    read: &mut BytesMut,
    names: &mut RecentNames,
) -> Result<ResponseHead, H1Error> {
    loop {
        if let Some(parsed) = parse_head(read, names)? {
            let (resp, framing, keep) = parsed;
            if resp.status().is_informational() && resp.status() != StatusCode::SWITCHING_PROTOCOLS
            {
                continue;
            }
            return Ok((resp, framing, keep));
        }
        if read.len() >= MAX_HEAD {
            return Err(H1Error::HeadTooLarge);
        }
        let filled =
            std::future::poll_fn(|cx| h1_codec::poll_fill(io, read, cx, READ_RESERVE)).await;
        if filled? == 0 {
            return Err(H1Error::Closed);
        }
    }
}

/// A response head from the read buffer, when a whole one is there.
fn parse_head(
    read: &mut BytesMut,
    names: &mut RecentNames,
) -> Result<Option<ResponseHead>, H1Error> {
    if read.is_empty() {
        return Ok(None);
    }
    // Left uninitialised: filling 100 empty headers first cost a 3 KiB write a response.
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        &*read,
        &mut slots,
    )? {
        httparse::Status::Partial => return Ok(None),
        httparse::Status::Complete(len) if len > MAX_HEAD => return Err(H1Error::HeadTooLarge),
        httparse::Status::Complete(len) => len,
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(H1Error::Malformed("status code"))?;
    let version = h1_codec::version(parsed.version);
    let spans = FieldSpans::of(parsed.headers, read.as_ptr())?;
    let head = read.split_to(len).freeze();
    let (headers, facts) = spans.header_map(&head, names)?;
    let framing = response_framing(&facts)?;
    let keep = facts.keeps_alive(version);
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.version_mut() = version;
    *resp.headers_mut() = headers;
    Ok(Some((resp, framing, keep)))
}

/// Where a connection goes once its response has been read to the end and it may carry
/// another request.
pub trait Home: Send + Unpin + 'static {
    fn take_back(self, conn: H1Conn);
}

/// A response body read from its upstream connection as it is polled.
pub struct H1Body<H: Home> {
    /// `None` once handed back (or given up).
    conn: Option<H1Conn>,
    state: BodyState,
    keep: bool,
    home: Option<H>,
}

impl<H: Home> H1Body<H> {
    /// At the body's end: the connection goes home if it can carry another request.
    fn finish_if_done(&mut self) {
        if self.state != BodyState::Done {
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
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(None);
        };
        let io = &mut conn.io;
        h1_codec::poll_body_frame(&mut self.state, &mut conn.read, cx, |cx, buf| {
            h1_codec::poll_fill(io, buf, cx, READ_RESERVE)
        })
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
        self.state == BodyState::Done
    }

    fn size_hint(&self) -> SizeHint {
        self.state
            .exact_left()
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// How a response's body ends (RFC 9112 §6.3), apart from the status and method rules.
fn response_framing(facts: &HeadFacts) -> Result<Framing, H1Error> {
    if let Some(chunked) = facts.chunked {
        return Ok(if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        });
    }
    Ok(facts
        .declared_length()?
        .map_or(Framing::Close, Framing::Length))
}

#[cfg(test)]
mod tests;
