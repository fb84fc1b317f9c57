//! The daemon's drain: once it starts (SIGTERM, or a successor holding the listeners), every
//! HTTP client connection finishes the exchange it is in and closes. HTTP/1.1 answers with
//! `connection: close` and an idle connection is closed; HTTP/2 sends GOAWAY and finishes its
//! open streams. Opaque TCP is left to end by itself, within the drain's deadline.
//!
//! Each proxy thread waits on a `Notify` of its own: a connection's signal is polled while it
//! waits for the next request, once per request, and one `Notify` shared by all threads
//! would move its lock between cores on every one of them.
use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use tokio::sync::{Notify, futures::OwnedNotified};

use super::shards::Shards;

pub struct Drain {
    started: AtomicBool,
    /// One per proxy thread, and the first for any other thread.
    notify: Vec<Arc<Notify>>,
}

impl Drain {
    pub fn new(threads: usize) -> Arc<Self> {
        Arc::new(Self {
            started: AtomicBool::new(false),
            notify: (0..=threads).map(|_| Arc::new(Notify::new())).collect(),
        })
    }

    /// Starts the drain (once; later calls do nothing).
    pub fn start(&self) {
        if !self.started.swap(true, Ordering::SeqCst) {
            for n in &self.notify {
                n.notify_waiters();
            }
        }
    }

    pub fn started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }

    /// A connection's view of the drain, for the calling thread.
    pub fn signal(self: &Arc<Self>) -> DrainSignal {
        let i = Shards::current().map_or(0, |i| i + 1) % self.notify.len();
        // Created before the flag is read: a drain that starts in between still wakes it.
        let notified = Box::pin(self.notify[i].clone().notified_owned());
        DrainSignal {
            drain: self.clone(),
            notified,
            fired: self.started(),
        }
    }
}

/// Ready once the drain has started.
pub struct DrainSignal {
    drain: Arc<Drain>,
    notified: Pin<Box<OwnedNotified>>,
    fired: bool,
}

impl DrainSignal {
    pub fn poll_started(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.fired || self.notified.as_mut().poll(cx).is_ready() || self.drain.started() {
            self.fired = true;
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Whether the drain has started, without waiting for it.
    pub fn started(&self) -> bool {
        self.fired || self.drain.started()
    }
}

#[cfg(test)]
mod tests {
    use std::{pin::pin, task::Poll, time::Duration};

    use super::Drain;

    /// A signal taken before the drain wakes when it starts; one taken after is ready at once.
    #[tokio::test]
    async fn signals_before_and_after_the_start_see_it() {
        let drain = Drain::new(2);
        let mut early = drain.signal();
        let waiting = tokio::spawn(async move {
            std::future::poll_fn(|cx| early.poll_started(cx)).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "ready before the drain started");
        drain.start();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken by the drain")
            .expect("task");

        let mut late = drain.signal();
        assert!(late.started());
        let ready = pin!(std::future::poll_fn(|cx| late.poll_started(cx)));
        assert_eq!(futures::poll!(ready), Poll::Ready(()));
    }
}
