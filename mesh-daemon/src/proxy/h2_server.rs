//! The downstream side of HTTP/2 (prior knowledge), on the h2 crate without hyper's server.
//!
//! hyper's server spawns a task per stream, which runs the answer and then pumps the
//! response body: a task's allocation, a scheduling and a wake-up across tasks for every
//! frame the stream sends, on top of the connection's own task. Here the connection's task
//! runs its streams itself, as Envoy's worker does: the answers live in a set polled between
//! reads of the connection, and a stream that sends wakes only the task it is already in.
//! Proxy threads run one event loop each, so spawning bought no parallelism.
//!
//! Conduct follows hyper's server, so nothing changes for clients: 1 MiB windows, 16 KiB
//! frames, at most 200 concurrent streams, `Date` added when missing, `Content-Length` for
//! bodies of known length, connection-specific headers removed, a failing response body
//! reset with `INTERNAL_ERROR`. A stream the client resets cancels its answer, and with it
//! the upstream request; a connection that ends cancels every answer still running.
use std::{
    future::Future,
    task::{Poll, ready},
};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt as _};
use h2::{RecvStream, server::SendResponse};
use http::{HeaderValue, Request, Response, header};
use hyper::body::Body as _;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};

use super::{
    date,
    h2_body::{H2Body, send_body},
    hop_by_hop,
    http::Body,
    idle::IdleDeadline,
};

const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;
const MAX_FRAME: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_CONCURRENT_STREAMS: u32 = 200;
/// Streams this end may reset for the client's protocol errors before it gives up on the
/// connection (a bound on what a misbehaving client costs).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// Serves HTTP/2 on `io` (its preface not yet read), answering each request with `answer`,
/// until the connection closes. After `idle`'s timeout with no stream open, or once the daemon
/// drains, the connection is drained (GOAWAY, open streams finished, then closed), as Envoy
/// does with its downstream `idle_timeout` and its drain.
pub async fn serve<I, F, Fut>(io: I, mut idle: IdleDeadline, answer: F)
where
    I: AsyncRead + AsyncWrite + Unpin,
    F: Fn(Request<H2Body>) -> Fut,
    Fut: Future<Output = Response<Body>>,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .handshake::<_, Bytes>(io);
    let mut conn = match handshake.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "HTTP/2 handshake with the client failed");
            return;
        }
    };
    let answer = &answer;
    let mut streams = FuturesUnordered::new();
    let mut idle_since = Instant::now();
    let mut draining = false;
    std::future::poll_fn(|cx| {
        loop {
            // The streams first: what they send is then written by the connection's poll.
            let busy = !streams.is_empty();
            while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
            if streams.is_empty() {
                if busy {
                    idle_since = Instant::now();
                }
                if !draining && idle.poll_expired(cx, idle_since).is_ready() {
                    tracing::debug!("HTTP/2 client connection idle; draining it");
                    conn.graceful_shutdown();
                    draining = true;
                }
            }
            if !draining && idle.poll_drain(cx).is_ready() {
                tracing::debug!("the daemon drains; so does this HTTP/2 client connection");
                conn.graceful_shutdown();
                draining = true;
            }
            match ready!(conn.poll_accept(cx)) {
                Some(Ok((req, respond))) => streams.push(exchange(answer, req, respond)),
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "HTTP/2 client connection failed");
                    return Poll::Ready(());
                }
                // Closed, and every stream done with (the connection stays open while one
                // is not), or the socket gone.
                None => return Poll::Ready(()),
            }
        }
    })
    .await;
}

/// One stream: the request answered, the response sent with its body.
async fn exchange<F, Fut>(answer: &F, req: Request<RecvStream>, mut respond: SendResponse<Bytes>)
where
    F: Fn(Request<H2Body>) -> Fut,
    Fut: Future<Output = Response<Body>>,
{
    let (parts, recv) = req.into_parts();
    let body = H2Body::new(recv, &parts.headers);
    // Boxed: the answer is the largest future of the exchange, and the exchange is moved
    // into the connection's set before its first poll; boxed, it is written once.
    let mut answering = Box::pin(answer(Request::from_parts(parts, body)));
    let resp = std::future::poll_fn(|cx| {
        if let Poll::Ready(resp) = answering.as_mut().poll(cx) {
            return Poll::Ready(Some(resp));
        }
        // Reset by the client (or its connection gone): the answer is dropped, which
        // cancels the upstream request, as Envoy does.
        respond.poll_reset(cx).map(|_| None)
    })
    .await;
    drop(answering);
    let Some(resp) = resp else {
        return;
    };
    let (mut parts, body) = resp.into_parts();
    let headers = &mut parts.headers;
    hop_by_hop::strip_for_h2(headers);
    if !headers.contains_key(header::DATE) {
        headers.insert(header::DATE, date::value());
    }
    let end = body.is_end_stream();
    if !end
        && let Some(len) = body.size_hint().exact()
        && !headers.contains_key(header::CONTENT_LENGTH)
    {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    match respond.send_response(Response::from_parts(parts, ()), end) {
        Ok(stream) if !end => send_body(body, stream).await,
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "response head not sent to the HTTP/2 client"),
    }
}

#[cfg(test)]
mod tests;
