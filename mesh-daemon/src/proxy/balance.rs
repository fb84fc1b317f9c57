//! Choosing an endpoint of a cluster.
use std::net::SocketAddr;

use crate::routing::Cluster;

/// A uniformly random endpoint of `cluster`, of the address family the client dialled when
/// the cluster has one (a client that reached the VIP over IPv6 stays on IPv6).
pub fn pick_endpoint(cluster: &Cluster, client_used_v4: bool) -> Option<SocketAddr> {
    let same = cluster
        .endpoints
        .iter()
        .filter(|e| e.addr.is_ipv4() == client_used_v4)
        .count();
    let (n, family) = if same == 0 {
        (cluster.endpoints.len(), None)
    } else {
        (same, Some(client_used_v4))
    };
    if n == 0 {
        return None;
    }
    cluster
        .endpoints
        .iter()
        .filter(|e| family.is_none_or(|v4| e.addr.is_ipv4() == v4))
        .nth(fastrand::usize(..n))
        .map(|e| e.addr)
}
