//! One pod's upstream HTTP connections, per cluster and endpoint, with Envoy's connection
//! pool limits from the DestinationRule: `tcp.maxConnections` across the cluster (a
//! request that finds none free waits, up to `http.http1MaxPendingRequests` waiting, beyond
//! which it is answered 503 UO), `http.maxRequestsPerConnection`, `http.idleTimeout`, and
//! HTTP/2 multiplexing (one connection per endpoint) for http2/grpc ports and
//! `h2UpgradePolicy: UPGRADE`. Both protocols' exchanges run in the request's own task
//! ([`super::h1_upstream`], [`super::h2_upstream`]); an HTTP/2 connection also has a task
//! that moves its frames.
// foldhash, not SipHash: these maps are looked up on every request and their keys are not
// chosen by a client.
use hashbrown::HashMap;
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering, fence},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use tokio::sync::Notify;

use super::{
    ProxyInputs,
    cluster_state::{ClusterState, Slot, take_slot},
    h1_upstream::{H1Body, H1Conn, H1Error, Home},
    h2_upstream::{self, H2Body, H2Conn},
    http::Body,
    shards::Shards,
    upstream_io::{DialError, dial},
};
use crate::{netns::Netns, routing::policy::ClusterPolicy};

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connection pool overflow")]
    Overflow,
    #[error(transparent)]
    Connect(#[from] DialError),
    #[error("HTTP handshake failed: {0}")]
    Handshake(h2::Error),
}

impl PoolError {
    /// A failure to reach the endpoint at all (Envoy's connect-failure).
    pub fn is_connect_failure(&self) -> bool {
        !matches!(self, PoolError::Overflow)
    }
}

/// Why a request got no response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    H1(#[from] H1Error),
    #[error(transparent)]
    H2(#[from] h2::Error),
}

/// A connection lent to one request. An HTTP/1.1 connection travels on with the response
/// body and goes back to the idle list at the body's end, if it is still good and has
/// requests left; an HTTP/2 lease gives its stream count back when dropped.
pub struct Lease {
    /// `Some` until sent on (HTTP/1.1) or dropped.
    sender: Option<Sender>,
    key: Key,
    uses: u32,
    /// Which HTTP/2 connection of the endpoint this is (a replaced one is not touched).
    generation: u64,
    idle_timeout: Duration,
    pool: Arc<PodPool>,
    keep: bool,
}

enum Sender {
    H1(H1Conn),
    H2(H2Conn),
}

