//! What a snapshot works out on first use and then shares. A snapshot never changes, so
//! anything computed from it alone (a cluster: endpoints narrowed to a subset, the
//! DestinationRule's policy merged and defaulted; a Service's default route) holds for the
//! snapshot's life: the first request builds it, every later one finds it. Built per
//! request, they cost microseconds and a handful of allocations each.
use std::{
    hash::Hash,
    sync::{Arc, RwLock},
};

use hashbrown::{Equivalent, HashMap};

use super::table::{Cluster, VirtualHost};

/// Entries beyond this are built per request and not kept. Keys come from configuration
/// (hosts and subsets that routes name) and from enrolled namespaces, so a real mesh stays
/// far below it; the cap only stops a pathological configuration from growing forever.
const MAX_ENTRIES: usize = 1 << 16;

#[derive(Debug)]
pub struct Memo<K, V> {
    map: RwLock<HashMap<K, V>>,
}

impl<K, V> Default for Memo<K, V> {
    fn default() -> Self {
        Self {
            map: RwLock::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq, V: Clone> Memo<K, V> {
    /// The value for `query`, built by `build` the first time. `query` borrows what the
    /// caller has, so a hit allocates nothing.
    pub fn get_or_build<Q>(&self, query: Q, build: impl FnOnce() -> V) -> V
    where
        Q: Hash + Equivalent<K> + Into<K>,
    {
        // A poisoned lock only means another thread panicked mid-insert; the map is intact.
        if let Some(hit) = self
            .map
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&query)
        {
            return hit.clone();
        }
        let built = build();
        let mut map = self
            .map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() < MAX_ENTRIES {
            // Another thread may have built it meanwhile; keep the first so all share one.
            return map.entry(query.into()).or_insert(built).clone();
        }
        built
    }
}

/// Clusters by (client namespace, host, port, subset); `None` is kept too: a subset that is
/// not defined stays undefined for the snapshot's life.
pub type Clusters = Memo<ClusterKey, Option<Arc<Cluster>>>;
/// Default routes (no VirtualService) by (host, port).
pub type DefaultRoutes = Memo<(String, u16), Option<Arc<VirtualHost>>>;

#[derive(Hash, PartialEq, Eq, Debug)]
pub struct ClusterKey {
    namespace: Box<str>,
    host: Box<str>,
    port: u16,
    subset: Option<Box<str>>,
}

/// What a request asks for, borrowed. Hashes as [`ClusterKey`] does (same fields, same
/// order; `Box<str>` and `&str` both hash as `str`).
#[derive(Hash, Clone, Copy)]
pub struct ClusterQuery<'a> {
    pub namespace: &'a str,
    pub host: &'a str,
    pub port: u16,
    pub subset: Option<&'a str>,
}

impl Equivalent<ClusterKey> for ClusterQuery<'_> {
    fn equivalent(&self, k: &ClusterKey) -> bool {
        self.port == k.port
            && *self.host == *k.host
            && *self.namespace == *k.namespace
            && self.subset == k.subset.as_deref()
    }
}

impl From<ClusterQuery<'_>> for ClusterKey {
    fn from(q: ClusterQuery<'_>) -> Self {
        ClusterKey {
            namespace: q.namespace.into(),
            host: q.host.into(),
            port: q.port,
            subset: q.subset.map(Into::into),
        }
    }
}

/// `(host, port)` borrowed; hashes as `(String, u16)` does.
#[derive(Hash, Clone, Copy)]
pub struct HostPort<'a>(pub &'a str, pub u16);

impl Equivalent<(String, u16)> for HostPort<'_> {
    fn equivalent(&self, k: &(String, u16)) -> bool {
        self.1 == k.1 && self.0 == k.0
    }
}

impl From<HostPort<'_>> for (String, u16) {
    fn from(q: HostPort<'_>) -> Self {
        (q.0.to_owned(), q.1)
    }
}
