//! What both ends of an HTTP/1.1 connection share (RFC 9112): how a message's body is framed,
//! reading a body from a connection's read buffer, writing one with its framing.
use std::{
    future::Future as _,
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};

use super::hop_by_hop;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Envoy's default `max_request_headers_kb` (and `max_response_headers_kb`) is 60.
pub const MAX_HEAD: usize = 60 * 1024;
pub const MAX_HEADERS: usize = 100;
/// A chunk-size line longer than this is not a chunk size.
const MAX_CHUNK_LINE: usize = 1024;
/// Body frames up to this size ride in the same write as what precedes them.
const COALESCE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the connection before the message ended")]
    Closed,
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("message head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("body: {0}")]
    Body(BoxError),
    #[error("body does not match its content-length")]
    LengthMismatch,
}

impl From<httparse::Error> for H1Error {
    fn from(_: httparse::Error) -> Self {
        H1Error::Malformed("message head")
    }
}

/// How a message's body ends.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

/// Where a body being read stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BodyState {
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

/// What the read buffer gave a body being read.
pub enum Decoded {
    Frame(Frame<Bytes>),
    End,
    /// More bytes are needed from the connection.
    More,
}

impl Framing {
    /// Whether a message framed so has any body bytes to send or read.
    pub fn carries_body(self) -> bool {
        BodyState::new(self) != BodyState::Done
    }
}

/// A response with no body whatever its headers say (RFC 9112 §6.3): to HEAD, 1xx, 204, 304.
pub fn bodiless_response(head_request: bool, status: StatusCode) -> bool {
    head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// The HTTP version of a head httparse read (`minor` 0 or 1).
pub fn version(minor: Option<u8>) -> Version {
    if minor == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    }
}

impl BodyState {
    pub fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty | Framing::Length(0) => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::ChunkSize,
            Framing::Close => BodyState::UntilClose,
        }
    }

    /// The next frame out of `buf` (consumed from it), without copying data.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, H1Error> {
        loop {
            match *self {
                BodyState::Done => return Ok(Decoded::End),
                BodyState::Length(left) if !buf.is_empty() => {
                    let (frame, rest) = take_data(buf, left);
                    *self = if rest == 0 {
                        BodyState::Done
                    } else {
                        BodyState::Length(rest)
                    };
                    return Ok(Decoded::Frame(frame));
                }
                BodyState::UntilClose if !buf.is_empty() => {
                    return Ok(Decoded::Frame(Frame::data(buf.split().freeze())));
                }
                BodyState::ChunkData(left) if !buf.is_empty() => {
                    let (frame, rest) = take_data(buf, left);
                    *self = if rest == 0 {
                        BodyState::ChunkEnd
                    } else {
                        BodyState::ChunkData(rest)
                    };
                    return Ok(Decoded::Frame(frame));
                }
                BodyState::ChunkSize => match chunk_size(buf)? {
                    Some(0) => *self = BodyState::Trailers,
                    Some(size) => *self = BodyState::ChunkData(size),
                    None => return Ok(Decoded::More),
                },
                BodyState::ChunkEnd if buf.len() >= 2 => {
                    if &buf[..2] != b"\r\n" {
                        return Err(H1Error::Malformed("chunk end"));
                    }
                    let _ = buf.split_to(2);
                    *self = BodyState::ChunkSize;
                }
                BodyState::Trailers => match trailers(buf)? {
                    Some(t) => {
                        *self = BodyState::Done;
                        if !t.is_empty() {
                            return Ok(Decoded::Frame(Frame::trailers(t)));
                        }
                    }
                    None if buf.len() >= MAX_HEAD => {
                        return Err(H1Error::Malformed("trailer section too large"));
                    }
                    None => return Ok(Decoded::More),
                },
                _ => return Ok(Decoded::More),
            }
        }
    }

    /// The connection ended: the end of a body read until close, an error for any other.
    pub fn at_eof(&mut self) -> Result<(), H1Error> {
        match self {
            BodyState::UntilClose | BodyState::Done => {
                *self = BodyState::Done;
                Ok(())
            }
            _ => Err(H1Error::Closed),
        }
    }

    /// Bytes of body still to come, when known.
    pub fn exact_left(&self) -> Option<u64> {
        match self {
            BodyState::Done => Some(0),
            BodyState::Length(n) => Some(*n),
            _ => None,
        }
    }
}

