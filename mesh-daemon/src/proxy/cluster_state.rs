//! What one client pod's proxy remembers about each upstream cluster between requests, as a
//! sidecar's Envoy would: requests in flight per endpoint (least-request balancing), the
//! round-robin position, outlier detection (consecutive errors, ejections), and the
//! circuit-breaker counters of the connection pool.
// foldhash, not SipHash: these maps are looked up on every request and their keys are not
// chosen by a client.
use hashbrown::HashMap;
use std::{
    hash::{Hash as _, Hasher as _},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    routing::{
        Cluster,
        policy::{LbPolicy, OutlierPolicy},
    },
    state::Endpoint,
};

/// Envoy's cap on an ejection's length (`max_ejection_time`).
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// One pod's view of every cluster it has used, by cluster name.
#[derive(Default)]
pub struct PodClusters {
    /// Keyed by the name each state holds: one copy of it.
    clusters: Mutex<HashMap<Arc<str>, Arc<ClusterState>>>,
}

impl PodClusters {
    /// Endpoints of cluster `name` that outlier detection has ejected now (none for a
    /// cluster this pod has not used), for the admin API.
    pub fn ejected(&self, name: &str) -> Vec<SocketAddr> {
        let m = self
            .clusters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.get(name).map_or_else(Vec::new, |s| s.ejected())
    }

    pub fn get(&self, name: &str) -> Arc<ClusterState> {
        let mut m = self
            .clusters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Looked up before inserting: the common hit copies no name.
        if let Some(state) = m.get(name) {
            return state.clone();
        }
        let state = Arc::new(ClusterState {
            name: Arc::from(name),
            ..ClusterState::default()
        });
        m.insert(state.name.clone(), state.clone());
        state
    }
}

/// How an attempt on an endpoint ended, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status.
    Status(u16),
    /// Connect failure, timeout or reset: the error is local to the proxy's side.
    LocalOriginFailure,
}

#[derive(Default)]
struct EndpointStats {
    active: u32,
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local: u32,
    ejected_until: Option<Instant>,
    /// Ejections in a row: each makes the next one longer.
    ejections: u32,
    /// When the endpoint last came back (or was first seen): quiet intervals since then
    /// forgive earlier ejections.
    healthy_since: Option<Instant>,
}

#[derive(Default)]
pub struct ClusterState {
    /// The cluster's name, shared with the pool's keys.
    pub name: Arc<str>,
    next: AtomicUsize,
    endpoints: Mutex<HashMap<SocketAddr, EndpointStats>>,
    /// Requests in flight to this cluster (the `http2MaxRequests` breaker).
    pub requests: Arc<AtomicU32>,
    /// Retries in flight (the `maxRetries` breaker).
    pub retries: Arc<AtomicU32>,
    /// Upstream TCP connections open (the `maxConnections` breaker).
    pub connections: Arc<AtomicU32>,
    /// Requests waiting for a connection (the `http1MaxPendingRequests` breaker).
    pub pending: Arc<AtomicU32>,
    /// When the latest ejection ends (nanoseconds after [`epoch`]): before it, some endpoint
    /// may be ejected and choosing must look at each; after it, none is.
    ejections_end: std::sync::atomic::AtomicU64,
}

/// A fixed instant to express times as plain numbers.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// A counter slot taken against a limit; given back when dropped.
pub struct Slot(Arc<AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Takes one of `limit` slots of `counter`, or `None` when all are taken (overflow).
pub fn take_slot(counter: &Arc<AtomicU32>, limit: u32) -> Option<Slot> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < limit).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(counter.clone()))
}

/// An endpoint's request in flight, counted for least-request balancing until dropped.
pub struct InFlight {
    state: Arc<ClusterState>,
    addr: SocketAddr,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(e) = self.state.lock().get_mut(&self.addr) {
            e.active = e.active.saturating_sub(1);
        }
    }
}

/// What choosing an endpoint may look at besides the cluster.
pub struct Choice<'a> {
    /// The client reached the VIP over IPv4: prefer IPv4 endpoints.
    pub v4: bool,
    /// The request's consistent-hash key, when the policy hashes and the key is present.
    pub hash: Option<u64>,
    /// Endpoints earlier attempts of this request used (Envoy's `previous_hosts`
    /// predicate): avoided while others remain.
    pub tried: &'a [SocketAddr],
}

