//! Tunnel connections shared by the connections between the same two pods, as ztunnel pools
//! them: one TLS connection carries up to [`MAX_STREAMS`] `CONNECT` streams, so a pod that
//! opens many connections to another pays for one handshake, not one each.
//!
//! A pooled connection belongs to one source pod (it leaves from that pod's address), one
//! pair of identities (the certificate it was opened with, the one it checked) and one
//! destination pod, and to the proxy thread that opened it: its frames are read and
//! written on that thread, as the connections whose streams it carries are. Idle for
//! [`IDLE_TIMEOUT`], it is let go and closes once its last stream ends.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::sync::watch;

use super::{
    HboneError,
    connect::{self, TunnelTo},
    stream::Tunnel,
};
use crate::{
    identity::Identity,
    netns::{HostNetns, Netns},
    proxy::shards::Shards,
};

/// Streams one tunnel connection carries at most before another is opened (ztunnel's
/// default); the server announces the same limit.
pub const MAX_STREAMS: u32 = 100;
/// How long a connection with no stream stays in the pool.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often an open connection checks whether it has been idle that long.
const IDLE_CHECK: Duration = Duration::from_secs(5);

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    /// The proxy thread (`None` off the proxy threads).
    shard: Option<usize>,
    source_pod: String,
    own: Identity,
    peer: IpAddr,
    expected: Identity,
}

/// What a pooled connection and the task driving it both see.
struct Usage {
    streams: AtomicUsize,
    /// Milliseconds since the pool's start when the last stream ended or began.
    last_active: AtomicU64,
    /// Set by the task driving the connection when it ends.
    closed: Arc<AtomicBool>,
}

struct Pooled {
    id: u64,
    send: SendRequest<Bytes>,
    local: SocketAddr,
    usage: Arc<Usage>,
}

type Conns = Mutex<HashMap<Key, Vec<Arc<Pooled>>>>;
/// Handshakes under way, by key: `Some(made)` once one has ended.
type Attempts = Mutex<HashMap<Key, watch::Receiver<Option<bool>>>>;

enum Attempt {
    Lead(Box<Lead>),
    Follow(watch::Receiver<Option<bool>>),
}

/// The caller making a key's connection. Dropped unfinished (its caller gave up), it tells
/// the followers nothing was made, so one of them makes it.
struct Lead {
    attempts: Arc<Attempts>,
    key: Key,
    tx: watch::Sender<Option<bool>>,
}

