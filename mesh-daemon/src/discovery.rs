//! Finds this node's pods from the cgroup tree below the daemon's cgroup: every directory
//! whose name carries a pod UID (as the kubelet lays cgroups out, for both cgroup drivers)
//! is a pod, any process in it or below it is one of its processes, and that process's
//! network namespace is the pod's.
//!
//! Walking the few directories of the pod tree and reading one `cgroup.procs` per pod costs
//! a fraction of reading every process's `/proc/<pid>/cgroup`, which a node with a thousand
//! processes would pay on every pass. A hostPID DaemonSet sees the node's `/proc` and
//! cgroup tree; the test cluster lays cgroups out the same way, so discovery is identical
//! in both.
use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::{cgroup, dir_changes::DirChanges};

/// Deepest directory looked at below the daemon's cgroup: the systemd driver nests pods four
/// levels down (`kubepods.slice/kubepods-burstable.slice/...pod<uid>.slice/cri-....scope`).
const MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredPod {
    pub uid: String,
    /// A process of the pod, to open its network namespace through.
    pub pid: u32,
    /// Inode of that namespace, to notice a pod sandbox replaced under the same UID.
    pub netns_inode: u64,
}

/// One pass over the cgroup directory `cgroup_dir` (the daemon's cgroup, inside the cgroup2
/// mount) and below. Pods without a live process are skipped; processes that exit mid-scan
/// are passed over for the pod's next one.
pub fn scan(proc_root: &Path, cgroup_dir: &Path) -> HashMap<String, DiscoveredPod> {
    let mut pods = HashMap::new();
    let mut dirs: Vec<(PathBuf, usize)> = vec![(cgroup_dir.to_owned(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        for child in subdirs(&dir) {
            let uid = child
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(cgroup::pod_uid);
            match uid {
                Some(uid) => {
                    if pods.contains_key(&uid) {
                        continue;
                    }
                    if let Some((pid, netns_inode)) = live_process(proc_root, &child, depth + 1) {
                        pods.insert(
                            uid.clone(),
                            DiscoveredPod {
                                uid,
                                pid,
                                netns_inode,
                            },
                        );
                    }
                }
                None if depth + 1 < MAX_DEPTH => dirs.push((child, depth + 1)),
                None => {}
            }
        }
    }
    pods
}

/// Watches the pod tree below `cgroup_dir` so that a pod is scanned for as soon as it
/// appears or goes: cgroup directories created and removed, a process moved into a cgroup
/// (a write to `cgroup.procs`), and a cgroup gaining its first process or losing its last
/// (the kernel's own change notice on `cgroup.events`, since cgroup v2 began in 4.5). The
/// scan's own reads of `cgroup.procs` are not changes.
pub fn watch(cgroup_dir: &Path) -> Result<DirChanges, notify::Error> {
    DirChanges::watch(cgroup_dir, |e| {
        use notify::EventKind;
        match e.kind {
            EventKind::Create(_) | EventKind::Remove(_) | EventKind::Any | EventKind::Other => true,
            EventKind::Modify(_) => e.paths.iter().any(|p| {
                p.file_name()
                    .is_some_and(|n| n == "cgroup.events" || n == "cgroup.procs")
            }),
            EventKind::Access(_) => false,
        }
    })
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// A process in `dir` or below it (containers live in child cgroups of the pod's) whose
/// network namespace can still be opened, and that namespace's inode.
fn live_process(proc_root: &Path, dir: &Path, depth: usize) -> Option<(u32, u64)> {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        if let Ok(meta) = std::fs::metadata(proc_root.join(pid.to_string()).join("ns/net")) {
            return Some((pid, meta.ino()));
        }
    }
    if depth >= MAX_DEPTH {
        return None;
    }
    subdirs(dir)
        .iter()
        .find_map(|child| live_process(proc_root, child, depth + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A made-up cgroup tree whose `cgroup.procs` files name this test's own process.
    struct Tree(PathBuf);

    impl Tree {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!(
                "sidelane-discovery-{}-{}",
                std::process::id(),
                fastrand::u64(..)
            ));
            Self(dir)
        }

        fn procs(&self, rel: &str, content: &str) {
            let dir = self.0.join(rel);
            std::fs::create_dir_all(&dir).expect("creating a cgroup directory");
            std::fs::write(dir.join("cgroup.procs"), content).expect("writing cgroup.procs");
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn finds_pods_of_both_drivers_through_their_containers() {
        let me = std::process::id();
        let my_netns = std::fs::metadata("/proc/self/ns/net")
            .expect("own netns")
            .ino();
        let t = Tree::new();
        let cgroupfs = "0b3f3a52-7a4e-4c59-9d8f-1a2b3c4d5e6f";
        let systemd = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        let empty = "2c5f39cb-3fb2-42e3-994f-1127e4ddb538";
        // cgroupfs driver: the pod's own cgroup is empty, its process is in a container's.
        t.procs(&format!("kubepods/burstable/pod{cgroupfs}"), "");
        t.procs(
            &format!("kubepods/burstable/pod{cgroupfs}/app"),
            &format!("{me}\n"),
        );
        // systemd driver, with a process that has exited listed before a live one.
        t.procs(
            &format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-x.scope",
                systemd.replace('-', "_")
            ),
            &format!("4294967290\n{me}\n"),
        );
        // A pod whose processes are all gone, and a system cgroup that is no pod.
        t.procs(&format!("kubepods/pod{empty}/app"), "");
        t.procs("system.slice/sshd.service", &format!("{me}\n"));

        let found = scan(Path::new("/proc"), &t.0);
        let mut uids: Vec<&str> = found.keys().map(String::as_str).collect();
        uids.sort_unstable();
        assert_eq!(uids, [cgroupfs, systemd]);
        for pod in found.values() {
            assert_eq!((pod.pid, pod.netns_inode), (me, my_netns), "{}", pod.uid);
        }
    }

    /// A real cgroup (the test runs as root, like the rest of the suite): a pod appearing, a
    /// process moving in and that process exiting each wake the watch; the scan's own reads
    /// do not.
    #[tokio::test]
    async fn a_real_pod_cgroup_starting_and_emptying_wakes_the_watch() {
        use std::time::Duration;
        struct Cgroup(PathBuf, Option<std::process::Child>);
        impl Drop for Cgroup {
            fn drop(&mut self) {
                if let Some(mut c) = self.1.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                // Children first: a cgroup directory goes only when empty of others.
                let _ = std::fs::remove_dir(self.0.join("app"));
                let _ = std::fs::remove_dir(&self.0);
                let _ = std::fs::remove_dir(self.0.parent().unwrap_or(&self.0));
            }
        }
        // Long enough that any return is an event, not the resync.
        const NEVER: Duration = Duration::from_secs(600);
        const SETTLE: Duration = Duration::from_millis(10);
        let woke = async |w: &mut DirChanges| {
            tokio::time::timeout(Duration::from_secs(5), w.next(NEVER, SETTLE))
                .await
                .is_ok()
        };
        let quiet = async |w: &mut DirChanges| {
            tokio::time::timeout(Duration::from_millis(300), w.next(NEVER, SETTLE))
                .await
                .is_err()
        };

        let mount = cgroup::find_v2_mount().expect("a cgroup2 mount");
        let top = mount.join(format!(
            "sidelane-unit-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        let uid = "3d6a4adc-4fc3-43f4-aa5f-2238f5eec649";
        let pod = top.join(format!("pod{uid}"));
        let mut guard = Cgroup(pod.clone(), None);
        std::fs::create_dir(&top).expect("creating a cgroup (needs root)");
        let mut w = watch(&top).expect("watching the cgroup");
        assert!(quiet(&mut w).await, "woke with nothing changed");

        std::fs::create_dir_all(pod.join("app")).expect("pod cgroup");
        assert!(woke(&mut w).await, "a new pod cgroup went unnoticed");
        let child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("sleep");
        let pid = child.id();
        guard.1 = Some(child);
        std::fs::write(pod.join("app/cgroup.procs"), pid.to_string()).expect("moving in");
        assert!(woke(&mut w).await, "a process moving in went unnoticed");

        let found = scan(Path::new("/proc"), &top);
        assert_eq!(found.get(uid).map(|p| p.pid), Some(pid), "{found:?}");
        assert!(quiet(&mut w).await, "the scan's own reads woke the watch");

        // Only the kernel's populated notice tells of an exit: nobody writes a file.
        if let Some(mut c) = guard.1.take() {
            c.kill().expect("kill");
            c.wait().expect("wait");
        }
        assert!(
            woke(&mut w).await,
            "the last process leaving went unnoticed"
        );
        assert!(scan(Path::new("/proc"), &top).is_empty());
    }
}
