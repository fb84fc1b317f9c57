//! `sidelane-workload`: the test cluster's application. As a server it answers HTTP/1.1,
//! HTTP/2 (prior knowledge) and raw TCP with its pod name and version, and can be told to
//! return a status, wait, or reset. As a client it sends requests from inside a pod and
//! prints one JSON line per result, for the tests to assert on.
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

#[derive(Parser)]
#[command(name = "sidelane-workload")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve HTTP and raw TCP.
    Serve {
        #[arg(long)]
        pod: String,
        #[arg(long, default_value = "default")]
        namespace: String,
        #[arg(long, default_value = "v1")]
        version: String,
        #[arg(long, default_value_t = 8080)]
        http_port: u16,
        /// Serve HTTP on this port too, from the same process (a port the mesh leaves alone,
        /// so one server is reached with and without it).
        #[arg(long)]
        also_http_port: Vec<u16>,
        #[arg(long, default_value_t = 9000)]
        tcp_port: u16,
    },
    /// Hold the pod's namespaces, like a pod sandbox's pause container.
    Pause,
    /// Answer the API server's TokenReview (`POST /apis/authentication.k8s.io/v1/tokenreviews`)
    /// from a JSON map of token to `{"username", "node"}`, over plain HTTP: the one API call
    /// the CA server makes, where no real API server can run.
    TokenReviews {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        reviews: std::path::PathBuf,
    },
    /// Send HTTP requests; print one JSON line per request.
    Http {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// HTTP/2 with prior knowledge.
        #[arg(long)]
        h2: bool,
        /// A new connection per request (otherwise keep-alive).
        #[arg(long)]
        new_conn: bool,
        /// Extra request header, "name: value".
        #[arg(long = "header")]
        headers: Vec<String>,
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Open one TCP connection: read the greeting, send data, half-close, read to the end.
    Tcp {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "")]
        send: String,
        /// Then send a line of this many bytes (too large for an argument).
        #[arg(long, default_value_t = 0)]
        bulk: usize,
        /// Open with a real TLS ClientHello for this server name instead of `send` (the
        /// servers here do not speak TLS: what answers shows where the mesh routed it).
        #[arg(long)]
        tls_sni: Option<String>,
        /// Once connected, print a "connected" line and wait this long before sending, so a
        /// test can change the mesh under an established connection.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        /// Once sent, print a "sent" line and keep the connection open this long before
        /// half-closing it, so a test can look at the mesh during a long-lived connection.
        #[arg(long, default_value_t = 0)]
        linger_ms: u64,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Serve {
                pod,
                namespace,
                version,
                http_port,
                also_http_port,
                tcp_port,
            } => {
                serve(
                    Arc::new(Identity {
                        pod,
                        namespace,
                        version,
                        seen: std::sync::Mutex::new((0, String::new(), String::new())),
                        behaviour: std::sync::Mutex::new(Behaviour::default()),
                    }),
                    std::iter::once(http_port).chain(also_http_port).collect(),
                    tcp_port,
                )
                .await
            }
            Cmd::Pause => loop {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            },
            Cmd::TokenReviews { listen, reviews } => {
                let text = std::fs::read_to_string(&reviews).context("reading the reviews")?;
                let known: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(&text).context("the reviews are a JSON object")?;
                token_reviews(listen, Arc::new(known)).await
            }
            Cmd::Http {
                url,
                count,
                h2,
                new_conn,
                headers,
                method,
                timeout_ms,
            } => {
                let options = ClientOptions {
                    count,
                    h2,
                    new_conn,
                    headers,
                    method: method.parse().context("--method")?,
                    timeout: Duration::from_millis(timeout_ms),
                };
                http_client(&url, &options).await
            }
            Cmd::Tcp {
                addr,
                send,
                bulk,
                tls_sni,
                hold_ms,
                linger_ms,
                timeout_ms,
            } => {
                let mut send = send.replace("\\r", "\r").replace("\\n", "\n").into_bytes();
                if bulk > 0 {
                    send.extend(std::iter::repeat_n(b'x', bulk));
                    send.push(b'\n');
                }
                if let Some(name) = tls_sni {
                    send = client_hello(&name)?;
                }
                let r = tokio::time::timeout(
                    Duration::from_millis(timeout_ms),
                    tcp_client(
                        addr,
                        &send,
                        Duration::from_millis(hold_ms),
                        Duration::from_millis(linger_ms),
                    ),
                )
                .await
                .unwrap_or_else(|_| json!({"error": "timeout"}));
                println!("{r}");
                Ok(())
            }
        }
    })
}