impl Sender {
    fn is_closed(&mut self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

impl Lease {
    /// Sends a request to `target` (path and query) with the head it borrows: HTTP/1.1
    /// writes it as it is, HTTP/2 sends a copy with the authority as `:authority`.
    pub async fn send(
        &mut self,
        head: &http::request::Parts,
        target: &str,
        body: Body,
    ) -> Result<http::Response<UpstreamBody>, SendError> {
        // HTTP/2: the sender stays in the lease while the request is sent, so a cancelled send
        // (per-try timeout) still gives the stream count back when the lease drops.
        if let Some(Sender::H2(s)) = &mut self.sender {
            return Ok(s.send(head, target, body).await?.map(UpstreamBody::H2));
        }
        match self.sender.take() {
            Some(Sender::H1(conn)) => {
                let home = PoolHome {
                    pool: self.pool.clone(),
                    key: self.key.clone(),
                    uses: self.uses,
                    idle_timeout: self.idle_timeout,
                    keep: self.keep,
                };
                let resp = conn.send(head, target, body, home).await?;
                Ok(resp.map(UpstreamBody::H1))
            }
            // Sent on already: an HTTP/1.1 connection is lent for one request.
            Some(Sender::H2(_)) | None => Err(SendError::H1(H1Error::Closed)),
        }
    }

    /// The request failed on this connection: do not lend it again.
    pub fn discard(&mut self) {
        self.keep = false;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        match self.sender.take() {
            // Lent but never sent on: still clean.
            Some(Sender::H1(conn)) if self.keep => {
                self.pool
                    .put_idle(self.key.clone(), conn, self.uses, self.idle_timeout);
                self.pool.returned.wake();
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
                self.pool.returned.wake();
            }
            // Sent on: the connection went on with the response body, which gives it back.
            // Dropped unsent: it closes, and its slot tells the waiting.
            _ => {}
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    cluster: Arc<str>,
    endpoint: SocketAddr,
    h2: bool,
    /// HTTP/2: the proxy thread whose connection this is. Each thread has its own, as each
    /// of Envoy's workers has its own pool: one connection shared by all threads had every
    /// stream of the other threads cross cores twice. `None` for HTTP/1.1, whose idle
    /// connections any thread may borrow. (`u16`: it fits in the key's padding.)
    thread: Option<u16>,
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
    idle: HashMap<Key, IdleList>,
    /// The HTTP/2 connection of each endpoint, shared by its requests.
    h2: HashMap<Key, Idle>,
    generation: u64,
    /// HTTP/2 keys with a sweep already scheduled: one timer per key, not one per request.
    sweeping: hashbrown::HashSet<Key>,
}

/// An endpoint's idle HTTP/1.1 connections.
#[derive(Default)]
struct IdleList {
    conns: Vec<Idle>,
    /// A sweep is scheduled (kept here, so a connection's return is one lookup).
    sweeping: bool,
}

/// Requests waiting for a connection of the pod to come back or close. Most requests never
/// wait, and telling nobody would still take the waiters' lock: a count of the waiting
/// keeps returns from taking it.
#[derive(Default)]
pub struct Returns {
    notify: Notify,
    waiting: AtomicUsize,
}

impl Returns {
    /// A connection came back (put back under the pool's lock) or closed (its slot given
    /// back, then a fence): requests waiting look again.
    fn wake(&self) {
        // A waiter counts itself, fences, then looks at the pool (under its lock) and at the
        // slots; a return is made under that lock, or a slot given back and fenced, before
        // this load. Either the waiter sees the connection or slot, or this sees the waiter.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }
}

/// One request counted among the waiting until dropped.
struct Waiting<'a>(&'a Returns);

impl<'a> Waiting<'a> {
    fn new(r: &'a Returns) -> Self {
        r.waiting.fetch_add(1, Ordering::SeqCst);
        // The slot counters are read with Acquire only: the fence orders this count before
        // that read, as the slot's release is ordered before `wake`'s load by its own fence.
        fence(Ordering::SeqCst);
        Self(r)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection's hold on one of its cluster's `maxConnections` slots: dropped with the
/// connection, it frees the slot and tells the requests waiting for one.
pub struct ConnSlot {
    /// `Some` until dropped.
    slot: Option<Slot>,
    freed: Arc<Returns>,
}

impl ConnSlot {
    pub fn new(slot: Slot, freed: Arc<Returns>) -> Self {
        Self {
            slot: Some(slot),
            freed,
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        // The slot is given back before the waiting are told: woken first, they could look,
        // find every slot still taken, and wait again for a wake-up already spent.
        drop(self.slot.take());
        // The slot's counter is not under the pool's lock: see `Returns::wake`.
        fence(Ordering::SeqCst);
        self.freed.wake();
    }
}

/// Where an HTTP/1.1 connection goes when its response body has ended cleanly.
pub struct PoolHome {
    pool: Arc<PodPool>,
    key: Key,
    uses: u32,
    idle_timeout: Duration,
    /// Whether the connection has requests left (`maxRequestsPerConnection`).
    keep: bool,
}

impl Home for PoolHome {
    fn take_back(self, conn: H1Conn) {
        if self.keep {
            self.pool
                .put_idle(self.key, conn, self.uses, self.idle_timeout);
            self.pool.returned.wake();
        }
        // Not kept: the connection closes here and its slot tells the waiting.
    }
}

/// An upstream response body, read by the request's task.
// HTTP/1.1's variant holds its connection and is the common one: boxing it would allocate
// for every response.
#[allow(clippy::large_enum_variant)]
pub enum UpstreamBody {
    H1(H1Body<PoolHome>),
    H2(H2Body),
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            UpstreamBody::H1(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpstreamBody::H2(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H1(b) => b.is_end_stream(),
            UpstreamBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::H1(b) => b.size_hint(),
            UpstreamBody::H2(b) => b.size_hint(),
        }
    }
}

/// What a request needs the pool to know.
pub struct Want<'a> {
    pub endpoint: SocketAddr,
    pub h2: bool,
    pub policy: &'a ClusterPolicy,
    pub state: &'a ClusterState,
}

pub struct PodPool {
    /// The pod the connections leave from (its identity, for the mTLS tunnel).
    pod_uid: String,
    netns: Arc<Netns>,
    inputs: Arc<ProxyInputs>,
    conns: Mutex<Conns>,
    /// Signalled whenever a connection is returned or closes: pending requests look again.
    returned: Arc<Returns>,
}

impl PodPool {
    pub fn new(pod_uid: &str, netns: Arc<Netns>, inputs: Arc<ProxyInputs>) -> Arc<Self> {
        Arc::new(Self {
            pod_uid: pod_uid.to_owned(),
            netns,
            inputs,
            conns: Mutex::new(Conns::default()),
            returned: Arc::new(Returns::default()),
        })
    }

    fn put_idle(self: &Arc<Self>, key: Key, conn: H1Conn, uses: u32, idle_timeout: Duration) {
        let idle = Idle {
            sender: Sender::H1(conn),
            uses,
            active: 0,
            generation: 0,
            since: Instant::now(),
        };
        let mut c = self.lock();
        let list = c.idle.entry_ref(&key).or_default();
        list.conns.push(idle);
        let sweep = !std::mem::replace(&mut list.sweeping, true);
        drop(c);
        if sweep {
            self.spawn_sweep(key, idle_timeout);
        }
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
        self.spawn_sweep(key, timeout);
    }

    /// The sweep itself, for a key already marked as sweeping.
    fn spawn_sweep(self: &Arc<Self>, key: Key, timeout: Duration) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut wait = timeout;
            loop {
                tokio::time::sleep(wait).await;
                let mut c = this.lock();
                let mut oldest: Option<Instant> = None;
                if let Some(list) = c.idle.get_mut(&key) {
                    list.conns
                        .retain_mut(|i| i.since.elapsed() < timeout && !i.sender.is_closed());
                    oldest = list.conns.iter().map(|i| i.since).min();
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
                    Some(since) => wait = timeout.saturating_sub(since.elapsed()),
                    None => {
                        // Nothing idle left: the endpoint's entry goes (endpoints come and go).
                        c.sweeping.remove(&key);
                        c.idle.remove(&key);
                        drop(c);
                        this.returned.wake();
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
            cluster: w.state.name.clone(),
            endpoint: w.endpoint,
            h2: w.h2,
            thread: if w.h2 { Shards::current_u16() } else { None },
        };
        let limits = &w.policy.limits;
        let mut pending: Option<Slot> = None;
        let mut waiting = None;
        loop {
            // Registered before looking, so a return between the look and the wait is seen.
            let returned = self.returned.notify.notified();
            if let Some(l) = self.reuse(&key, w.policy) {
                return Ok(l);
            }
            if let Some(slot) = take_slot(&w.state.connections, limits.max_connections) {
                // Boxed: a new connection is the rare path, and the HTTP/2 handshake would
                // otherwise size (and be copied with) every request's future.
                return Box::pin(self.connect(key, w, slot)).await;
            }
            // At `maxConnections`, another thread's HTTP/2 connection beats waiting for one
            // of our own that the limit would not let us open.
            if let Some(l) = self.reuse_other_thread(&key, w.policy) {
                return Ok(l);
            }
            if pending.is_none() {
                pending = Some(
                    take_slot(&w.state.pending, limits.max_pending_requests)
                        .ok_or(PoolError::Overflow)?,
                );
            }
            if waiting.is_none() {
                // Counted first, then a second look: a return before the count was made is
                // seen by that look, one after it wakes this request.
                waiting = Some(Waiting::new(&self.returned));
                continue;
            }
            returned.await;
        }
    }

    fn reuse_other_thread(self: &Arc<Self>, key: &Key, policy: &ClusterPolicy) -> Option<Lease> {
        if !key.h2 {
            return None;
        }
        (0..self.inputs.shards.len())
            .filter_map(|t| u16::try_from(t).ok().map(Some))
            .chain([None])
            .filter(|t| *t != key.thread)
            .find_map(|thread| {
                let other = Key {
                    thread,
                    ..key.clone()
                };
                self.reuse(&other, policy)
            })
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
            });
        }
        let list = c.idle.get_mut(key)?;
        // A connection of this thread first: one of another thread works, but each of its
        // reads is a wake-up across cores.
        if let Some(i) = list
            .conns
            .iter()
            .rposition(|idle| matches!(&idle.sender, Sender::H1(conn) if conn.is_local()))
        {
            let last = list.conns.len() - 1;
            list.conns.swap(i, last);
        }
        while let Some(mut idle) = list.conns.pop() {
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
        let snap = self.inputs.snapshot.load();
        let stream = dial(
            &self.inputs,
            &self.netns,
            &snap,
            &self.pod_uid,
            w.endpoint,
            w.policy.connect_timeout,
        )
        .await?
        .io;
        let per_conn = w
            .policy
            .limits
            .max_requests_per_connection
            .unwrap_or(u32::MAX);
        let idle_timeout = w.policy.http_idle_timeout;
        if key.h2 {
            let (sender, conn) = h2_upstream::handshake(stream)
                .await
                .map_err(PoolError::Handshake)?;
            // The connection task holds the cluster's connection slot: it is free again when
            // the connection is gone (its last sender dropped, or the peer closed it).
            let held = ConnSlot::new(slot, self.returned.clone());
            tokio::spawn(async move {
                let _held = held;
                conn.await;
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
            });
        }
        // The connection holds the slot itself, idle or at work.
        Ok(Lease {
            sender: Some(Sender::H1(H1Conn::new(
                stream,
                ConnSlot::new(slot, self.returned.clone()),
            ))),
            key,
            uses: 1,
            generation: 0,
            idle_timeout,
            pool: self.clone(),
            keep: 1 < per_conn,
        })
    }
}
