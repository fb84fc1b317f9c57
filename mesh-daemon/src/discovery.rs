//! Finds this node's pods from the node's own process table: every process whose cgroup
//! lies below the daemon's cgroup and names a pod UID (as the kubelet lays cgroups out)
//! belongs to that pod, and its network namespace is the pod's.
//!
//! A hostPID DaemonSet sees the node's `/proc`; the test cluster lays out cgroups the same
//! way, so discovery is identical in both.
use std::{collections::HashMap, os::unix::fs::MetadataExt as _, path::Path};

use crate::cgroup;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredPod {
    pub uid: String,
    /// A process of the pod, to open its network namespace through.
    pub pid: u32,
    /// Inode of that namespace, to notice a pod sandbox replaced under the same UID.
    pub netns_inode: u64,
}

/// One pass over `/proc`. Processes that exit mid-scan are skipped.
pub fn scan(proc_root: &Path, below: &str) -> HashMap<String, DiscoveredPod> {
    let mut pods = HashMap::new();
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return pods;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(cg) = cgroup::process_cgroup(proc_root, pid) else {
            continue;
        };
        if !cgroup::is_below(&cg, below) {
            continue;
        }
        let Some(uid) = cgroup::pod_uid(&cg) else {
            continue;
        };
        if pods.contains_key(&uid) {
            continue;
        }
        let Ok(meta) = std::fs::metadata(proc_root.join(pid.to_string()).join("ns/net")) else {
            continue;
        };
        pods.insert(
            uid.clone(),
            DiscoveredPod {
                uid,
                pid,
                netns_inode: meta.ino(),
            },
        );
    }
    pods
}