/// The next frame of a body being read: decoded from `buf`, which `fill` tops up from the
/// connection (`Ok(0)`: the peer's end) whenever a frame needs more bytes.
pub fn poll_body_frame(
    state: &mut BodyState,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
    mut fill: impl FnMut(&mut Context<'_>, &mut BytesMut) -> Poll<io::Result<usize>>,
) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
    loop {
        match state.decode(buf)? {
            Decoded::Frame(f) => return Poll::Ready(Some(Ok(f))),
            Decoded::End => return Poll::Ready(None),
            Decoded::More => {}
        }
        if std::task::ready!(fill(cx, buf))? == 0 {
            state.at_eof()?;
        }
    }
}

/// Reads what the socket has into `buf`, first making room for `reserve` bytes when less than
/// a quarter of that is free; `Ok(0)` is the peer's end. Through `AsyncRead`, which takes a
/// short read as the socket drained and clears its readiness: a `try_read` would leave it
/// set, and the next message's first read would be a wasted `recvfrom` returning EAGAIN.
pub fn poll_fill<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
    reserve: usize,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < reserve / 4 {
        buf.reserve(reserve);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
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

/// Where a parsed head's fields sit in its buffer, noted while httparse's slices still
/// borrow the buffer so that the values can be sliced out of the frozen head afterwards.
/// Offsets, since a head is under 64 KiB: no allocation, no names built twice.
pub struct FieldSpans {
    /// Name offset, name length, value offset, value length.
    at: [[u16; 4]; MAX_HEADERS],
    n: usize,
}

impl FieldSpans {
    /// The spans of `fields`, parsed out of the buffer that starts at `base`.
    pub fn of(fields: &[httparse::Header<'_>], base: *const u8) -> Result<Self, H1Error> {
        let base = base as usize;
        let small = |n: usize| u16::try_from(n).map_err(|_| H1Error::HeadTooLarge);
        let mut this = Self {
            at: [[0; 4]; MAX_HEADERS],
            n: fields.len().min(MAX_HEADERS),
        };
        for (slot, f) in this.at.iter_mut().zip(fields) {
            *slot = [
                small(f.name.as_ptr() as usize - base)?,
                small(f.name.len())?,
                small(f.value.as_ptr() as usize - base)?,
                small(f.value.len())?,
            ];
        }
        Ok(this)
    }

    /// The header map (names validated, values sliced out of `head`, the head's bytes
    /// frozen, without copying) and what its framing and connection fields say, read in
    /// the same pass: looked up afterwards, each would hash its name again. A head that
    /// repeats the names of the connection's last one starts from a copy of their map.
    pub fn header_map(
        &self,
        head: &Bytes,
        recent: &mut RecentNames,
    ) -> Result<(HeaderMap, HeadFacts), H1Error> {
        let repeated = recent.repeated_by(self, head);
        if repeated && let Some(names) = &recent.map {
            let mut headers = names.clone();
            let mut facts = HeadFacts::default();
            for ((name, value), &[_, _, at, len]) in headers.iter_mut().zip(&self.at[..self.n]) {
                *value = value_at(head, at, len)?;
                facts.note(name, value.as_bytes());
            }
            return Ok((headers, facts));
        }
        let mut headers = HeaderMap::with_capacity(self.n);
        let mut facts = HeadFacts::default();
        for &[name_at, name_len, at, len] in &self.at[..self.n] {
            let name_at = usize::from(name_at);
            let name = HeaderName::from_bytes(&head[name_at..name_at + usize::from(name_len)])
                .map_err(|_| H1Error::Malformed("header name"))?;
            let value = value_at(head, at, len)?;
            facts.note(&name, value.as_bytes());
            headers.append(name, value);
        }
        recent.remember(self, head, &headers, repeated);
        Ok((headers, facts))
    }

    fn names<'h>(&self, head: &'h [u8]) -> impl Iterator<Item = &'h [u8]> {
        self.at[..self.n].iter().map(move |&[at, len, _, _]| {
            let at = usize::from(at);
            &head[at..at + usize::from(len)]
        })
    }
}

fn value_at(head: &Bytes, at: u16, len: u16) -> Result<HeaderValue, H1Error> {
    let at = usize::from(at);
    HeaderValue::from_maybe_shared(head.slice(at..at + usize::from(len)))
        .map_err(|_| H1Error::Malformed("header value"))
}

/// The field names of the last head read on a connection. A keep-alive peer sends the same
/// fields in the same order head after head (a client its `Host`, `User-Agent`, `Accept`; a
/// server its `Content-Type`, `Content-Length`), and validating each name and hashing it
/// into a fresh map was most of the cost of reading a head; a copy of a map that has the
/// names already only takes the new values.
#[derive(Default)]
pub struct RecentNames {
    /// The names as they came, back to back, and where each ends: one allocation a
    /// connection, sized to the first head (most connections carry one request).
    raw: Vec<u8>,
    ends: [u16; RECENT_NAMES],
    n: usize,
    /// Those names with empty values, built once a second head has repeated them (a
    /// connection that carries one request pays nothing for it). `None` also for heads
    /// that repeat a name: a map iterates a repeated name's values together, out of the
    /// head's order.
    map: Option<HeaderMap>,
}

