//! Types shared by the eBPF programs (`mesh-ebpf`) and the node daemon.
//!
//! Every type here is a map key or value, so each is `#[repr(C)]`, `Copy`, uses only
//! integers (no `bool`, no enums), carries explicit padding, and has its size checked at
//! compile time: the kernel compares sizes, not types, and a silent mismatch between the
//! two sides would corrupt redirection.
#![no_std]
#![deny(rust_2018_idioms)]

/// Map names. The kernel keeps 15 characters of a map name; each name below fits.
pub mod map_names {
    /// Enrolled pods: network-namespace cookie -> [`PodPolicy`](super::PodPolicy).
    pub const PODS: &str = "sl_pods";
    /// Redirected sockets awaiting their handshake: socket cookie -> [`OrigDst`](super::OrigDst).
    pub const PENDING: &str = "sl_pending";
    /// Original destinations of established redirected connections, looked up by the daemon
    /// when it accepts: [`ConnKey`](super::ConnKey) -> [`OrigDst`](super::OrigDst).
    pub const ORIG_DST: &str = "sl_orig_dst";
    /// Per-CPU decision counters, indexed by the `STAT_*` constants.
    pub const STATS: &str = "sl_stats";
    /// Enrolled pods' own addresses whose inbound TCP is captured:
    /// [`InboundKey`](super::InboundKey) -> [`InboundPolicy`](super::InboundPolicy).
    pub const INBOUND: &str = "sl_inbound";
    /// The daemon's inbound listener in each such pod: [`InboundKey`](super::InboundKey) ->
    /// socket (a `SOCKHASH`).
    pub const INBOUND_SOCKETS: &str = "sl_inbound_sk";
}

/// Program names as they appear in the object file and under the pin directory.
pub mod program_names {
    pub const CONNECT4: &str = "sl_connect4";
    pub const CONNECT6: &str = "sl_connect6";
    pub const SOCKOPS: &str = "sl_sockops";
    /// `sk_lookup`, attached to each enrolled pod's network namespace.
    pub const SK_LOOKUP: &str = "sl_sk_lookup";
}

/// Ports an enrolled pod's inbound capture leaves alone: the tunnel and the daemon's own
/// listeners inside the pod.
pub const INBOUND_PASS_PORTS: [u16; 3] = [15001, 15006, 15008];

/// Socket mark the daemon sets on every socket it opens inside a pod's network namespace.
/// The connect hooks never redirect a socket carrying it, so the daemon cannot loop into
/// itself. Same value as ztunnel's, so operators who know one recognise the other.
pub const DAEMON_SOCKET_MARK: u32 = 0x539;

/// Capacity of the enrolled-pod map: pods per node, with room (kubelet defaults to 110).
pub const MAX_PODS: u32 = 4096;
/// Capacity of the handshake and original-destination maps (LRU, so overflow evicts the
/// oldest entry instead of failing a connect).
pub const MAX_TRACKED_CONNECTIONS: u32 = 65536;

pub const MAX_EXCLUDED_PORTS: usize = 16;
pub const MAX_EXCLUDED_CIDRS: usize = 8;

/// [`PodPolicy::flags`]: redirect this pod's outbound TCP.
pub const POD_FLAG_REDIRECT_OUTBOUND: u32 = 1;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// An IPv4 network: `addr` and `mask` in network byte order as they sit in memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr4 {
    pub addr: [u8; 4],
    pub mask: [u8; 4],
}

/// An IPv6 network, as [`Cidr4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr6 {
    pub addr: [u8; 16],
    pub mask: [u8; 16],
}

/// What the connect hooks must do for one enrolled pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodPolicy {
    /// `POD_FLAG_*` bits.
    pub flags: u32,
    /// Port of the daemon's outbound listener inside the pod's network namespace.
    pub redirect_port: u16,
    pub excluded_ports_len: u8,
    pub excluded_v4_len: u8,
    pub excluded_v6_len: u8,
    pub _pad: [u8; 3],
    /// Destination ports never redirected (host byte order), first `excluded_ports_len` used.
    pub excluded_ports: [u16; MAX_EXCLUDED_PORTS],
    pub excluded_v4: [Cidr4; MAX_EXCLUDED_CIDRS],
    pub excluded_v6: [Cidr6; MAX_EXCLUDED_CIDRS],
}