impl ClusterState {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, EndpointStats>> {
        self.endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An endpoint by the cluster's load-balancing policy, skipping ejected endpoints
    /// (unless fewer than `minHealthPercent` are healthy: Envoy's panic mode).
    pub fn choose(
        self: &Arc<Self>,
        cluster: &Cluster,
        c: &Choice<'_>,
    ) -> Option<(SocketAddr, InFlight)> {
        let now = Instant::now();
        let addr = if c.tried.is_empty()
            && nanos_since_epoch(now) >= self.ejections_end.load(Ordering::Acquire)
        {
            self.pick_unfiltered(cluster, c)?
        } else {
            self.pick_filtered(cluster, c, now)?
        };
        self.lock().entry(addr).or_default().active += 1;
        Some((
            addr,
            InFlight {
                state: self.clone(),
                addr,
            },
        ))
    }

    /// The common case, nothing ejected and nothing tried yet: a pick among the endpoints of
    /// the client's address family without building any list.
    fn pick_unfiltered(&self, cluster: &Cluster, c: &Choice<'_>) -> Option<SocketAddr> {
        let in_family = cluster
            .endpoints
            .iter()
            .filter(|e| e.addr.is_ipv4() == c.v4)
            .count();
        let any_family = in_family == 0;
        let n = if any_family {
            cluster.endpoints.len()
        } else {
            in_family
        };
        if n == 0 {
            return None;
        }
        let pool = || {
            cluster
                .endpoints
                .iter()
                .filter(move |e| any_family || e.addr.is_ipv4() == c.v4)
        };
        let nth = |i: usize| pool().nth(i).map(|e| e.addr);
        match (&cluster.policy.lb, c.hash) {
            (LbPolicy::Hash(_), Some(h)) => pool()
                .max_by_key(|e| rendezvous_score(h, e))
                .map(|e| e.addr),
            (LbPolicy::RoundRobin, _) => nth(self.next.fetch_add(1, Ordering::Relaxed) % n),
            (LbPolicy::LeastRequest, _) if n > 1 => {
                let a = fastrand::usize(..n);
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                let (a, b) = (nth(a)?, nth(b)?);
                let stats = self.lock();
                let load = |x: &SocketAddr| stats.get(x).map_or(0, |s| s.active);
                Some(if load(&b) < load(&a) { b } else { a })
            }
            _ => nth(fastrand::usize(..n)),
        }
    }

    /// With ejections or earlier attempts to leave out, a pick among what is left.
    fn pick_filtered(&self, cluster: &Cluster, c: &Choice<'_>, now: Instant) -> Option<SocketAddr> {
        let policy = &cluster.policy;
        let family: Vec<&Endpoint> = {
            let same: Vec<&Endpoint> = cluster
                .endpoints
                .iter()
                .filter(|e| e.addr.is_ipv4() == c.v4)
                .collect();
            if same.is_empty() {
                cluster.endpoints.iter().collect()
            } else {
                same
            }
        };
        if family.is_empty() {
            return None;
        }
        let mut stats = self.lock();
        let healthy: Vec<&Endpoint> = family
            .iter()
            .copied()
            .filter(|e| !stats.entry(e.addr).or_default().ejected(now))
            .collect();
        let panic = policy
            .outlier
            .is_some_and(|o| healthy.len() * 100 < family.len() * o.min_health_percent as usize);
        let pool = if panic { family } else { healthy };
        let fresh: Vec<&Endpoint> = pool
            .iter()
            .copied()
            .filter(|e| !c.tried.contains(&e.addr))
            .collect();
        let pool = if fresh.is_empty() { pool } else { fresh };
        if pool.is_empty() {
            return None;
        }
        let i = match (&policy.lb, c.hash) {
            (LbPolicy::Hash(_), Some(h)) => rendezvous(&pool, h),
            (LbPolicy::RoundRobin, _) => self.next.fetch_add(1, Ordering::Relaxed) % pool.len(),
            (LbPolicy::LeastRequest, _) if pool.len() > 1 => {
                let a = fastrand::usize(..pool.len());
                let b = (a + 1 + fastrand::usize(..pool.len() - 1)) % pool.len();
                let load = |i: usize| stats.get(&pool[i].addr).map_or(0, |s| s.active);
                if load(b) < load(a) { b } else { a }
            }
            _ => fastrand::usize(..pool.len()),
        };
        Some(pool[i].addr)
    }

