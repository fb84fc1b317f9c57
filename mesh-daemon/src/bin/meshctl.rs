//! `meshctl`: what `istioctl` gives the tutorial's users, for Sidelane. Talks to the node
//! daemon's admin API (localhost:15000 on the node) or reads the pinned eBPF maps.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use clap::{Parser, Subcommand};
use mesh_common::{PodPolicy, map_names, stats};
use mesh_daemon::{
    analyze::{Level, Options},
    config::{kube_source, manifest_dir, objects::Objects},
    settings::{DEFAULT_ADMIN_ADDR, DEFAULT_PIN_DIR},
};
use serde_json::Value;

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Inspect Sidelane on this node")]
struct Cli {
    /// The node daemon's admin API.
    #[arg(long, global = true, default_value = DEFAULT_ADMIN_ADDR)]
    admin: SocketAddr,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pods on this node, whether they are in the mesh, and why.
    ProxyStatus,
    /// What applies to one pod (`istioctl x describe pod`): mesh membership, the Services it
    /// serves with their DestinationRule subsets and routes, PeerAuthentication and
    /// AuthorizationPolicy.
    Describe {
        #[arg(value_parser = ["pod"])]
        kind: String,
        /// The pod, as `name` (with -n) or `name.namespace`.
        pod: String,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long, default_value = "text")]
        output: String,
    },
    /// The daemon's compiled configuration snapshot, as JSON.
    ConfigDump,
    /// What the proxy uses for one pod: routes, clusters, endpoints, or the
    /// AuthorizationPolicies its inbound connections meet (authz) (POD is name.namespace);
    /// or the node's workload certificates (certs, no POD).
    ProxyConfig {
        #[arg(value_parser = ["routes", "clusters", "endpoints", "authz", "certs"])]
        what: String,
        /// `name.namespace`, or `name` with -n (as istioctl takes it).
        #[arg(required_if_eq_any = [("what", "routes"), ("what", "clusters"), ("what", "endpoints"), ("what", "authz")])]
        pod: Option<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long, default_value = "text")]
        output: String,
    },
    /// Validate Istio and Kubernetes YAML and report what istioctl analyze would, plus what
    /// Sidelane does not enforce yet. Exits 79 when an error is found (as istioctl does).
    Analyze {
        /// Files or directories of manifests; without any, the cluster (KUBECONFIG or
        /// in-cluster) is analyzed.
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        /// Only report on this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Output format: text or json.
        #[arg(short = 'o', long, default_value = "text")]
        output: String,
        #[arg(long, default_value = "cluster.local")]
        cluster_domain: String,
    },
    /// Print CustomResourceDefinitions for Istio's resources, for clusters without Istio
    /// (`meshctl crds | kubectl apply -f -`).
    Crds,
    /// The mesh's certificate authority.
    Ca {
        #[command(subcommand)]
        what: CaCmd,
    },
    /// The kernel side, read from the pinned maps.
    Bpf {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[command(subcommand)]
        what: BpfCmd,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Make a self-signed root CA and write it in Istio's `cacerts` layout, for the daemons'
    /// `--ca-dir` (`kubectl create secret generic cacerts -n sidelane-system --from-file=DIR`).
    Init {
        /// The directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = mesh_daemon::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Ask the CA server for a workload certificate as this node would (the key stays in
    /// memory): shows whether the node may have it.
    Request {
        /// The SPIFFE ID, e.g. spiffe://cluster.local/ns/production/sa/reviews.
        identity: String,
        #[arg(long, env = "SIDELANE_CA_ADDR")]
        ca_addr: String,
        /// The directory holding the mesh's `root-cert.pem`.
        #[arg(long, env = "SIDELANE_CA_DIR", default_value = mesh_daemon::settings::DEFAULT_CA_DIR)]
        ca_dir: PathBuf,
        #[arg(long, env = "SIDELANE_CA_TOKEN_FILE", default_value = mesh_daemon::settings::DEFAULT_CA_TOKEN_FILE)]
        token_file: PathBuf,
        #[arg(long, env = "SIDELANE_CA_SERVER_NAME", default_value = mesh_daemon::settings::DEFAULT_CA_SERVER_NAME)]
        server_name: String,
    },
}

#[derive(Subcommand)]
enum BpfCmd {
    /// Enrolled network namespaces and their exclusions (sl_pods).
    Pods,
    /// Connect-hook decision counters (sl_stats).
    Stats,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Problems met while reading the cluster (RBAC, TLS) are logged as warnings.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .without_time()
        .init();
    match cli.cmd {
        Cmd::ProxyStatus => proxy_status(cli.admin),
        Cmd::Describe {
            pod,
            namespace,
            output,
            ..
        } => describe(cli.admin, &pod, namespace.as_deref(), &output),
        Cmd::ConfigDump => {
            println!("{}", get(cli.admin, "/config_dump")?);
            Ok(())
        }
        Cmd::Crds => {
            print!("{}", mesh_daemon::config::istio::crds::render());
            Ok(())
        }
        Cmd::ProxyConfig { what, output, .. } if what == "certs" => certs(cli.admin, &output),
        Cmd::ProxyConfig {
            what,
            pod,
            namespace,
            output,
        } => proxy_config(
            cli.admin,
            &what,
            &pod_name(pod.as_deref().unwrap_or_default(), namespace.as_deref()),
            &output,
        ),
        Cmd::Analyze {
            files,
            namespace,
            output,
            cluster_domain,
        } => {
            let errors = analyze(&files, namespace.as_deref(), &output, &cluster_domain)?;
            if errors {
                // istioctl's exit code for "analyzers found issues".
                std::process::exit(79);
            }
            Ok(())
        }
        Cmd::Ca {
            what: CaCmd::Init { out, trust_domain },
        } => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            mesh_daemon::identity::ca::Ca::generate(&trust_domain)?.write(&out)?;
            println!("CA for {trust_domain} written to {}", out.display());
            Ok(())
        }
        Cmd::Ca {
            what:
                CaCmd::Request {
                    identity,
                    ca_addr,
                    ca_dir,
                    token_file,
                    server_name,
                },
        } => ca_request(&identity, ca_addr, &ca_dir, token_file, &server_name),
        Cmd::Bpf { pin_dir, what } => match what {
            BpfCmd::Pods => bpf_pods(&pin_dir),
            BpfCmd::Stats => bpf_stats(&pin_dir),
        },
    }
}