impl Lead {
    fn finish(self, made: bool) {
        let _ = self.tx.send(Some(made));
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// A stream's place on its connection, given back when the tunnel is dropped.
pub struct StreamSlot {
    usage: Arc<Usage>,
    epoch: Instant,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.usage
            .last_active
            .store(millis_since(self.epoch), Ordering::Relaxed);
        self.usage.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

pub struct TunnelPool {
    conns: Arc<Conns>,
    attempts: Arc<Attempts>,
    next_id: AtomicU64,
    epoch: Instant,
    /// TLS connections opened to peers' tunnel ports, for the metric.
    opened: prometheus_client::metrics::counter::Counter,
}

impl TunnelPool {
    pub fn new(opened: prometheus_client::metrics::counter::Counter) -> Self {
        Self {
            conns: Arc::default(),
            attempts: Arc::default(),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
            opened,
        }
    }

    /// A tunnel for one connection from the pod `source_pod`: a new stream on a pooled
    /// connection when one has room, else on a new connection. Connections that want one at
    /// the same moment wait for a single handshake rather than each making its own. A pooled
    /// connection found broken is dropped and the stream opened on a new one.
    pub async fn open(
        &self,
        netns: &Netns,
        host: &HostNetns,
        source_pod: &str,
        to: &TunnelTo<'_>,
        connect_timeout: Duration,
    ) -> Result<(Tunnel, SocketAddr), HboneError> {
        let key = Key {
            shard: Shards::current(),
            source_pod: source_pod.to_owned(),
            own: to.source.identity.clone(),
            peer: to.target.ip(),
            expected: to.expected.clone(),
        };
        // Bounded: each turn either uses a connection, makes one, or follows another's
        // attempt that ended; a few turns cover a broken pooled connection and a handshake
        // abandoned by its caller.
        for _ in 0..4 {
            if let Some((conn, slot)) = self.checkout(&key) {
                match connect::stream(conn.send.clone(), to).await {
                    Ok(t) => return Ok((t.holding(slot), conn.local)),
                    // The connection is gone (reset, GOAWAY, closed): a new one may do.
                    Err(HboneError::H2 { .. }) => {
                        remove(&self.conns, &key, conn.id);
                        continue;
                    }
                    // A peer that does not answer within the handshake timeout may have
                    // stalled: later tunnels get a new connection instead of the same wait.
                    Err(e @ HboneError::Timeout { .. }) => {
                        remove(&self.conns, &key, conn.id);
                        return Err(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            match self.attempt(&key) {
                Attempt::Follow(mut made) => {
                    // The other caller's handshake ended: its connection has room for this
                    // stream too. If it failed, this one would likely fail the same way.
                    match made.wait_for(Option::is_some).await.map(|made| *made) {
                        Ok(Some(false)) => {
                            return Err(HboneError::SharedAttempt {
                                peer: SocketAddr::new(to.target.ip(), super::HBONE_PORT),
                            });
                        }
                        Ok(_) | Err(_) => continue,
                    }
                }
                Attempt::Lead(lead) => {
                    let made = self.connect(&key, netns, host, to, connect_timeout).await;
                    lead.finish(made.is_ok());
                    let (conn, slot) = made?;
                    let tunnel = connect::stream(conn.send.clone(), to).await?;
                    return Ok((tunnel.holding(slot), conn.local));
                }
            }
        }
        Err(HboneError::SharedAttempt {
            peer: SocketAddr::new(to.target.ip(), super::HBONE_PORT),
        })
    }

    /// Whether this caller makes the key's next connection or follows the attempt under way.
    fn attempt(&self, key: &Key) -> Attempt {
        let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(made) = attempts.get(key) {
            return Attempt::Follow(made.clone());
        }
        let (tx, rx) = watch::channel(None);
        attempts.insert(key.clone(), rx);
        Attempt::Lead(Box::new(Lead {
            attempts: self.attempts.clone(),
            key: key.clone(),
            tx,
        }))
    }

    /// A new connection for `key`, in the pool with this caller's stream counted.
    async fn connect(
        &self,
        key: &Key,
        netns: &Netns,
        host: &HostNetns,
        to: &TunnelTo<'_>,
        connect_timeout: Duration,
    ) -> Result<(Arc<Pooled>, StreamSlot), HboneError> {
        let (send, local, closed) = connect::handshake(netns, host, to, connect_timeout).await?;
        self.opened.inc();
        let usage = Arc::new(Usage {
            streams: AtomicUsize::new(1),
            last_active: AtomicU64::new(millis_since(self.epoch)),
            closed,
        });
        let conn = Arc::new(Pooled {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            send,
            local,
            usage: usage.clone(),
        });
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .push(conn.clone());
        self.watch_idle(key.clone(), &conn);
        let slot = StreamSlot {
            usage,
            epoch: self.epoch,
        };
        Ok((conn, slot))
    }

    /// A live connection of `key` with room for one more stream, the stream counted.
    fn checkout(&self, key: &Key) -> Option<(Arc<Pooled>, StreamSlot)> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.get_mut(key)?;
        list.retain(|c| !c.usage.closed.load(Ordering::Acquire));
        let conn = list
            .iter()
            .find(|c| c.usage.streams.load(Ordering::Acquire) < MAX_STREAMS as usize)?
            .clone();
        conn.usage.streams.fetch_add(1, Ordering::AcqRel);
        conn.usage
            .last_active
            .store(millis_since(self.epoch), Ordering::Relaxed);
        let slot = StreamSlot {
            usage: conn.usage.clone(),
            epoch: self.epoch,
        };
        Some((conn, slot))
    }

    /// Lets the connection go once it has had no stream for [`IDLE_TIMEOUT`]: the pool's
    /// handle dropped, the connection closes when its last stream does. The task holds no
    /// handle itself, or the connection would never see them all dropped.
    fn watch_idle(&self, key: Key, conn: &Pooled) {
        let conns: Weak<Conns> = Arc::downgrade(&self.conns);
        let (usage, id, epoch) = (conn.usage.clone(), conn.id, self.epoch);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_CHECK);
            loop {
                tick.tick().await;
                let Some(conns) = conns.upgrade() else { return };
                if usage.closed.load(Ordering::Acquire) {
                    remove(&conns, &key, id);
                    return;
                }
                // Decided under the pool's lock, which a checkout takes to add a stream.
                let mut map = conns.lock().unwrap_or_else(|p| p.into_inner());
                let idle = usage.streams.load(Ordering::Acquire) == 0
                    && millis_since(epoch)
                        .saturating_sub(usage.last_active.load(Ordering::Relaxed))
                        >= IDLE_TIMEOUT.as_millis() as u64;
                if idle {
                    remove_from(&mut map, &key, id);
                    return;
                }
            }
        });
    }

    /// Pooled connections now, for the admin API and tests.
    pub fn connections(&self) -> usize {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }
}

fn remove(conns: &Conns, key: &Key, id: u64) {
    remove_from(
        &mut conns.lock().unwrap_or_else(|p| p.into_inner()),
        key,
        id,
    );
}

fn remove_from(map: &mut HashMap<Key, Vec<Arc<Pooled>>>, key: &Key, id: u64) {
    if let Some(list) = map.get_mut(key) {
        list.retain(|c| c.id != id);
        if list.is_empty() {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool with one connection under `key`: HTTP/2 over an in-memory pipe, a server that
    /// accepts streams and drops them.
    async fn pool_with_one(key: &Key) -> (TunnelPool, Arc<AtomicBool>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            if let Ok(mut conn) = h2::server::handshake(server).await {
                while let Some(Ok(_)) = conn.accept().await {}
            }
        });
        let (send, conn) = h2::client::handshake(client).await.expect("h2");
        tokio::spawn(conn);
        let pool = TunnelPool::new(Default::default());
        let closed = Arc::new(AtomicBool::new(false));
        let pooled = Arc::new(Pooled {
            id: 7,
            send,
            local: "10.244.1.10:40000".parse().expect("addr"),
            usage: Arc::new(Usage {
                streams: AtomicUsize::new(0),
                last_active: AtomicU64::new(0),
                closed: closed.clone(),
            }),
        });
        pool.conns
            .lock()
            .expect("lock")
            .insert(key.clone(), vec![pooled]);
        (pool, closed)
    }

    fn key(peer: &str) -> Key {
        let id = |sa: &str| {
            Identity::parse(&format!("spiffe://cluster.local/ns/production/sa/{sa}"))
                .expect("identity")
        };
        Key {
            shard: None,
            source_pod: "uid-1".into(),
            own: id("sleep"),
            peer: peer.parse().expect("ip"),
            expected: id("db"),
        }
    }

    #[tokio::test]
    async fn a_connection_takes_streams_up_to_its_limit_and_each_given_back_makes_room() {
        let k = key("10.244.2.10");
        let (pool, _) = pool_with_one(&k).await;
        let slots: Vec<StreamSlot> = (0..MAX_STREAMS)
            .map(|_| pool.checkout(&k).expect("room").1)
            .collect();
        assert!(pool.checkout(&k).is_none(), "a stream past the limit");
        drop(slots.into_iter().next());
        let (conn, _slot) = pool.checkout(&k).expect("room again");
        assert_eq!(conn.id, 7);
        // Another destination pod has a connection of its own.
        assert!(pool.checkout(&key("10.244.2.11")).is_none());
    }

    #[tokio::test]
    async fn a_connection_that_ended_takes_no_more_streams() {
        let k = key("10.244.2.10");
        let (pool, closed) = pool_with_one(&k).await;
        assert_eq!(pool.connections(), 1);
        closed.store(true, Ordering::Release);
        assert!(pool.checkout(&k).is_none());
        assert_eq!(pool.connections(), 0);
    }
}
