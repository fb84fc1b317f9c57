//! The redirect decision: which connects go to the daemon and which go straight out.
use mesh_common::{
    Cidr4, Cidr6, DAEMON_SOCKET_MARK, MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS,
    POD_FLAG_REDIRECT_OUTBOUND, PodPolicy, stats,
};

use crate::maps::PODS;

pub enum Verdict {
    /// Send to the daemon's listener on this port.
    Redirect(u16),
    /// Leave alone; count under this `stats` index.
    Skip(u32),
}

/// Common checks; returns the pod's policy when the connect is a candidate.
#[inline(always)]
fn enrolled(netns: u64, mark: u32) -> Result<&'static PodPolicy, u32> {
    if mark == DAEMON_SOCKET_MARK {
        return Err(stats::DAEMON_OWN);
    }
    // SAFETY: the value is only read, and the daemon replaces entries whole.
    match unsafe { PODS.get(netns) } {
        Some(p) if p.flags & POD_FLAG_REDIRECT_OUTBOUND != 0 => Ok(p),
        _ => Err(stats::NOT_ENROLLED),
    }
}

#[inline(always)]
fn port_excluded(p: &PodPolicy, port: u16) -> bool {
    let n = p.excluded_ports_len as usize;
    let mut i = 0;
    while i < MAX_EXCLUDED_PORTS {
        if i < n && p.excluded_ports[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

#[inline(always)]
fn in_v4(cidrs: &[Cidr4; MAX_EXCLUDED_CIDRS], n: u8, addr: [u8; 4]) -> bool {
    let mut i = 0;
    while i < MAX_EXCLUDED_CIDRS {
        if i < n as usize {
            let c = &cidrs[i];
            let a = u32::from_ne_bytes(addr) & u32::from_ne_bytes(c.mask);
            if a == u32::from_ne_bytes(c.addr) {
                return true;
            }
        }
        i += 1;
    }
    false
}

#[inline(always)]
fn in_v6(cidrs: &[Cidr6; MAX_EXCLUDED_CIDRS], n: u8, addr: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < MAX_EXCLUDED_CIDRS {
        if i < n as usize {
            let c = &cidrs[i];
            let mut all = true;
            let mut w = 0;
            while w < 4 {
                let o = w * 4;
                let a = u32::from_ne_bytes([addr[o], addr[o + 1], addr[o + 2], addr[o + 3]]);
                let m =
                    u32::from_ne_bytes([c.mask[o], c.mask[o + 1], c.mask[o + 2], c.mask[o + 3]]);
                let n =
                    u32::from_ne_bytes([c.addr[o], c.addr[o + 1], c.addr[o + 2], c.addr[o + 3]]);
                if a & m != n {
                    all = false;
                }
                w += 1;
            }
            if all {
                return true;
            }
        }
        i += 1;
    }
    false
}

#[inline(always)]
pub fn decide_v4(netns: u64, mark: u32, addr: [u8; 4], port: u16) -> Verdict {
    let p = match enrolled(netns, mark) {
        Ok(p) => p,
        Err(stat) => return Verdict::Skip(stat),
    };
    if addr[0] == 127 {
        return Verdict::Skip(stats::LOOPBACK);
    }
    if port_excluded(p, port) || in_v4(&p.excluded_v4, p.excluded_v4_len, addr) {
        return Verdict::Skip(stats::EXCLUDED);
    }
    Verdict::Redirect(p.redirect_port)
}

/// Returns the verdict and whether `addr` is an IPv4-mapped address.
#[inline(always)]
pub fn decide_v6(netns: u64, mark: u32, addr: &[u8; 16], port: u16) -> (Verdict, bool) {
    let p = match enrolled(netns, mark) {
        Ok(p) => p,
        Err(stat) => return (Verdict::Skip(stat), false),
    };
    let mut prefix_zero = true;
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            prefix_zero = false;
        }
        i += 1;
    }
    let mapped = prefix_zero && addr[10] == 0xff && addr[11] == 0xff;
    if mapped {
        let v4 = [addr[12], addr[13], addr[14], addr[15]];
        if v4[0] == 127 {
            return (Verdict::Skip(stats::LOOPBACK), true);
        }
        if port_excluded(p, port) || in_v4(&p.excluded_v4, p.excluded_v4_len, v4) {
            return (Verdict::Skip(stats::EXCLUDED), true);
        }
        return (Verdict::Redirect(p.redirect_port), true);
    }
    let loopback = prefix_zero
        && addr[10] == 0
        && addr[11] == 0
        && addr[12] == 0
        && addr[13] == 0
        && addr[14] == 0
        && addr[15] == 1;
    if loopback {
        return (Verdict::Skip(stats::LOOPBACK), false);
    }
    if port_excluded(p, port) || in_v6(&p.excluded_v6, p.excluded_v6_len, addr) {
        return (Verdict::Skip(stats::EXCLUDED), false);
    }
    (Verdict::Redirect(p.redirect_port), false)
}