fn ca_request(
    identity: &str,
    ca_addr: String,
    ca_dir: &std::path::Path,
    token_file: PathBuf,
    server_name: &str,
) -> anyhow::Result<()> {
    let identity = mesh_daemon::identity::Identity::parse(identity)?;
    let roots = mesh_daemon::identity::ca::load_roots(ca_dir)?;
    let client =
        mesh_daemon::identity::ca_client::CaClient::new(ca_addr, server_name, roots, token_file)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cert = rt.block_on(client.issue(&identity, Duration::from_secs(3600)))?;
    let until = cert
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    println!("issued {} (valid until unix time {until})", cert.identity);
    Ok(())
}

/// What the cluster holds, read once through the same source the daemon uses.
fn from_cluster() -> anyhow::Result<Objects> {
    const LIST_TIMEOUT: Duration = Duration::from_secs(30);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (set KUBECONFIG, or pass -f FILE|DIR)")?;
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let task = kube_source::watch(client, tx);
        let first = tokio::time::timeout(LIST_TIMEOUT, rx.recv()).await;
        task.abort();
        match first {
            Ok(Some(objects)) => Ok(objects),
            _ => bail!(
                "could not list the cluster's objects within {LIST_TIMEOUT:?} (see the warnings above: RBAC? API server reachable?)"
            ),
        }
    })
}

