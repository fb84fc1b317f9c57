//! A downstream connection's idle timeout (Envoy's `idle_timeout`: no request in progress for
//! that long closes the connection), kept by one timer for the connection's life: a timer per
//! request was registered with the runtime's timer wheel (a lock) while the connection waited
//! for the next request and taken out again when it came, on every request. This one is only
//! moved on when it fires early, i.e. about once per timeout. The daemon's drain ends an idle
//! connection the same way.
use std::{
    future::Future,
    pin::{Pin, pin},
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::{Instant, Sleep};

use super::drain::DrainSignal;

/// Envoy's default `idle_timeout` for downstream HTTP connections, which Istio keeps.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60 * 60);

pub struct IdleDeadline {
    timeout: Duration,
    timer: Pin<Box<Sleep>>,
    drain: DrainSignal,
}

impl IdleDeadline {
    pub fn new(timeout: Duration, drain: DrainSignal) -> Self {
        Self {
            timeout,
            timer: Box::pin(tokio::time::sleep(timeout)),
            drain,
        }
    }

    /// Ready once the daemon drains: the connection should end after its current exchange.
    pub fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.drain.poll_started(cx)
    }

    /// Whether the daemon drains (then no connection is kept for another request).
    pub fn draining(&self) -> bool {
        self.drain.started()
    }

    /// Ready once the connection, idle since `since`, has been idle for the timeout.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>, since: Instant) -> Poll<()> {
        while self.timer.as_mut().poll(cx).is_ready() {
            // Set while a request was in progress: idle time counts from `since`.
            let deadline = since + self.timeout;
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            self.timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }

    /// Runs `wait` (the wait for the next request); `None` when nothing came for the timeout,
    /// or when the daemon drains before something came.
    pub async fn unless_idle<F: Future>(&mut self, wait: F) -> Option<F::Output> {
        let since = Instant::now();
        let mut wait = pin!(wait);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = wait.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            if self.poll_drain(cx).is_ready() {
                return Poll::Ready(None);
            }
            self.poll_expired(cx, since).map(|()| None)
        })
        .await
    }
}
