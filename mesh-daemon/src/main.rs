//! `mesh-daemon`: Sidelane's per-node daemon.
use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use clap::Parser as _;
use mesh_daemon::{
    admin::{self, AdminState, Exposure},
    cgroup,
    config::{kube_source, manifest_dir},
    datapath::Datapath,
    discovery,
    handover::{self, Inherited, Role},
    identity::{
        ca::{self, Ca},
        ca_client::CaClient,
        certs::{Certificates, Signer},
    },
    metrics::{Metrics, ReloadLabels},
    netns::HostNetns,
    proxy::{ProxyInputs, hbone::pool::TunnelPool, shards::Shards},
    reconcile::{LiveProxies, Reconciler},
    settings::{ConfigSource, DEFAULT_CONNECT_TIMEOUT, DEFAULT_SCAN_INTERVAL, Settings},
    state::Snapshot,
};
use tokio::sync::{mpsc, oneshot, watch};

fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    init_tracing(&settings.log_format);
    // The control plane (configuration, discovery, admin API) needs little: one worker. The
    // pods' traffic runs on the proxy threads (`Shards`).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run(settings))
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let host = HostNetns::current().context("opening the daemon's own network namespace")?;
    let cg_root = cgroup::find_v2_mount()?;
    let cgroup_rel = settings.cgroup.trim_start_matches('/').to_owned();
    let cgroup_path = cg_root.join(&cgroup_rel);
    let datapath = Datapath::load(&settings.pin_dir, &cgroup_path).with_context(|| {
        format!(
            "installing the eBPF programs on cgroup {} (pins in {})",
            cgroup_path.display(),
            settings.pin_dir.display()
        )
    })?;
    tracing::info!(
        cgroup = %cgroup_path.display(),
        pins = %settings.pin_dir.display(),
        adopted = datapath.adopted,
        kernel = %mesh_daemon::datapath::kernel_release_string(),
        "eBPF programs attached"
    );

    let metrics = Arc::new(Metrics::new());
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let workloads = Arc::new(ArcSwap::from_pointee(Vec::new()));
    let (ready_tx, ready_rx) = watch::channel(false);
    let (changed_tx, changed_rx) = watch::channel(0u64);
    let (handed_over_tx, handed_over_rx) = oneshot::channel();

    let Datapath {
        pods,
        orig_dst,
        stats,
        inbound: capture,
        ..
    } = datapath;
    let shards = Shards::start(settings.proxy_threads).context("starting the proxy threads")?;
    let (policy_tx, policy_changes) = tokio::sync::watch::channel(0u64);
    let inputs = Arc::new(ProxyInputs {
        snapshot: snapshot.clone(),
        orig_dst,
        metrics: metrics.clone(),
        host: host.try_clone()?,
        connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        outbound_port: settings.outbound_port,
        mirror_shadow_host: settings.compat_before(1, 28),
        retry_503_by_default: settings.compat_before(1, 24),
        protocol_detection_timeout: Settings::unless_zero(settings.protocol_detection_timeout),
        tcp_reporting_interval: Settings::unless_zero(settings.tcp_reporting_interval),
        shards: shards.clone(),
        certs: workload_certificates(&settings)?,
        tunnels: TunnelPool::new(metrics.tunnel_connections_opened.clone()),
        policy_changes,
    });

    // Configuration: every batch of objects becomes a new snapshot, swapped in whole.
    let (obj_tx, mut obj_rx) = mpsc::channel(4);
    // Held for the daemon's life: dropping it stops the source.
    let _source: Box<dyn std::any::Any> = match (settings.config_source, &settings.config_dir) {
        (ConfigSource::Dir, Some(dir)) => Box::new(manifest_dir::watch(dir.clone(), obj_tx)?),
        (ConfigSource::Dir, None) => anyhow::bail!("--config-source dir needs --config-dir"),
        (ConfigSource::Kubernetes, _) => {
            let client = kube::Client::try_default().await.context(
                "connecting to the Kubernetes API (in-cluster service account, or KUBECONFIG)",
            )?;
            Box::new(kube_source::watch(client, obj_tx))
        }
    };
    let first = obj_rx
        .recv()
        .await
        .context("the manifest watcher stopped before the first load")?;
    let mut generation = 1;
    let apply = |objects: &mesh_daemon::config::objects::Objects, generation: u64| {
        let snap = Snapshot::compile(
            objects,
            &settings.cluster_domain,
            &settings.root_namespace,
            generation,
        );
        for e in &snap.errors {
            tracing::warn!(error = %e, "configuration object rejected");
        }
        metrics.config_errors.set(snap.errors.len() as i64);
        metrics
            .config_reloads
            .get_or_create(&ReloadLabels {
                result: if snap.errors.is_empty() {
                    "ok"
                } else {
                    "partial"
                },
            })
            .inc();
        let policies_changed = snapshot.load().authz_changed(&snap);
        snapshot.store(Arc::new(snap));
        if policies_changed {
            policy_tx.send_modify(|n| *n += 1);
        }
    };
    apply(&first, generation);

    // Listeners: those of the daemon running before, when it hands them over (a restart or
    // an upgrade then refuses nothing), else bound here. Taken once the configuration is in,
    // so that the old daemon stops accepting only when this one can route at once.
    let handover_path = settings.handover_socket.clone();
    let mut inherited =
        match tokio::task::spawn_blocking(move || handover::take_over(&handover_path)).await {
            Ok(Ok(Some(inherited))) => {
                tracing::info!(
                    listeners = inherited.len(),
                    "took the listeners over from the daemon running before"
                );
                inherited
            }
            Ok(Ok(None)) => Inherited::default(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "no handover from the running daemon; binding afresh");
                Inherited::default()
            }
            Err(e) => anyhow::bail!("the handover task failed: {e}"),
        };
    let admin_l = listener(
        &mut inherited,
        Role::Admin,
        settings.admin_addr,
        "the admin API",
    )
    .await?;
    let metrics_l = listener(
        &mut inherited,
        Role::Metrics,
        settings.metrics_addr,
        "metrics",
    )
    .await?;
    let ready_l = listener(
        &mut inherited,
        Role::Readiness,
        settings.readiness_addr,
        "readiness",
    )
    .await?;
    let own_listeners = [
        (Role::Admin, &admin_l),
        (Role::Metrics, &metrics_l),
        (Role::Readiness, &ready_l),
    ]
    .into_iter()
    .map(|(role, l)| Ok((role, socket2::SockRef::from(l).try_clone()?.into())))
    .collect::<std::io::Result<Vec<_>>>()
    .context("copying the admin listeners for a successor")?;
    let successors = offer_to_successors(&settings.handover_socket);

    let proxies = LiveProxies::default();
    let admin_state = Arc::new(AdminState {
        snapshot: snapshot.clone(),
        workloads: workloads.clone(),
        proxies: proxies.clone(),
        metrics: metrics.clone(),
        stats,
        ready: ready_rx,
        node_name: settings.node_name.clone(),
        certs: inputs.certs.clone(),
    });
    let admin_tasks = [
        tokio::spawn(admin::serve(admin_l, admin_state.clone(), Exposure::Admin)),
        tokio::spawn(admin::serve(
            metrics_l,
            admin_state.clone(),
            Exposure::Metrics,
        )),
        tokio::spawn(admin::serve(ready_l, admin_state, Exposure::Readiness)),
    ];

    // Holds the programs for the daemon's life (the pins hold the attachments anyway).
    let capture = Arc::new(capture);
    let reconciler = Reconciler {
        node_name: settings.node_name.clone(),
        proc_root: settings.proc_root.clone(),
        cgroup_dir: cgroup_path.clone(),
        pod_changes: discovery::watch(&cgroup_path)
            .inspect_err(|e| {
                tracing::warn!(error = %e, cgroup = %cgroup_path.display(),
                    "cannot watch the pod cgroups; scanning for pods every {DEFAULT_SCAN_INTERVAL:?} instead")
            })
            .ok(),
        scan_interval: DEFAULT_SCAN_INTERVAL,
        pods_map: pods,
        inputs,
        metrics: metrics.clone(),
        workloads,
        proxies,
        ready: ready_tx,
        inherited,
        successors,
        own_listeners,
        handed_over: Some(handed_over_tx),
        capture: capture.clone(),
    };
    let reconciling = tokio::spawn(reconciler.run(changed_rx));

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Only a sent handover counts: a reconciler that ended otherwise (a panic) dropped the
    // sender, and a finished receiver must not be polled again.
    let mut handed_over = std::pin::pin!(async {
        if handed_over_rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    });
    loop {
        tokio::select! {
            Some(objects) = obj_rx.recv() => {
                generation += 1;
                apply(&objects, generation);
                let _ = changed_tx.send(generation);
            }
            () = &mut handed_over => break,
            _ = sigterm.recv() => {
                // Nothing accepts from here on: new connections are refused (fail closed,
                // and a client may retry) rather than cut when the drain ends.
                tracing::info!("SIGTERM: no longer accepting; draining");
                break;
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted: no longer accepting; draining");
                break;
            }
        }
    }
    reconciling.abort();
    for t in admin_tasks {
        t.abort();
    }
    drain(
        &shards,
        Settings::unless_zero(settings.drain_timeout),
        &mut sigterm,
    )
    .await;
    // Programs and maps stay pinned: pods stay redirected (and fail closed) until the next
    // daemon takes over.
    tracing::info!("shutting down; eBPF programs stay attached for the next daemon");
    mesh_daemon::proxy::access_log::flush();
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}