/// Prints the analysis; returns whether any error was found.
fn analyze(
    files: &[PathBuf],
    namespace: Option<&str>,
    output: &str,
    cluster_domain: &str,
) -> anyhow::Result<bool> {
    let mut objects = if files.is_empty() {
        from_cluster()?
    } else {
        Objects::default()
    };
    for f in files {
        if f.is_dir() {
            let dir = manifest_dir::load(f)?;
            objects.merge(dir);
        } else {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            objects.add_text(&f.display().to_string(), &text);
        }
    }
    let messages = mesh_daemon::analyze::analyze(
        &objects,
        &Options {
            namespace,
            cluster_domain,
        },
    );
    match output {
        "json" => println!("{}", serde_json::to_string_pretty(&messages)?),
        "text" | "" => {
            if messages.is_empty() {
                println!(
                    "\u{2714} No validation issues found when analyzing {}.",
                    namespace.unwrap_or("all namespaces")
                );
            }
            for m in &messages {
                println!("{m}");
            }
        }
        other => bail!("unknown output format {other:?} (text or json)"),
    }
    Ok(messages.iter().any(|m| m.level == Level::Error))
}

fn get(admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(2)).with_context(|| {
        format!("connecting to the daemon's admin API at {admin} (run meshctl on the node, or in its network namespace)")
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {admin}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{path}: {}", head.lines().next().unwrap_or("no response"));
    }
    Ok(body.to_owned())
}

/// A pod as the admin API names it, `name.namespace`, from istioctl's two spellings:
/// `name.namespace`, or `name` with `-n namespace` (`default` without either).
fn pod_name(pod: &str, namespace: Option<&str>) -> String {
    match (pod.split_once('.'), namespace) {
        (Some(_), None) => pod.to_owned(),
        (_, ns) => format!("{pod}.{}", ns.unwrap_or("default")),
    }
}

/// `istioctl x describe pod`, from the node's daemon.
fn describe(
    admin: SocketAddr,
    pod: &str,
    namespace: Option<&str>,
    output: &str,
) -> anyhow::Result<()> {
    let pod = pod_name(pod, namespace);
    let body = get(admin, &format!("/describe?pod={pod}"))?;
    if output == "json" {
        println!("{body}");
        return Ok(());
    }
    let d: Value = serde_json::from_str(&body)?;
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let list = |v: &Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    println!(
        "Pod: {} (node {}, service account {})",
        s(&d["pod"]),
        s(&d["node"]),
        s(&d["service_account"])
    );
    let member = if d["in_mesh"] == true { "yes" } else { "no" };
    println!("   In the mesh: {member} ({})", s(&d["reason"]));
    for p in d["problems"].as_array().into_iter().flatten() {
        println!("   Problem: {}", s(p));
    }
    for svc in d["services"].as_array().into_iter().flatten() {
        println!("--------------------");
        println!("Service: {}", s(&svc["host"]));
        println!(
            "   Port: {} {}/{} targets pod port {}",
            s(&svc["port_name"]),
            svc["port"],
            s(&svc["protocol"]),
            svc["target_port"]
        );
        println!("   PeerAuthentication: {}", s(&svc["peer_authentication"]));
        let rules = list(&svc["destination_rules"]);
        if !rules.is_empty() {
            println!("DestinationRule: {rules} for \"{}\"", s(&svc["host"]));
            println!("   Matching subsets: {}", list(&svc["matching_subsets"]));
            let other = list(&svc["other_subsets"]);
            if !other.is_empty() {
                println!("      (Non-matching subsets {other})");
            }
        }
        let mut current = String::new();
        for r in svc["routes"].as_array().into_iter().flatten() {
            let vs = s(&r["virtual_service"]);
            if vs != current {
                println!("VirtualService: {vs}");
                current = vs;
            }
            println!("   {} -> {}", s(&r["matches"]), s(&r["action"]));
        }
    }
    println!("--------------------");
    let policies = d["authorization_policies"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if policies.is_empty() {
        println!("AuthorizationPolicies: none (every connection allowed)");
    } else {
        println!("AuthorizationPolicies:");
        for p in &policies {
            let mut notes = Vec::new();
            if p["dry_run"] == true {
                notes.push("dry-run".to_owned());
            }
            let http = list(&p["http_attributes"]);
            if !http.is_empty() {
                notes.push(format!("HTTP attributes not seen on connections: {http}"));
            }
            println!(
                "   {} {}, {} rule(s){}",
                s(&p["name"]),
                s(&p["action"]),
                p["rules"],
                if notes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", notes.join("; "))
                }
            );
        }
    }
    Ok(())
}

