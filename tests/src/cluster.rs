//! A Kubernetes-shaped cluster built from Linux primitives.
//!
//! Layout for run `<id>` (all names unique per run):
//! * fabric: netns `sl<id>-fab` with bridge `br0`, joining the nodes on 10.200.0.0/24 and
//!   fd00:200::/64;
//! * node `i`: netns `sl<id>-n<i>`, `eth0` on the fabric (10.200.0.i), bridge `cbr0` as the
//!   pods' gateway (10.244.i.1, fd00:244:i::1), routes to the other nodes' pod ranges, and a
//!   `mesh-daemon` attached to cgroup `sidelane-test-<id>/node-<i>`;
//! * pod `j` on node `i`: netns `sl<id>-n<i>p<j>`, `eth0` bridged to `cbr0` (10.244.i.(10+j),
//!   fd00:244:i::(10+j)), processes in `.../node-<i>/kubepods/pod<uid>/app`;
//! * Services get VIPs 10.96.0.x and fd00:96::x. There is no kube-proxy: only the mesh makes
//!   a VIP reachable, as in a cluster where Sidelane replaces kube-proxy for enrolled pods.
//!
//! Dropping the cluster kills its processes and removes every namespace, cgroup, pin and
//! file it made, also when the test failed.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use crate::{
    manifests::{self, EndpointObject, PodObject, ServicePortObject},
    sys::{self, HarnessError, Result, io_err},
};

pub const ADMIN_PORT: u16 = 15000;
pub const METRICS_PORT: u16 = 15020;
pub const READY_PORT: u16 = 15021;
pub const HTTP_PORT: u16 = 8080;
pub const TCP_PORT: u16 = 9000;

const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(20);
const ENROLL_TIMEOUT: Duration = Duration::from_secs(10);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodRef(pub usize);
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceRef(pub usize);

/// What to run as a pod.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub node: usize,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Run the workload server (HTTP on 8080, TCP on 9000).
    pub serve: bool,
    /// More ports the same server answers HTTP on.
    pub also_http: Vec<u16>,
    /// The pod's identity in the mesh.
    pub service_account: String,
}

impl PodSpec {
    pub fn new(namespace: &str, name: &str, node: usize) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            node,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            serve: false,
            also_http: Vec::new(),
            service_account: "default".into(),
        }
    }
    pub fn service_account(mut self, name: &str) -> Self {
        self.service_account = name.into();
        self
    }
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }
    pub fn annotation(mut self, k: &str, v: &str) -> Self {
        self.annotations.insert(k.into(), v.into());
        self
    }
    pub fn serving(mut self) -> Self {
        self.serve = true;
        self
    }
    /// The server answers HTTP on `port` as well as on 8080.
    pub fn serving_http_also_on(mut self, port: u16) -> Self {
        self.serve = true;
        self.also_http.push(port);
        self
    }
}

#[derive(Debug, Clone)]
pub struct ServicePortSpec {
    pub name: String,
    pub port: u16,
    pub target: u16,
    pub app_protocol: Option<String>,
}

impl ServicePortSpec {
    pub fn new(name: &str, port: u16, target: u16) -> Self {
        Self {
            name: name.into(),
            port,
            target,
            app_protocol: None,
        }
    }
}

/// A client still running in a pod; its output is read line by line.
pub struct RunningClient {
    child: Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl RunningClient {
    /// The next JSON line the client prints (blocks until it does or exits).
    pub fn next_json(&mut self) -> Result<Value> {
        let line = self
            .lines
            .next()
            .ok_or_else(|| HarnessError::Other("client exited without output".into()))?
            .map_err(io_err("reading client output"))?;
        serde_json::from_str(&line)
            .map_err(|e| HarnessError::Other(format!("client output {line:?}: {e}")))
    }
}

impl Drop for RunningClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Node {
    name: String,
    netns: String,
    cgroup: PathBuf,
    pin_dir: PathBuf,
    daemon: Option<Child>,
    /// Daemons told to stop (SIGTERM, or a successor took their listeners), draining.
    retiring: Vec<Child>,
    pods: usize,
}

pub struct Pod {
    pub spec: PodSpec,
    pub uid: String,
    pub netns: String,
    pub ip4: String,
    pub ip6: String,
    cgroup: PathBuf,
    server: Option<Child>,
}

pub struct Service {
    pub name: String,
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePortSpec>,
    pub vip4: String,
    pub vip6: String,
}

pub struct Cluster {
    pub id: String,
    fabric: String,
    nodes: Vec<Node>,
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    run_dir: PathBuf,
    config_dir: PathBuf,
    cgroup_top: PathBuf,
    cgroup_top_rel: String,
    bin_dir: PathBuf,
    netns_made: Vec<String>,
    /// Environment every daemon starts with (its settings: `SIDELANE_*`).
    daemon_env: Vec<(String, String)>,
    /// A program (and its arguments) every daemon runs under, such as an instruction
    /// counter; empty for none.
    daemon_wrapper: Vec<String>,
    /// The CA server (and the test API server it asks), in the control plane's namespace,
    /// once started.
    control_plane: Vec<Child>,
    /// Whether daemons get certificates from the CA server (else the mesh has no CA).
    ca_enabled: bool,
    /// Whether the CA server has the API server review node tokens (else a token file).
    ca_token_review: bool,
}

/// The control plane's address on the fabric, where the CA server listens.
const CONTROL_PLANE_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 200, 0, 254);
const CA_PORT: u16 = 15012;
/// The CA server's default metrics port (istiod's monitoring port).
const CA_METRICS_PORT: u16 = 15014;

