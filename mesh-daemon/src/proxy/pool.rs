//! One pod's upstream HTTP connections, per cluster and endpoint, with Envoy's connection
//! pool limits from the DestinationRule: `tcp.maxConnections` across the cluster (a
//! request that finds none free waits, up to `http.http1MaxPendingRequests` waiting, beyond
//! which it is answered 503 UO), `http.maxRequestsPerConnection`, `http.idleTimeout`, and
//! HTTP/2 multiplexing (one connection per endpoint) for http2/grpc ports and
//! `h2UpgradePolicy: UPGRADE`.
//!
//! An HTTP/1.1 connection carries one exchange at a time, so it has no task of its own: the
//! request holding it drives its I/O, while sending and then while its response body is
//! read (the body is polled by the client's connection task). A spawned connection task
//! cost two cross-task hand-offs per request (request in, response out) plus one per body
//! frame. HTTP/2 connections are shared by many requests and keep their own task.
use std::{
    collections::HashMap,
    future::Future as _,
    net::SocketAddr,
    pin::{Pin, pin},
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::{
    body::{Frame, Incoming},
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpStream, sync::Notify};

use super::{
    ProxyInputs,
    cluster_state::{ClusterState, Slot, take_slot},
    http::Body,
    sockets::{SocketError, connect_in},
};
use crate::{netns::Netns, routing::policy::ClusterPolicy};

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connection pool overflow")]
    Overflow,
    #[error(transparent)]
    Connect(#[from] SocketError),
    #[error("HTTP handshake failed: {0}")]
    Handshake(hyper::Error),
}

impl PoolError {
    /// A failure to reach the endpoint at all (Envoy's connect-failure).
    pub fn is_connect_failure(&self) -> bool {
        !matches!(self, PoolError::Overflow)
    }
}

/// A connection lent to one request. [`Lease::send`] hands it to the response body, which
/// gives it back at its end: an HTTP/1.1 connection goes back to the idle list if its
/// exchange finished and it has requests left.
pub struct Lease {
    /// Always `Some` until dropped.
    sender: Option<Sender>,
    key: Key,
    uses: u32,
    /// Which HTTP/2 connection of the endpoint this is (a replaced one is not touched).
    generation: u64,
    idle_timeout: Duration,
    pool: Arc<PodPool>,
    /// Requests are left on the connection and nothing has failed on it.
    keep: bool,
    /// HTTP/1.1: the response has been read to its end, so the connection is between
    /// exchanges and can be lent again.
    finished: bool,
}

enum Sender {
    H1(Box<H1>),
    H2(http2::SendRequest<Body>),
}

/// An HTTP/1.1 connection and the I/O state machine that whoever holds it polls.
struct H1 {
    sender: http1::SendRequest<Body>,
    /// `None` once the connection has ended.
    conn: Option<http1::Connection<TokioIo<TcpStream>, Body>>,
    /// The cluster's connection slot, free again when the connection is dropped.
    _slot: Slot,
}

impl H1 {
    /// Moves the connection's I/O along; false once it has ended (closed by the peer or
    /// failed).
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(conn) = self.conn.as_mut()
            && Pin::new(conn).poll(cx).is_ready()
        {
            self.conn = None;
        }
        self.conn.is_some()
    }

    async fn send(
        &mut self,
        req: http::Request<Body>,
    ) -> Result<http::Response<Incoming>, hyper::Error> {
        let H1 { sender, conn, .. } = self;
        let mut drive = |cx: &mut Context<'_>| {
            if let Some(c) = conn.as_mut()
                && Pin::new(c).poll(cx).is_ready()
            {
                *conn = None;
            }
        };
        // An ended connection fails both: hyper answers pending requests with an error.
        std::future::poll_fn(|cx| {
            drive(cx);
            sender.poll_ready(cx)
        })
        .await?;
        let mut response = pin!(sender.send_request(req));
        std::future::poll_fn(|cx| {
            drive(cx);
            response.as_mut().poll(cx)
        })
        .await
    }

    fn is_closed(&self) -> bool {
        self.conn.is_none() || self.sender.is_closed()
    }
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(c) => c.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