/// The node's workload certificates (`istioctl ztunnel-config certificates`, in short).
fn certs(admin: SocketAddr, output: &str) -> anyhow::Result<()> {
    let body = get(admin, "/certs")?;
    if output == "json" {
        println!("{body}");
        return Ok(());
    }
    let v: Value = serde_json::from_str(&body)?;
    if v["mtls"] != true {
        println!("no CA configured on this node: traffic between pods is plaintext");
        return Ok(());
    }
    println!(
        "signed by {} (trust domain {})",
        v["signer"].as_str().unwrap_or("?"),
        v["trust_domain"].as_str().unwrap_or("?")
    );
    println!("{:<60} {:<30} EXPIRES", "IDENTITY", "VALID FROM");
    for c in v["certificates"].as_array().into_iter().flatten() {
        let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
        println!(
            "{:<60} {:<30} {}",
            s("identity"),
            s("valid_from"),
            s("expires")
        );
    }
    Ok(())
}

fn proxy_config(admin: SocketAddr, what: &str, pod: &str, output: &str) -> anyhow::Result<()> {
    let body = get(admin, &format!("/proxy_config/{what}?pod={pod}"))?;
    if output == "json" {
        println!("{body}");
        return Ok(());
    }
    let rows: Vec<Value> = serde_json::from_str(&body)?;
    let s = |v: &Value, k: &str| match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    match what {
        "routes" => {
            println!(
                "{:<6} {:<45} {:<24} {:<50} VIRTUAL SERVICE",
                "PORT", "HOST", "MATCH", "DESTINATIONS"
            );
            for r in &rows {
                println!(
                    "{:<6} {:<45} {:<24} {:<50} {}",
                    s(r, "port"),
                    s(r, "host"),
                    s(r, "matches"),
                    s(r, "action"),
                    s(r, "virtual_service")
                );
            }
        }
        "clusters" => {
            println!(
                "{:<45} {:<6} {:<8} {:<10} {:<24} POLICY",
                "SERVICE FQDN", "PORT", "SUBSET", "ENDPOINTS", "DESTINATION RULE"
            );
            for r in &rows {
                println!(
                    "{:<45} {:<6} {:<8} {:<10} {:<24} {}",
                    s(r, "host"),
                    s(r, "port"),
                    s(r, "subset"),
                    s(r, "endpoints"),
                    s(r, "destination_rule"),
                    s(r, "policy")
                );
            }
        }
        "authz" => {
            println!(
                "{:<40} {:<7} {:<24} {:<6} NOTES",
                "POLICY", "ACTION", "SELECTOR", "RULES"
            );
            for r in &rows {
                let selector = r["selector"].as_object().map_or_else(
                    || "(all workloads)".to_owned(),
                    |m| {
                        m.iter()
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                            .collect::<Vec<_>>()
                            .join(",")
                    },
                );
                let mut notes = Vec::new();
                if r["dry_run"] == Value::Bool(true) {
                    notes.push("dry-run: logged, not enforced".to_owned());
                }
                if let Some(found) = r["http_attributes"].as_array().filter(|a| !a.is_empty()) {
                    let names: Vec<&str> = found.iter().filter_map(Value::as_str).collect();
                    notes.push(format!(
                        "HTTP attributes not seen on connections: {}",
                        names.join(",")
                    ));
                }
                println!(
                    "{:<40} {:<7} {:<24} {:<6} {}",
                    s(r, "name"),
                    s(r, "action").to_uppercase(),
                    selector,
                    r["rules"].as_array().map_or(0, Vec::len),
                    notes.join("; ")
                );
            }
        }
        _ => {
            println!(
                "{:<28} {:<9} {:<14} CLUSTER",
                "ENDPOINT", "STATUS", "OUTLIER CHECK"
            );
            for r in &rows {
                println!(
                    "{:<28} {:<9} {:<14} {}",
                    s(r, "endpoint"),
                    s(r, "status"),
                    s(r, "outlier_check"),
                    s(r, "cluster")
                );
            }
        }
    }
    Ok(())
}

