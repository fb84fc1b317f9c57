//! nginx and haproxy set up as node proxies on the same paths the mesh takes: in the nodes'
//! network namespaces, beside the daemons, forwarding the client pod's traffic to the same
//! server pods. Plaintext: one proxy on the client's node forwards to the server pod, as the
//! mesh's single hop does to a pod outside it. mTLS: two hops as the mesh's tunnel has, the
//! client's node's proxy originating TLS with a client certificate to a proxy on the
//! server's node, which requires one from the mesh's CA and forwards in plaintext. Every
//! listener keeps upstream connections alive as the mesh does.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use anyhow::Context as _;
use sidelane_tests::{Cluster, sys};

/// What a baseline listener carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// HTTP/1.1 in, HTTP/1.1 keep-alive out.
    Http1,
    /// HTTP/2 (prior knowledge, or ALPN h2 in TLS) in; out HTTP/2 for haproxy, HTTP/1.1 for
    /// nginx (its proxy module has no HTTP/2 upstream).
    Http2,
    /// Opaque TCP.
    Tcp,
}

impl Listener {
    const ALL: [Listener; 3] = [Listener::Http1, Listener::Http2, Listener::Tcp];
}

/// Which hop of a path a listener is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// Plaintext in, plaintext to the server pod: the whole path.
    Plain,
    /// The client's node of the mTLS path: plaintext in, TLS to the server's node out.
    Originate,
    /// The server's node of the mTLS path: TLS with a client certificate in, plaintext out.
    Terminate,
}

/// One server pod a baseline forwards to, and the node it runs on.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub name: &'static str,
    pub node: usize,
    pub http: SocketAddr,
    pub tcp: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Nginx,
    Haproxy,
}

impl Kind {
    fn base_port(self) -> u16 {
        match self {
            Kind::Nginx => 20000,
            Kind::Haproxy => 30000,
        }
    }
}

/// The port a baseline listens on for upstream number `index`, `listener` and `hop`.
pub fn port(kind: Kind, index: usize, listener: Listener, hop: Hop) -> u16 {
    let l = match listener {
        Listener::Http1 => 0,
        Listener::Http2 => 1,
        Listener::Tcp => 2,
    };
    let h = match hop {
        Hop::Plain => 0,
        Hop::Originate => 100,
        Hop::Terminate => 200,
    };
    kind.base_port() + h + 10 * index as u16 + l
}

/// The name the baselines' certificate carries and each TLS client checks (nginx and
/// haproxy check DNS names; the mesh checks the SPIFFE ID the same certificate also holds).
pub const TLS_NAME: &str = "bench-proxy";

/// The baselines' certificate, key and trusted root, issued by the mesh's CA so every path
/// does the same cryptography (ECDSA P-256, TLS 1.3).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate and key in one file, as haproxy's `crt` wants.
    pub bundle: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// Issues the certificate with openssl from the CA in `ca_dir` (the `cacerts` layout).
    pub fn issue(ca_dir: &Path, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let files = TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            bundle: dir.join("bundle.pem"),
            ca: ca_dir.join("root-cert.pem"),
        };
        let csr = dir.join("req.csr");
        let ext = dir.join("ext.cnf");
        std::fs::write(
            &ext,
            format!(
                "subjectAltName=DNS:{TLS_NAME},URI:spiffe://cluster.local/ns/outside/sa/default\n\
                 keyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
            ),
        )?;
        let openssl = |args: &[&std::ffi::OsStr]| -> anyhow::Result<()> {
            let out = Command::new("openssl")
                .args(args)
                .output()
                .context("running openssl")?;
            anyhow::ensure!(
                out.status.success(),
                "openssl {:?}: {}",
                args,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            Ok(())
        };
        let s = |v: &'static str| std::ffi::OsStr::new(v);
        openssl(&[
            s("req"),
            s("-new"),
            s("-newkey"),
            s("ec"),
            s("-pkeyopt"),
            s("ec_paramgen_curve:prime256v1"),
            s("-nodes"),
            s("-subj"),
            s("/CN=bench-proxy"),
            s("-keyout"),
            files.key.as_os_str(),
            s("-out"),
            csr.as_os_str(),
        ])?;
        openssl(&[
            s("x509"),
            s("-req"),
            s("-in"),
            csr.as_os_str(),
            s("-CA"),
            ca_dir.join("ca-cert.pem").as_os_str(),
            s("-CAkey"),
            ca_dir.join("ca-key.pem").as_os_str(),
            s("-set_serial"),
            s("1"),
            s("-days"),
            s("1"),
            s("-extfile"),
            ext.as_os_str(),
            s("-out"),
            files.cert.as_os_str(),
        ])?;
        let bundle = std::fs::read_to_string(&files.cert)? + &std::fs::read_to_string(&files.key)?;
        std::fs::write(&files.bundle, bundle)?;
        Ok(files)
    }
}

