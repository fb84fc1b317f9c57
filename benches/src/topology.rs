//! The benchmark cluster. Two nodes; on node 1 two clients, one in the mesh (namespace
//! `bench`, enrolled) and one outside it (`outside`), so the direct and baseline paths start
//! from a pod the mesh leaves alone; a server pod on node 1 (`near`, same node) and one on
//! node 2 (`far`, cross node), each behind a Service; nginx and haproxy on both nodes beside
//! the daemons. Every path ends at the same server process.
//!
//! The daemons have the mesh's CA, so the mesh carries traffic between enrolled pods in its
//! mTLS tunnel. Each server also answers on ports it excludes from the mesh
//! (`excludeInboundPorts`): the mesh's plaintext path goes there, as it does to a pod outside
//! the mesh, and so do the direct and baseline paths, which the mesh's inbound capture would
//! otherwise take in.
use std::{path::Path, time::Duration};

use anyhow::Context as _;
use serde::Serialize;
use sidelane_tests::{Cluster, PodRef, PodSpec, RunningClient, ServicePortSpec, sys};

use crate::baselines::{self, Hop, Kind, Listener, Proxy, TlsFiles, Upstream};

/// The node the clients, the measured daemon and the baseline proxies run on.
pub const CLIENT_NODE: usize = 1;
/// HTTP through the mesh's tunnel.
const HTTP_PORT: u16 = 8080;
/// The Service port named `http2`: the mesh speaks HTTP/2 to the server on it.
const HTTP2_SERVICE_PORT: u16 = 8081;
const IPERF_PORT: u16 = 5201;
/// The same server's HTTP on a port the mesh leaves alone.
const PLAIN_HTTP_PORT: u16 = 8090;
/// Service ports to it: `http-plain` and `http2-plain`.
const PLAIN_HTTP_SERVICE_PORT: u16 = 9080;
const PLAIN_HTTP2_SERVICE_PORT: u16 = 9081;
const PLAIN_IPERF_PORT: u16 = 5202;

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

/// What the proxies do to the bytes between the nodes' hops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Security {
    /// One proxy, on the client's node, in plaintext.
    Plaintext,
    /// Two proxies, one on the client's node and one on the server's, mutual TLS between
    /// them (for the mesh, its HBONE tunnel).
    Mtls,
}

impl Security {
    pub const ALL: [Security; 2] = [Security::Plaintext, Security::Mtls];

    pub fn label(self) -> &'static str {
        match self {
            Security::Plaintext => "plaintext",
            Security::Mtls => "mtls",
        }
    }
}

/// Where the server is and how the proxies carry traffic to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Route {
    pub placement: Placement,
    pub security: Security,
}

impl Route {
    pub fn all() -> impl Iterator<Item = Route> {
        Security::ALL.into_iter().flat_map(|security| {
            Placement::ALL.map(|placement| Route {
                placement,
                security,
            })
        })
    }

    pub fn label(self) -> String {
        format!("{} {}", self.placement.label(), self.security.label())
    }

    fn server_node(self) -> usize {
        match self.placement {
            Placement::SameNode => CLIENT_NODE,
            Placement::CrossNode => 2,
        }
    }

    /// The nodes whose proxies carry this route: for mTLS, the server's node's too.
    fn nodes(self) -> Vec<usize> {
        let mut nodes = vec![CLIENT_NODE];
        if self.security == Security::Mtls && self.server_node() != CLIENT_NODE {
            nodes.push(self.server_node());
        }
        nodes
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
    /// The proxies' processes (none for direct), a list per node the path crosses.
    pub per_node: Vec<Vec<u32>>,
}

impl Target {
    /// Every process of the proxies on the path.
    pub fn pids(&self) -> Vec<u32> {
        self.per_node.concat()
    }
}

struct Server {
    pod_ip: String,
    vip: String,
    /// The Service's name in the mesh's metrics.
    host: String,
}

/// What the client's node daemon has carried to one Service so far (requests and TCP
/// connections, as its source-side metrics count them), by whether the peer was
/// authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Carried {
    pub mutual_tls: u64,
    pub plaintext: u64,
}

impl Carried {
    /// Whether everything carried between `before` and `self` went as `security` says.
    pub fn only(self, before: Carried, security: Security) -> bool {
        let tls = self.mutual_tls - before.mutual_tls.min(self.mutual_tls);
        let plain = self.plaintext - before.plaintext.min(self.plaintext);
        match security {
            Security::Mtls => tls > 0 && plain == 0,
            Security::Plaintext => plain > 0 && tls == 0,
        }
    }
}