/// HTTP connections finish their exchange and close; the rest get until `deadline` (or,
/// without one, until they end). A second SIGTERM or an interrupt ends the wait.
async fn drain(
    shards: &Shards,
    deadline: Option<Duration>,
    sigterm: &mut tokio::signal::unix::Signal,
) {
    shards.drain().start();
    let started = tokio::time::Instant::now();
    let open_left = async {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        while shards.open_connections() > 0 {
            tick.tick().await;
        }
    };
    let past_deadline = async {
        match deadline {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = open_left => tracing::info!(took = ?started.elapsed(), "drained: no connection left"),
        () = past_deadline => tracing::warn!(
            left = shards.open_connections(),
            "drain timeout; closing the connections left"
        ),
        _ = sigterm.recv() => tracing::warn!(left = shards.open_connections(), "SIGTERM again; closing the connections left"),
        _ = tokio::signal::ctrl_c() => tracing::warn!(left = shards.open_connections(), "interrupted; closing the connections left"),
    }
}

/// A listener handed over for `role`, or one bound at `addr`.
async fn listener(
    inherited: &mut Inherited,
    role: Role,
    addr: std::net::SocketAddr,
    what: &str,
) -> anyhow::Result<tokio::net::TcpListener> {
    match inherited.take(&role) {
        Some(l) => tokio::net::TcpListener::from_std(l)
            .with_context(|| format!("serving {what} on the listener handed over")),
        None => admin::bind(addr)
            .await
            .with_context(|| format!("binding {what} on {addr}")),
    }
}

/// Listens for a successor at `path`, on a thread of its own (the wait is a blocking accept).
/// Without the offer a restart still works, but resets the connections open at the time.
fn offer_to_successors(path: &std::path::Path) -> Option<mpsc::Receiver<handover::Successor>> {
    let offer = match handover::Offer::listen(path) {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, "cannot offer the listeners to a successor; a restart will reset open connections");
            return None;
        }
    };
    let (tx, rx) = mpsc::channel(1);
    let spawned = std::thread::Builder::new()
        .name("sl-handover".into())
        .spawn(move || {
            loop {
                match offer.next_successor() {
                    Ok(s) => {
                        if tx.blocking_send(s).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "a successor's request failed"),
                }
            }
        });
    match spawned {
        Ok(_) => Some(rx),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the handover thread");
            None
        }
    }
}