/// One listener of a baseline proxy and where it forwards.
#[derive(Clone, Debug)]
pub struct Forward {
    /// Unique within the proxy (nginx upstream and haproxy section names).
    pub name: String,
    pub listener: Listener,
    pub listen: SocketAddr,
    pub to: SocketAddr,
    pub hop: Hop,
}

/// Every listener the proxy of `kind` on `node` has: on the client's node the plaintext
/// path and the first mTLS hop to every upstream; on every node the second mTLS hop to the
/// upstreams there. Listeners are on each node's pod-bridge address, `gateway(node)`.
pub fn forwards(
    gateway: impl Fn(usize) -> String,
    kind: Kind,
    node: usize,
    client_node: usize,
    upstreams: &[Upstream],
) -> anyhow::Result<Vec<Forward>> {
    let at = |node: usize, port: u16| -> anyhow::Result<SocketAddr> {
        Ok(SocketAddr::new(gateway(node).parse()?, port))
    };
    let mut out = Vec::new();
    for (i, u) in upstreams.iter().enumerate() {
        for listener in Listener::ALL {
            let server = match listener {
                Listener::Http1 | Listener::Http2 => u.http,
                Listener::Tcp => u.tcp,
            };
            let name = |hop: &str| format!("{}-{hop}-{listener:?}", u.name).to_lowercase();
            if node == client_node {
                out.push(Forward {
                    name: name("plain"),
                    listener,
                    listen: at(node, port(kind, i, listener, Hop::Plain))?,
                    to: server,
                    hop: Hop::Plain,
                });
                out.push(Forward {
                    name: name("originate"),
                    listener,
                    listen: at(node, port(kind, i, listener, Hop::Originate))?,
                    to: at(u.node, port(kind, i, listener, Hop::Terminate))?,
                    hop: Hop::Originate,
                });
            }
            if node == u.node {
                out.push(Forward {
                    name: name("terminate"),
                    listener,
                    listen: at(node, port(kind, i, listener, Hop::Terminate))?,
                    to: server,
                    hop: Hop::Terminate,
                });
            }
        }
    }
    Ok(out)
}

const WORKERS: u32 = 2;
/// Within the usual hard limit of open files (haproxy wants two per connection).
const MAX_CONNECTIONS: u32 = 8000;