/// Heads with more fields than this are not remembered.
const RECENT_NAMES: usize = 32;

impl RecentNames {
    fn repeated_by(&self, spans: &FieldSpans, head: &[u8]) -> bool {
        let mut start = 0;
        spans.n == self.n
            && spans.names(head).zip(&self.ends).all(|(name, &end)| {
                let end = usize::from(end);
                let same = self.raw.get(start..end) == Some(name);
                start = end;
                same
            })
    }

    /// Notes the names of a head built afresh; `repeated`: they are the remembered ones (and
    /// no map of them exists yet, or the head would have been copied from it).
    fn remember(&mut self, spans: &FieldSpans, head: &[u8], headers: &HeaderMap, repeated: bool) {
        if repeated {
            if headers.len() == spans.n && headers.keys_len() == spans.n {
                let mut names = headers.clone();
                for value in names.values_mut() {
                    *value = HeaderValue::from_static("");
                }
                self.map = Some(names);
            }
            return;
        }
        self.map = None;
        self.raw.clear();
        self.n = 0;
        if spans.n > RECENT_NAMES {
            return;
        }
        self.raw.reserve(spans.names(head).map(<[u8]>::len).sum());
        for (name, end) in spans.names(head).zip(&mut self.ends) {
            self.raw.extend_from_slice(name);
            // Under MAX_HEAD (60 KiB), as the head is.
            *end = u16::try_from(self.raw.len()).unwrap_or(u16::MAX);
        }
        self.n = spans.n;
    }
}

/// What a head's framing and connection fields say.
#[derive(Default)]
pub struct HeadFacts {
    length: Length,
    /// Whether the last transfer coding is `chunked`; `None` without `Transfer-Encoding`.
    pub chunked: Option<bool>,
    connection_close: bool,
    connection_keep_alive: bool,
    /// `TE` lists `trailers`: the client takes trailers in a chunked response.
    pub trailers: bool,
    /// `Expect: 100-continue`.
    pub continue_expected: bool,
}