impl Default for PodPolicy {
    fn default() -> Self {
        Self {
            flags: 0,
            redirect_port: 0,
            excluded_ports_len: 0,
            excluded_v4_len: 0,
            excluded_v6_len: 0,
            _pad: [0; 3],
            excluded_ports: [0; MAX_EXCLUDED_PORTS],
            excluded_v4: [Cidr4 {
                addr: [0; 4],
                mask: [0; 4],
            }; MAX_EXCLUDED_CIDRS],
            excluded_v6: [Cidr6 {
                addr: [0; 16],
                mask: [0; 16],
            }; MAX_EXCLUDED_CIDRS],
        }
    }
}

/// Where a redirected connection was going. IPv4 addresses sit in the first four bytes of
/// `addr`; IPv4-mapped IPv6 destinations are stored as IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Network namespace of the pod that connected.
    pub netns_cookie: u64,
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 5],
}

/// Identifies a redirected connection as the daemon sees it after `accept`: the pod's
/// network namespace plus the client socket's local address (the accepted socket's peer).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub netns_cookie: u64,
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}

/// An enrolled pod's own address (IPv4 in the first four bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InboundKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// How one enrolled pod's inbound TCP is captured.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundPolicy {
    pub excluded_ports_len: u8,
    pub _pad: u8,
    /// Destination ports left to the application (`excludeInboundPorts`), host byte order.
    pub excluded_ports: [u16; MAX_EXCLUDED_PORTS],
}

/// Indexes into the `sl_stats` per-CPU array.
pub mod stats {
    /// Connects from enrolled pods steered to the daemon.
    pub const REDIRECTED: u32 = 0;
    /// Connects from network namespaces that are not enrolled.
    pub const NOT_ENROLLED: u32 = 1;
    /// Connects skipped because their socket carries the daemon's mark.
    pub const DAEMON_OWN: u32 = 2;
    /// Connects to loopback.
    pub const LOOPBACK: u32 = 3;
    /// Connects to an excluded port or CIDR.
    pub const EXCLUDED: u32 = 4;
    /// Redirected handshakes whose original destination was handed to the daemon.
    pub const ESTABLISHED: u32 = 5;
    /// Map updates the kernel refused (full map, no memory).
    pub const MAP_ERRORS: u32 = 6;
    pub const COUNT: u32 = 7;
    /// Names for the daemon's `sidelane_bpf_decisions_total{decision}`.
    pub const NAMES: [&str; COUNT as usize] = [
        "redirected",
        "not_enrolled",
        "daemon_own",
        "loopback",
        "excluded",
        "established",
        "map_errors",
    ];
}

const _: () = assert!(core::mem::size_of::<Cidr4>() == 8);
const _: () = assert!(core::mem::size_of::<Cidr6>() == 32);
const _: () = assert!(core::mem::size_of::<PodPolicy>() == 12 + 32 + 8 * 8 + 8 * 32);
const _: () = assert!(core::mem::size_of::<OrigDst>() == 32);
const _: () = assert!(core::mem::size_of::<ConnKey>() == 32);
const _: () = assert!(core::mem::size_of::<InboundKey>() == 20);
const _: () = assert!(core::mem::size_of::<InboundPolicy>() == 2 + 2 * MAX_EXCLUDED_PORTS);

#[cfg(feature = "user")]
mod user {
    #![allow(unsafe_code)]
    // SAFETY: each type is repr(C), Copy, integer-only with explicit padding, so every bit
    // pattern is valid and there are no implicit padding bytes to leak.
    unsafe impl aya::Pod for super::PodPolicy {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::InboundKey {}
    unsafe impl aya::Pod for super::InboundPolicy {}
}