fn nginx_config(dir: &Path, forwards: &[Forward], tls: &TlsFiles) -> String {
    let d = dir.display();
    let mut http = String::new();
    let mut stream = String::new();
    for f in forwards {
        let (name, listen, to) = (&f.name, f.listen, f.to);
        let ssl_in = if f.hop == Hop::Terminate { " ssl" } else { "" };
        match f.listener {
            Listener::Http1 | Listener::Http2 => {
                let h2 = if f.listener == Listener::Http2 {
                    " http2"
                } else {
                    ""
                };
                let scheme = if f.hop == Hop::Originate {
                    "https"
                } else {
                    "http"
                };
                http.push_str(&format!(
                    "  upstream {name} {{ server {to}; keepalive 128; }}\n\
                     \x20 server {{ listen {listen}{ssl_in}{h2}; location / {{ proxy_pass {scheme}://{name}; }} }}\n"
                ));
            }
            Listener::Tcp => {
                let ssl_out = if f.hop == Hop::Originate {
                    " proxy_ssl on;"
                } else {
                    ""
                };
                stream.push_str(&format!(
                    "  server {{ listen {listen}{ssl_in}; proxy_pass {to};{ssl_out} }}\n"
                ));
            }
        }
    }
    // Both directions' TLS settings, for the listeners and upstreams that use TLS: TLS 1.3,
    // a client certificate required and checked against the mesh's root, the server's
    // checked against it and the name.
    let tls_settings = format!(
        "  ssl_certificate {cert};\n  ssl_certificate_key {key};\n  ssl_client_certificate {ca};\n\
         \x20 ssl_verify_client on;\n  ssl_protocols TLSv1.3;\n\
         \x20 proxy_ssl_certificate {cert};\n  proxy_ssl_certificate_key {key};\n\
         \x20 proxy_ssl_trusted_certificate {ca};\n  proxy_ssl_verify on;\n\
         \x20 proxy_ssl_name {TLS_NAME};\n  proxy_ssl_protocols TLSv1.3;\n",
        cert = tls.cert.display(),
        key = tls.key.display(),
        ca = tls.ca.display()
    );
    format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         worker_processes {WORKERS};\n\
         daemon off;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/nginx-error.log warn;\n\
         events {{ worker_connections {MAX_CONNECTIONS}; }}\n\
         http {{\n\
         \x20 log_format mesh '[$time_iso8601] \"$request\" $status $request_length $body_bytes_sent $request_time \"$http_x_forwarded_for\" \"$http_user_agent\" \"$http_x_request_id\" \"$host\" \"$upstream_addr\" $upstream_response_time $remote_addr:$remote_port';\n\
         \x20 access_log {d}/access.log mesh buffer=64k flush=100ms;\n\
         \x20 client_body_temp_path {d}/body;\n\
         \x20 proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fastcgi;\n\
         \x20 uwsgi_temp_path {d}/uwsgi;\n\
         \x20 scgi_temp_path {d}/scgi;\n\
         \x20 proxy_http_version 1.1;\n\
         \x20 proxy_set_header Connection \"\";\n\
         \x20 keepalive_requests 1000000;\n\
         \x20 http2_max_requests 1000000;\n\
         {tls_settings}\
         {http}}}\n\
         stream {{\n\
         \x20 log_format tcp '[$time_iso8601] $status $bytes_received $bytes_sent $session_time \"$upstream_addr\" $remote_addr:$remote_port';\n\
         \x20 access_log {d}/tcp-access.log tcp buffer=64k flush=100ms;\n\
         {tls_settings}\
         {stream}}}\n"
    )
}

fn haproxy_config(forwards: &[Forward], tls: &TlsFiles) -> String {
    let mut out = format!(
        "global\n  nbthread {WORKERS}\n  maxconn {MAX_CONNECTIONS}\n  log stdout format raw local0\n\
         \x20 ssl-default-bind-options ssl-min-ver TLSv1.3\n  ssl-default-server-options ssl-min-ver TLSv1.3\n\
         defaults\n  mode http\n  log global\n  option httplog\n  timeout connect 10s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\n"
    );
    let (bundle, ca) = (tls.bundle.display(), tls.ca.display());
    for f in forwards {
        let (name, listen, to) = (&f.name, f.listen, f.to);
        let h2 = f.listener == Listener::Http2;
        let mut bind = format!("bind {listen}");
        let mut server = format!("server s {to}");
        match f.hop {
            Hop::Plain => {}
            Hop::Originate => server.push_str(&format!(
                " ssl crt {bundle} ca-file {ca} verify required verifyhost {TLS_NAME}"
            )),
            Hop::Terminate => {
                bind.push_str(&format!(" ssl crt {bundle} ca-file {ca} verify required"))
            }
        }
        if h2 {
            // In TLS, h2 is chosen by ALPN; in plaintext by prior knowledge.
            let in_tls = f.hop == Hop::Terminate;
            let out_tls = f.hop == Hop::Originate;
            bind.push_str(if in_tls { " alpn h2" } else { " proto h2" });
            server.push_str(if out_tls { " alpn h2" } else { " proto h2" });
        }
        match f.listener {
            Listener::Http1 | Listener::Http2 => out.push_str(&format!(
                "frontend {name}\n  {bind}\n  default_backend {name}\nbackend {name}\n  {server}\n"
            )),
            Listener::Tcp => out.push_str(&format!(
                "listen {name}\n  mode tcp\n  option tcplog\n  {bind}\n  {server}\n"
            )),
        }
    }
    out
}

/// A running baseline proxy; stopped when dropped (and killed with the cluster's cgroups
/// at the latest).
pub struct Proxy {
    child: Child,
}

impl Proxy {
    /// Writes the configuration into the run directory, starts the proxy on `node` and
    /// waits until every listener accepts connections.
    pub fn start(
        c: &Cluster,
        node: usize,
        kind: Kind,
        forwards: &[Forward],
        tls: &TlsFiles,
    ) -> anyhow::Result<Self> {
        let dir: PathBuf = c
            .run_dir()
            .join(format!("{kind:?}-node{node}").to_lowercase());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = std::fs::File::create(dir.join("stderr.log")).context("proxy log")?;
        let mut cmd = match kind {
            Kind::Nginx => {
                let conf = dir.join("nginx.conf");
                std::fs::write(&conf, nginx_config(&dir, forwards, tls))?;
                let mut cmd = Command::new("nginx");
                cmd.arg("-c")
                    .arg(&conf)
                    .arg("-p")
                    .arg(&dir)
                    .arg("-e")
                    .arg(dir.join("nginx-error.log"));
                cmd
            }
            Kind::Haproxy => {
                let conf = dir.join("haproxy.cfg");
                std::fs::write(&conf, haproxy_config(forwards, tls))?;
                let mut cmd = Command::new("haproxy");
                cmd.arg("-f").arg(&conf).arg("-db");
                cmd
            }
        };
        // haproxy writes its access log to stdout; nginx writes its own files.
        let access = std::fs::File::create(dir.join("stdout.log")).context("proxy log")?;
        cmd.stdout(access).stderr(log);
        let child = c
            .spawn_on_node(node, &mut cmd)
            .with_context(|| format!("starting {kind:?} on node {node}"))?;
        let mut proxy = Proxy { child };
        let addrs: Vec<SocketAddr> = forwards.iter().map(|f| f.listen).collect();
        if !proxy.wait_listening(c.node_netns(node), &addrs) {
            let said = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
            let errors = std::fs::read_to_string(dir.join("nginx-error.log")).unwrap_or_default();
            anyhow::bail!("{kind:?} on node {node} did not come up: {said}{errors}");
        }
        Ok(proxy)
    }

    /// Whether every address accepts connections within 10 s (false at once if the proxy
    /// exits, as it does on a configuration it refuses).
    fn wait_listening(&mut self, netns: &str, addrs: &[SocketAddr]) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return false;
            }
            let addrs = addrs.to_vec();
            let up = sys::in_netns(netns, move || {
                addrs.iter().all(|a| {
                    std::net::TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok()
                })
            });
            if matches!(up, Ok(true)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The processes to account CPU and memory to (nginx: master and workers).
    pub fn pids(&self) -> Vec<u32> {
        crate::procstat::with_children(self.child.id())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // SIGTERM lets nginx's master stop its workers; haproxy exits the same way.
        sys::kill(self.child.id(), nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstreams() -> Vec<Upstream> {
        let at = |a: &str| a.parse().expect("addr");
        vec![
            Upstream {
                name: "near",
                node: 1,
                http: at("10.244.1.10:8090"),
                tcp: at("10.244.1.10:5202"),
            },
            Upstream {
                name: "far",
                node: 2,
                http: at("10.244.2.10:8090"),
                tcp: at("10.244.2.10:5202"),
            },
        ]
    }

    fn on(kind: Kind, node: usize) -> Vec<Forward> {
        forwards(|n| format!("10.244.{n}.1"), kind, node, 1, &upstreams()).expect("forwards")
    }

    fn tls() -> TlsFiles {
        TlsFiles {
            cert: "/t/cert.pem".into(),
            key: "/t/key.pem".into(),
            bundle: "/t/bundle.pem".into(),
            ca: "/ca/root-cert.pem".into(),
        }
    }

    #[test]
    fn the_mtls_path_has_one_hop_on_each_node() {
        let n1 = on(Kind::Nginx, 1);
        let n2 = on(Kind::Nginx, 2);
        // Node 1: plaintext and the first hop to both servers, the second hop to its own.
        assert_eq!(n1.len(), 2 * 3 + 2 * 3 + 3);
        assert_eq!(n2.len(), 3);
        let far = n1
            .iter()
            .find(|f| f.name == "far-originate-http1")
            .expect("far's first hop");
        let second = n2
            .iter()
            .find(|f| f.listen == far.to)
            .expect("the first hop leads to node 2's second");
        assert_eq!(second.hop, Hop::Terminate);
        assert_eq!(second.to, upstreams()[1].http);
        assert!(n2.iter().all(|f| f.hop == Hop::Terminate));
    }

    #[test]
    fn nginx_keeps_upstream_connections_alive_and_checks_both_ends() {
        let c = nginx_config(Path::new("/run/x"), &on(Kind::Nginx, 1), &tls());
        assert!(
            c.contains("upstream near-plain-http1 { server 10.244.1.10:8090; keepalive 128; }")
        );
        assert!(c.contains("listen 10.244.1.1:20001 http2;"));
        assert!(c.contains("proxy_set_header Connection \"\";"));
        assert!(c.contains("listen 10.244.1.1:20002; proxy_pass 10.244.1.10:5202; }"));
        assert!(
            c.contains("upstream far-originate-http1 { server 10.244.2.1:20210; keepalive 128; }")
        );
        assert!(c.contains("proxy_pass https://far-originate-http1;"));
        assert!(
            c.contains("listen 10.244.1.1:20112; proxy_pass 10.244.2.1:20212; proxy_ssl on; }")
        );
        assert!(c.contains("listen 10.244.1.1:20201 ssl http2;"));
        assert!(c.contains("listen 10.244.1.1:20202 ssl; proxy_pass 10.244.1.10:5202; }"));
        assert!(c.contains("ssl_verify_client on;") && c.contains("proxy_ssl_verify on;"));
        assert!(c.contains("proxy_ssl_name bench-proxy;"));
        // Like the mesh, which logs every request and connection.
        assert!(c.contains("access_log /run/x/access.log mesh buffer=64k flush=100ms;"));
        assert!(c.contains("access_log /run/x/tcp-access.log tcp"));
    }

    #[test]
    fn haproxy_speaks_h2_both_ways_on_the_h2_port_in_tls_too() {
        let c = haproxy_config(&on(Kind::Haproxy, 1), &tls());
        assert!(c.contains("bind 10.244.1.1:30001 proto h2"));
        assert!(c.contains("server s 10.244.1.10:8090 proto h2"));
        assert!(c.contains(
            "server s 10.244.2.1:30211 ssl crt /t/bundle.pem ca-file /ca/root-cert.pem verify required verifyhost bench-proxy alpn h2"
        ));
        assert!(c.contains(
            "bind 10.244.1.1:30201 ssl crt /t/bundle.pem ca-file /ca/root-cert.pem verify required alpn h2"
        ));
        assert!(c.contains("http-reuse always"));
        assert!(c.contains("log stdout format raw local0") && c.contains("option httplog"));
    }
}
