//! Message bodies on HTTP/2 streams, both ways and at both ends of the proxy: what is
//! received is passed on frame by frame with its flow-control window handed back as it
//! goes, and what is sent waits for the peer's window one chunk at a time, so neither side
//! buffers more than a chunk ahead of its peer.
use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use hyper::body::{Body as _, Frame, SizeHint};

use super::{
    h1_codec::BoxError,
    http::{Body, content_length},
};

/// Sends a body on its stream, each chunk once the peer's window has room, and stops when
/// the peer resets the stream. A body that fails resets the stream, so the peer cannot take
/// what it got as whole.
pub async fn send_body(body: Body, stream: SendStream<Bytes>) {
    let mut pipe = Pipe {
        body,
        stream,
        waiting: None,
    };
    if let Err(PipeError::Body(e)) = std::future::poll_fn(|cx| pipe.poll(cx)).await {
        tracing::debug!(error = %e, "body failed; resetting its HTTP/2 stream");
        pipe.stream.send_reset(Reason::INTERNAL_ERROR);
    }
}

struct Pipe {
    body: Body,
    stream: SendStream<Bytes>,
    /// A chunk read from the body, waiting for window, and whether it ends the body.
    waiting: Option<(Bytes, bool)>,
}

enum PipeError {
    /// The stream is gone (reset, or its connection); nothing more to send.
    Stream,
    /// The body failed: the peer must not take what it got as whole.
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

/// A body received on an HTTP/2 stream (a response upstream, a request downstream): data,
/// then trailers, each frame's bytes handed back to the peer's window as soon as it is
/// passed on.
pub struct H2Body {
    recv: RecvStream,
    data_done: bool,
    /// What the message's `Content-Length` says, for the size hint.
    length: Option<u64>,
}

impl H2Body {
    /// The body of a message received with these headers.
    pub fn new(recv: RecvStream, headers: &http::HeaderMap) -> Self {
        Self {
            recv,
            data_done: false,
            length: content_length(headers),
        }
    }
}

impl hyper::body::Body for H2Body {
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

/// A reset with `NO_ERROR` after a response began means the server has said all it will
/// and wants no more of the request (RFC 9113 8.1): the body ends there, it did not fail.
fn ended_early(e: h2::Error) -> Option<Result<Frame<Bytes>, h2::Error>> {
    if e.reason() == Some(Reason::NO_ERROR) {
        None
    } else {
        Some(Err(e))
    }
}
