//! Typed access to the pinned maps.
use std::net::{IpAddr, SocketAddr};

use aya::maps::{HashMap, MapData, MapError, PerCpuArray};
use mesh_common::{
    Cidr4, Cidr6, ConnKey, FAMILY_V4, FAMILY_V6, MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS, OrigDst,
    POD_FLAG_REDIRECT_OUTBOUND, PodPolicy, stats,
};

use crate::enrollment::{Cidr, Exclusions};

/// An address as the maps hold it: 16 bytes (IPv4 in the first four) and its family.
pub fn kernel_addr(ip: IpAddr) -> ([u8; 16], u8) {
    let mut addr = [0u8; 16];
    match ip {
        IpAddr::V4(a) => {
            addr[..4].copy_from_slice(&a.octets());
            (addr, FAMILY_V4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

/// Copies `ports` into a map value's fixed slots; returns how many fit and reports the rest
/// (never silently dropped).
pub fn fill_ports(
    ports: &[u16],
    slots: &mut [u16; MAX_EXCLUDED_PORTS],
    what: &str,
    dropped: &mut Vec<String>,
) -> u8 {
    let mut n = 0;
    for port in ports {
        if n < MAX_EXCLUDED_PORTS {
            slots[n] = *port;
            n += 1;
        } else {
            dropped.push(format!("{what} {port} (at most {MAX_EXCLUDED_PORTS})"));
        }
    }
    n as u8
}

/// Builds the kernel's view of one enrolled pod. Returns the policy and the exclusions
/// that did not fit (reported, never silently dropped).
pub fn pod_policy(redirect_port: u16, ex: &Exclusions) -> (PodPolicy, Vec<String>) {
    let mut p = PodPolicy {
        flags: POD_FLAG_REDIRECT_OUTBOUND,
        redirect_port,
        ..PodPolicy::default()
    };
    let mut dropped = Vec::new();
    p.excluded_ports_len = fill_ports(
        &ex.outbound_ports,
        &mut p.excluded_ports,
        "excluded port",
        &mut dropped,
    );
    for c in &ex.outbound_cidrs {
        let fits = match c.addr {
            IpAddr::V4(_) => (p.excluded_v4_len as usize) < MAX_EXCLUDED_CIDRS,
            IpAddr::V6(_) => (p.excluded_v6_len as usize) < MAX_EXCLUDED_CIDRS,
        };
        if !fits {
            dropped.push(format!(
                "excluded CIDR {}/{} (at most {MAX_EXCLUDED_CIDRS} per family)",
                c.addr, c.prefix
            ));
            continue;
        }
        match c.addr {
            IpAddr::V4(_) => {
                p.excluded_v4[p.excluded_v4_len as usize] = cidr4(c);
                p.excluded_v4_len += 1;
            }
            IpAddr::V6(_) => {
                p.excluded_v6[p.excluded_v6_len as usize] = cidr6(c);
                p.excluded_v6_len += 1;
            }
        }
    }
    (p, dropped)
}

fn mask_bytes<const N: usize>(prefix: u8) -> [u8; N] {
    let mut m = [0u8; N];
    for (i, b) in m.iter_mut().enumerate() {
        let bits = (prefix as usize).saturating_sub(i * 8).min(8);
        *b = if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
    }
    m
}

fn cidr4(c: &Cidr) -> Cidr4 {
    let IpAddr::V4(a) = c.addr else {
        return Cidr4::default();
    };
    let mask = mask_bytes::<4>(c.prefix);
    let mut addr = a.octets();
    addr.iter_mut().zip(mask).for_each(|(a, m)| *a &= m);
    Cidr4 { addr, mask }
}

fn cidr6(c: &Cidr) -> Cidr6 {
    let IpAddr::V6(a) = c.addr else {
        return Cidr6::default();
    };
    let mask = mask_bytes::<16>(c.prefix);
    let mut addr = a.octets();
    addr.iter_mut().zip(mask).for_each(|(a, m)| *a &= m);
    Cidr6 { addr, mask }
}

/// `sl_pods`, written only by the reconciler.
pub struct PodsMap(HashMap<MapData, u64, PodPolicy>);

impl PodsMap {
    pub(super) fn new(m: HashMap<MapData, u64, PodPolicy>) -> Self {
        Self(m)
    }

    pub fn set(&mut self, netns_cookie: u64, policy: &PodPolicy) -> Result<(), MapError> {
        self.0.insert(netns_cookie, policy, 0)
    }

    pub fn remove(&mut self, netns_cookie: u64) -> Result<(), MapError> {
        match self.0.remove(&netns_cookie) {
            Err(MapError::KeyNotFound) => Ok(()),
            other => other,
        }
    }

    pub fn get(&self, netns_cookie: u64) -> Option<PodPolicy> {
        self.0.get(&netns_cookie, 0).ok()
    }

    pub fn cookies(&self) -> Vec<u64> {
        self.0.keys().filter_map(Result::ok).collect()
    }
}

/// `sl_orig_dst`, read by the proxy on every accepted connection. Lookups are plain
/// syscalls on a shared fd: no lock.
pub struct OrigDstMap(HashMap<MapData, ConnKey, OrigDst>);

impl OrigDstMap {
    pub(super) fn new(m: HashMap<MapData, ConnKey, OrigDst>) -> Self {
        Self(m)
    }

    /// Where the pod in `netns_cookie` meant to go when it connected from `peer` (the accepted
    /// socket's peer, i.e. the client's local address).
    pub fn lookup(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let (addr, family) = kernel_addr(peer.ip());
        let key = ConnKey {
            netns_cookie,
            port: peer.port(),
            addr,
            family,
            ..ConnKey::default()
        };
        let v = self.0.get(&key, 0).ok()?;
        let ip = match v.family {
            FAMILY_V4 => IpAddr::from([v.addr[0], v.addr[1], v.addr[2], v.addr[3]]),
            FAMILY_V6 => IpAddr::from(v.addr),
            _ => return None,
        };
        Some(SocketAddr::new(ip, v.port))
    }
}

/// `sl_stats`, summed over CPUs.
pub struct StatsMap(PerCpuArray<MapData, u64>);

impl StatsMap {
    pub(super) fn new(m: PerCpuArray<MapData, u64>) -> Self {
        Self(m)
    }

    pub fn read(&self) -> Vec<(&'static str, u64)> {
        (0..stats::COUNT)
            .map(|i| {
                let total = self
                    .0
                    .get(&i, 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or_default();
                (stats::NAMES[i as usize], total)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_masks_cidrs_and_reports_what_does_not_fit() {
        let ex = Exclusions {
            outbound_ports: (1..=20).collect(),
            inbound_ports: vec![],
            outbound_cidrs: vec![
                "10.1.2.3/8".parse().expect("cidr"),
                "fd00:1::5/33".parse().expect("cidr"),
            ],
        };
        let (p, dropped) = pod_policy(15001, &ex);
        assert_eq!(p.excluded_ports_len as usize, MAX_EXCLUDED_PORTS);
        assert_eq!(dropped.len(), 20 - MAX_EXCLUDED_PORTS);
        assert_eq!(p.excluded_v4[0].addr, [10, 0, 0, 0]);
        assert_eq!(p.excluded_v4[0].mask, [255, 0, 0, 0]);
        assert_eq!(p.excluded_v6[0].mask[4], 0x80);
        assert_eq!(p.excluded_v6[0].mask[3], 0xff);
        assert_eq!(p.excluded_v6[0].addr[15], 0);
    }
}