/// The workload certificates, when the mesh has a CA: from the CA server (`--ca-addr`), or
/// signed here with the CA's key from `--ca-dir`. Neither leaves traffic between pods in
/// plaintext (said once, loudly); a CA that is there but unusable stops the daemon rather
/// than silently dropping mTLS.
fn workload_certificates(settings: &Settings) -> anyhow::Result<Option<Arc<Certificates>>> {
    let dir = &settings.ca_dir;
    let signer = if let Some(addr) = &settings.ca_addr {
        let roots = ca::load_roots(dir)
            .with_context(|| format!("reading the mesh's roots from {}", dir.display()))?;
        tracing::info!(ca_addr = %addr, trust_domain = %settings.trust_domain, "mTLS between enrolled pods; certificates from the CA server");
        Signer::Server(CaClient::new(
            addr.clone(),
            &settings.ca_server_name,
            roots,
            settings.ca_token_file.clone(),
        )?)
    } else if dir.join(ca::CA_KEY).exists() {
        let ca = Ca::load(dir).with_context(|| format!("loading the CA from {}", dir.display()))?;
        tracing::warn!(ca_dir = %dir.display(), trust_domain = %settings.trust_domain, "mTLS between enrolled pods, signed with the CA key on this node: it can sign any identity (run sidelane-ca and pass --ca-addr so a node gets certificates only for its own pods)");
        Signer::Local(Box::new(ca))
    } else {
        tracing::warn!(ca_dir = %dir.display(), "no CA: traffic between enrolled pods stays plaintext (create one with `meshctl ca init`)");
        return Ok(None);
    };
    Ok(Some(Arc::new(Certificates::new(
        signer,
        &settings.trust_domain,
        settings.workload_cert_ttl.0,
    ))))
}