/// One baseline proxy on each node (the one on node 2 carries the mTLS path's second hop).
struct Baseline {
    kind: Kind,
    on_node: Vec<(usize, Proxy)>,
}

impl Baseline {
    fn pids(&self, nodes: &[usize]) -> Vec<u32> {
        self.on_node
            .iter()
            .filter(|(n, _)| nodes.contains(n))
            .flat_map(|(_, p)| p.pids())
            .collect()
    }
}

pub struct Bench {
    pub cluster: Cluster,
    mesh_client: PodRef,
    plain_client: PodRef,
    servers: Vec<Server>,
    nginx: Baseline,
    haproxy: Baseline,
    _iperf: Vec<RunningClient>,
}

impl Bench {
    /// The cluster, with every daemon run under `daemon_under` (a program and its
    /// arguments, such as valgrind) when it is not empty.
    pub fn build(daemon_under: &[&str]) -> anyhow::Result<Self> {
        let mut c = Cluster::new(2).context("building the netns cluster")?;
        c.run_daemons_under(daemon_under);
        c.namespace("bench", &[("istio-injection", "enabled")])?;
        c.namespace("outside", &[])?;
        let mut server_pods = Vec::new();
        let mut services = Vec::new();
        let excluded = format!("{PLAIN_HTTP_PORT},{PLAIN_IPERF_PORT}");
        for (app, node) in [("near", 1), ("far", 2)] {
            server_pods.push(
                c.add_pod(
                    PodSpec::new("bench", &format!("{app}-server"), node)
                        .label("app", app)
                        .annotation("traffic.sidecar.istio.io/excludeInboundPorts", &excluded)
                        .serving_http_also_on(PLAIN_HTTP_PORT),
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
                    ServicePortSpec::new("http-plain", PLAIN_HTTP_SERVICE_PORT, PLAIN_HTTP_PORT),
                    ServicePortSpec::new("http2-plain", PLAIN_HTTP2_SERVICE_PORT, PLAIN_HTTP_PORT),
                    ServicePortSpec::new("tcp-iperf-plain", PLAIN_IPERF_PORT, PLAIN_IPERF_PORT),
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

        // iperf3 serves one test at a time: one server per port.
        let mut iperf = Vec::new();
        for &p in &server_pods {
            for port in [IPERF_PORT, PLAIN_IPERF_PORT] {
                iperf.push(c.spawn_in(p, Path::new("iperf3"), &["-s", "-p", &port.to_string()])?);
                let netns = c.pod(p).netns.clone();
                sys::wait_for("iperf3 listening", Duration::from_secs(10), || {
                    let filter = format!("sport = :{port}");
                    let out = sys::run("ip", &["netns", "exec", &netns, "ss", "-Hltn", &filter]);
                    out.ok().filter(|o| !o.trim().is_empty()).map(drop)
                })?;
            }
        }
        let servers: Vec<Server> = server_pods
            .iter()
            .zip(&services)
            .zip(["near", "far"])
            .map(|((&p, &s), app)| Server {
                pod_ip: c.pod(p).ip4.clone(),
                vip: c.service(s).vip4.clone(),
                host: format!("{app}.bench.svc.cluster.local"),
            })
            .collect();
        let upstreams: Vec<Upstream> = [("near", 1), ("far", 2)]
            .iter()
            .zip(&servers)
            .map(|((name, node), s)| -> anyhow::Result<Upstream> {
                Ok(Upstream {
                    name,
                    node: *node,
                    http: format!("{}:{PLAIN_HTTP_PORT}", s.pod_ip).parse()?,
                    tcp: format!("{}:{PLAIN_IPERF_PORT}", s.pod_ip).parse()?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let tls = TlsFiles::issue(
            &c.run_dir().join("cacerts"),
            &c.run_dir().join("baseline-tls"),
        )
        .context("issuing the baselines' certificate")?;
        let start = |kind: Kind| -> anyhow::Result<Baseline> {
            let mut on_node = Vec::new();
            for node in [1, 2] {
                let forwards = baselines::forwards(
                    |n| c.node_gateway4(n),
                    kind,
                    node,
                    CLIENT_NODE,
                    &upstreams,
                )?;
                on_node.push((node, Proxy::start(&c, node, kind, &forwards, &tls)?));
            }
            Ok(Baseline { kind, on_node })
        };
        let nginx = start(Kind::Nginx)?;
        let haproxy = start(Kind::Haproxy)?;
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

    /// The processes of each proxy on `nodes`, for memory and CPU accounting.
    pub fn pids(&self, via: Via, nodes: &[usize]) -> Vec<u32> {
        match via {
            Via::Direct => vec![],
            Via::Sidelane => nodes
                .iter()
                .filter_map(|n| self.cluster.daemon_pid(*n))
                .collect(),
            Via::Nginx => self.nginx.pids(nodes),
            Via::Haproxy => self.haproxy.pids(nodes),
        }
    }

    /// The processes of the proxies on the client's node.
    pub fn client_node_pids(&self, via: Via) -> Vec<u32> {
        self.pids(via, &[CLIENT_NODE])
    }

    /// What the mesh has carried to the route's server so far: a measurement through the
    /// mesh checks that its warm-up went the way the route says (through the tunnel or not).
    pub fn carried(&self, route: Route) -> anyhow::Result<Carried> {
        let server = &self.servers[route.placement.index()];
        let m = self.cluster.metrics(CLIENT_NODE)?;
        let service = format!("destination_service=\"{}\"", server.host);
        let count = |principal: &str| {
            ["istio_requests_total", "istio_tcp_connections_opened_total"]
                .iter()
                .map(|name| {
                    sidelane_tests::scenario::metric(
                        &m,
                        name,
                        &["reporter=\"source\"", &service, principal],
                    )
                })
                .sum()
        };
        Ok(Carried {
            mutual_tls: count("destination_principal=\"spiffe://"),
            plaintext: count("destination_principal=\"unknown\""),
        })
    }

    pub fn target(&self, route: Route, via: Via, listener: Listener) -> Target {
        let server = &self.servers[route.placement.index()];
        let per_node: Vec<Vec<u32>> = route
            .nodes()
            .into_iter()
            .map(|n| self.pids(via, &[n]))
            .filter(|p| !p.is_empty())
            .collect();
        let mtls = route.security == Security::Mtls;
        let baseline = |b: &Baseline| Target {
            client: self.plain_client,
            host: self.cluster.node_gateway4(CLIENT_NODE),
            port: baselines::port(
                b.kind,
                route.placement.index(),
                listener,
                if mtls { Hop::Originate } else { Hop::Plain },
            ),
            per_node: per_node.clone(),
        };
        match via {
            // The same for both: no proxy, no TLS.
            Via::Direct => Target {
                client: self.plain_client,
                host: server.pod_ip.clone(),
                port: match listener {
                    Listener::Tcp => PLAIN_IPERF_PORT,
                    Listener::Http1 | Listener::Http2 => PLAIN_HTTP_PORT,
                },
                per_node: per_node.clone(),
            },
            Via::Sidelane => Target {
                client: self.mesh_client,
                host: server.vip.clone(),
                port: match (listener, mtls) {
                    (Listener::Http1, true) => HTTP_PORT,
                    (Listener::Http2, true) => HTTP2_SERVICE_PORT,
                    (Listener::Tcp, true) => IPERF_PORT,
                    (Listener::Http1, false) => PLAIN_HTTP_SERVICE_PORT,
                    (Listener::Http2, false) => PLAIN_HTTP2_SERVICE_PORT,
                    (Listener::Tcp, false) => PLAIN_IPERF_PORT,
                },
                per_node: per_node.clone(),
            },
            Via::Nginx => baseline(&self.nginx),
            Via::Haproxy => baseline(&self.haproxy),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_is_carried_as_it_says_only_if_nothing_went_the_other_way() {
        let before = Carried {
            mutual_tls: 10,
            plaintext: 5,
        };
        let tunnelled = Carried {
            mutual_tls: 30,
            plaintext: 5,
        };
        let mixed = Carried {
            mutual_tls: 30,
            plaintext: 6,
        };
        assert!(tunnelled.only(before, Security::Mtls));
        assert!(!tunnelled.only(before, Security::Plaintext));
        assert!(!mixed.only(before, Security::Mtls));
        // Nothing carried at all proves nothing.
        assert!(!before.only(before, Security::Mtls));
        assert!(!before.only(before, Security::Plaintext));
    }

    #[test]
    fn the_mtls_route_crosses_the_server_node_too() {
        let route = |placement, security| Route {
            placement,
            security,
        };
        assert_eq!(route(Placement::CrossNode, Security::Mtls).nodes(), [1, 2]);
        assert_eq!(route(Placement::SameNode, Security::Mtls).nodes(), [1]);
        assert_eq!(
            route(Placement::CrossNode, Security::Plaintext).nodes(),
            [1]
        );
        assert_eq!(Route::all().count(), 4);
    }
}
