//! The benchmark cluster. Two nodes; on node 1 two clients, one in the mesh (namespace
//! `bench`, enrolled) and one outside it (`outside`), so the direct and baseline paths start
//! from a pod the mesh leaves alone; a server pod on node 1 (`near`, same node) and one on
//! node 2 (`far`, cross node), each behind a Service; nginx and haproxy on node 1 beside the
//! daemon. Every path ends at the same server process.
use std::{path::Path, time::Duration};

use anyhow::Context as _;
use serde::Serialize;
use sidelane_tests::{Cluster, PodRef, PodSpec, RunningClient, ServicePortSpec, sys};

use crate::baselines::{self, Kind, Listener, Proxy, Upstream};

/// The node the clients, the measured daemon and the baseline proxies run on.
pub const CLIENT_NODE: usize = 1;
const HTTP_PORT: u16 = 8080;
/// The Service port named `http2`: the mesh speaks HTTP/2 to the server on it.
const HTTP2_SERVICE_PORT: u16 = 8081;
const IPERF_PORT: u16 = 5201;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    SameNode,
    CrossNode,
}

impl Placement {
    pub const ALL: [Placement; 2] = [Placement::SameNode, Placement::CrossNode];

    fn index(self) -> usize {
        match self {
            Placement::SameNode => 0,
            Placement::CrossNode => 1,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Placement::SameNode => "same-node",
            Placement::CrossNode => "cross-node",
        }
    }
}

/// The way from the client to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// The client dials the server pod: no proxy (the reference).
    Direct,
    /// The client dials the Service; Sidelane's eBPF and node daemon carry it.
    Sidelane,
    Nginx,
    Haproxy,
}

impl Via {
    pub const ALL: [Via; 4] = [Via::Direct, Via::Sidelane, Via::Nginx, Via::Haproxy];

    pub fn label(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Sidelane => "sidelane",
            Via::Nginx => "nginx",
            Via::Haproxy => "haproxy",
        }
    }
}

/// Where one measurement sends its traffic, and which processes carry it.
pub struct Target {
    pub client: PodRef,
    pub host: String,
    pub port: u16,
    /// The proxy's processes (none for direct).
    pub pids: Vec<u32>,
}

struct Server {
    pod_ip: String,
    vip: String,
}

pub struct Bench {
    pub cluster: Cluster,
    mesh_client: PodRef,
    plain_client: PodRef,
    servers: Vec<Server>,
    nginx: Proxy,
    haproxy: Proxy,
    _iperf: Vec<RunningClient>,
}

impl Bench {
    /// The cluster, with every daemon run under `daemon_under` (a program and its
    /// arguments, such as valgrind) when it is not empty.
    pub fn build(daemon_under: &[&str]) -> anyhow::Result<Self> {
        let mut c = Cluster::new(2).context("building the netns cluster")?;
        c.run_daemons_under(daemon_under);
        // Plaintext, as nginx and haproxy carry it: the same path for every proxy. The test
        // cluster's CA would put Sidelane's traffic in the mTLS tunnel.
        c.daemon_setting("SIDELANE_CA_DIR", "/nonexistent/sidelane-bench-plaintext");
        c.namespace("bench", &[("istio-injection", "enabled")])?;
        c.namespace("outside", &[])?;
        let mut server_pods = Vec::new();
        let mut services = Vec::new();
        for (app, node) in [("near", 1), ("far", 2)] {
            server_pods.push(
                c.add_pod(
                    PodSpec::new("bench", &format!("{app}-server"), node)
                        .label("app", app)
                        .serving(),
                )?,
            );
            services.push(c.add_service(
                "bench",
                app,
                &[("app", app)],
                &[
                    ServicePortSpec::new("http", HTTP_PORT, HTTP_PORT),
                    ServicePortSpec::new("http2", HTTP2_SERVICE_PORT, HTTP_PORT),
                    ServicePortSpec::new("tcp-iperf", IPERF_PORT, IPERF_PORT),
                ],
            )?);
        }
        let mesh_client =
            c.add_pod(PodSpec::new("bench", "client", CLIENT_NODE).label("app", "client"))?;
        let plain_client =
            c.add_pod(PodSpec::new("outside", "client", CLIENT_NODE).label("app", "client"))?;
        c.start()?;
        c.wait_enrolled(mesh_client, true)?;
        c.wait_enrolled(plain_client, false)?;

        let mut iperf = Vec::new();
        for &p in &server_pods {
            iperf.push(c.spawn_in(
                p,
                Path::new("iperf3"),
                &["-s", "-p", &IPERF_PORT.to_string()],
            )?);
            let netns = c.pod(p).netns.clone();
            sys::wait_for("iperf3 listening", Duration::from_secs(10), || {
                let filter = format!("sport = :{IPERF_PORT}");
                let out = sys::run("ip", &["netns", "exec", &netns, "ss", "-Hltn", &filter]);
                out.ok().filter(|o| !o.trim().is_empty()).map(drop)
            })?;
        }
        let servers: Vec<Server> = server_pods
            .iter()
            .zip(&services)
            .map(|(&p, &s)| Server {
                pod_ip: c.pod(p).ip4.clone(),
                vip: c.service(s).vip4.clone(),
            })
            .collect();
        let upstreams: Vec<Upstream> = ["near", "far"]
            .iter()
            .zip(&servers)
            .map(|(name, s)| -> anyhow::Result<Upstream> {
                Ok(Upstream {
                    name,
                    http: format!("{}:{HTTP_PORT}", s.pod_ip).parse()?,
                    tcp: format!("{}:{IPERF_PORT}", s.pod_ip).parse()?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let nginx = Proxy::start(&c, CLIENT_NODE, Kind::Nginx, &upstreams)?;
        let haproxy = Proxy::start(&c, CLIENT_NODE, Kind::Haproxy, &upstreams)?;
        Ok(Self {
            cluster: c,
            mesh_client,
            plain_client,
            servers,
            nginx,
            haproxy,
            _iperf: iperf,
        })
    }

    /// The processes of each proxy, for memory and CPU accounting.
    pub fn pids(&self, via: Via) -> Vec<u32> {
        match via {
            Via::Direct => vec![],
            Via::Sidelane => self.cluster.daemon_pid(CLIENT_NODE).into_iter().collect(),
            Via::Nginx => self.nginx.pids(),
            Via::Haproxy => self.haproxy.pids(),
        }
    }

    pub fn target(&self, placement: Placement, via: Via, listener: Listener) -> Target {
        let server = &self.servers[placement.index()];
        let pids = self.pids(via);
        let baseline = |proxy: &Proxy| Target {
            client: self.plain_client,
            host: self.cluster.node_gateway4(CLIENT_NODE),
            port: baselines::port(proxy.kind, placement.index(), listener),
            pids: pids.clone(),
        };
        match via {
            Via::Direct => Target {
                client: self.plain_client,
                host: server.pod_ip.clone(),
                port: match listener {
                    Listener::Tcp => IPERF_PORT,
                    Listener::Http1 | Listener::Http2 => HTTP_PORT,
                },
                pids,
            },
            Via::Sidelane => Target {
                client: self.mesh_client,
                host: server.vip.clone(),
                port: match listener {
                    Listener::Http1 => HTTP_PORT,
                    Listener::Http2 => HTTP2_SERVICE_PORT,
                    Listener::Tcp => IPERF_PORT,
                },
                pids,
            },
            Via::Nginx => baseline(&self.nginx),
            Via::Haproxy => baseline(&self.haproxy),
        }
    }
}