    /// Counts an attempt's outcome against its endpoint and ejects it when a threshold is
    /// reached and no more than `maxEjectionPercent` of `cluster` would be ejected. Returns
    /// whether this outcome ejected it.
    pub fn report(&self, cluster: &Cluster, addr: SocketAddr, outcome: Outcome) -> bool {
        let Some(o) = cluster.policy.outlier else {
            return false;
        };
        let now = Instant::now();
        let mut stats = self.lock();
        let e = stats.entry(addr).or_default();
        let split = o.consecutive_local_origin.is_some();
        // Without the split, a local failure counts as the 503 it turns into.
        let status = match outcome {
            Outcome::LocalOriginFailure if split => {
                e.consecutive_local += 1;
                None
            }
            Outcome::LocalOriginFailure => Some(503),
            Outcome::Status(s) => {
                if split {
                    e.consecutive_local = 0;
                }
                Some(s)
            }
        };
        if let Some(s) = status {
            if (500..600).contains(&s) {
                e.consecutive_5xx += 1;
                if matches!(s, 502..=504) {
                    e.consecutive_gateway += 1;
                } else {
                    e.consecutive_gateway = 0;
                }
            } else {
                e.consecutive_5xx = 0;
                e.consecutive_gateway = 0;
            }
        }
        let reached = |count: u32, threshold: Option<u32>| threshold.is_some_and(|t| count >= t);
        let trip = reached(e.consecutive_5xx, o.consecutive_5xx)
            || reached(e.consecutive_gateway, o.consecutive_gateway)
            || reached(e.consecutive_local, o.consecutive_local_origin);
        if !trip || e.ejected(now) {
            return false;
        }
        // Among the endpoints of the same address family: a dual-stack pod is one endpoint.
        let family = || {
            cluster
                .endpoints
                .iter()
                .filter(|ep| ep.addr.is_ipv4() == addr.is_ipv4())
        };
        let total = family().count().max(1);
        let ejected = family()
            .filter(|ep| stats.get(&ep.addr).is_some_and(|s| s.ejected(now)))
            .count();
        if ejected * 100 >= total * o.max_ejection_percent as usize {
            return false;
        }
        if let Some(e) = stats.get_mut(&addr) {
            e.eject(now, &o);
            if let Some(until) = e.ejected_until {
                self.ejections_end
                    .fetch_max(nanos_since_epoch(until), Ordering::AcqRel);
            }
        }
        true
    }

    /// Addresses ejected now, for the admin API.
    pub fn ejected(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|(_, s)| s.ejected(now))
            .map(|(a, _)| *a)
            .collect()
    }
}

impl EndpointStats {
    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| now < t)
    }

    /// Each ejection in a row lasts base x n (at most five minutes); every quiet interval
    /// since the last return forgives one earlier ejection, as Envoy decrements it.
    fn eject(&mut self, now: Instant, o: &OutlierPolicy) {
        let quiet = self
            .healthy_since
            .or(self.ejected_until)
            .map_or(0, |since| {
                let secs = o.interval.as_secs_f64().max(0.001);
                (now.saturating_duration_since(since).as_secs_f64() / secs) as u32
            });
        self.ejections = self.ejections.saturating_sub(quiet) + 1;
        let length = o
            .base_ejection_time
            .saturating_mul(self.ejections)
            .min(MAX_EJECTION.max(o.base_ejection_time));
        self.ejected_until = Some(now + length);
        self.healthy_since = Some(now + length);
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        self.consecutive_local = 0;
    }
}

/// Highest-random-weight hashing: the endpoint whose hash with the key is largest. A key
/// stays on its endpoint while that endpoint stays, and only the keys of a removed
/// endpoint move, as with Envoy's ring hash.
fn rendezvous(pool: &[&Endpoint], key: u64) -> usize {
    (0..pool.len())
        .max_by_key(|&i| rendezvous_score(key, pool[i]))
        .unwrap_or(0)
}

fn rendezvous_score(key: u64, e: &Endpoint) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    e.addr.hash(&mut h);
    h.finish()
}

/// The `useSourceIp` key of a client pod: its first address (every connection from the
/// pod reaches the proxy from loopback, so the socket's peer says nothing).
pub fn source_hash(pod: Option<&crate::state::PodInfo>, uid: &str) -> u64 {
    match pod.and_then(|p| p.ips.first()) {
        Some(ip) => hash_key(ip.to_string().as_bytes()),
        None => hash_key(uid.as_bytes()),
    }
}