fn proxy_status(admin: SocketAddr) -> anyhow::Result<()> {
    let w: Value = serde_json::from_str(&get(admin, "/workloads")?)?;
    println!(
        "{:<40} {:<9} {:<20} REASON",
        "POD", "STATUS", "NETNS COOKIE"
    );
    for x in w.as_array().into_iter().flatten() {
        let pod = format!(
            "{}.{}",
            x["name"].as_str().unwrap_or("?"),
            x["namespace"].as_str().unwrap_or("?")
        );
        let status = if x["enrolled"] == true {
            "ENROLLED"
        } else {
            "BYPASS"
        };
        let cookie = x["netns_cookie"]
            .as_u64()
            .map_or("-".into(), |c| c.to_string());
        println!(
            "{pod:<40} {status:<9} {cookie:<20} {}",
            x["reason"].as_str().unwrap_or("")
        );
        for p in x["problems"].as_array().into_iter().flatten() {
            println!("    warning: {}", p.as_str().unwrap_or(""));
        }
    }
    Ok(())
}

fn pinned(pin_dir: &std::path::Path, name: &str) -> anyhow::Result<MapData> {
    let path = pin_dir.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (is the daemon installed?)",
            path.display()
        )
    })
}

fn bpf_pods(pin_dir: &std::path::Path) -> anyhow::Result<()> {
    let map: HashMap<MapData, u64, PodPolicy> =
        HashMap::try_from(Map::HashMap(pinned(pin_dir, map_names::PODS)?))?;
    println!(
        "{:<20} {:<8} EXCLUDED PORTS / CIDRS",
        "NETNS COOKIE", "PORT"
    );
    for entry in map.iter() {
        let (cookie, p) = entry?;
        let ports = &p.excluded_ports[..p.excluded_ports_len as usize];
        let v4: Vec<String> = p.excluded_v4[..p.excluded_v4_len as usize]
            .iter()
            .map(|c| {
                format!(
                    "{}/{}",
                    std::net::Ipv4Addr::from(c.addr),
                    c.mask.iter().map(|b| b.count_ones()).sum::<u32>()
                )
            })
            .collect();
        let v6: Vec<String> = p.excluded_v6[..p.excluded_v6_len as usize]
            .iter()
            .map(|c| {
                format!(
                    "{}/{}",
                    std::net::Ipv6Addr::from(c.addr),
                    c.mask.iter().map(|b| b.count_ones()).sum::<u32>()
                )
            })
            .collect();
        println!(
            "{cookie:<20} {:<8} {ports:?} {v4:?} {v6:?}",
            p.redirect_port
        );
    }
    Ok(())
}

fn bpf_stats(pin_dir: &std::path::Path) -> anyhow::Result<()> {
    let map: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(pinned(pin_dir, map_names::STATS)?))?;
    for i in 0..stats::COUNT {
        let total: u64 = map.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
        println!("{:<14} {total}", stats::NAMES[i as usize]);
    }
    Ok(())
}