impl HeadFacts {
    fn note(&mut self, name: &HeaderName, value: &[u8]) {
        use http::header;
        if name == header::CONTENT_LENGTH {
            self.length = self.length.and(value);
        } else if name == header::TRANSFER_ENCODING {
            // Codings apply in order, across fields too: the last one decides.
            let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
            self.chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONNECTION {
            self.connection_close |= hop_by_hop::lists_token(value, b"close");
            self.connection_keep_alive |= hop_by_hop::lists_token(value, b"keep-alive");
        } else if name == header::TE {
            self.trailers |= hop_by_hop::lists_token(value, b"trailers");
        } else if name == header::EXPECT {
            self.continue_expected |= value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
    }

    /// The declared length of the body (RFC 9112 §6.3): every `Content-Length` value must
    /// agree; `Ok(None)` when there is none.
    pub fn declared_length(&self) -> Result<Option<u64>, H1Error> {
        match self.length {
            Length::Absent => Ok(None),
            Length::Agreed(n) => Ok(Some(n)),
            Length::Malformed => Err(H1Error::Malformed("content-length")),
            Length::Conflicting => Err(H1Error::Malformed("conflicting content-length")),
        }
    }

    /// HTTP/1.1 keeps the connection unless told `close`; HTTP/1.0 only when told
    /// `keep-alive`.
    pub fn keeps_alive(&self, version: Version) -> bool {
        if version == Version::HTTP_10 {
            self.connection_keep_alive
        } else {
            !self.connection_close
        }
    }
}

/// `Content-Length` as read so far: a list of values (in one field or several) is one length
/// only when all agree.
#[derive(Clone, Copy, Default)]
enum Length {
    #[default]
    Absent,
    Agreed(u64),
    Malformed,
    Conflicting,
}

impl Length {
    fn and(self, value: &[u8]) -> Self {
        let mut length = self;
        for part in value.split(|&b| b == b',') {
            length = match (length, parse_decimal(part.trim_ascii())) {
                (Length::Malformed | Length::Conflicting, _) => return length,
                (_, None) => return Length::Malformed,
                (Length::Agreed(l), Some(n)) if l != n => Length::Conflicting,
                (_, Some(n)) => Length::Agreed(n),
            };
        }
        length
    }
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Writes a head's fields with its `Content-Length` as one value, and returns that length.
/// A list of identical values (RFC 9110 lets a recipient take it as the one value) goes out
/// as the value; a malformed or conflicting one is left out, so that the body is framed by
/// what it is. Either way a message never leaves with two framings.
pub fn write_fields(w: &mut Vec<u8>, headers: &HeaderMap) -> Option<u64> {
    let mut length = Length::Absent;
    for (name, value) in headers {
        if name == http::header::CONTENT_LENGTH {
            length = length.and(value.as_bytes());
        } else {
            write_field(w, name, value);
        }
    }
    let Length::Agreed(n) = length else {
        return None;
    };
    write_content_length(w, n);
    Some(n)
}

pub fn write_headers(w: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        write_field(w, name, value);
    }
}

fn write_field(w: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    w.extend_from_slice(name.as_str().as_bytes());
    w.extend_from_slice(b": ");
    w.extend_from_slice(value.as_bytes());
    w.extend_from_slice(b"\r\n");
}

fn write_content_length(w: &mut Vec<u8>, n: u64) {
    w.extend_from_slice(b"content-length: ");
    w.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    w.extend_from_slice(b"\r\n");
}

/// The framing header a body is sent with when its head declares none: a body known to be
/// empty gets none (requests) or `content-length: 0` (responses), a known size is declared,
/// anything else goes chunked — or, where chunked is not allowed, until close.
pub fn frame_undeclared<B: Body>(
    w: &mut Vec<u8>,
    body: &B,
    empty_declared: bool,
    chunked_allowed: bool,
) -> Framing {
    let exact = if body.is_end_stream() {
        Some(0)
    } else {
        body.size_hint().exact()
    };
    match exact {
        Some(0) if !empty_declared => Framing::Empty,
        Some(n) => {
            write_content_length(w, n);
            if n == 0 {
                Framing::Empty
            } else {
                Framing::Length(n)
            }
        }
        None if chunked_allowed => {
            w.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Framing::Chunked
        }
        None => Framing::Close,
    }
}

/// Writes what `w` holds (an encoded head) and then `body` in `framing`; small frames that
/// are ready at once share the head's write. A body framed `Empty` is still polled to its
/// end (what it yields is dropped) so that whatever watches it sees it finish. Trailers go
/// out only on a chunked body whose receiver asked for them.
pub async fn write_body<W, B>(
    io: &mut W,
    w: &mut Vec<u8>,
    mut body: B,
    framing: Framing,
    send_trailers: bool,
) -> Result<(), H1Error>
where
    W: AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    let chunked = framing == Framing::Chunked;
    let mut ended = body.is_end_stream();
    while !ended {
        let polled =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
        let next = match polled {
            Poll::Ready(f) => f,
            Poll::Pending => {
                flush(io, w).await?;
                body.frame().await
            }
        };
        let Some(frame) = next else { break };
        let frame = frame.map_err(|e| H1Error::Body(e.into()))?;
        ended = body.is_end_stream();
        if framing == Framing::Empty {
            continue;
        }
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => {
                if chunked {
                    let mut hex = [0u8; 16];
                    w.extend_from_slice(hex_len(data.len(), &mut hex));
                    w.extend_from_slice(b"\r\n");
                } else if framing != Framing::Close {
                    left = left
                        .checked_sub(data.len() as u64)
                        .ok_or(H1Error::LengthMismatch)?;
                }
                if data.len() <= COALESCE {
                    w.extend_from_slice(&data);
                } else {
                    flush(io, w).await?;
                    io.write_all(&data).await?;
                }
                if chunked {
                    w.extend_from_slice(b"\r\n");
                }
            }
            Err(frame) => {
                if let (true, Ok(trailers)) = (chunked, frame.into_trailers()) {
                    w.extend_from_slice(b"0\r\n");
                    if send_trailers {
                        write_headers(w, &trailers);
                    }
                    w.extend_from_slice(b"\r\n");
                    left = 0;
                    break;
                }
            }
        }
    }
    if chunked && left != 0 {
        w.extend_from_slice(b"0\r\n\r\n");
    } else if matches!(framing, Framing::Length(_)) && left != 0 {
        return Err(H1Error::LengthMismatch);
    }
    flush(io, w).await
}

