//! nginx and haproxy set up as node proxies on the same path the mesh takes: in node 1's
//! network namespace, beside the daemon, forwarding the client pod's traffic to the same
//! server pods. Each listens on the node's pod-bridge address, one port per
//! (server, protocol), and keeps upstream connections alive as the mesh does.
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
    /// HTTP/2 (prior knowledge) in; out HTTP/2 for haproxy, HTTP/1.1 for nginx (its proxy
    /// module has no HTTP/2 upstream).
    Http2,
    /// Opaque TCP.
    Tcp,
}

/// One upstream a baseline forwards to: a server pod's address.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub name: &'static str,
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

/// The port a baseline listens on for upstream number `index` and `listener`.
pub fn port(kind: Kind, index: usize, listener: Listener) -> u16 {
    let l = match listener {
        Listener::Http1 => 0,
        Listener::Http2 => 1,
        Listener::Tcp => 2,
    };
    kind.base_port() + 10 * index as u16 + l
}

const WORKERS: u32 = 2;
/// Within the usual hard limit of open files (haproxy wants two per connection).
const MAX_CONNECTIONS: u32 = 8000;

fn nginx_config(dir: &Path, listen: &str, upstreams: &[Upstream]) -> String {
    let d = dir.display();
    let mut http = String::new();
    let mut stream = String::new();
    for (i, u) in upstreams.iter().enumerate() {
        let p1 = port(Kind::Nginx, i, Listener::Http1);
        let p2 = port(Kind::Nginx, i, Listener::Http2);
        let pt = port(Kind::Nginx, i, Listener::Tcp);
        let name = u.name;
        http.push_str(&format!(
            "  upstream {name} {{ server {}; keepalive 128; }}\n\
             \x20 server {{ listen {listen}:{p1}; location / {{ proxy_pass http://{name}; }} }}\n\
             \x20 server {{ listen {listen}:{p2} http2; location / {{ proxy_pass http://{name}; }} }}\n",
            u.http
        ));
        stream.push_str(&format!(
            "  server {{ listen {listen}:{pt}; proxy_pass {}; }}\n",
            u.tcp
        ));
    }
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
         {http}}}\n\
         stream {{\n\
         \x20 log_format tcp '[$time_iso8601] $status $bytes_received $bytes_sent $session_time \"$upstream_addr\" $remote_addr:$remote_port';\n\
         \x20 access_log {d}/tcp-access.log tcp buffer=64k flush=100ms;\n\
         {stream}}}\n"
    )
}

fn haproxy_config(listen: &str, upstreams: &[Upstream]) -> String {
    let mut out = format!(
        "global\n  nbthread {WORKERS}\n  maxconn {MAX_CONNECTIONS}\n  log stdout format raw local0\n\
         defaults\n  mode http\n  log global\n  option httplog\n  timeout connect 10s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\n"
    );
    for (i, u) in upstreams.iter().enumerate() {
        let name = u.name;
        let p1 = port(Kind::Haproxy, i, Listener::Http1);
        let p2 = port(Kind::Haproxy, i, Listener::Http2);
        let pt = port(Kind::Haproxy, i, Listener::Tcp);
        out.push_str(&format!(
            "frontend {name}-h1\n  bind {listen}:{p1}\n  default_backend {name}-h1\n\
             backend {name}-h1\n  server s {}\n\
             frontend {name}-h2\n  bind {listen}:{p2} proto h2\n  default_backend {name}-h2\n\
             backend {name}-h2\n  server s {} proto h2\n\
             listen {name}-tcp\n  mode tcp\n  option tcplog\n  bind {listen}:{pt}\n  server s {}\n",
            u.http, u.http, u.tcp
        ));
    }
    out
}

/// A running baseline proxy; stopped when dropped (and killed with the cluster's cgroups
/// at the latest).
pub struct Proxy {
    pub kind: Kind,
    child: Child,
}

impl Proxy {
    /// Writes the configuration into the run directory, starts the proxy on `node` and
    /// waits until every listener accepts connections.
    pub fn start(
        c: &Cluster,
        node: usize,
        kind: Kind,
        upstreams: &[Upstream],
    ) -> anyhow::Result<Self> {
        let listen = c.node_gateway4(node);
        let dir: PathBuf = c.run_dir().join(format!("{kind:?}").to_lowercase());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = std::fs::File::create(dir.join("stderr.log")).context("proxy log")?;
        let mut cmd = match kind {
            Kind::Nginx => {
                let conf = dir.join("nginx.conf");
                std::fs::write(&conf, nginx_config(&dir, &listen, upstreams))?;
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
                std::fs::write(&conf, haproxy_config(&listen, upstreams))?;
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
            .with_context(|| format!("starting {kind:?}"))?;
        let mut proxy = Proxy { kind, child };
        let ports: Vec<u16> = (0..upstreams.len())
            .flat_map(|i| {
                [Listener::Http1, Listener::Http2, Listener::Tcp].map(|l| port(kind, i, l))
            })
            .collect();
        let listen: std::net::IpAddr = listen.parse()?;
        let addrs: Vec<SocketAddr> = ports.iter().map(|p| SocketAddr::new(listen, *p)).collect();
        if !proxy.wait_listening(c.node_netns(node), &addrs) {
            let said = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
            let errors = std::fs::read_to_string(dir.join("nginx-error.log")).unwrap_or_default();
            anyhow::bail!("{kind:?} did not come up: {said}{errors}");
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
        vec![Upstream {
            name: "near",
            http: "10.244.1.10:8080".parse().expect("addr"),
            tcp: "10.244.1.10:5201".parse().expect("addr"),
        }]
    }

    #[test]
    fn nginx_keeps_upstream_connections_alive() {
        let c = nginx_config(Path::new("/run/x"), "10.244.1.1", &upstreams());
        assert!(c.contains("upstream near { server 10.244.1.10:8080; keepalive 128; }"));
        assert!(c.contains("listen 10.244.1.1:20001 http2;"));
        assert!(c.contains("proxy_set_header Connection \"\";"));
        assert!(c.contains("listen 10.244.1.1:20002; proxy_pass 10.244.1.10:5201;"));
        // Like the mesh, which logs every request and connection.
        assert!(c.contains("access_log /run/x/access.log mesh buffer=64k flush=100ms;"));
        assert!(c.contains("access_log /run/x/tcp-access.log tcp"));
    }

    #[test]
    fn haproxy_speaks_h2_both_ways_on_the_h2_port() {
        let c = haproxy_config("10.244.1.1", &upstreams());
        assert!(c.contains("bind 10.244.1.1:30001 proto h2"));
        assert!(c.contains("server s 10.244.1.10:8080 proto h2"));
        assert!(c.contains("http-reuse always"));
        assert!(c.contains("log stdout format raw local0") && c.contains("option httplog"));
    }
}
