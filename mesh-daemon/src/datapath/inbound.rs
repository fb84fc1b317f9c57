//! Inbound capture: `sl_sk_lookup` attached to an enrolled pod's network namespace sends
//! TCP arriving for the pod's own addresses to the daemon's inbound listener there (through
//! the `sl_inbound_sk` socket map), except what `sl_inbound` says to leave alone. Each
//! pod's link is pinned, so capture (and failing closed) outlives the daemon; a successor
//! replaces the link without a gap, as for the cgroup programs.
use std::{
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, SockHash},
    programs::{SkLookup, links::FdLink},
};
use mesh_common::{InboundKey, InboundPolicy, program_names};

use super::{
    loader::{DatapathError, error_chain, program, program_error, replace_link},
    maps::{fill_ports, kernel_addr},
};
use crate::netns::Netns;

/// The kernel's view of one address of an enrolled pod.
pub fn inbound_key(ip: IpAddr) -> InboundKey {
    let (addr, family) = kernel_addr(ip);
    InboundKey {
        addr,
        family,
        ..InboundKey::default()
    }
}

/// What capture leaves alone on one pod: its `excludeInboundPorts` (those past the map's
/// room are returned, to be reported).
pub fn inbound_policy(excluded: &[u16]) -> (InboundPolicy, Vec<String>) {
    let mut p = InboundPolicy::default();
    let mut dropped = Vec::new();
    p.excluded_ports_len = fill_ports(
        excluded,
        &mut p.excluded_ports,
        "excluded inbound port",
        &mut dropped,
    );
    (p, dropped)
}

pub struct InboundCapture {
    /// Holds every program (the cgroup ones too) for the daemon's life.
    ebpf: Mutex<Ebpf>,
    policies: Mutex<HashMap<MapData, InboundKey, InboundPolicy>>,
    sockets: Mutex<SockHash<MapData, InboundKey>>,
    pin_dir: PathBuf,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl InboundCapture {
    pub(super) fn new(
        ebpf: Ebpf,
        policies: HashMap<MapData, InboundKey, InboundPolicy>,
        sockets: SockHash<MapData, InboundKey>,
        pin_dir: &Path,
    ) -> Self {
        Self {
            ebpf: Mutex::new(ebpf),
            policies: Mutex::new(policies),
            sockets: Mutex::new(sockets),
            pin_dir: pin_dir.to_owned(),
        }
    }

    fn link_pin(&self, cookie: u64) -> PathBuf {
        self.pin_dir
            .join(format!("{}_{cookie}", program_names::SK_LOOKUP))
    }

    /// Captures inbound TCP to each of the pod's addresses in `netns` into the listener
    /// given with it. Socket and policy first, program last: a connection captured always
    /// finds the listener.
    pub fn capture(
        &self,
        netns: &Netns,
        listeners: &[(IpAddr, &dyn AsRawFd)],
        policy: &InboundPolicy,
    ) -> Result<(), DatapathError> {
        let name = program_names::SK_LOOKUP;
        let map_error =
            |action, e: aya::maps::MapError| program_error(name, action, error_chain(&e));
        for (addr, listener) in listeners {
            let key = inbound_key(*addr);
            locked(&self.sockets)
                .insert(key, listener.as_raw_fd(), 0)
                .map_err(|e| map_error("add the inbound listener to sl_inbound_sk", e))?;
            locked(&self.policies)
                .insert(key, *policy, 0)
                .map_err(|e| map_error("write sl_inbound", e))?;
        }
        let mut ebpf = locked(&self.ebpf);
        let prog = program::<SkLookup>(&mut ebpf, name)?;
        let id = prog
            .attach(netns.file())
            .map_err(|e| program_error(name, "attach to the pod's namespace", error_chain(&e)))?;
        let link = prog
            .take_link(id)
            .map_err(|e| program_error(name, "take link", error_chain(&e)))?;
        replace_link(name, &self.link_pin(netns.cookie()), FdLink::from(link))
    }

    /// Updates what capture leaves alone on a pod already captured.
    pub fn update(&self, addrs: &[IpAddr], policy: &InboundPolicy) -> Result<(), DatapathError> {
        for addr in addrs {
            locked(&self.policies)
                .insert(inbound_key(*addr), *policy, 0)
                .map_err(|e| {
                    program_error(
                        program_names::SK_LOOKUP,
                        "write sl_inbound",
                        error_chain(&e),
                    )
                })?;
        }
        Ok(())
    }

    /// After a restart: stops capturing for pods no longer enrolled (their links and map
    /// entries, left by an earlier daemon).
    pub fn release_others(&self, live_cookies: &[u64], live_addrs: &[IpAddr]) {
        let prefix = format!("{}_", program_names::SK_LOOKUP);
        if let Ok(dir) = std::fs::read_dir(&self.pin_dir) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let cookie = name
                    .strip_prefix(&prefix)
                    .and_then(|c| c.parse::<u64>().ok());
                if cookie.is_some_and(|c| !live_cookies.contains(&c)) {
                    let _ = std::fs::remove_file(entry.path());
                    tracing::info!(pin = %name, "removed inbound capture left by an earlier daemon");
                }
            }
        }
        let live: Vec<InboundKey> = live_addrs.iter().map(|a| inbound_key(*a)).collect();
        let stale: Vec<InboundKey> = locked(&self.policies)
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live.contains(k))
            .collect();
        for key in stale {
            let _ = locked(&self.policies).remove(&key);
            let _ = locked(&self.sockets).remove(&key);
        }
    }

    /// Stops capturing: the link first (unpinned, so detached), then the map entries.
    pub fn release(&self, cookie: u64, addrs: &[IpAddr]) {
        let pin = self.link_pin(cookie);
        if let Err(e) = std::fs::remove_file(&pin)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(pin = %pin.display(), error = %e, "cannot unpin the inbound capture link");
        }
        for addr in addrs {
            let key = inbound_key(*addr);
            let _ = locked(&self.policies).remove(&key);
            let _ = locked(&self.sockets).remove(&key);
        }
    }
}