/// Whether the daemon of the node whose network namespace is `netns` says it is ready.
fn daemon_ready(netns: &str) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], READY_PORT));
    matches!(
        sys::http_get_in(netns, addr, "/healthz/ready"),
        Ok((200, _))
    )
}

/// Where `mesh-daemon` and `sidelane-workload` were built.
pub fn bin_dir() -> Result<PathBuf> {
    if let Ok(d) = std::env::var("SIDELANE_BIN_DIR") {
        return Ok(d.into());
    }
    let exe = std::env::current_exe().map_err(io_err("locating the test binary"))?;
    exe.ancestors()
        .skip(1)
        .take(3)
        .find(|d| d.join("mesh-daemon").exists() && d.join("sidelane-workload").exists())
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            HarnessError::Other(
                "mesh-daemon and sidelane-workload are not built next to the tests: run `cargo xtask test`".into(),
            )
        })
}

/// Six hex digits (names of network interfaces are short) unlikely to be in use: process,
/// time and a per-process counter, mixed (splitmix64's finaliser) so that tests started in
/// the same microsecond by the same process still differ. [`Cluster::new`] then claims the
/// ID by creating its run directory, and draws again if another run holds it.
fn unique_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut x =
        (u64::from(std::process::id()) << 32) ^ nanos ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    format!("{:06x}", x & 0xff_ffff)
}

/// A deterministic RFC 4122-shaped UID from a pod's coordinates.
fn pod_uid(id: &str, node: usize, index: usize) -> String {
    let h = u32::from_str_radix(id, 16).unwrap_or(0);
    format!(
        "{h:08x}-{node:04x}-4{index:03x}-8000-{:012x}",
        (u64::from(h) << 16) | (node as u64) << 8 | index as u64
    )
}

/// Wires `netns` to a bridge in another namespace: a veth pair whose `eth0` end, in
/// `netns`, gets `addrs`, and whose other end (`peer.1`, in `peer.0`) joins bridge `peer.2`.
fn plug(netns: &str, peer: (&str, &str, &str), addrs: [&str; 2]) -> Result<()> {
    let (peer_ns, peer_if, bridge) = peer;
    sys::ip(&[
        "link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", peer_if, "netns",
        peer_ns,
    ])?;
    sys::ip(&[
        "-n", peer_ns, "link", "set", peer_if, "master", bridge, "up",
    ])?;
    for a in addrs {
        addr_add(netns, "eth0", a)?;
    }
    sys::ip(&["-n", netns, "link", "set", "eth0", "up"])
}

/// Adds an address; IPv6 ones without duplicate-address detection, which would delay them.
fn addr_add(netns: &str, dev: &str, cidr: &str) -> Result<()> {
    let mut args = vec!["-n", netns, "addr", "add", cidr, "dev", dev];
    if cidr.contains(':') {
        args.push("nodad");
    }
    sys::ip(&args)
}