struct Identity {
    pod: String,
    namespace: String,
    version: String,
    /// Requests served (other than /__stats), and the last one's Host and path: how a test
    /// sees traffic that never reaches a client, such as mirrored requests.
    seen: std::sync::Mutex<(u64, String, String)>,
    /// How every request is answered until told otherwise (`/__behave`).
    behaviour: std::sync::Mutex<Behaviour>,
}

/// What `/__behave?delay_ms=..&status=..&reset=1` sets for every later request (and a bare
/// `/__behave` clears): how tests make an endpoint slow, failing or resetting.
#[derive(Clone, Copy, Default)]
struct Behaviour {
    delay: Duration,
    status: Option<u16>,
    reset: bool,
}

impl Behaviour {
    fn from_query(q: &str) -> Self {
        let mut b = Self::default();
        for (k, v) in q.split('&').filter_map(|kv| kv.split_once('=')) {
            match k {
                "delay_ms" => b.delay = Duration::from_millis(v.parse().unwrap_or(0)),
                "status" => b.status = v.parse().ok(),
                "reset" => b.reset = v == "1",
                _ => {}
            }
        }
        b
    }
}

fn dual_stack_listener(port: u16) -> anyhow::Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
    s.set_only_v6(false)?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from(([0u16; 8], port)).into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(TcpListener::from_std(s.into())?)
}

async fn serve(id: Arc<Identity>, http_ports: Vec<u16>, tcp_port: u16) -> anyhow::Result<()> {
    let mut http = Vec::new();
    for port in http_ports {
        http.push(dual_stack_listener(port).with_context(|| format!("binding HTTP port {port}"))?);
    }
    let tcp = dual_stack_listener(tcp_port).context("binding the TCP port")?;
    let tcp_id = id.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = tcp.accept().await {
            tokio::spawn(tcp_conn(tcp_id.clone(), s));
        }
    });
    let mut accepting = tokio::task::JoinSet::new();
    for listener in http {
        accepting.spawn(serve_http(id.clone(), listener));
    }
    match accepting.join_next().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(e.into()),
        None => Ok(()),
    }
}