pub async fn flush<W: AsyncWrite + Unpin>(io: &mut W, w: &mut Vec<u8>) -> Result<(), H1Error> {
    if !w.is_empty() {
        io.write_all(w).await?;
        w.clear();
    }
    Ok(())
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

/// Whether the peer of an idle socket closed or reset it. Asks the reactor, not the
/// socket: its readiness carries the peer's FIN or RST (EPOLLRDHUP, EPOLLHUP) without a
/// syscall, where a probing read would cost one per request.
pub fn peer_closed(io: &tokio::net::TcpStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let ready = std::pin::pin!(io.ready(tokio::io::Interest::READABLE));
    match ready.poll(&mut cx) {
        Poll::Ready(Ok(r)) => r.is_read_closed() || r.is_error(),
        Poll::Ready(Err(_)) => true,
        Poll::Pending => false,
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue, header};

    use super::{FieldSpans, RecentNames, write_fields};

    fn written(lengths: &[&'static str]) -> (String, Option<u64>) {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a"));
        for l in lengths {
            h.append(header::CONTENT_LENGTH, HeaderValue::from_static(l));
        }
        let mut w = Vec::new();
        let n = write_fields(&mut w, &h);
        (String::from_utf8_lossy(&w).into_owned(), n)
    }

    #[test]
    fn a_head_leaves_with_one_content_length_or_none() {
        assert_eq!(
            written(&["5"]),
            ("host: a\r\ncontent-length: 5\r\n".into(), Some(5))
        );
        // Identical values, in one field or several: sent as the one value.
        assert_eq!(
            written(&["5, 5"]),
            ("host: a\r\ncontent-length: 5\r\n".into(), Some(5))
        );
        assert_eq!(
            written(&["5", "5"]),
            ("host: a\r\ncontent-length: 5\r\n".into(), Some(5))
        );
        // Conflicting or malformed: left out, for the body to be framed by what it is.
        assert_eq!(written(&["5", "6"]), ("host: a\r\n".into(), None));
        assert_eq!(written(&["five"]), ("host: a\r\n".into(), None));
        assert_eq!(written(&[]), ("host: a\r\n".into(), None));
    }

    /// Reads `fields` as a response head would be, with the connection's recent names.
    fn read(recent: &mut RecentNames, fields: &str) -> (HeaderMap, Option<u64>) {
        let text = format!("HTTP/1.1 200 OK\r\n{fields}\r\n");
        let mut slots = [httparse::EMPTY_HEADER; 8];
        let mut parsed = httparse::Response::new(&mut slots);
        let head = bytes::Bytes::from(text);
        assert!(parsed.parse(&head).expect("parses").is_complete());
        let spans = FieldSpans::of(parsed.headers, head.as_ptr()).expect("spans");
        let (map, facts) = spans.header_map(&head, recent).expect("map");
        (map, facts.declared_length().expect("length"))
    }

    fn pairs(map: &HeaderMap) -> Vec<(String, String)> {
        map.iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_owned()))
            .collect()
    }

    #[test]
    fn a_head_that_repeats_the_last_names_gets_its_own_values() {
        let mut recent = RecentNames::default();
        let fields = |n: u32| format!("Content-Type: text/n{n}\r\nContent-Length: {n}\r\n");
        for n in 1..=4 {
            let (map, length) = read(&mut recent, &fields(n));
            assert_eq!(length, Some(u64::from(n)), "head {n}");
            assert_eq!(
                pairs(&map),
                [
                    ("content-type".into(), format!("text/n{n}")),
                    ("content-length".into(), n.to_string()),
                ],
                "head {n}"
            );
            // From the third head on, the map is a copy of the remembered names.
            assert_eq!(recent.map.is_some(), n >= 2, "head {n}");
        }
        // Other names (or the same in another case) are read afresh and remembered anew.
        let (map, length) = read(&mut recent, "content-type: a\r\nX-Id: 7\r\n");
        assert_eq!(length, None);
        assert_eq!(
            pairs(&map),
            [
                ("content-type".into(), "a".into()),
                ("x-id".into(), "7".into())
            ]
        );
        assert!(recent.map.is_none());
    }

    #[test]
    fn a_head_with_a_repeated_name_keeps_every_value_in_order() {
        let mut recent = RecentNames::default();
        let fields = "Set-Cookie: a=1\r\nServer: s\r\nSet-Cookie: b=2\r\n";
        for _ in 0..3 {
            let (map, _) = read(&mut recent, fields);
            let cookies: Vec<_> = map.get_all("set-cookie").iter().collect();
            assert_eq!(cookies, ["a=1", "b=2"]);
            assert_eq!(map.get("server").map(|v| v.as_bytes()), Some(&b"s"[..]));
            assert!(recent.map.is_none(), "never copied from remembered names");
        }
    }
}
