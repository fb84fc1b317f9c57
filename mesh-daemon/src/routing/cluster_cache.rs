//! Clusters resolved once per snapshot. A cluster (endpoints narrowed to a subset, the
//! DestinationRule's policy merged and defaulted) depends only on the snapshot and on
//! (client namespace, host, port, subset), so the first request for it builds it and every
//! later one shares it: resolving it per request cost microseconds over large services.
use std::{
    hash::Hash,
    sync::{Arc, RwLock},
};

use hashbrown::{Equivalent, HashMap};

use super::table::Cluster;

/// Entries beyond this are built per request and not kept. The keys come from configuration
/// (hosts and subsets named by routes) and enrolled namespaces, so a real mesh stays far
/// below it; the cap only stops a pathological configuration from growing the map forever.
const MAX_ENTRIES: usize = 1 << 16;

#[derive(Hash, PartialEq, Eq, Debug)]
struct Key {
    namespace: Box<str>,
    host: Box<str>,
    port: u16,
    subset: Option<Box<str>>,
}

/// What a request asks for, borrowed: a hit costs no allocation. Hashes as [`Key`] does
/// (same fields, same order; `Box<str>` and `&str` hash as `str`).
#[derive(Hash, Clone, Copy)]
pub struct ClusterQuery<'a> {
    pub namespace: &'a str,
    pub host: &'a str,
    pub port: u16,
    pub subset: Option<&'a str>,
}

impl Equivalent<Key> for ClusterQuery<'_> {
    fn equivalent(&self, k: &Key) -> bool {
        self.port == k.port
            && *self.host == *k.host
            && *self.namespace == *k.namespace
            && self.subset == k.subset.as_deref()
    }
}

impl From<ClusterQuery<'_>> for Key {
    fn from(q: ClusterQuery<'_>) -> Self {
        Key {
            namespace: q.namespace.into(),
            host: q.host.into(),
            port: q.port,
            subset: q.subset.map(Into::into),
        }
    }
}

/// `None` is kept too: an undefined subset stays undefined for the snapshot's life.
#[derive(Debug, Default)]
pub struct ClusterCache {
    map: RwLock<HashMap<Key, Option<Arc<Cluster>>>>,
}

impl ClusterCache {
    pub fn get_or_build(
        &self,
        q: ClusterQuery<'_>,
        build: impl FnOnce() -> Option<Cluster>,
    ) -> Option<Arc<Cluster>> {
        // A poisoned lock only means another thread panicked mid-insert; the map is intact.
        if let Some(hit) = self
            .map
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&q)
        {
            return hit.clone();
        }
        let built = build().map(Arc::new);
        let mut map = self
            .map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() < MAX_ENTRIES {
            // Another thread may have built it meanwhile; keep the first so all share one.
            return map.entry(q.into()).or_insert(built).clone();
        }
        built
    }
}
