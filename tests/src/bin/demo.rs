//! `sidelane-demo` (run it with `cargo xtask demo`): builds a two-node cluster out of
//! network namespaces, deploys the tutorial's api-server, applies the tutorial's YAML,
//! sends traffic from a pod and explains what happened at each step.
use std::{collections::BTreeMap, path::PathBuf};

use anyhow::Context as _;
use clap::Parser;
use sidelane_tests::{Cluster, PodSpec, ServicePortSpec};

#[derive(Parser)]
struct Args {
    /// Directory holding the tutorial's YAML files.
    #[arg(long)]
    tutorial: PathBuf,
    /// Requests to send through the mesh.
    #[arg(long, default_value_t = 200)]
    requests: u32,
}

/// The tutorial files whose resources the demo applies (the others show alternative
/// settings for the same `api-server` VirtualService, so they cannot all apply at once).
const APPLIED: &[&str] = &["virtualservice.yaml", "destinationrule.yaml"];

fn step(n: u32, text: &str) {
    println!("\n== {n}. {text}");
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!("Sidelane demo: a sidecarless mesh on a cluster made of Linux network namespaces.");

    step(
        1,
        "Building a cluster: 2 nodes, each a network namespace running its own mesh-daemon",
    );
    let mut c = Cluster::new(2).context("building the cluster")?;
    // As the tutorial does with `kubectl label namespace production istio-injection=enabled`.
    c.namespace("production", &[("istio-injection", "enabled")])?;
    c.namespace("legacy", &[])?;
    let mut replicas = Vec::new();
    for (name, node, version) in [
        ("api-server-v1-0", 1, "v1"),
        ("api-server-v1-1", 2, "v1"),
        ("api-server-v2-0", 2, "v2"),
    ] {
        replicas.push(
            c.add_pod(
                PodSpec::new("production", name, node)
                    .label("app", "api-server")
                    .label("version", version)
                    .serving(),
            )?,
        );
    }
    let client = c.add_pod(PodSpec::new("production", "sleep", 1).label("app", "sleep"))?;
    let legacy = c.add_pod(PodSpec::new("legacy", "legacy-client", 1).label("app", "legacy"))?;
    let svc = c.add_service(
        "production",
        "api-server",
        &[("app", "api-server")],
        &[ServicePortSpec::new("http", 8080, 8080)],
    )?;
    for f in APPLIED {
        let text = std::fs::read_to_string(args.tutorial.join(f))
            .with_context(|| format!("reading {f}"))?;
        c.write_file(f, &text)?;
    }
    c.start()?;
    for p in &c.pods {
        println!(
            "   pod {:<28} node-{}  {:<12} {}",
            format!("{}/{}", p.spec.namespace, p.spec.name),
            p.spec.node,
            p.ip4,
            p.spec
                .labels
                .get("version")
                .map(|v| format!("version={v}"))
                .unwrap_or_default()
        );
    }
    let s = c.service(svc);
    println!(
        "   service production/api-server  ClusterIP {} and {}, port 8080 (no kube-proxy: only the mesh can reach it)",
        s.vip4, s.vip6
    );
    println!("   applied from the tutorial: {}", APPLIED.join(", "));

    step(
        2,
        "Which pods are in the mesh (meshctl proxy-status on each node)",
    );
    c.wait_enrolled(client, true)?;
    c.wait_enrolled(legacy, false).ok();
    for node in 1..=2 {
        println!("   node-{node}:");
        for line in c.meshctl(node, &["proxy-status"])?.lines() {
            println!("     {line}");
        }
    }

    let vip = c.service(svc).vip4.clone();
    step(
        3,
        &format!(
            "The sleep pod sends {} requests to http://{vip}:8080/api: the tutorial's VirtualService splits /api 90/10",
            args.requests
        ),
    );
    let before = outbound(&c, 1);
    let out = c.http(
        client,
        &format!("http://{vip}:8080/api"),
        &["--count", &args.requests.to_string()],
    )?;
    print_tally(&out);
    println!(
        "   node-1's daemon carried {} connection(s) for them: eBPF sent the connect() to it, and it",
        outbound(&c, 1) - before
    );
    println!(
        "   routed each request by the VirtualService to a DestinationRule subset, from the pod's own address."
    );
    println!(
        "   20 requests to /orders with the header x-canary: true (the tutorial's header route):"
    );
    print_tally(&c.http(
        client,
        &format!("http://{vip}:8080/orders"),
        &["--count", "20", "--header", "x-canary: true"],
    )?);
    println!("   20 requests to /orders without it (the default route):");
    print_tally(&c.http(
        client,
        &format!("http://{vip}:8080/orders"),
        &["--count", "20"],
    )?);
    if let Some(line) = c
        .daemon_log_with(1, &["outbound|8080|v"])
        .lines()
        .rfind(|l| l.contains("outbound|8080|v"))
    {
        println!("   last access-log line on node-1:\n     {line}");
    }

    step(
        4,
        "A pod outside the mesh (namespace legacy, not labelled): its own connections are left alone",
    );
    let before = outbound(&c, 1);
    let ip = c.pod(replicas[0]).ip4.clone();
    let r = c.http(legacy, &format!("http://{ip}:8080/"), &[])?;
    println!(
        "   legacy-client -> {ip}:8080 directly: HTTP {}; its connections redirected by node-1's daemon: +{}",
        r.first().and_then(|r| r["status"].as_u64()).unwrap_or(0),
        outbound(&c, 1) - before
    );
    println!(
        "   but its plaintext into a mesh pod is captured there (sk_lookup) and meets PeerAuthentication:"
    );
    println!("   none is set, so PERMISSIVE lets it through, as Istio does during a migration.");

    step(
        5,
        "mTLS: the tutorial's peerauthentication.yaml (STRICT in production and mesh-wide)",
    );
    let text = std::fs::read_to_string(args.tutorial.join("peerauthentication.yaml"))
        .context("reading peerauthentication.yaml")?;
    c.write_file("peerauthentication.yaml", &text)?;
    let refused = sidelane_tests::sys::wait_for(
        "STRICT applied",
        std::time::Duration::from_secs(10),
        || {
            let r = c.http(legacy, &format!("http://{ip}:8080/"), &[]).ok()?;
            let first = r.first()?;
            let error = first["error"].as_str().unwrap_or_default();
            (first["status"].as_u64() != Some(200)).then(|| {
                if error.contains("ConnectionReset") {
                    "connection reset by node-1's daemon".to_owned()
                } else {
                    error.to_owned()
                }
            })
        },
    )?;
    println!("   legacy-client -> {ip}:8080 in plaintext now: refused, {refused}");
    let out = c.http(
        client,
        &format!("http://{vip}:8080/api"),
        &["--count", "20"],
    )?;
    println!("   the sleep pod's 20 requests, each side proving its SPIFFE identity in TLS 1.3:");
    print_tally(&out);
    let m = c.metrics(2)?;
    if let Some(line) = m.lines().find(|l| {
        l.starts_with("istio_tcp_connections_opened_total{reporter=\"destination\"")
            && l.contains("mutual_tls")
    }) {
        println!("   node-2, as the destination reports it (what Kiali draws the padlock from):");
        for label in [
            "source_principal",
            "destination_principal",
            "connection_security_policy",
        ] {
            if let Some(v) = line.split(&format!("{label}=\"")).nth(1) {
                println!("     {label}={}", v.split('"').next().unwrap_or(""));
            }
        }
    }

    step(
        6,
        "What the kernel programs decided on node-1 (meshctl bpf stats; also in /metrics)",
    );
    for line in c.meshctl(1, &["bpf", "stats"])?.lines() {
        println!("   {line}");
    }
    println!("   enrolled network namespaces (meshctl bpf pods):");
    for line in c.meshctl(1, &["bpf", "pods"])?.lines() {
        println!("     {line}");
    }
    println!(
        "   maps are pinned with BTF: bpftool map dump pinned /sys/fs/bpf/sidelane/test-{}-node-1/sl_pods",
        c.id
    );

    step(
        7,
        "The tutorial's Istio resources (meshctl analyze on the cluster's manifests)",
    );
    let meshctl = std::env::current_exe()?.with_file_name("meshctl");
    let out = std::process::Command::new(&meshctl)
        .arg("analyze")
        .arg("-f")
        .arg(c.config_dir())
        .output()
        .with_context(|| format!("running {}", meshctl.display()))?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("   {line}");
    }
    let dump = c.admin_json(1, "/config_dump")?;
    let errors = dump["errors"].as_array().map(Vec::len).unwrap_or(0);
    println!("   objects the daemon rejected: {errors}");
    println!(
        "   what they compile to for the sleep pod (meshctl proxy-config routes sleep.production):"
    );
    for line in c
        .meshctl(1, &["proxy-config", "routes", "sleep.production"])?
        .lines()
    {
        println!("     {line}");
    }
    println!("   what applies to a v2 pod (meshctl describe pod api-server-v2-0 -n production):");
    for line in c
        .meshctl(
            1,
            &["describe", "pod", "api-server-v2-0", "-n", "production"],
        )?
        .lines()
    {
        println!("     {line}");
    }

    println!("\nTearing the cluster down (namespaces, cgroups, pins, processes).");
    drop(c);
    println!("Done.");
    Ok(())
}

/// Prints how many responses each pod (and version) gave.
fn print_tally(out: &[serde_json::Value]) {
    let mut by_pod: BTreeMap<String, u32> = BTreeMap::new();
    for r in out {
        let key = match (
            r["status"].as_u64(),
            r["pod"].as_str(),
            r["version"].as_str(),
        ) {
            (Some(200), Some(p), Some(v)) => format!("{p} ({v})"),
            (Some(status), _, _) => format!("HTTP {status}"),
            _ => format!("error: {}", r["error"]),
        };
        *by_pod.entry(key).or_default() += 1;
    }
    for (k, n) in &by_pod {
        println!("   {n:>4} answered by {k}");
    }
}

fn outbound(c: &Cluster, node: usize) -> u64 {
    let m = c.metrics(node).unwrap_or_default();
    m.lines()
        .find(|l| l.starts_with("sidelane_outbound_connections_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}
