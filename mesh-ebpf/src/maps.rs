//! The maps, declared with BTF so `bpftool map dump` prints named fields.
use aya_ebpf::{
    btf_maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
    macros::btf_map,
};
use mesh_common::{
    ConnKey, InboundKey, InboundPolicy, MAX_PODS, MAX_TRACKED_CONNECTIONS, OrigDst, PodPolicy,
    stats,
};

/// Enrolled pods by network-namespace cookie; written only by the daemon.
#[btf_map(name = "sl_pods")]
pub static PODS: HashMap<u64, PodPolicy, { MAX_PODS as usize }> = HashMap::new();

/// Socket cookie -> original destination, between connect() and the handshake.
#[btf_map(name = "sl_pending")]
pub static PENDING: LruHashMap<u64, OrigDst, { MAX_TRACKED_CONNECTIONS as usize }> =
    LruHashMap::new();

/// Client address -> original destination, read (and deleted) by the daemon on accept.
#[btf_map(name = "sl_orig_dst")]
pub static ORIG_DST: LruHashMap<ConnKey, OrigDst, { MAX_TRACKED_CONNECTIONS as usize }> =
    LruHashMap::new();

/// Enrolled pods' addresses whose inbound TCP goes to the daemon; written only by the daemon.
#[btf_map(name = "sl_inbound")]
pub static INBOUND: HashMap<InboundKey, InboundPolicy, { 2 * MAX_PODS as usize }> = HashMap::new();

/// The daemon's inbound listener for each of those addresses.
#[btf_map(name = "sl_inbound_sk")]
pub static INBOUND_SOCKETS: SockHash<InboundKey, { 2 * MAX_PODS as usize }> = SockHash::new();

/// Decision counters, one slot per `mesh_common::stats` index.
#[btf_map(name = "sl_stats")]
pub static STATS: PerCpuArray<u64, { stats::COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}
