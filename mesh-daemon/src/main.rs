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
    metrics::{Metrics, ReloadLabels},
    netns::HostNetns,
    proxy::{ProxyInputs, shards::Shards},
    reconcile::{LiveProxies, Reconciler},
    settings::{ConfigSource, DEFAULT_CONNECT_TIMEOUT, DEFAULT_SCAN_INTERVAL, Settings},
    state::Snapshot,
};
use tokio::sync::{mpsc, watch};

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

    // Bind every listener before serving anything, so a port clash shows at once.
    let admin_l = admin::bind(settings.admin_addr)
        .await
        .with_context(|| format!("binding the admin API on {}", settings.admin_addr))?;
    let metrics_l = admin::bind(settings.metrics_addr)
        .await
        .with_context(|| format!("binding metrics on {}", settings.metrics_addr))?;
    let ready_l = admin::bind(settings.readiness_addr)
        .await
        .with_context(|| format!("binding readiness on {}", settings.readiness_addr))?;

    let metrics = Arc::new(Metrics::new());
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let workloads = Arc::new(ArcSwap::from_pointee(Vec::new()));
    let (ready_tx, ready_rx) = watch::channel(false);
    let (changed_tx, changed_rx) = watch::channel(0u64);

    let Datapath {
        pods,
        orig_dst,
        stats,
        programs: _programs,
        ..
    } = datapath;
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
        shards: Shards::start(settings.proxy_threads).context("starting the proxy threads")?,
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
        snapshot.store(Arc::new(snap));
    };
    apply(&first, generation);

    let proxies = LiveProxies::default();
    let admin_state = Arc::new(AdminState {
        snapshot: snapshot.clone(),
        workloads: workloads.clone(),
        proxies: proxies.clone(),
        metrics: metrics.clone(),
        stats,
        ready: ready_rx,
        node_name: settings.node_name.clone(),
    });
    tokio::spawn(admin::serve(admin_l, admin_state.clone(), Exposure::Admin));
    tokio::spawn(admin::serve(
        metrics_l,
        admin_state.clone(),
        Exposure::Metrics,
    ));
    tokio::spawn(admin::serve(ready_l, admin_state, Exposure::Readiness));

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
    };
    tokio::spawn(reconciler.run(changed_rx));

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            Some(objects) = obj_rx.recv() => {
                generation += 1;
                apply(&objects, generation);
                let _ = changed_tx.send(generation);
            }
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    // Programs and maps stay pinned: pods stay redirected (and fail closed) until the next
    // daemon takes over.
    tracing::info!("shutting down; eBPF programs stay attached for the next daemon");
    mesh_daemon::proxy::access_log::flush();
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
