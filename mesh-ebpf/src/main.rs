//! Sidelane's eBPF programs.
//!
//! * `sl_connect4` / `sl_connect6` (`cgroup/connect4|6`, kernel 4.17+; `bpf_get_netns_cookie`
//!   needs 5.7): when a socket in an enrolled pod's network namespace connects over TCP, rewrite
//!   the destination to the daemon's outbound listener on the pod's own loopback and remember
//!   the original destination under the socket's cookie.
//! * `sl_sockops` (`sockops`, 4.13+; socket cookies 5.0+): once such a handshake completes,
//!   re-key the original destination by the client's local address, which is what the daemon
//!   sees as the peer when it accepts.
//!
//! * `sl_sk_lookup` (`sk_lookup`, 5.9+), attached to each enrolled pod's network namespace
//!   when the mesh has a CA: a TCP connection arriving for the pod's own address from
//!   elsewhere goes to the daemon's inbound listener in the pod, which applies
//!   PeerAuthentication; connections from the pod's own address (the daemon delivering, or
//!   the pod talking to itself), the tunnel port and excluded ports are left alone. With the
//!   listener gone (no daemon) the connection is dropped: enrolled pods fail closed.
//!
//! Every entry point is a thin wrapper around a `try_*` function; nothing here can panic.
#![no_std]
#![no_main]

mod maps;
mod policy;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, sk_lookup, sock_ops},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use core::ptr::read_volatile;

use mesh_common::{ConnKey, FAMILY_V4, FAMILY_V6, INBOUND_PASS_PORTS, InboundKey, OrigDst, stats};

use crate::{
    maps::{INBOUND, INBOUND_SOCKETS, ORIG_DST, PENDING, count},
    policy::{Verdict, decide_v4, decide_v6},
};

/// `connect()` proceeds (with the possibly rewritten address).
const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;

#[cgroup_sock_addr(connect4)]
pub fn sl_connect4(ctx: SockAddrContext) -> i32 {
    let _ = try_connect4(&ctx);
    // A failure to redirect must never fail the application's connect; it is counted.
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn sl_connect6(ctx: SockAddrContext) -> i32 {
    let _ = try_connect6(&ctx);
    ALLOW
}

#[sock_ops]
pub fn sl_sockops(ctx: SockOpsContext) -> u32 {
    let _ = try_sockops(&ctx);
    0
}

/// `sk_lookup` verdicts.
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;

#[sk_lookup]
pub fn sl_sk_lookup(ctx: SkLookupContext) -> u32 {
    try_sk_lookup(&ctx)
}

fn try_sk_lookup(ctx: &SkLookupContext) -> u32 {
    // Every field loaded up front with a volatile read at its own constant offset (see
    // `try_sockops`). SAFETY: the kernel hands a valid `bpf_sk_lookup`.
    let (family, protocol, port, local4, remote4, local6, remote6) = unsafe {
        let l = ctx.lookup;
        (
            read_volatile(&raw const (*l).family),
            read_volatile(&raw const (*l).protocol),
            read_volatile(&raw const (*l).local_port),
            read_volatile(&raw const (*l).local_ip4),
            read_volatile(&raw const (*l).remote_ip4),
            [
                read_volatile(&raw const (*l).local_ip6[0]),
                read_volatile(&raw const (*l).local_ip6[1]),
                read_volatile(&raw const (*l).local_ip6[2]),
                read_volatile(&raw const (*l).local_ip6[3]),
            ],
            [
                read_volatile(&raw const (*l).remote_ip6[0]),
                read_volatile(&raw const (*l).remote_ip6[1]),
                read_volatile(&raw const (*l).remote_ip6[2]),
                read_volatile(&raw const (*l).remote_ip6[3]),
            ],
        )
    };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let port = port as u16;
    let mut key = InboundKey::default();
    if family == AF_INET {
        // From the pod's own address: the daemon delivering, or the pod calling itself.
        if local4 == remote4 {
            return SK_PASS;
        }
        key.family = FAMILY_V4;
        key.addr[..4].copy_from_slice(&local4.to_ne_bytes());
    } else {
        if local6 == remote6 {
            return SK_PASS;
        }
        key.family = FAMILY_V6;
        key.addr = ip6_bytes(local6);
    }
    let policy = match INBOUND.get_ptr(key) {
        // SAFETY: the pointer comes from a successful lookup and is read at once.
        Some(p) => unsafe { *p },
        None => return SK_PASS,
    };
    if INBOUND_PASS_PORTS.contains(&port) {
        return SK_PASS;
    }
    let n = (policy.excluded_ports_len as usize).min(policy.excluded_ports.len());
    let mut i = 0;
    while i < n {
        if policy.excluded_ports[i] == port {
            return SK_PASS;
        }
        i += 1;
    }
    match INBOUND_SOCKETS.redirect_sk_lookup(ctx, key, 0) {
        Ok(()) => SK_PASS,
        // Enrolled but no listener (no daemon): refuse rather than let plaintext through.
        Err(_) => SK_DROP,
    }
}

/// Reads the fields every connect hook needs; `None` for sockets that are not TCP.
fn tcp_socket(ctx: &SockAddrContext) -> Option<(u64, u32)> {
    // SAFETY: the kernel hands a valid `bpf_sock_addr`; these are plain context loads.
    let (ty, proto, sk) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.type_, sa.protocol, sa.__bindgen_anon_1.sk)
    };
    if ty != SOCK_STREAM || (proto != 0 && proto != IPPROTO_TCP) || sk.is_null() {
        return None;
    }
    // SAFETY: `sk` was checked non-null; the verifier allows reading `mark` from it.
    let mark = unsafe { (*sk).mark };
    // SAFETY: both helpers are allowed for cgroup sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    Some((netns, mark))
}