async fn serve_http(id: Arc<Identity>, http: TcpListener) -> anyhow::Result<()> {
    loop {
        let (stream, peer) = http.accept().await?;
        // As real servers do: without it, small HTTP/2 frames wait on delayed ACKs.
        stream.set_nodelay(true).ok();
        let id = id.clone();
        tokio::spawn(async move {
            // A second handle on the socket lets a handler turn the close into a reset.
            let Ok(std) = stream.into_std() else { return };
            let Ok(handle) = std.try_clone() else { return };
            let Ok(stream) = TcpStream::from_std(std) else {
                return;
            };
            let handle = Arc::new(handle);
            let svc = service_fn(move |req| respond(id.clone(), peer, handle.clone(), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn respond(
    id: Arc<Identity>,
    peer: SocketAddr,
    handle: Arc<std::net::TcpStream>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let path = req.uri().path().to_owned();
    if path == "/upgrade"
        && let Some(protocol) = req.headers().get(hyper::header::UPGRADE).cloned()
    {
        // Switches to the raw TCP service's protocol (greeting, then echoed lines).
        let switched = hyper::upgrade::on(&mut req);
        let id = id.clone();
        tokio::spawn(async move {
            if let Ok(io) = switched.await {
                echo_lines(&id, TokioIo::new(io)).await;
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("upgrade"),
        );
        r.headers_mut().insert(hyper::header::UPGRADE, protocol);
        return Ok(r);
    }
    // HTTP/2 carries the host as :authority, which apps see as their request's host.
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    if path == "/__stats" {
        let (n, last_host, last_path) = id.seen.lock().map(|s| s.clone()).unwrap_or_default();
        let body = json!({"requests": n, "last_host": last_host, "last_path": last_path});
        return Ok(Response::new(Full::new(Bytes::from(body.to_string()))));
    }
    if path == "/__behave" {
        let b = Behaviour::from_query(req.uri().query().unwrap_or(""));
        if let Ok(mut current) = id.behaviour.lock() {
            *current = b;
        }
        return Ok(Response::new(Full::new(Bytes::from_static(b"{}"))));
    }
    if let Ok(mut s) = id.seen.lock() {
        *s = (s.0 + 1, host.clone(), path.clone());
    }
    let behaviour = id.behaviour.lock().map(|b| *b).unwrap_or_default();
    if !behaviour.delay.is_zero() {
        tokio::time::sleep(behaviour.delay).await;
    }
    if behaviour.reset {
        let _ = socket2::SockRef::from(&*handle).set_linger(Some(Duration::ZERO));
        return Err(std::io::Error::other("reset requested"));
    }
    let mut status = behaviour.status.unwrap_or(200);
    if let Some(code) = path.strip_prefix("/status/") {
        status = code.parse().unwrap_or(400);
    } else if let Some(secs) = path.strip_prefix("/delay/") {
        let secs: f64 = secs.parse().unwrap_or(0.0);
        tokio::time::sleep(Duration::from_secs_f64(secs.clamp(0.0, 30.0))).await;
    } else if path == "/reset" {
        // The connection's last handle closes after this error: with linger 0, as a RST.
        let _ = socket2::SockRef::from(&*handle).set_linger(Some(Duration::ZERO));
        return Err(std::io::Error::other("reset requested"));
    }
    let mut headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
        .collect();
    if !host.is_empty() {
        headers.entry("host").or_insert_with(|| json!(host));
    }
    let body = json!({
        "pod": id.pod,
        "namespace": id.namespace,
        "version": id.version,
        "method": req.method().as_str(),
        "path": path,
        "proto": format!("{:?}", req.version()),
        "peer": peer.to_string(),
        "headers": headers,
    });
    let _ = req.into_body().collect().await;
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-sidelane-pod", id.pod.as_str())
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_default())
}

/// Raw TCP: greet, then echo lines; "RESET" resets the connection; a FIN from the client is
/// answered with "bye" and a FIN.
async fn tcp_conn(id: Arc<Identity>, s: TcpStream) {
    if let Some(s) = echo_lines(&id, s).await {
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    }
}

/// The raw TCP service on any byte stream; the stream back when the client asked for a reset.
async fn echo_lines<S>(id: &Identity, s: S) -> Option<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (r, mut w) = tokio::io::split(s);
    let mut lines = BufReader::new(r).lines();
    if w.write_all(format!("pod={} version={}\n", id.pod, id.version).as_bytes())
        .await
        .is_err()
    {
        return None;
    }
    loop {
        match lines.next_line().await {
            Ok(Some(line)) if line.trim() == "RESET" => {
                return Some(lines.into_inner().into_inner().unsplit(w));
            }
            Ok(Some(line)) => {
                if w.write_all(format!("echo:{line}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return None;
                }
            }
            Ok(None) => {
                let _ = w.write_all(b"bye\n").await;
                let _ = w.shutdown().await;
                return None;
            }
            Err(_) => return None,
        }
    }
}

/// The first flight of a rustls client for `server_name`.
fn client_hello(server_name: &str) -> anyhow::Result<Vec<u8>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut out = Vec::new();
    conn.write_tls(&mut out)?;
    Ok(out)
}

async fn tcp_client(
    addr: SocketAddr,
    send: &[u8],
    hold: Duration,
    linger: Duration,
) -> serde_json::Value {
    let mut s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return json!({"error": error_kind(&e)}),
    };
    let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
    pause(&local, "connected", hold).await;
    if !send.is_empty()
        && let Err(e) = s.write_all(send).await
    {
        return json!({"error": error_kind(&e), "local": local});
    }
    pause(&local, "sent", linger).await;
    // Half-close: the server must still be able to answer.
    if let Err(e) = s.shutdown().await {
        return json!({"error": error_kind(&e), "local": local});
    }
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf).await {
        Ok(_) => json!({"received": String::from_utf8_lossy(&buf), "local": local}),
        Err(e) => {
            json!({"error": error_kind(&e), "received": String::from_utf8_lossy(&buf), "local": local})
        }
    }
}

/// Unless `wait` is zero: tells the test `event` has happened (a JSON line, flushed at once),
/// then waits, so the test can act on the mesh while the connection is open.
async fn pause(local: &str, event: &str, wait: Duration) {
    if wait.is_zero() {
        return;
    }
    use std::io::Write as _;
    println!("{}", json!({"event": event, "local": local}));
    let _ = std::io::stdout().flush();
    tokio::time::sleep(wait).await;
}

fn error_kind(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionReset => "reset".into(),
        std::io::ErrorKind::ConnectionRefused => "refused".into(),
        std::io::ErrorKind::TimedOut => "timeout".into(),
        _ => e.to_string(),
    }
}

struct ClientOptions {
    count: u32,
    h2: bool,
    new_conn: bool,
    headers: Vec<String>,
    method: http::Method,
    timeout: Duration,
}

async fn http_client(url: &str, o: &ClientOptions) -> anyhow::Result<()> {
    let ClientOptions {
        count,
        h2,
        new_conn,
        ref headers,
        ref method,
        timeout,
    } = *o;
    let uri: http::Uri = url.parse().context("parsing --url")?;
    let mut client = None;
    for _ in 0..count {
        if new_conn || client.is_none() {
            let mut b = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
            b.http2_only(h2);
            if new_conn {
                b.pool_max_idle_per_host(0);
            }
            client = Some(b.build_http::<Full<Bytes>>());
        }
        let Some(c) = client.as_ref() else { continue };
        let mut req = Request::builder().method(method.clone()).uri(uri.clone());
        for h in headers {
            if let Some((k, v)) = h.split_once(':') {
                req = req.header(k.trim(), v.trim());
            }
        }
        let req = req.body(Full::new(Bytes::new()))?;
        let start = Instant::now();
        let line = match tokio::time::timeout(timeout, c.request(req)).await {
            Err(_) => json!({"error": "timeout"}),
            Ok(Err(e)) => json!({"error": format!("{e:?}")}),
            Ok(Ok(resp)) => {
                let status = resp.status().as_u16();
                let version = format!("{:?}", resp.version());
                let response_headers: serde_json::Map<String, serde_json::Value> = resp
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
                    .collect();
                let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                let body: serde_json::Value = body
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or(serde_json::Value::Null);
                json!({
                    "status": status,
                    "proto": version,
                    "pod": body.get("pod"),
                    "version": body.get("version"),
                    "body": body,
                    "headers": response_headers,
                    "ms": start.elapsed().as_millis() as u64,
                })
            }
        };
        println!("{line}");
    }
    Ok(())
}

/// The TokenReview endpoint of a test API server: a known token is authenticated as its
/// user, bound to a pod on its node (the `extra` keys a bound token carries), for the
/// audiences asked about.
async fn token_reviews(
    listen: SocketAddr,
    known: Arc<serde_json::Map<String, serde_json::Value>>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!(
        "{}",
        json!({"event": "listening", "addr": listen.to_string()})
    );
    loop {
        let (stream, _) = listener.accept().await?;
        let known = known.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let known = known.clone();
                async move {
                    let path_ok = req.uri().path() == "/apis/authentication.k8s.io/v1/tokenreviews";
                    let body = req.into_body().collect().await.map(|b| b.to_bytes());
                    let review: serde_json::Value = body
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or_default();
                    let token = review["spec"]["token"].as_str().unwrap_or_default();
                    let status = match known.get(token) {
                        Some(who) if path_ok => json!({
                            "authenticated": true,
                            "audiences": review["spec"]["audiences"],
                            "user": {
                                "username": who["username"],
                                "extra": {"authentication.kubernetes.io/node-name": [who["node"]]},
                            },
                        }),
                        _ => json!({"authenticated": false}),
                    };
                    let answer = json!({
                        "apiVersion": "authentication.k8s.io/v1",
                        "kind": "TokenReview",
                        "metadata": {},
                        "spec": review["spec"],
                        "status": status,
                    });
                    let mut r = Response::new(Full::new(Bytes::from(answer.to_string())));
                    *r.status_mut() = if path_ok {
                        hyper::StatusCode::CREATED
                    } else {
                        hyper::StatusCode::NOT_FOUND
                    };
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
