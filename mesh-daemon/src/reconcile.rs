//! Keeps the kernel maps and the per-pod listeners in step with the configuration and the
//! pods actually running on the node.
use std::{collections::HashMap, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use mesh_common::PodPolicy;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    datapath::{PodsMap, pod_policy},
    dir_changes::DirChanges,
    discovery::{self, DiscoveredPod},
    handover::{Inherited, Role, Successor},
    metrics::Metrics,
    netns::Netns,
    proxy::{
        ProxyInputs, hbone::inbound::TunnelServer, http::PodHttp, outbound::Outbound,
        pod_listeners::PodListeners,
    },
    state::Snapshot,
};

/// What the admin API and `meshctl` show for one pod found on this node.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadStatus {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub enrolled: bool,
    pub reason: String,
    pub netns_cookie: Option<u64>,
    pub listeners: Vec<String>,
    pub problems: Vec<String>,
}

struct Active {
    netns_inode: u64,
    cookie: u64,
    policy: PodPolicy,
    listeners: Vec<String>,
    /// Second descriptors of the pod's listeners, for a successor.
    copies: Vec<(Role, std::net::TcpListener)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Active {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub struct Reconciler {
    pub node_name: String,
    pub proc_root: std::path::PathBuf,
    /// The daemon's cgroup directory (inside the cgroup2 mount): this node's pods are below.
    pub cgroup_dir: std::path::PathBuf,
    /// Wakes the scan when the pod tree changes; without it (no inotify) the scan polls
    /// every `scan_interval`.
    pub pod_changes: Option<DirChanges>,
    pub scan_interval: Duration,
    pub pods_map: PodsMap,
    pub inputs: Arc<ProxyInputs>,
    pub metrics: Arc<Metrics>,
    pub workloads: Arc<ArcSwap<Vec<WorkloadStatus>>>,
    pub proxies: LiveProxies,
    pub ready: watch::Sender<bool>,
    /// The handover from the daemon that ran before: its pods' listeners, claimed as the
    /// pods are enrolled again (those left after the first pass are closed).
    pub inherited: Inherited,
    /// Daemons asking for the listeners (`handover::Offer`).
    pub successors: Option<mpsc::Receiver<Successor>>,
    /// Second descriptors of the daemon's own listeners (admin, metrics, readiness), sent
    /// along with the pods'.
    pub own_listeners: Vec<(Role, std::net::TcpListener)>,
    /// Told once a successor holds the listeners: `run` has returned, nothing accepts here.
    pub handed_over: Option<oneshot::Sender<()>>,
}

/// The HTTP side of each enrolled pod's proxy, by pod UID: what the admin API shows of
/// its state (outlier ejections). Clones share one registry.
#[derive(Clone, Default)]
pub struct LiveProxies(Arc<std::sync::Mutex<HashMap<String, Arc<PodHttp>>>>);

impl LiveProxies {
    pub fn get(&self, uid: &str) -> Option<Arc<PodHttp>> {
        self.map().get(uid).cloned()
    }

    fn insert(&self, uid: &str, http: Arc<PodHttp>) {
        self.map().insert(uid.to_owned(), http);
    }

    fn remove(&self, uid: &str) {
        self.map().remove(uid);
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<PodHttp>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn next_successor(successors: &mut Option<mpsc::Receiver<Successor>>) -> Option<Successor> {
    match successors {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A scan also runs this often when the pod tree is watched, in case the kernel dropped an
/// event (its queue overflowing is reported, but a missed pod would stay out of the mesh).
const RESCAN: Duration = Duration::from_secs(10);
/// A pod starting is a burst of events (cgroup directories, processes moved in): one scan.
const SETTLE: Duration = Duration::from_millis(10);

async fn pods_may_have_changed(changes: &mut Option<DirChanges>, poll: Duration) {
    match changes {
        Some(c) => c.next(RESCAN, SETTLE).await,
        None => tokio::time::sleep(poll).await,
    }
}

impl Reconciler {
    /// Runs until the process ends or a successor holds the listeners. Wakes on every
    /// configuration change and on a timer (pods come and go without a configuration change).
    pub async fn run(mut self, mut config_changed: watch::Receiver<u64>) {
        let mut active: HashMap<String, Active> = HashMap::new();
        let mut first = true;
        loop {
            let proc_root = self.proc_root.clone();
            let cgroup_dir = self.cgroup_dir.clone();
            let found =
                tokio::task::spawn_blocking(move || discovery::scan(&proc_root, &cgroup_dir))
                    .await
                    .unwrap_or_default();
            let snap = self.inputs.snapshot.load_full();
            let status = self.reconcile(&snap, &found, &mut active);
            if first {
                self.remove_stale_entries(&active);
                if !self.inherited.is_empty() {
                    tracing::info!(
                        listeners = self.inherited.len(),
                        "closing listeners handed over for pods no longer enrolled"
                    );
                }
                self.inherited = Inherited::default();
                first = false;
            }
            self.metrics.enrolled_pods.set(active.len() as i64);
            self.workloads.store(Arc::new(status));
            let _ = self.ready.send(true);
            tokio::select! {
                _ = config_changed.changed() => {}
                () = pods_may_have_changed(&mut self.pod_changes, self.scan_interval) => {}
                Some(successor) = next_successor(&mut self.successors) => {
                    if self.hand_over(successor, &active).await {
                        if let Some(tx) = self.handed_over.take() {
                            let _ = tx.send(());
                        }
                        // Dropping `active` stops the accept loops; the pods' map entries
                        // stay, for the successor.
                        return;
                    }
                }
            }
        }
    }

    /// Sends every listener to `successor`; true once it holds them.
    async fn hand_over(&self, successor: Successor, active: &HashMap<String, Active>) -> bool {
        let mut listeners = Vec::new();
        let copies = self
            .own_listeners
            .iter()
            .map(|(role, l)| (role.clone(), l))
            .chain(
                active
                    .values()
                    .flat_map(|a| a.copies.iter().map(|(role, l)| (role.clone(), l))),
            );
        for (role, l) in copies {
            match l.try_clone() {
                Ok(l) => listeners.push((role, l)),
                Err(e) => {
                    tracing::warn!(error = %e, ?role, "cannot copy a listener for the successor; not handing over");
                    return false;
                }
            }
        }
        let n = listeners.len();
        let sent = tokio::task::spawn_blocking(move || {
            let fds: Vec<_> = listeners
                .iter()
                .map(|(role, l)| (role.clone(), std::os::fd::AsFd::as_fd(l)))
                .collect();
            successor.hand_over(&fds)
        })
        .await;
        match sent
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            Ok(()) => {
                tracing::info!(listeners = n, "a successor holds the listeners; draining");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "handover failed; still serving");
                false
            }
        }
    }

    fn reconcile(
        &mut self,
        snap: &Snapshot,
        found: &HashMap<String, DiscoveredPod>,
        active: &mut HashMap<String, Active>,
    ) -> Vec<WorkloadStatus> {
        let mut status = Vec::new();
        for (uid, pod) in found {
            let info = snap.pods_by_uid.get(uid);
            let (enrolled, reason, mut problems) = match info {
                None => (
                    false,
                    "no Pod object with this UID in the configuration".to_owned(),
                    vec![],
                ),
                Some(i) if !i.node_name.is_empty() && i.node_name != self.node_name => (
                    false,
                    format!(
                        "Pod object is scheduled to node {}, not {}",
                        i.node_name, self.node_name
                    ),
                    vec![],
                ),
                Some(i) => (
                    i.enrollment.enrolled,
                    i.enrollment.reason.clone(),
                    i.enrollment.problems.clone(),
                ),
            };
            let mut cookie = None;
            let mut listeners = Vec::new();
            if enrolled && let Some(info) = info {
                let (policy, dropped) =
                    pod_policy(self.inputs.outbound_port, &info.enrollment.exclusions);
                problems.extend(dropped);
                match self.ensure(uid, pod, policy, active) {
                    Ok(a) => {
                        cookie = Some(a.cookie);
                        listeners = a.listeners.clone();
                    }
                    Err(e) => {
                        tracing::warn!(pod = %uid, error = %e, "cannot enrol pod");
                        problems.push(e);
                    }
                }
            } else {
                self.release(uid, active);
            }
            status.push(WorkloadStatus {
                uid: uid.clone(),
                name: info.map(|i| i.name.clone()).unwrap_or_default(),
                namespace: info.map(|i| i.namespace.clone()).unwrap_or_default(),
                enrolled: cookie.is_some(),
                reason,
                netns_cookie: cookie,
                listeners,
                problems,
            });
        }
        let gone: Vec<String> = active
            .keys()
            .filter(|u| !found.contains_key(*u))
            .cloned()
            .collect();
        for uid in gone {
            self.release(&uid, active);
        }
        status.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        status
    }

    fn ensure<'a>(
        &mut self,
        uid: &str,
        pod: &DiscoveredPod,
        policy: PodPolicy,
        active: &'a mut HashMap<String, Active>,
    ) -> Result<&'a Active, String> {
        if active
            .get(uid)
            .is_some_and(|a| a.netns_inode != pod.netns_inode)
        {
            // The pod's sandbox was replaced: its old namespace is gone.
            self.release(uid, active);
        }
        if !active.contains_key(uid) {
            let path = self.proc_root.join(pod.pid.to_string()).join("ns/net");
            let netns = Arc::new(Netns::open(&path, &self.inputs.host).map_err(|e| e.to_string())?);
            let (outbound, tunnel, copies) = self.listeners_for(uid, pod, &netns)?;
            let listeners = outbound
                .listeners()
                .addresses()
                .iter()
                .chain(tunnel.as_ref().map(|(l, _)| l.addresses()).iter().flatten())
                .map(ToString::to_string)
                .collect();
            let http = outbound.http();
            let mut tasks = vec![tokio::spawn(outbound.run())];
            if let Some((listeners, server)) = tunnel {
                tasks.push(tokio::spawn(server.run(listeners)));
            }
            let abort_all =
                |tasks: &[tokio::task::JoinHandle<()>]| tasks.iter().for_each(|t| t.abort());
            // Listener first, map entry second: a connect redirected here always finds us.
            if let Err(e) = self.pods_map.set(netns.cookie(), &policy) {
                abort_all(&tasks);
                return Err(format!("writing sl_pods: {e}"));
            }
            tracing::info!(pod = %uid, cookie = netns.cookie(), "pod enrolled");
            // Registered with the pod's entry, so that whatever releases one releases both.
            self.proxies.insert(uid, http);
            active.insert(
                uid.to_owned(),
                Active {
                    netns_inode: pod.netns_inode,
                    cookie: netns.cookie(),
                    policy,
                    listeners,
                    copies,
                    tasks,
                },
            );
        }
        let a = active
            .get_mut(uid)
            .ok_or_else(|| "pod vanished during enrolment".to_owned())?;
        if a.policy != policy {
            self.pods_map
                .set(a.cookie, &policy)
                .map_err(|e| format!("updating sl_pods: {e}"))?;
            a.policy = policy;
        }
        Ok(a)
    }

    /// The pod's outbound listeners and, with mTLS on, its tunnel listeners: those the daemon
    /// before handed over, else bound now; with second descriptors of each for a successor.
    #[allow(clippy::type_complexity)]
    fn listeners_for(
        &mut self,
        uid: &str,
        pod: &DiscoveredPod,
        netns: &Arc<Netns>,
    ) -> Result<
        (
            Outbound,
            Option<(PodListeners, TunnelServer)>,
            Vec<(Role, std::net::TcpListener)>,
        ),
        String,
    > {
        let inputs = &self.inputs;
        let (outbound_role, tunnel_role) = (
            Role::Outbound {
                pod_uid: uid.to_owned(),
                netns_inode: pod.netns_inode,
            },
            Role::Tunnel {
                pod_uid: uid.to_owned(),
                netns_inode: pod.netns_inode,
            },
        );
        let inherited = self.inherited.take_all(&outbound_role);
        let outbound = if inherited.is_empty() {
            Outbound::bind(uid.to_owned(), netns.clone(), inputs.clone())
                .map_err(|e| e.to_string())?
        } else {
            Outbound::adopt(
                uid.to_owned(),
                netns.clone(),
                inputs.clone(),
                PodListeners::adopt(inherited),
            )
        };
        let copy_of = |role: &Role, l: &PodListeners| {
            l.copies()
                .map(|c| c.into_iter().map(|c| (role.clone(), c)).collect::<Vec<_>>())
                .map_err(|e| format!("copying the pod's listeners: {e}"))
        };
        let mut copies = copy_of(&outbound_role, outbound.listeners())?;
        let inherited = self.inherited.take_all(&tunnel_role);
        let tunnel = match &inputs.certs {
            None => None,
            Some(certs) => {
                let server =
                    TunnelServer::new(uid.to_owned(), netns.clone(), inputs.clone(), certs.clone());
                let listeners = if inherited.is_empty() {
                    server.bind().map_err(|e| e.to_string())?
                } else {
                    PodListeners::adopt(inherited)
                };
                copies.extend(copy_of(&tunnel_role, &listeners)?);
                Some((listeners, server))
            }
        };
        Ok((outbound, tunnel, copies))
    }

    fn release(&mut self, uid: &str, active: &mut HashMap<String, Active>) {
        self.proxies.remove(uid);
        if let Some(a) = active.remove(uid) {
            // Map entry first: new connects go direct before the listener disappears.
            if let Err(e) = self.pods_map.remove(a.cookie) {
                tracing::warn!(pod = %uid, error = %e, "cannot remove pod from sl_pods");
            }
            tracing::info!(pod = %uid, "pod left the mesh");
        }
    }

    /// After a restart, entries of pods that went away while the daemon was down.
    fn remove_stale_entries(&mut self, active: &HashMap<String, Active>) {
        let live: Vec<u64> = active.values().map(|a| a.cookie).collect();
        for cookie in self.pods_map.cookies() {
            if !live.contains(&cookie) {
                let _ = self.pods_map.remove(cookie);
                tracing::info!(cookie, "removed stale pod entry left by an earlier daemon");
            }
        }
    }
}