impl Lease {
    /// HTTP/2 sends with the absolute URI (it carries `:authority`); HTTP/1.1 with the path.
    pub fn is_h2(&self) -> bool {
        matches!(self.sender, Some(Sender::H2(_)))
    }

    /// Sends `req`; the response's body keeps the connection until it has been read.
    pub async fn send(
        mut self,
        req: http::Request<Body>,
    ) -> Result<http::Response<LeasedBody>, hyper::Error> {
        let sent = match self.sender.as_mut() {
            Some(Sender::H1(c)) => c.send(req).await,
            Some(Sender::H2(s)) => match s.ready().await {
                Ok(()) => s.send_request(req).await,
                Err(e) => Err(e),
            },
            // Unreachable: the sender is only taken in drop.
            None => return Err(missing_sender()),
        };
        match sent {
            Ok(resp) => Ok(resp.map(|inner| LeasedBody {
                inner,
                lease: Some(self),
            })),
            Err(e) => {
                // Whatever failed is not lent again.
                self.keep = false;
                Err(e)
            }
        }
    }

    /// Moves an HTTP/1.1 connection's I/O along (HTTP/2 has its own task); false once it
    /// has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        match self.sender.as_mut() {
            Some(Sender::H1(c)) => c.drive(cx),
            Some(Sender::H2(s)) => !s.is_closed(),
            None => false,
        }
    }

    /// An idle HTTP/1.1 connection is polled by no one, so a close by the peer shows only
    /// when it is next driven: do that now, before a request is trusted to it.
    async fn still_open(&mut self) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(self.drive(cx))).await
    }
}

/// Never built: a lease's sender is there until the lease is dropped.
fn missing_sender() -> hyper::Error {
    unreachable!("a lease keeps its sender until it is dropped")
}

impl Drop for Lease {
    fn drop(&mut self) {
        match self.sender.take() {
            Some(Sender::H1(c)) if self.keep && self.finished && !c.is_closed() => {
                let idle = Idle {
                    sender: Sender::H1(c),
                    uses: self.uses,
                    active: 0,
                    generation: 0,
                    since: Instant::now(),
                };
                self.pool
                    .lock()
                    .idle
                    .entry(self.key.clone())
                    .or_default()
                    .push(idle);
                self.pool.sweep_later(self.key.clone(), self.idle_timeout);
            }
            Some(Sender::H2(_)) => {
                let mut c = self.pool.lock();
                if let Some(shared) = c.h2.get_mut(&self.key)
                    && shared.generation == self.generation
                {
                    shared.active = shared.active.saturating_sub(1);
                    if !self.keep {
                        c.h2.remove(&self.key);
                    } else if shared.active == 0 {
                        shared.since = Instant::now();
                        drop(c);
                        self.pool.sweep_later(self.key.clone(), self.idle_timeout);
                    }
                }
            }
            _ => {}
        }
        self.pool.returned.notify_waiters();
    }
}

/// An upstream response body holding its connection: polling it drives an HTTP/1.1
/// connection's I/O, and its end gives the connection back.
pub struct LeasedBody {
    inner: Incoming,
    lease: Option<Lease>,
}

impl LeasedBody {
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(l) = self.lease.as_mut() {
            l.drive(cx);
        }
    }

    fn finish(&mut self) {
        if let Some(mut l) = self.lease.take() {
            l.finished = true;
        }
    }
}

