//! Keeps the kernel maps and the per-pod listeners in step with the configuration and the
//! pods actually running on the node.
use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use mesh_common::PodPolicy;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use mesh_common::InboundPolicy;

use crate::{
    datapath::{InboundCapture, PodsMap, inbound_policy, pod_policy},
    dir_changes::DirChanges,
    discovery::{self, DiscoveredPod},
    handover::{Inherited, Role, Successor},
    metrics::Metrics,
    netns::Netns,
    proxy::{
        ProxyInputs, hbone::inbound::TunnelServer, http::PodHttp, inbound::PlaintextInbound,
        outbound::Outbound, pod_listeners::PodListeners, sockets::SocketError,
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
    /// The pod's addresses whose inbound TCP is captured, and what capture leaves alone.
    captured: Vec<IpAddr>,
    inbound_policy: InboundPolicy,
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
    /// Attaches inbound capture to pods (used when the mesh has a CA: mTLS on).
    pub capture: Arc<InboundCapture>,
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
                let (inbound_policy, dropped) =
                    inbound_policy(&info.enrollment.exclusions.inbound_ports);
                problems.extend(dropped);
                let wanted = Wanted {
                    policy,
                    inbound_policy,
                    ips: &info.ips,
                };
                match self.ensure(uid, pod, &wanted, active) {
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
        wanted: &Wanted<'_>,
        active: &'a mut HashMap<String, Active>,
    ) -> Result<&'a Active, String> {
        let policy = wanted.policy;
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
            let servers = self.listeners_for(uid, pod, &netns)?;
            let listeners = servers.addresses();
            let PodServers {
                outbound,
                tunnel,
                inbound,
                copies,
            } = servers;
            let mut captured = Vec::new();
            if let Some((listeners, _)) = &inbound {
                let pairs: Vec<(IpAddr, &dyn std::os::fd::AsRawFd)> = wanted
                    .ips
                    .iter()
                    .filter_map(|ip| {
                        let l = listeners.for_family_of(*ip)?;
                        Some((*ip, l as &dyn std::os::fd::AsRawFd))
                    })
                    .collect();
                self.capture
                    .capture(&netns, &pairs, &wanted.inbound_policy)
                    .map_err(|e| format!("inbound capture: {e}"))?;
                captured = pairs.iter().map(|(ip, _)| *ip).collect();
            }
            let http = outbound.http();
            let mut tasks = vec![tokio::spawn(outbound.run())];
            if let Some((listeners, server)) = tunnel {
                tasks.push(tokio::spawn(listeners.serve(Arc::new(server))));
            }
            if let Some((listeners, server)) = inbound {
                tasks.push(tokio::spawn(listeners.serve(Arc::new(server))));
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
                    captured,
                    inbound_policy: wanted.inbound_policy,
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
        if a.inbound_policy != wanted.inbound_policy {
            self.capture
                .update(&a.captured, &wanted.inbound_policy)
                .map_err(|e| format!("updating sl_inbound: {e}"))?;
            a.inbound_policy = wanted.inbound_policy;
        }
        Ok(a)
    }

    /// The pod's outbound listeners and, with mTLS on, its tunnel and plaintext inbound
    /// listeners: those the daemon before handed over, else bound now; with second
    /// descriptors of each for a successor.
    fn listeners_for(
        &mut self,
        uid: &str,
        pod: &DiscoveredPod,
        netns: &Arc<Netns>,
    ) -> Result<PodServers, String> {
        let inputs = self.inputs.clone();
        let role = |make: fn(String, u64) -> Role| make(uid.to_owned(), pod.netns_inode);
        let outbound_role = role(|pod_uid, netns_inode| Role::Outbound {
            pod_uid,
            netns_inode,
        });
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
        let mut copies = Vec::new();
        copy_into(&mut copies, &outbound_role, outbound.listeners())?;
        let mut servers = PodServers {
            outbound,
            tunnel: None,
            inbound: None,
            copies: Vec::new(),
        };
        let Some(certs) = inputs.certs.clone() else {
            servers.copies = copies;
            return Ok(servers);
        };
        prefetch_certificate(&inputs, &certs, uid);
        let tunnel_role = role(|pod_uid, netns_inode| Role::Tunnel {
            pod_uid,
            netns_inode,
        });
        let tunnel = TunnelServer::new(uid.to_owned(), netns.clone(), inputs.clone(), certs);
        let listeners = self.take_or_bind(&tunnel_role, || tunnel.bind())?;
        copy_into(&mut copies, &tunnel_role, &listeners)?;
        servers.tunnel = Some((listeners, tunnel));
        let inbound_role = role(|pod_uid, netns_inode| Role::Inbound {
            pod_uid,
            netns_inode,
        });
        let inbound = PlaintextInbound::new(uid.to_owned(), netns.clone(), inputs);
        let listeners = self.take_or_bind(&inbound_role, || inbound.bind())?;
        copy_into(&mut copies, &inbound_role, &listeners)?;
        servers.inbound = Some((listeners, inbound));
        servers.copies = copies;
        Ok(servers)
    }

    /// The listeners handed over as `role`, else new ones.
    fn take_or_bind(
        &mut self,
        role: &Role,
        bind: impl FnOnce() -> Result<PodListeners, SocketError>,
    ) -> Result<PodListeners, String> {
        let inherited = self.inherited.take_all(role);
        if inherited.is_empty() {
            bind().map_err(|e| e.to_string())
        } else {
            Ok(PodListeners::adopt(inherited))
        }
    }

    fn release(&mut self, uid: &str, active: &mut HashMap<String, Active>) {
        self.proxies.remove(uid);
        if let Some(a) = active.remove(uid) {
            self.capture.release(a.cookie, &a.captured);
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
        let captured: Vec<IpAddr> = active.values().flat_map(|a| a.captured.clone()).collect();
        self.capture.release_others(&live, &captured);
        for cookie in self.pods_map.cookies() {
            if !live.contains(&cookie) {
                let _ = self.pods_map.remove(cookie);
                tracing::info!(cookie, "removed stale pod entry left by an earlier daemon");
            }
        }
    }
}

/// What a pod's kernel entries should say.
struct Wanted<'a> {
    policy: PodPolicy,
    inbound_policy: InboundPolicy,
    ips: &'a [IpAddr],
}

/// Asks for the pod's certificate now, in the background, so that its first connection does
/// not wait for the CA server.
fn prefetch_certificate(
    inputs: &ProxyInputs,
    certs: &Arc<crate::identity::certs::Certificates>,
    uid: &str,
) {
    let Some(pod) = inputs.snapshot.load().pods_by_uid.get(uid).cloned() else {
        return;
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let (certs, identity) = (
        certs.clone(),
        certs.identity(&pod.namespace, &pod.service_account),
    );
    runtime.spawn(async move {
        if let Err(e) = certs.get(&identity).await {
            tracing::warn!(%identity, error = %e, "no workload certificate yet (asked again on first use)");
        }
    });
}

/// An enrolled pod's servers, before they run.
struct PodServers {
    outbound: Outbound,
    tunnel: Option<(PodListeners, TunnelServer)>,
    inbound: Option<(PodListeners, PlaintextInbound)>,
    /// Second descriptors of every listener, for a successor.
    copies: Vec<(Role, std::net::TcpListener)>,
}

impl PodServers {
    fn addresses(&self) -> Vec<String> {
        let mut all = self.outbound.listeners().addresses();
        for l in [
            self.tunnel.as_ref().map(|(l, _)| l),
            self.inbound.as_ref().map(|(l, _)| l),
        ]
        .into_iter()
        .flatten()
        {
            all.extend(l.addresses());
        }
        all.iter().map(ToString::to_string).collect()
    }
}

fn copy_into(
    copies: &mut Vec<(Role, std::net::TcpListener)>,
    role: &Role,
    listeners: &PodListeners,
) -> Result<(), String> {
    let made = listeners
        .copies()
        .map_err(|e| format!("copying the pod's listeners: {e}"))?;
    copies.extend(made.into_iter().map(|l| (role.clone(), l)));
    Ok(())
}
