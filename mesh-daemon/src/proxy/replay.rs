//! A request body that can be sent again for a retry. It streams to the upstream as it
//! arrives (no added latency, no deadlock with streaming clients) while keeping a copy of up
//! to [`REPLAY_LIMIT`] bytes. After a failed attempt the body can be replayed when the
//! attempt never read it (a connect failure) or read all of it within the limit; a larger
//! or unfinished body is not retried, as Envoy does when its retry buffer overflows.
use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::http::{Body, empty};

/// Largest body kept for replay (Envoy's default per-request buffer is 1 MiB).
pub const REPLAY_LIMIT: usize = 1024 * 1024;

struct Tee {
    /// The client's body, until an attempt has read all of it.
    source: Option<Body>,
    copy: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    copied: usize,
    /// An attempt has read from the source.
    started: bool,
    ended: bool,
    overflow: bool,
}

/// The body of one attempt: the live source the first time, a copy afterwards.
pub struct Attempt {
    tee: Arc<Mutex<Tee>>,
    hint: SizeHint,
}

/// The request body of a request that may be retried.
pub struct Replayable {
    /// `None` for a request without a body (most): every attempt sends an empty one, and
    /// nothing is allocated or locked for it.
    tee: Option<Arc<Mutex<Tee>>>,
    hint: SizeHint,
}

impl Replayable {
    pub fn new(body: Body) -> Self {
        let hint = body.size_hint();
        if body.is_end_stream() {
            return Self { tee: None, hint };
        }
        Self {
            tee: Some(Arc::new(Mutex::new(Tee {
                source: Some(body),
                copy: Vec::new(),
                trailers: None,
                copied: 0,
                started: false,
                ended: false,
                overflow: false,
            }))),
            hint,
        }
    }

    /// The body for the next attempt, or `None` when it can no longer be sent whole.
    pub fn attempt(&self) -> Option<Body> {
        let Some(tee) = &self.tee else {
            return Some(empty());
        };
        let t = tee
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !t.started && t.source.is_some() {
            return Some(
                Attempt {
                    tee: tee.clone(),
                    hint: self.hint,
                }
                .boxed(),
            );
        }
        if !t.ended || t.overflow {
            return None;
        }
        let whole: Bytes = if t.copy.len() == 1 {
            t.copy[0].clone()
        } else {
            t.copy.concat().into()
        };
        let trailers = t.trailers.clone();
        let body = Full::new(whole).map_err(|e| match e {}).boxed();
        Some(match trailers {
            None => body,
            Some(tr) => body.with_trailers(async move { Some(Ok(tr)) }).boxed(),
        })
    }
}

impl HttpBody for Attempt {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut t = self
            .tee
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        t.started = true;
        let Some(source) = t.source.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(source).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    t.copied += data.len();
                    if t.copied > REPLAY_LIMIT {
                        t.overflow = true;
                        t.copy.clear();
                    } else {
                        t.copy.push(data.clone());
                    }
                } else if let Some(tr) = frame.trailers_ref() {
                    t.trailers = Some(tr.clone());
                }
            }
            Poll::Ready(None) => {
                t.ended = true;
                t.source = None;
            }
            Poll::Ready(Some(Err(_))) => {
                // The client broke its own body off: nothing whole to replay.
                t.overflow = true;
            }
            Poll::Pending => {}
        }
        polled
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[&'static str]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed()
    }

    async fn read(b: Body) -> Bytes {
        b.collect().await.map(|c| c.to_bytes()).unwrap_or_default()
    }

    #[tokio::test]
    async fn an_unread_body_is_handed_on_and_a_read_one_is_replayed() {
        let r = Replayable::new(body(&["hello ", "world"]));
        // A first attempt that failed before reading (connect failure) leaves it unread.
        drop(r.attempt().expect("first"));
        let second = r.attempt().expect("still unread");
        assert_eq!(read(second).await, "hello world");
        let third = r.attempt().expect("replayed from the copy");
        assert_eq!(read(third).await, "hello world");
    }

    #[tokio::test]
    async fn a_body_cut_short_or_too_large_is_not_replayed() {
        let r = Replayable::new(body(&["part one", "part two"]));
        let mut first = r.attempt().expect("first");
        // Read one frame only, as an upstream that failed mid-body would.
        let _ = first.frame().await;
        drop(first);
        assert!(r.attempt().is_none(), "half a body must not be sent again");

        let big: &'static str = Box::leak("x".repeat(REPLAY_LIMIT + 1).into_boxed_str());
        let r = Replayable::new(body(&[big]));
        assert_eq!(
            read(r.attempt().expect("first")).await.len(),
            REPLAY_LIMIT + 1
        );
        assert!(r.attempt().is_none(), "over the limit");
    }

    #[tokio::test]
    async fn a_request_without_a_body_sends_an_empty_one_every_time() {
        let r = Replayable::new(empty());
        for _ in 0..3 {
            let b = r.attempt().expect("always");
            assert!(b.is_end_stream());
            assert_eq!(read(b).await, "");
        }
    }
}