fn try_connect4(ctx: &SockAddrContext) -> Result<(), ()> {
    let (netns, mark) = tcp_socket(ctx).ok_or(())?;
    // SAFETY: plain context loads.
    let (ip, port_be) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    let addr = ip.to_ne_bytes();
    let port = u16::from_be(port_be as u16);
    let redirect_port = match decide_v4(netns, mark, addr, port) {
        Verdict::Redirect(p) => p,
        Verdict::Skip(stat) => {
            count(stat);
            return Ok(());
        }
    };
    let mut orig = OrigDst {
        netns_cookie: netns,
        port,
        family: FAMILY_V4,
        ..OrigDst::default()
    };
    orig.addr[..4].copy_from_slice(&addr);
    remember(ctx, &orig)?;
    // SAFETY: the program type permits rewriting the destination.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
        (*ctx.sock_addr).user_port = u32::from(redirect_port.to_be());
    }
    count(stats::REDIRECTED);
    Ok(())
}

fn try_connect6(ctx: &SockAddrContext) -> Result<(), ()> {
    let (netns, mark) = tcp_socket(ctx).ok_or(())?;
    // SAFETY: plain context loads (the kernel only allows 4-byte loads of user_ip6).
    let (words, port_be) = unsafe {
        let sa = &*ctx.sock_addr;
        (
            [
                sa.user_ip6[0],
                sa.user_ip6[1],
                sa.user_ip6[2],
                sa.user_ip6[3],
            ],
            sa.user_port,
        )
    };
    let addr = ip6_bytes(words);
    let port = u16::from_be(port_be as u16);
    let (verdict, mapped_v4) = decide_v6(netns, mark, &addr, port);
    let redirect_port = match verdict {
        Verdict::Redirect(p) => p,
        Verdict::Skip(stat) => {
            count(stat);
            return Ok(());
        }
    };
    let mut orig = OrigDst {
        netns_cookie: netns,
        port,
        family: FAMILY_V6,
        ..OrigDst::default()
    };
    if mapped_v4 {
        orig.family = FAMILY_V4;
        orig.addr[..4].copy_from_slice(&addr[12..16]);
    } else {
        orig.addr = addr;
    }
    remember(ctx, &orig)?;
    // SAFETY: the program type permits rewriting the destination.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        sa.user_ip6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
        sa.user_port = u32::from(redirect_port.to_be());
    }
    count(stats::REDIRECTED);
    Ok(())
}

/// An IPv6 address as the kernel hands it (four network-order words) to its 16 bytes.
#[inline(always)]
fn ip6_bytes(w: [u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&w[0].to_ne_bytes());
    b[4..8].copy_from_slice(&w[1].to_ne_bytes());
    b[8..12].copy_from_slice(&w[2].to_ne_bytes());
    b[12..16].copy_from_slice(&w[3].to_ne_bytes());
    b
}

fn remember(ctx: &SockAddrContext, orig: &OrigDst) -> Result<(), ()> {
    // SAFETY: allowed for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    PENDING
        .insert(cookie, orig, u64::from(BPF_ANY))
        .map_err(|_| {
            count(stats::MAP_ERRORS);
        })
}

fn try_sockops(ctx: &SockOpsContext) -> Result<(), ()> {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return Ok(());
    }
    // SAFETY: allowed for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = match PENDING.get_ptr(cookie) {
        // SAFETY: the pointer comes from a successful lookup and is copied out at once.
        Some(p) => unsafe { *p },
        None => return Ok(()),
    };
    // Load every context field up front, each at its own constant offset: the verifier
    // rejects context loads through a pointer the compiler offset once and shared between
    // branches.
    // Volatile, so the compiler cannot fold two loads into one at a computed offset.
    // SAFETY: the kernel hands a valid `bpf_sock_ops`; these are plain context loads.
    let (family, port, ip4, w) = unsafe {
        let o = ctx.ops;
        (
            read_volatile(&raw const (*o).family),
            read_volatile(&raw const (*o).local_port),
            read_volatile(&raw const (*o).local_ip4),
            [
                read_volatile(&raw const (*o).local_ip6[0]),
                read_volatile(&raw const (*o).local_ip6[1]),
                read_volatile(&raw const (*o).local_ip6[2]),
                read_volatile(&raw const (*o).local_ip6[3]),
            ],
        )
    };
    let mut key = ConnKey {
        netns_cookie: orig.netns_cookie,
        port: port as u16,
        ..ConnKey::default()
    };
    if family == AF_INET {
        key.family = FAMILY_V4;
        key.addr[..4].copy_from_slice(&ip4.to_ne_bytes());
    } else {
        key.family = FAMILY_V6;
        key.addr = ip6_bytes(w);
    }
    let _ = PENDING.remove(cookie);
    ORIG_DST
        .insert(key, orig, u64::from(BPF_ANY))
        .map_err(|_| count(stats::MAP_ERRORS))?;
    count(stats::ESTABLISHED);
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // Unreachable: the verifier rejects any program that could get here.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