/// A stable 64-bit hash of a consistent-hash key.
pub fn hash_key(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::policy::{ClusterPolicy, HashKey};

    fn cluster(n: u8, lb: LbPolicy, outlier: Option<OutlierPolicy>) -> Cluster {
        let mut policy = ClusterPolicy::resolve(None, None, 80, Duration::from_secs(1));
        policy.lb = lb;
        policy.outlier = outlier;
        Cluster {
            name: "outbound|80||svc".into(),
            host: "svc".into(),
            port: 80,
            subset: None,
            endpoints: (1..=n)
                .map(|i| Endpoint {
                    addr: SocketAddr::from(([10, 0, 0, i], 80)),
                    pod: None,
                })
                .collect(),
            policy,
        }
    }

    fn pick(s: &Arc<ClusterState>, c: &Cluster, hash: Option<u64>) -> SocketAddr {
        let choice = Choice {
            v4: true,
            hash,
            tried: &[],
        };
        s.choose(c, &choice).map(|(a, _)| a).expect("an endpoint")
    }

    #[test]
    fn round_robin_takes_turns() {
        let (s, c) = (
            Arc::new(ClusterState::default()),
            cluster(3, LbPolicy::RoundRobin, None),
        );
        let picks: Vec<SocketAddr> = (0..6).map(|_| pick(&s, &c, None)).collect();
        assert_eq!(picks[0..3], picks[3..6]);
        assert_ne!(picks[0], picks[1]);
        assert_ne!(picks[1], picks[2]);
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let (s, c) = (
            Arc::new(ClusterState::default()),
            cluster(2, LbPolicy::LeastRequest, None),
        );
        let choice = Choice {
            v4: true,
            hash: None,
            tried: &[],
        };
        let (busy, _held) = s.choose(&c, &choice).expect("endpoint");
        // With one request held on `busy`, both choices see it loaded: the other one wins.
        for _ in 0..20 {
            assert_ne!(pick(&s, &c, None), busy);
        }
    }

    #[test]
    fn a_hash_key_stays_on_its_endpoint() {
        let (s, c) = (
            Arc::new(ClusterState::default()),
            cluster(5, LbPolicy::Hash(HashKey::Header("x-user".into())), None),
        );
        let alice = hash_key(b"alice");
        let first = pick(&s, &c, Some(alice));
        assert!((0..50).all(|_| pick(&s, &c, Some(alice)) == first));
        let spread: std::collections::BTreeSet<SocketAddr> = (0..200u32)
            .map(|k| pick(&s, &c, Some(hash_key(&k.to_be_bytes()))))
            .collect();
        assert!(
            spread.len() >= 4,
            "keys spread over {} endpoints",
            spread.len()
        );
    }

    fn outlier(max_pct: u32) -> OutlierPolicy {
        OutlierPolicy {
            consecutive_5xx: Some(5),
            consecutive_gateway: None,
            consecutive_local_origin: None,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_millis(200),
            max_ejection_percent: max_pct,
            min_health_percent: 0,
        }
    }

    #[test]
    fn five_consecutive_5xx_eject_within_the_max_percent() {
        let (s, c) = (
            Arc::new(ClusterState::default()),
            cluster(2, LbPolicy::Random, Some(outlier(50))),
        );
        let [a, b] = [c.endpoints[0].addr, c.endpoints[1].addr];
        for _ in 0..4 {
            assert!(!s.report(&c, a, Outcome::Status(500)));
        }
        // A success in between starts the count again.
        s.report(&c, a, Outcome::Status(200));
        for _ in 0..4 {
            assert!(!s.report(&c, a, Outcome::Status(503)));
        }
        assert!(s.report(&c, a, Outcome::LocalOriginFailure));
        assert_eq!(s.ejected(), [a]);
        assert!((0..20).all(|_| pick(&s, &c, None) == b));
        // Ejecting b too would pass 50%: it stays.
        for _ in 0..5 {
            assert!(!s.report(&c, b, Outcome::Status(500)));
        }
        std::thread::sleep(Duration::from_millis(250));
        assert!(s.ejected().is_empty(), "a returns after its ejection time");
    }

    #[test]
    fn each_ejection_in_a_row_lasts_longer() {
        let mut e = EndpointStats::default();
        let o = outlier(100);
        let now = Instant::now();
        e.eject(now, &o);
        let first = e.ejected_until.map(|t| t - now);
        // Ejected again as soon as it is back: twice the base.
        let back = now + Duration::from_millis(200);
        e.eject(back, &o);
        let second = e.ejected_until.map(|t| t - back);
        assert_eq!(first, Some(Duration::from_millis(200)));
        assert_eq!(second, Some(Duration::from_millis(400)));
    }

    #[test]
    fn below_min_health_percent_ejections_are_ignored() {
        let mut o = outlier(100);
        o.min_health_percent = 60;
        let (s, c) = (
            Arc::new(ClusterState::default()),
            cluster(2, LbPolicy::RoundRobin, Some(o)),
        );
        let a = c.endpoints[0].addr;
        for _ in 0..5 {
            s.report(&c, a, Outcome::Status(502));
        }
        assert_eq!(s.ejected(), [a]);
        // One healthy of two is 50% < 60%: panic mode balances over both again.
        let picks: std::collections::BTreeSet<SocketAddr> =
            (0..4).map(|_| pick(&s, &c, None)).collect();
        assert_eq!(picks.len(), 2);
    }
}