impl Cluster {
    /// Builds the fabric and `nodes` nodes; no daemon runs until [`Cluster::start`].
    pub fn new(nodes: usize) -> Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            return Err(HarnessError::Other(
                "the netns cluster needs root (CAP_NET_ADMIN, CAP_BPF, CAP_SYS_ADMIN)".into(),
            ));
        }
        // Claimed by creating the run directory: `create_dir` fails if another run has it.
        let (id, run_dir) = loop {
            let id = unique_id();
            let run_dir = std::env::temp_dir().join(format!("sidelane-test-{id}"));
            match std::fs::create_dir(&run_dir) {
                Ok(()) => break (id, run_dir),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("creating the run directory")(e)),
            }
        };
        let config_dir = run_dir.join("manifests");
        std::fs::create_dir_all(&config_dir).map_err(io_err("creating the run directory"))?;
        std::fs::create_dir_all(run_dir.join("logs"))
            .map_err(io_err("creating the log directory"))?;
        // The mesh's CA, as an operator would create the `cacerts` secret: only the CA server
        // reads the key; the daemons get the root (`roots/`) and a node token each.
        let ca_dir = run_dir.join("cacerts");
        std::fs::create_dir_all(&ca_dir).map_err(io_err("creating the CA directory"))?;
        mesh_daemon::identity::ca::Ca::generate(mesh_daemon::identity::DEFAULT_TRUST_DOMAIN)
            .and_then(|ca| ca.write(&ca_dir))
            .map_err(|e| HarnessError::Other(format!("making the test CA: {e}")))?;
        let roots = run_dir.join("roots");
        std::fs::create_dir_all(&roots).map_err(io_err("creating the roots directory"))?;
        std::fs::copy(
            ca_dir.join(mesh_daemon::identity::ca::ROOT_CERT),
            roots.join(mesh_daemon::identity::ca::ROOT_CERT),
        )
        .map_err(io_err("copying the root certificate"))?;
        let cgroup_top_rel = format!("sidelane-test-{id}");
        let cgroup_top = sys::cgroup2_root()?.join(&cgroup_top_rel);
        let mut c = Cluster {
            fabric: format!("sl{id}-fab"),
            id,
            nodes: Vec::new(),
            namespaces: BTreeMap::new(),
            pods: Vec::new(),
            services: Vec::new(),
            run_dir,
            config_dir,
            cgroup_top,
            cgroup_top_rel,
            bin_dir: bin_dir()?,
            netns_made: Vec::new(),
            daemon_env: Vec::new(),
            daemon_wrapper: Vec::new(),
            control_plane: Vec::new(),
            ca_enabled: true,
            ca_token_review: false,
        };
        std::fs::create_dir_all(&c.cgroup_top).map_err(io_err("creating the run's cgroup"))?;
        c.add_netns(&c.fabric.clone())?;
        sys::ip(&["-n", &c.fabric, "link", "add", "br0", "type", "bridge"])?;
        sys::ip(&["-n", &c.fabric, "link", "set", "br0", "up"])?;
        for i in 1..=nodes {
            c.add_node(i)?;
        }
        c.add_control_plane(nodes)?;
        for i in 1..=nodes {
            for j in 1..=nodes {
                if i != j {
                    let ns = &c.nodes[i - 1].netns;
                    sys::ip(&[
                        "-n",
                        ns,
                        "route",
                        "add",
                        &format!("10.244.{j}.0/24"),
                        "via",
                        &format!("10.200.0.{j}"),
                    ])?;
                    sys::ip(&[
                        "-n",
                        ns,
                        "-6",
                        "route",
                        "add",
                        &format!("fd00:244:{j}::/64"),
                        "via",
                        &format!("fd00:200::{j}"),
                    ])?;
                }
            }
        }
        Ok(c)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        sys::ip(&["netns", "add", name])?;
        self.netns_made.push(name.to_owned());
        // No duplicate-address detection: its delay would stall the first IPv6 packets.
        for key in [
            "net.ipv6.conf.all.accept_dad",
            "net.ipv6.conf.default.accept_dad",
        ] {
            sys::sysctl_in(name, key, "0")?;
        }
        sys::ip(&["-n", name, "link", "set", "lo", "up"])
    }

    fn add_node(&mut self, i: usize) -> Result<()> {
        let netns = format!("sl{}-n{i}", self.id);
        self.add_netns(&netns)?;
        let fab = self.fabric.clone();
        plug(
            &netns,
            (&fab, &format!("n{i}"), "br0"),
            [&format!("10.200.0.{i}/24"), &format!("fd00:200::{i}/64")],
        )?;
        sys::ip(&["-n", &netns, "link", "add", "cbr0", "type", "bridge"])?;
        addr_add(&netns, "cbr0", &format!("{}/24", self.node_gateway4(i)))?;
        addr_add(&netns, "cbr0", &format!("fd00:244:{i}::1/64"))?;
        sys::ip(&["-n", &netns, "link", "set", "cbr0", "up"])?;
        sys::sysctl_in(&netns, "net.ipv4.ip_forward", "1")?;
        sys::sysctl_in(&netns, "net.ipv6.conf.all.forwarding", "1")?;
        let name = format!("node-{i}");
        let cgroup = self.cgroup_top.join(&name);
        for sub in ["system", "kubepods"] {
            std::fs::create_dir_all(cgroup.join(sub)).map_err(io_err("creating node cgroups"))?;
        }
        self.nodes.push(Node {
            pin_dir: PathBuf::from("/sys/fs/bpf/sidelane").join(format!("test-{}-{name}", self.id)),
            name,
            netns,
            cgroup,
            daemon: None,
            retiring: Vec::new(),
            pods: 0,
        });
        Ok(())
    }

    /// The control plane's namespace on the fabric (where the CA server runs, as istiod would
    /// in a cluster), and one CA token per node: `run_dir/node-tokens` for the server,
    /// `run_dir/<node>.token` for each daemon.
    fn add_control_plane(&mut self, nodes: usize) -> Result<()> {
        let netns = self.control_plane_netns();
        self.add_netns(&netns)?;
        plug(
            &netns,
            (&self.fabric.clone(), "cp", "br0"),
            [&format!("{CONTROL_PLANE_IP}/24"), "fd00:200::fe/64"],
        )?;
        let mut table = String::new();
        for i in 1..=nodes {
            let token = format!("{}{}{}", unique_id(), unique_id(), unique_id());
            let name = self.node_name(i).to_owned();
            table.push_str(&format!("{token},{name}\n"));
            std::fs::write(self.run_dir.join(format!("{name}.token")), &token)
                .map_err(io_err("writing a node token"))?;
        }
        std::fs::write(self.run_dir.join("node-tokens"), table)
            .map_err(io_err("writing the node tokens"))
    }

    fn control_plane_netns(&self) -> String {
        format!("sl{}-cp", self.id)
    }

    /// The CA server's address, as daemons reach it from their nodes.
    pub fn ca_addr(&self) -> String {
        format!("{CONTROL_PLANE_IP}:{CA_PORT}")
    }

    /// The CA server's Prometheus metrics.
    pub fn ca_metrics(&self) -> Result<String> {
        let addr = SocketAddr::from((CONTROL_PLANE_IP, CA_METRICS_PORT));
        let (status, body) = sys::http_get_in(&self.control_plane_netns(), addr, "/metrics")?;
        if status != 200 {
            return Err(HarnessError::Other(format!(
                "the CA server's metrics answered {status}"
            )));
        }
        Ok(body)
    }

    /// The file holding `node`'s token for the CA server.
    pub fn node_token_file(&self, node: usize) -> PathBuf {
        self.run_dir.join(format!("{}.token", self.node_name(node)))
    }

    /// The directory holding only the mesh's root certificate, as daemons get it.
    pub fn roots_dir(&self) -> PathBuf {
        self.run_dir.join("roots")
    }

    /// Daemons started from now on have no CA: traffic between pods stays plaintext.
    pub fn without_ca(&mut self) {
        self.ca_enabled = false;
    }

    /// The CA server checks node tokens with the API server (TokenReview), as in a cluster,
    /// instead of a token file: a test API server answers it.
    pub fn ca_reviews_tokens(&mut self) {
        self.ca_token_review = true;
    }

    /// A token the test API server authenticates as a workload's service account (production
    /// /sleep, on node-1): a real token, but not a node's.
    pub fn workload_token_file(&self) -> PathBuf {
        self.run_dir.join("workload.token")
    }

    /// Starts a control-plane process and waits for `ready` in its log.
    fn start_control_plane_process(
        &mut self,
        name: &str,
        mut cmd: Command,
        ready: &str,
    ) -> Result<()> {
        let log = self.log_file(name)?;
        cmd.stdout(log.try_clone().map_err(io_err("log"))?)
            .stderr(log);
        let cgroup = self.cgroup_top.join("control-plane");
        std::fs::create_dir_all(&cgroup).map_err(io_err("creating the control plane's cgroup"))?;
        let child = sys::spawn_in(&self.control_plane_netns(), &cgroup, &mut cmd)?;
        self.control_plane.push(child);
        let log_path = self.run_dir.join("logs").join(format!("{name}.log"));
        sys::wait_for(name, DAEMON_READY_TIMEOUT, || {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(c) = self.control_plane.last_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Some(Err(HarnessError::Other(format!(
                    "{name} exited ({status}):\n{log}"
                ))));
            }
            log.contains(ready).then_some(Ok(()))
        })?
    }

    /// Starts the CA server in the control plane's namespace, once.
    fn start_ca_server(&mut self) -> Result<()> {
        if !self.control_plane.is_empty() || !self.ca_enabled {
            return Ok(());
        }
        let mut cmd = Command::new(self.bin_dir.join("sidelane-ca"));
        cmd.arg("--ca-dir")
            .arg(self.run_dir.join("cacerts"))
            .args(["--listen", &self.ca_addr()])
            .arg("--config-dir")
            .arg(&self.config_dir)
            .env("RUST_LOG", "info");
        if self.ca_token_review {
            let mut reviews = serde_json::Map::new();
            for i in 1..=self.nodes.len() {
                let token = std::fs::read_to_string(self.node_token_file(i))
                    .map_err(io_err("reading a node token"))?;
                reviews.insert(
                    token,
                    serde_json::json!({
                        "username": "system:serviceaccount:sidelane-system:sidelane",
                        "node": self.node_name(i),
                    }),
                );
            }
            let workload = format!("workload-{}", unique_id());
            std::fs::write(self.workload_token_file(), &workload)
                .map_err(io_err("writing the workload token"))?;
            reviews.insert(
                workload,
                serde_json::json!({
                    "username": "system:serviceaccount:production:sleep",
                    "node": self.node_name(1),
                }),
            );
            let reviews_file = self.run_dir.join("token-reviews.json");
            std::fs::write(
                &reviews_file,
                serde_json::Value::Object(reviews).to_string(),
            )
            .map_err(io_err("writing the token reviews"))?;
            let mut api = Command::new(self.bin_dir.join("sidelane-workload"));
            api.args(["token-reviews", "--listen", "127.0.0.1:6443", "--reviews"])
                .arg(&reviews_file);
            self.start_control_plane_process("test-api-server", api, "listening")?;
            let kubeconfig = self.run_dir.join("kubeconfig");
            std::fs::write(
                &kubeconfig,
                "apiVersion: v1\nkind: Config\nclusters: [{name: test, cluster: {server: 'http://127.0.0.1:6443'}}]\nusers: [{name: ca, user: {token: test}}]\ncontexts: [{name: test, context: {cluster: test, user: ca}}]\ncurrent-context: test\n",
            )
            .map_err(io_err("writing the kubeconfig"))?;
            cmd.env("KUBECONFIG", kubeconfig);
        } else {
            cmd.arg("--node-tokens")
                .arg(self.run_dir.join("node-tokens"));
        }
        self.start_control_plane_process("sidelane-ca", cmd, "CA server ready")
    }

    pub fn node_name(&self, node: usize) -> &str {
        &self.nodes[node - 1].name
    }

    /// The node's cgroup, where its daemon attaches the programs.
    pub fn node_cgroup(&self, node: usize) -> &Path {
        &self.nodes[node - 1].cgroup
    }

    /// The node's address on its pods' bridge: how pods reach a program on their node.
    pub fn node_gateway4(&self, node: usize) -> String {
        format!("10.244.{node}.1")
    }

    pub fn node_netns(&self, node: usize) -> &str {
        &self.nodes[node - 1].netns
    }

    pub fn namespace(&mut self, name: &str, labels: &[(&str, &str)]) -> Result<()> {
        self.namespaces.insert(
            name.into(),
            labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        );
        self.write_manifests()
    }

    /// Creates the pod's namespace, network and cgroup, and starts its server if asked.
    pub fn add_pod(&mut self, spec: PodSpec) -> Result<PodRef> {
        let i = spec.node;
        let node = self
            .nodes
            .get_mut(i.wrapping_sub(1))
            .ok_or_else(|| HarnessError::Other(format!("no node {i}")))?;
        node.pods += 1;
        let j = node.pods;
        let node_ns = node.netns.clone();
        let node_cgroup = node.cgroup.clone();
        let netns = format!("sl{}-n{i}p{j}", self.id);
        self.add_netns(&netns)?;
        let (ip4, ip6) = (
            format!("10.244.{i}.{}", 10 + j),
            format!("fd00:244:{i}::{}", 10 + j),
        );
        plug(
            &netns,
            (&node_ns, &format!("p{j}"), "cbr0"),
            [&format!("{ip4}/24"), &format!("{ip6}/64")],
        )?;
        for gw in [format!("10.244.{i}.1"), format!("fd00:244:{i}::1")] {
            sys::ip(&["-n", &netns, "route", "add", "default", "via", &gw])?;
        }
        let uid = pod_uid(&self.id, i, j);
        let cgroup = node_cgroup
            .join("kubepods")
            .join(format!("pod{uid}"))
            .join("app");
        std::fs::create_dir_all(&cgroup).map_err(io_err("creating the pod cgroup"))?;
        let mut pod = Pod {
            spec,
            uid,
            netns,
            ip4,
            ip6,
            cgroup,
            server: None,
        };
        // Every pod runs a process, as every real pod has its sandbox's pause process.
        let log = self.log_file(&format!("{}-{}", pod.spec.namespace, pod.spec.name))?;
        let version = pod
            .spec
            .labels
            .get("version")
            .cloned()
            .unwrap_or_else(|| "v1".into());
        let mut cmd = Command::new(self.bin_dir.join("sidelane-workload"));
        if pod.spec.serve {
            cmd.args([
                "serve",
                "--pod",
                &pod.spec.name,
                "--namespace",
                &pod.spec.namespace,
                "--version",
                &version,
            ]);
            for port in &pod.spec.also_http {
                cmd.args(["--also-http-port", &port.to_string()]);
            }
        } else {
            cmd.arg("pause");
        }
        cmd.stdout(log.try_clone().map_err(io_err("log"))?)
            .stderr(log);
        pod.server = Some(sys::spawn_in(&pod.netns, &pod.cgroup, &mut cmd)?);
        if pod.spec.serve {
            let ns = pod.netns.clone();
            sys::wait_for(
                "the workload server to listen",
                Duration::from_secs(5),
                || {
                    sys::in_netns(&ns, || {
                        std::net::TcpStream::connect(("127.0.0.1", HTTP_PORT)).is_ok()
                            && std::net::TcpStream::connect(("127.0.0.1", TCP_PORT)).is_ok()
                    })
                    .ok()
                    .filter(|ok| *ok)
                },
            )?;
        }
        self.pods.push(pod);
        self.write_manifests()?;
        Ok(PodRef(self.pods.len() - 1))
    }

    pub fn pod(&self, p: PodRef) -> &Pod {
        &self.pods[p.0]
    }

    pub fn add_service(
        &mut self,
        namespace: &str,
        name: &str,
        selector: &[(&str, &str)],
        ports: &[ServicePortSpec],
    ) -> Result<ServiceRef> {
        let n = self.services.len() + 10;
        self.services.push(Service {
            name: name.into(),
            namespace: namespace.into(),
            selector: selector
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            ports: ports.to_vec(),
            vip4: format!("10.96.0.{n}"),
            vip6: format!("fd00:96::{n:x}"),
        });
        self.write_manifests()?;
        Ok(ServiceRef(self.services.len() - 1))
    }

    pub fn service(&self, s: ServiceRef) -> &Service {
        &self.services[s.0]
    }

    /// Rewrites `cluster.yaml` in the manifest directory (atomically, by rename).
    pub fn write_manifests(&self) -> Result<()> {
        let mut objects = Vec::new();
        for (name, labels) in &self.namespaces {
            objects.push(manifests::namespace(name, labels));
        }
        for p in &self.pods {
            objects.push(manifests::pod(&PodObject {
                name: &p.spec.name,
                namespace: &p.spec.namespace,
                uid: &p.uid,
                node: &self.nodes[p.spec.node - 1].name,
                labels: &p.spec.labels,
                annotations: &p.spec.annotations,
                ips: [&p.ip4, &p.ip6],
                service_account: &p.spec.service_account,
            }));
        }
        for s in &self.services {
            let ports: Vec<ServicePortObject<'_>> = s
                .ports
                .iter()
                .map(|p| ServicePortObject {
                    name: &p.name,
                    port: p.port,
                    target: p.target,
                    app_protocol: p.app_protocol.as_deref(),
                })
                .collect();
            objects.push(manifests::service(
                &s.name,
                &s.namespace,
                &s.selector,
                [&s.vip4, &s.vip6],
                &ports,
            ));
            let members: Vec<&Pod> = self
                .pods
                .iter()
                .filter(|p| {
                    p.spec.namespace == s.namespace
                        && p.spec.serve
                        && s.selector
                            .iter()
                            .all(|(k, v)| p.spec.labels.get(k) == Some(v))
                })
                .collect();
            for (family, v6) in [("IPv4", false), ("IPv6", true)] {
                let eps: Vec<EndpointObject<'_>> = members
                    .iter()
                    .map(|p| EndpointObject {
                        ip: if v6 { &p.ip6 } else { &p.ip4 },
                        pod: &p.spec.name,
                        uid: &p.uid,
                        node: &self.nodes[p.spec.node - 1].name,
                    })
                    .collect();
                objects.push(manifests::endpoint_slice(
                    &s.name,
                    &s.namespace,
                    family,
                    &ports,
                    &eps,
                ));
            }
        }
        self.write_file("cluster.yaml", &manifests::to_yaml(&objects))
    }

    /// The manifest directory every daemon reads (the cluster's "API server").
    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    /// Adds (or replaces) a manifest file of the test's own, e.g. Istio resources.
    pub fn write_file(&self, name: &str, text: &str) -> Result<()> {
        let tmp = self.config_dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).map_err(io_err("writing a manifest"))?;
        std::fs::rename(&tmp, self.config_dir.join(name)).map_err(io_err("renaming a manifest"))
    }

    fn log_file(&self, name: &str) -> Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.run_dir.join("logs").join(format!("{name}.log")))
            .map_err(io_err("opening a log file"))
    }

    pub fn daemon_log(&self, node: usize) -> String {
        std::fs::read_to_string(
            self.run_dir
                .join("logs")
                .join(format!("{}.log", self.nodes[node - 1].name)),
        )
        .unwrap_or_default()
    }

    /// The daemon's log once it holds every one of `needles`, or as it is after 5 s. Access-log
    /// lines are written by a background thread, so a line can trail its response a little.
    pub fn daemon_log_with(&self, node: usize, needles: &[&str]) -> String {
        sys::wait_for("access-log lines", Duration::from_secs(5), || {
            let log = self.daemon_log(node);
            needles.iter().all(|n| log.contains(n)).then_some(log)
        })
        .unwrap_or_else(|_| self.daemon_log(node))
    }

    /// Sets a daemon setting (by its environment variable) for daemons started from now on.
    pub fn daemon_setting(&mut self, var: &str, value: &str) {
        self.daemon_env.push((var.to_owned(), value.to_owned()));
    }

    /// Runs daemons started from now on under `program args.. mesh-daemon ..` (valgrind for
    /// the instruction counts of the benchmarks). Their pid is the wrapper's, which must
    /// exec the daemon in the same process, as valgrind does.
    pub fn run_daemons_under(&mut self, program_and_args: &[&str]) {
        self.daemon_wrapper = program_and_args.iter().map(|&a| a.to_owned()).collect();
    }

    /// Starts every node's daemon and waits until each is ready.
    pub fn start(&mut self) -> Result<()> {
        self.start_ca_server()?;
        for i in 1..=self.nodes.len() {
            self.start_daemon(i)?;
        }
        Ok(())
    }

    pub fn start_daemon(&mut self, node: usize) -> Result<()> {
        let log = self.log_file(&self.nodes[node - 1].name.clone())?;
        let n = &self.nodes[node - 1];
        let daemon = self.bin_dir.join("mesh-daemon");
        let mut cmd = match self.daemon_wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(daemon);
                c
            }
            None => Command::new(daemon),
        };
        // An instrumented daemon starts many times slower.
        let ready_timeout = if self.daemon_wrapper.is_empty() {
            DAEMON_READY_TIMEOUT
        } else {
            DAEMON_READY_TIMEOUT * 6
        };
        cmd.args(["--node-name", &n.name])
            .arg("--config-dir")
            .arg(&self.config_dir)
            .args(["--cgroup", &format!("/{}/{}", self.cgroup_top_rel, n.name)])
            .arg("--pin-dir")
            .arg(&n.pin_dir)
            .arg("--handover-socket")
            .arg(self.run_dir.join(format!("{}-handover.sock", n.name)))
            .env("RUST_LOG", "info")
            .envs(self.daemon_env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().map_err(io_err("log"))?)
            .stderr(log);
        if self.ca_enabled {
            // Environment variables rather than flags, as the DaemonSet sets them.
            cmd.env("SIDELANE_CA_ADDR", self.ca_addr())
                .env("SIDELANE_CA_DIR", self.roots_dir())
                .env("SIDELANE_CA_TOKEN_FILE", self.node_token_file(node));
        } else {
            cmd.env("SIDELANE_CA_DIR", self.run_dir.join("no-ca"));
        }
        let child = sys::spawn_in(&n.netns, &n.cgroup.join("system"), &mut cmd)?;
        let netns = n.netns.clone();
        self.nodes[node - 1].daemon = Some(child);
        let ready = sys::wait_for("mesh-daemon readiness", ready_timeout, || {
            if let Some(c) = self.nodes[node - 1].daemon.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Some(Err(HarnessError::Other(format!(
                    "mesh-daemon on node {node} exited ({status}):\n{}",
                    self.daemon_log(node)
                ))));
            }
            daemon_ready(&netns).then_some(Ok(()))
        });
        ready?
    }

    /// Starts a second daemon on a node while the first runs, as a rolling update with
    /// `maxSurge` does: it takes the listeners over and the first drains (see
    /// [`Self::wait_retired`]). Returns once the successor holds the listeners and is ready.
    pub fn start_successor(&mut self, node: usize) -> Result<()> {
        const HANDED: &str = "a successor holds the listeners";
        let before = self.daemon_log(node).matches(HANDED).count();
        let old = self.nodes[node - 1]
            .daemon
            .take()
            .ok_or_else(|| HarnessError::Other(format!("no daemon runs on node {node}")))?;
        self.nodes[node - 1].retiring.push(old);
        // Readiness may still be answered by the old daemon: wait for the handover too.
        self.start_daemon(node)?;
        sys::wait_for(
            "the handover to the successor",
            DAEMON_READY_TIMEOUT,
            || (self.daemon_log(node).matches(HANDED).count() > before).then_some(()),
        )?;
        let netns = self.nodes[node - 1].netns.clone();
        sys::wait_for("the successor's readiness", DAEMON_READY_TIMEOUT, || {
            daemon_ready(&netns).then_some(())
        })
    }

    /// Sends SIGTERM to a node's daemon, which drains; [`Self::wait_retired`] waits for it.
    pub fn terminate_daemon(&mut self, node: usize) {
        if let Some(c) = self.nodes[node - 1].daemon.take() {
            sys::kill(c.id(), nix::sys::signal::Signal::SIGTERM);
            self.nodes[node - 1].retiring.push(c);
        }
    }

    /// Waits up to `timeout` for a node's retiring daemons to exit by themselves; their exit
    /// statuses, or an error naming what still runs.
    pub fn wait_retired(
        &mut self,
        node: usize,
        timeout: Duration,
    ) -> Result<Vec<std::process::ExitStatus>> {
        let n = &mut self.nodes[node - 1];
        let deadline = std::time::Instant::now() + timeout;
        let mut statuses = Vec::new();
        while let Some(c) = n.retiring.last_mut() {
            match c.try_wait() {
                Ok(Some(status)) => {
                    statuses.push(status);
                    n.retiring.pop();
                }
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => {
                    return Err(HarnessError::Other(format!(
                        "the retiring daemon {} on node {node} still runs after {timeout:?}",
                        c.id()
                    )));
                }
                Err(e) => return Err(HarnessError::Other(format!("waiting for a daemon: {e}"))),
            }
        }
        Ok(statuses)
    }

    /// Stops a pod's server as if it crashed: the pod stays in its Services' endpoints, and
    /// connections to it are refused.
    pub fn stop_server(&mut self, pod: PodRef) {
        if let Some(mut c) = self.pods[pod.0].server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills a node's daemon (SIGKILL: no chance to clean up, as in a crash).
    pub fn kill_daemon(&mut self, node: usize) {
        if let Some(mut c) = self.nodes[node - 1].daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a host-level program on a node (its network namespace, beside the daemon),
    /// as a node-local proxy would run. It is killed with the cluster at the latest.
    pub fn spawn_on_node(&self, node: usize, cmd: &mut Command) -> Result<Child> {
        let n = &self.nodes[node - 1];
        sys::spawn_in(&n.netns, &n.cgroup.join("system"), cmd)
    }

    /// This run's own directory (removed with the cluster): for files other programs need.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    pub fn daemon_pid(&self, node: usize) -> Option<u32> {
        self.nodes[node - 1].daemon.as_ref().map(Child::id)
    }

    pub fn admin_get(&self, node: usize, path: &str) -> Result<String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT));
        match sys::http_get_in(&self.nodes[node - 1].netns, addr, path)? {
            (200, body) => Ok(body),
            (status, body) => Err(HarnessError::Other(format!(
                "admin {path}: {status} {body}"
            ))),
        }
    }

    pub fn admin_json(&self, node: usize, path: &str) -> Result<Value> {
        let body = self.admin_get(node, path)?;
        serde_json::from_str(&body)
            .map_err(|e| HarnessError::Other(format!("admin {path}: {e}: {body}")))
    }

    /// The metrics a Prometheus server would scrape from a node's daemon.
    pub fn metrics(&self, node: usize) -> Result<String> {
        let addr = SocketAddr::from(([10, 200, 0, node as u8], METRICS_PORT));
        match sys::http_get_in(&self.nodes[node - 1].netns, addr, "/metrics")? {
            (200, body) => Ok(body),
            (status, _) => Err(HarnessError::Other(format!("metrics: HTTP {status}"))),
        }
    }

    /// Runs `meshctl` on a node, as an operator would on the host.
    pub fn meshctl(&self, node: usize, args: &[&str]) -> Result<String> {
        let n = &self.nodes[node - 1];
        let meshctl = self.bin_dir.join("meshctl");
        let meshctl = meshctl.to_string_lossy();
        let pin_dir = n.pin_dir.to_string_lossy();
        // nsenter, not `ip netns exec`: the latter remounts /sys, hiding bpffs.
        let net = format!("--net={}", sys::netns_path(&n.netns).display());
        let mut full = vec![net.as_str(), meshctl.as_ref()];
        full.extend_from_slice(args);
        if args.first() == Some(&"bpf") {
            full.splice(2..3, ["bpf", "--pin-dir", pin_dir.as_ref()]);
        }
        sys::run("nsenter", &full)
    }

    /// Waits until the node daemon reports the pod as enrolled (or not).
    pub fn wait_enrolled(&self, pod: PodRef, enrolled: bool) -> Result<()> {
        let p = self.pod(pod);
        let what = format!(
            "pod {}/{} enrolled={enrolled}",
            p.spec.namespace, p.spec.name
        );
        sys::wait_for(&what, ENROLL_TIMEOUT, || {
            let w = self.admin_json(p.spec.node, "/workloads").ok()?;
            let hit = w.as_array()?.iter().find(|x| x["uid"] == p.uid.as_str())?;
            (hit["enrolled"].as_bool() == Some(enrolled)).then_some(())
        })
    }

    /// Runs `sidelane-workload <args>` inside a pod, like `kubectl exec`.
    pub fn exec(&self, pod: PodRef, args: &[&str]) -> Result<String> {
        self.run_in(pod, &self.bin_dir.join("sidelane-workload"), args)
    }

    /// Runs `program <args>` in a pod (its network namespace and cgroup) to the end.
    pub fn run_in(&self, pod: PodRef, program: &Path, args: &[&str]) -> Result<String> {
        self.run_in_for(pod, program, args, CLIENT_TIMEOUT)
    }

    /// [`Cluster::run_in`] for programs that run longer, killed after `timeout`.
    pub fn run_in_for(
        &self,
        pod: PodRef,
        program: &Path,
        args: &[&str],
        timeout: Duration,
    ) -> Result<String> {
        let p = self.pod(pod);
        let mut cmd = Command::new(program);
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = sys::spawn_in(&p.netns, &p.cgroup, &mut cmd)?;
        let out = sys::wait_output(child, timeout, "a client in a pod")?;
        if !out.status.success() {
            return Err(HarnessError::Other(format!(
                "client failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `sidelane-workload <args>` in a pod without waiting for it.
    pub fn spawn_exec(&self, pod: PodRef, args: &[&str]) -> Result<RunningClient> {
        self.spawn_in(pod, &self.bin_dir.join("sidelane-workload"), args)
    }

    /// Starts `program <args>` in a pod without waiting for it; it is killed when the
    /// returned handle drops.
    pub fn spawn_in(&self, pod: PodRef, program: &Path, args: &[&str]) -> Result<RunningClient> {
        let p = self.pod(pod);
        let mut cmd = Command::new(program);
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = sys::spawn_in(&p.netns, &p.cgroup, &mut cmd)?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| HarnessError::Other("client stdout not piped".into()))?;
        Ok(RunningClient {
            child,
            lines: std::io::BufRead::lines(std::io::BufReader::new(stdout)),
        })
    }

    /// HTTP requests from a pod; one JSON object per request.
    pub fn http(&self, pod: PodRef, url: &str, extra: &[&str]) -> Result<Vec<Value>> {
        let mut args = vec!["http", "--url", url];
        args.extend_from_slice(extra);
        let out = self.exec(pod, &args)?;
        Ok(out
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// Tells the workload of pod `target` how to answer from now on (see the workload's
    /// `/__behave`: `delay_ms=..`, `status=..`, `reset=1`; empty for normal), asked from
    /// pod `from`.
    pub fn behave(&self, from: PodRef, target: &str, how: &str) -> Result<()> {
        let ip = self
            .pods
            .iter()
            .find(|p| p.spec.name == target)
            .map(|p| p.ip4.clone())
            .ok_or_else(|| HarnessError::Other(format!("no pod {target}")))?;
        let r = self.http(from, &format!("http://{ip}:8080/__behave?{how}"), &[])?;
        match r.first().and_then(|r| r["status"].as_u64()) {
            Some(200) => Ok(()),
            _ => Err(HarnessError::Other(format!(
                "{target} did not take {how:?}: {r:?}"
            ))),
        }
    }

    /// One TCP exchange from a pod, with `sidelane-workload tcp`'s options.
    pub fn tcp_with(&self, pod: PodRef, addr: &str, options: &[&str]) -> Result<Value> {
        let mut args = vec!["tcp", "--addr", addr];
        args.extend_from_slice(options);
        let out = self.exec(pod, &args)?;
        // The result is the last line; `--hold-ms` and `--linger-ms` print events before it.
        let last = out.trim().lines().last().unwrap_or_default();
        serde_json::from_str(last)
            .map_err(|e| HarnessError::Other(format!("tcp client output: {e}: {out:.200}")))
    }

    /// Sends `send` over TCP from a pod, half-closes and reads everything back.
    pub fn tcp(&self, pod: PodRef, addr: &str, send: &str) -> Result<Value> {
        self.tcp_with(pod, addr, &["--send", send])
    }

    /// Sends a line of `bytes` bytes over TCP from a pod and reads everything back.
    pub fn tcp_bulk(&self, pod: PodRef, addr: &str, bytes: usize) -> Result<Value> {
        self.tcp_with(pod, addr, &["--bulk", &bytes.to_string()])
    }

    fn cleanup(&mut self) {
        for n in &mut self.nodes {
            for mut c in n.retiring.drain(..) {
                let _ = c.kill();
                let _ = c.wait();
            }
            if let Some(mut c) = n.daemon.take() {
                sys::kill(c.id(), nix::sys::signal::Signal::SIGTERM);
                let deadline = std::time::Instant::now() + Duration::from_secs(2);
                while std::time::Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for mut c in self.control_plane.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for p in &mut self.pods {
            if let Some(mut c) = p.server.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        sys::remove_cgroup_tree(&self.cgroup_top);
        // Removing the link pins detaches the programs from the (now gone) cgroups.
        for n in &self.nodes {
            let _ = std::fs::remove_dir_all(&n.pin_dir);
        }
        let _ = std::fs::remove_dir(PathBuf::from("/sys/fs/bpf/sidelane"));
        for ns in self.netns_made.iter().rev() {
            let _ = sys::ip(&["netns", "del", ns]);
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 1..=self.nodes.len() {
                let log = self.daemon_log(i);
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!(
                    "--- mesh-daemon on node-{i}, last lines ---\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        self.cleanup();
    }
}
