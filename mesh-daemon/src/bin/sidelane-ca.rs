//! `sidelane-ca`: the mesh's certificate authority as a service. It alone holds the signing
//! key; node daemons (`--ca-addr`) send it signing requests and get certificates only for
//! the identities of pods scheduled on their node.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use clap::Parser as _;
use mesh_daemon::{
    ca_server::{CaMetrics, CaServer, NodeAuth, NodeTokens, ServingCert, TokenReviewer},
    config::{kube_source, manifest_dir},
    identity::ca::Ca,
    settings::{ConfigSource, DEFAULT_CA_SERVER_NAME, DEFAULT_ROOT_NAMESPACE},
    state::Snapshot,
};
use tokio::sync::mpsc;

/// How long the server's own certificate lives; it is made afresh at each start.
const SERVING_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

#[derive(clap::Parser, Debug)]
#[command(
    name = "sidelane-ca",
    version,
    about = "Sidelane's certificate authority"
)]
struct Args {
    /// The CA in Istio's `cacerts` layout, with its key.
    #[arg(long, env = "SIDELANE_CA_DIR")]
    ca_dir: PathBuf,
    #[arg(long, env = "SIDELANE_CA_LISTEN", default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Prometheus metrics (`sidelane_ca_*`), plain HTTP (istiod's monitoring port).
    #[arg(
        long,
        env = "SIDELANE_CA_METRICS_ADDR",
        default_value = "0.0.0.0:15014"
    )]
    metrics_addr: SocketAddr,
    /// The name nodes know the server by (its Service), put in its certificate.
    #[arg(long, env = "SIDELANE_CA_SERVER_NAME", default_value = DEFAULT_CA_SERVER_NAME)]
    server_name: String,
    /// `token,node-name` lines: which bearer token stands for which node. Without it, tokens
    /// are the node daemons' projected service account tokens, checked by the API server
    /// (TokenReview).
    #[arg(long, env = "SIDELANE_NODE_TOKENS")]
    node_tokens: Option<PathBuf>,
    /// The audience the node daemons' projected tokens are made for.
    #[arg(long, env = "SIDELANE_CA_AUDIENCE", default_value = "sidelane-ca")]
    audience: String,
    /// `namespace/name` of the service account the node daemons run as.
    #[arg(
        long,
        env = "SIDELANE_NODE_SERVICE_ACCOUNT",
        default_value = "sidelane-system/sidelane"
    )]
    node_service_account: String,
    #[arg(
        long,
        env = "SIDELANE_CONFIG_SOURCE",
        value_enum,
        default_value = "dir"
    )]
    config_source: ConfigSource,
    #[arg(
        long,
        env = "SIDELANE_CONFIG_DIR",
        required_if_eq("config_source", "dir")
    )]
    config_dir: Option<PathBuf>,
    #[arg(long, env = "SIDELANE_TRUST_DOMAIN", default_value = mesh_daemon::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// The longest certificate lifetime handed out.
    #[arg(
        long,
        env = "SIDELANE_MAX_WORKLOAD_CERT_TTL",
        default_value = "24h",
        value_parser = mesh_daemon::config::istio::types::Duration::parse
    )]
    max_ttl: mesh_daemon::config::istio::types::Duration,
    #[arg(long, env = "SIDELANE_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    #[arg(long, env = "SIDELANE_ROOT_NAMESPACE", default_value = DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let ca = Ca::load(&args.ca_dir)
        .with_context(|| format!("loading the CA from {}", args.ca_dir.display()))?;
    // One client for both uses of the API (TokenReviews, the configuration), if any needs it.
    let mut api = None;
    let auth = match &args.node_tokens {
        Some(path) => NodeAuth::Tokens(NodeTokens::load(path)?),
        None => {
            let (ns, name) = args
                .node_service_account
                .split_once('/')
                .context("--node-service-account is namespace/name")?;
            NodeAuth::Kubernetes(TokenReviewer {
                client: kube_client(&mut api).await?,
                audience: args.audience.clone(),
                username: format!("system:serviceaccount:{ns}:{name}"),
            })
        }
    };
    let ips: Vec<_> = [args.listen.ip()]
        .into_iter()
        .filter(|ip| !ip.is_unspecified())
        .collect();
    let names = vec![args.server_name.clone()];
    let serving = Arc::new(ServingCert::new(ServingCert::issue(
        &ca,
        &names,
        &ips,
        SERVING_TTL,
    )?));
    let tls = serving.server_config()?;

    let (tx, mut rx) = mpsc::channel(4);
    let _source: Box<dyn std::any::Any> = match (args.config_source, &args.config_dir) {
        (ConfigSource::Dir, Some(dir)) => Box::new(manifest_dir::watch(dir.clone(), tx)?),
        (ConfigSource::Dir, None) => anyhow::bail!("--config-source dir needs --config-dir"),
        (ConfigSource::Kubernetes, _) => {
            Box::new(kube_source::watch(kube_client(&mut api).await?, tx))
        }
    };
    let compile = |objects| {
        Arc::new(Snapshot::compile(
            &objects,
            &args.cluster_domain,
            &args.root_namespace,
            0,
        ))
    };
    let first = rx
        .recv()
        .await
        .context("the configuration source stopped before the first load")?;
    let snapshot = Arc::new(ArcSwap::new(compile(first)));
    let server = Arc::new(CaServer {
        ca,
        trust_domain: args.trust_domain.clone(),
        auth,
        snapshot: snapshot.clone(),
        max_ttl: args.max_ttl.0,
        metrics: CaMetrics::default(),
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(listen = %args.listen, server_name = %args.server_name, trust_domain = %args.trust_domain, "CA server ready");
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("listening on {}", args.metrics_addr))?;
    let tasks = [
        tokio::spawn(server.clone().serve(listener, tls)),
        tokio::spawn(serve_metrics(server.clone(), metrics_listener)),
        tokio::spawn(renew_serving_cert(server.clone(), serving, names, ips)),
    ];
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            next = rx.recv() => match next {
                Some(objects) => snapshot.store(compile(objects)),
                None => anyhow::bail!("the configuration source stopped"),
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    for t in tasks {
        t.abort();
    }
    Ok(())
}

/// Issues the server's certificate again at half its life.
async fn renew_serving_cert(
    server: Arc<CaServer>,
    serving: Arc<ServingCert>,
    names: Vec<String>,
    ips: Vec<std::net::IpAddr>,
) {
    loop {
        tokio::time::sleep(SERVING_TTL / 2).await;
        match ServingCert::issue(&server.ca, &names, &ips, SERVING_TTL) {
            Ok(next) => {
                serving.replace(next);
                tracing::info!("serving certificate renewed");
            }
            Err(e) => tracing::error!(error = %e, "renewing the serving certificate failed"),
        }
    }
}

/// `GET /metrics` in Prometheus' text format.
async fn serve_metrics(server: Arc<CaServer>, listener: tokio::net::TcpListener) {
    mesh_daemon::admin::serve_with(listener, move |path, _| {
        if path == "/metrics" {
            (
                hyper::StatusCode::OK,
                mesh_daemon::admin::OPENMETRICS,
                server.metrics.encode(),
            )
        } else {
            (
                hyper::StatusCode::NOT_FOUND,
                "text/plain",
                "not found\n".into(),
            )
        }
    })
    .await;
}

/// The API client, made on first use and shared after.
async fn kube_client(made: &mut Option<kube::Client>) -> anyhow::Result<kube::Client> {
    if let Some(c) = made {
        return Ok(c.clone());
    }
    let c = kube::Client::try_default().await.context(
        "connecting to the Kubernetes API (for TokenReviews without --node-tokens, or the configuration)",
    )?;
    *made = Some(c.clone());
    Ok(c)
}