impl hyper::body::Body for LeasedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        this.drive(cx);
        let mut polled = Pin::new(&mut this.inner).poll_frame(cx);
        if polled.is_pending() {
            // hyper reads body data only once the body has asked for it: the ask just made
            // may have given the connection work, so drive it once more before waiting.
            this.drive(cx);
            polled = Pin::new(&mut this.inner).poll_frame(cx);
        }
        if matches!(polled, Poll::Ready(None)) {
            this.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LeasedBody {
    fn drop(&mut self) {
        // A body known to be empty (HEAD, 204, 304, `content-length: 0`) is often never
        // polled: its exchange is over all the same.
        if hyper::body::Body::is_end_stream(&self.inner) {
            self.finish();
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    cluster: String,
    endpoint: SocketAddr,
    h2: bool,
}

struct Idle {
    sender: Sender,
    uses: u32,
    /// HTTP/2: requests in flight on the connection.
    active: u32,
    generation: u64,
    /// Idle since (HTTP/2: since its last request ended).
    since: Instant,
}

#[derive(Default)]
struct Conns {
    /// HTTP/1.1 connections not in use.
    idle: HashMap<Key, Vec<Idle>>,
    /// The HTTP/2 connection of each endpoint, shared by its requests.
    h2: HashMap<Key, Idle>,
    generation: u64,
    /// Keys with a sweep already scheduled: one timer per key, not one per request.
    sweeping: std::collections::HashSet<Key>,
}

/// What a request needs the pool to know.
pub struct Want<'a> {
    pub cluster: &'a str,
    pub endpoint: SocketAddr,
    pub h2: bool,
    pub policy: &'a ClusterPolicy,
    pub state: &'a ClusterState,
}

pub struct PodPool {
    netns: Arc<Netns>,
    inputs: Arc<ProxyInputs>,
    conns: Mutex<Conns>,
    /// Signalled whenever a connection is returned or closes: pending requests look again.
    returned: Notify,
}

impl PodPool {
    pub fn new(netns: Arc<Netns>, inputs: Arc<ProxyInputs>) -> Arc<Self> {
        Arc::new(Self {
            netns,
            inputs,
            conns: Mutex::new(Conns::default()),
            returned: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Envoy closes upstream connections idle for the cluster's idle timeout: one timer per
    /// key drops whatever has been idle that long (its connection then closes and gives its
    /// slot back), and comes back for what is left.
    fn sweep_later(self: &Arc<Self>, key: Key, timeout: Duration) {
        if !self.lock().sweeping.insert(key.clone()) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut wait = timeout;
            loop {
                tokio::time::sleep(wait).await;
                let mut c = this.lock();
                let mut oldest: Option<Instant> = None;
                if let Some(list) = c.idle.get_mut(&key) {
                    list.retain(|i| i.since.elapsed() < timeout && !i.sender.is_closed());
                    oldest = list.iter().map(|i| i.since).min();
                }
                match c.h2.get(&key) {
                    Some(s) if s.active == 0 && s.since.elapsed() >= timeout => {
                        c.h2.remove(&key);
                    }
                    Some(s) if s.active == 0 => {
                        oldest = Some(oldest.map_or(s.since, |o| o.min(s.since)));
                    }
                    _ => {}
                }
                match oldest {
                    Some(since) => {
                        wait = timeout.saturating_sub(since.elapsed());
                        drop(c);
                        // What was dropped gave its connection slot back.
                        this.returned.notify_waiters();
                    }
                    None => {
                        c.sweeping.remove(&key);
                        drop(c);
                        this.returned.notify_waiters();
                        return;
                    }
                }
            }
        });
    }

    /// A connection to `w.endpoint`: an idle or shared one, else a new one within the
    /// cluster's `maxConnections`, else a wait as one of at most `http1MaxPendingRequests`.
    pub async fn lease(self: &Arc<Self>, w: &Want<'_>) -> Result<Lease, PoolError> {
        let key = Key {
            cluster: w.cluster.to_owned(),
            endpoint: w.endpoint,
            h2: w.h2,
        };
        let limits = &w.policy.limits;
        let mut pending: Option<Slot> = None;
        loop {
            // Registered before looking, so a return between the look and the wait is seen.
            let returned = self.returned.notified();
            while let Some(mut l) = self.reuse(&key, w.policy) {
                if l.still_open().await {
                    return Ok(l);
                }
                // Closed while idle: dropping it freed its slot; look again.
                l.keep = false;
            }
            if let Some(slot) = take_slot(&w.state.connections, limits.max_connections) {
                return self.connect(key, w, slot).await;
            }
            if pending.is_none() {
                pending = Some(
                    take_slot(&w.state.pending, limits.max_pending_requests)
                        .ok_or(PoolError::Overflow)?,
                );
            }
            returned.await;
        }
    }

    fn reuse(self: &Arc<Self>, key: &Key, policy: &ClusterPolicy) -> Option<Lease> {
        let per_conn = policy
            .limits
            .max_requests_per_connection
            .unwrap_or(u32::MAX);
        let mut c = self.lock();
        if key.h2 {
            let shared = c.h2.get_mut(key)?;
            if shared.sender.is_closed() || shared.uses >= per_conn {
                c.h2.remove(key);
                return None;
            }
            shared.uses += 1;
            shared.active += 1;
            let Sender::H2(s) = &shared.sender else {
                return None;
            };
            return Some(Lease {
                sender: Some(Sender::H2(s.clone())),
                key: key.clone(),
                uses: shared.uses,
                generation: shared.generation,
                idle_timeout: policy.http_idle_timeout,
                pool: self.clone(),
                keep: true,
                finished: false,
            });
        }
        let list = c.idle.get_mut(key)?;
        while let Some(idle) = list.pop() {
            if idle.sender.is_closed() || idle.since.elapsed() >= policy.http_idle_timeout {
                continue;
            }
            let uses = idle.uses + 1;
            return Some(Lease {
                keep: uses < per_conn,
                sender: Some(idle.sender),
                key: key.clone(),
                uses,
                generation: 0,
                idle_timeout: policy.http_idle_timeout,
                pool: self.clone(),
                finished: false,
            });
        }
        None
    }

    async fn connect(
        self: &Arc<Self>,
        key: Key,
        w: &Want<'_>,
        slot: Slot,
    ) -> Result<Lease, PoolError> {
        let stream = connect_in(
            &self.netns,
            &self.inputs.host,
            w.endpoint,
            w.policy.connect_timeout,
        )
        .await?;
        let io = TokioIo::new(stream);
        let per_conn = w
            .policy
            .limits
            .max_requests_per_connection
            .unwrap_or(u32::MAX);
        let idle_timeout = w.policy.http_idle_timeout;
        if key.h2 {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(PoolError::Handshake)?;
            // The connection task holds the cluster's connection slot: it is free again when
            // the connection is gone (its last sender dropped, or the peer closed it).
            let pool = self.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let _ = conn.await;
                pool.returned.notify_waiters();
            });
            let mut c = self.lock();
            c.generation += 1;
            let generation = c.generation;
            c.h2.insert(
                key.clone(),
                Idle {
                    sender: Sender::H2(sender.clone()),
                    uses: 1,
                    active: 1,
                    generation,
                    since: Instant::now(),
                },
            );
            drop(c);
            return Ok(Lease {
                sender: Some(Sender::H2(sender)),
                key,
                uses: 1,
                generation,
                idle_timeout,
                pool: self.clone(),
                keep: 1 < per_conn,
                finished: false,
            });
        }
        let (sender, conn) = http1::handshake(io).await.map_err(PoolError::Handshake)?;
        Ok(Lease {
            sender: Some(Sender::H1(Box::new(H1 {
                sender,
                conn: Some(conn),
                _slot: slot,
            }))),
            key,
            uses: 1,
            generation: 0,
            idle_timeout,
            pool: self.clone(),
            keep: 1 < per_conn,
            finished: false,
        })
    }
}
