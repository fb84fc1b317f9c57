//! `sidelane-bench` (run it with `cargo xtask bench`): what the mesh costs. Builds the netns
//! cluster, then for every scenario and route (placement, plaintext or mTLS) loads the same server directly, through
//! Sidelane, through nginx and through haproxy, one after the other in the same run, and
//! writes `results.json`, `results.txt` and one latency plot per HTTP scenario.
//! `benches/README.md` says what each figure means.
mod baselines;
mod callgrind;
mod instructions;
mod load;
mod measure;
mod plot;
mod procstat;
mod report;
mod topology;

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::Context as _;
use clap::Parser;

use measure::Plan;
use report::{Report, Row, Scenario};
use topology::{Bench, Route, Via};

#[derive(Parser)]
struct Args {
    /// Directory for results.json, results.txt and the plots.
    #[arg(long)]
    out: PathBuf,
    /// The oha binary.
    #[arg(long, default_value = "oha")]
    oha: PathBuf,
    /// Seconds of closed-loop load per saturation round.
    #[arg(long, default_value_t = 3)]
    saturation_secs: u32,
    /// Saturation and latency rounds per path, taken in turn across the paths; the median
    /// round counts (by throughput, by p99).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Seconds of open-loop load per latency measurement.
    #[arg(long, default_value_t = 10)]
    latency_secs: u32,
    /// Requests per second of the latency measurement.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Seconds of each TCP bulk transfer.
    #[arg(long, default_value_t = 5)]
    bulk_secs: u32,
    /// Only measurements whose "scenario placement security via" contains every one of
    /// these words (for example `http1-keepalive same-node mtls`).
    #[arg(long, num_args = 1..)]
    only: Vec<String>,
    /// Instead of timing anything, count the daemon's instructions per request under
    /// valgrind's callgrind (HTTP scenarios, the mesh path only).
    #[arg(long)]
    instructions: bool,
    /// Requests counted per scenario with `--instructions`.
    #[arg(long, default_value_t = 2000)]
    requests: u32,
    /// An earlier `instructions.json` to compare the counts with.
    #[arg(long)]
    baseline: Option<PathBuf>,
}

/// How long the proxies' idle CPU is measured.
const IDLE_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

fn selected(only: &[String], s: Scenario, r: Route, v: Via) -> bool {
    let name = format!("{} {} {}", s.label(), r.label(), v.label());
    only.iter().all(|w| name.contains(w.as_str()))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let plan = Plan {
        oha: args.oha.clone(),
        saturation_secs: args.saturation_secs,
        latency_secs: args.latency_secs,
        rate: args.rate,
        bulk_secs: args.bulk_secs,
    };
    if args.instructions {
        return count_instructions(&args, &plan);
    }
    println!("building the benchmark cluster (2 nodes, the mesh, nginx and haproxy on each)");
    let bench = Bench::build(&[])?;
    let proxies = [Via::Sidelane, Via::Nginx, Via::Haproxy];
    let idle_rss_mb: BTreeMap<String, f64> = proxies
        .into_iter()
        .map(|v| {
            let pids = bench.client_node_pids(v);
            (
                v.label().to_owned(),
                procstat::rss_bytes(&pids) as f64 / 1e6,
            )
        })
        .collect();
    // What each costs with no traffic at all: the daemon also watches pods and config.
    let meters: Vec<_> = proxies
        .iter()
        .map(|v| procstat::CpuMeter::start(&bench.client_node_pids(*v)))
        .collect();
    std::thread::sleep(IDLE_WINDOW);
    let idle_cpu_percent: BTreeMap<String, f64> = proxies
        .iter()
        .zip(&meters)
        .map(|(v, m)| {
            (
                v.label().to_owned(),
                m.seconds() / IDLE_WINDOW.as_secs_f64() * 100.0,
            )
        })
        .collect();

    let mut rows = Vec::new();
    for scenario in Scenario::ALL {
        for route in Route::all() {
            let vias: Vec<Via> = Via::ALL
                .into_iter()
                .filter(|v| selected(&args.only, scenario, route, *v))
                .collect();
            if vias.is_empty() {
                continue;
            }
            println!("measuring {} {}", scenario.label(), route.label());
            if scenario == Scenario::TcpBulk {
                for via in vias {
                    let row = measure::bulk(&bench, &plan, route, via);
                    rows.push(row.unwrap_or_else(|e| failed(scenario, route, via, &e)));
                }
            } else {
                rows.extend(http_group(
                    &bench,
                    &plan,
                    scenario,
                    route,
                    &vias,
                    args.rounds,
                ));
            }
        }
    }

    let report = Report {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        saturation_secs: args.saturation_secs,
        latency_secs: args.latency_secs,
        rate: args.rate,
        rounds: args.rounds,
        bulk_secs: args.bulk_secs,
        idle_rss_mb,
        idle_cpu_percent,
        rows,
    };
    write_outputs(&args.out, &report)?;
    let failed = report.rows.iter().filter(|r| r.error.is_some()).count();
    anyhow::ensure!(failed == 0, "{failed} measurement(s) failed; see above");
    Ok(())
}

/// `--instructions`: every selected HTTP scenario and route through the mesh, with the
/// daemons under callgrind.
fn count_instructions(args: &Args, plan: &Plan) -> anyhow::Result<()> {
    println!("building the benchmark cluster, its daemons under valgrind's callgrind");
    let wrapper = instructions::daemon_wrapper(&args.out);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let bench = Bench::build(&wrapper)?;
    let mut counts = Vec::new();
    for scenario in Scenario::ALL
        .into_iter()
        .filter(|s| *s != Scenario::TcpBulk)
    {
        for route in Route::all() {
            if !selected(&args.only, scenario, route, Via::Sidelane) {
                continue;
            }
            println!("counting {} {}", scenario.label(), route.label());
            counts.push(
                instructions::count(&bench, plan, &args.out, scenario, route, args.requests)
                    .with_context(|| format!("{} {}", scenario.label(), route.label()))?,
            );
        }
    }
    let baseline = args
        .baseline
        .as_deref()
        .map(instructions::Baseline::load)
        .transpose()?;
    let table = instructions::table(&counts, baseline.as_ref());
    println!("\n{table}");
    std::fs::write(args.out.join("instructions.txt"), &table)?;
    std::fs::write(
        args.out.join("instructions.json"),
        serde_json::to_string_pretty(&counts)?,
    )?;
    println!("written to {}", args.out.display());
    Ok(())
}

fn failed(scenario: Scenario, route: Route, via: Via, e: &anyhow::Error) -> Row {
    eprintln!("  {} failed: {e:#}", via.label());
    Row::failed(scenario, route, via, format!("{e:#}"))
}

/// One HTTP scenario and route over every path: saturation, then latency, each in
/// `rounds` rounds that take the paths in turn (so drift during the run touches every path
/// alike); the round with the median throughput, and the one with the median p99, count.
fn http_group(
    bench: &Bench,
    plan: &Plan,
    scenario: Scenario,
    route: Route,
    vias: &[Via],
    rounds: u32,
) -> Vec<Row> {
    /// One path's rounds so far; a failed round ends its measurement.
    struct Rounds {
        via: Via,
        path: measure::HttpPath,
        runs: Vec<report::Saturation>,
        latencies: Vec<report::Latency>,
        error: Option<anyhow::Error>,
    }
    let mut rows = Vec::new();
    let mut paths = Vec::new();
    for &via in vias {
        match measure::http_path(bench, plan, scenario, route, via) {
            Ok(path) => paths.push(Rounds {
                via,
                path,
                runs: Vec::new(),
                latencies: Vec::new(),
                error: None,
            }),
            Err(e) => rows.push(failed(scenario, route, via, &e)),
        }
    }
    for _ in 0..rounds.max(1) {
        for p in paths.iter_mut().filter(|p| p.error.is_none()) {
            match measure::saturation(bench, plan, &p.path) {
                Ok(s) => p.runs.push(s),
                Err(e) => p.error = Some(e),
            }
        }
    }
    for _ in 0..rounds.max(1) {
        for p in paths.iter_mut().filter(|p| p.error.is_none()) {
            match measure::latency(bench, plan, &p.path) {
                Ok(l) => p.latencies.push(l),
                Err(e) => p.error = Some(e),
            }
        }
    }
    for p in paths {
        rows.push(match p.error {
            None => Row {
                scenario,
                route,
                via: p.via,
                saturation_rounds: p.runs.iter().map(Into::into).collect(),
                saturation: measure::median(p.runs, |s| s.run.rps),
                latency: measure::median(p.latencies, |l| {
                    l.run.percentile("p99").unwrap_or(f64::INFINITY)
                }),
                bulk: None,
                error: None,
            },
            Some(e) => failed(scenario, route, p.via, &e),
        });
    }
    rows
}

fn write_outputs(out: &std::path::Path, report: &Report) -> anyhow::Result<()> {
    let table = report.table();
    let targets = report.targets().join("\n");
    println!("\n{table}\n{targets}");
    std::fs::write(out.join("results.txt"), format!("{table}\n{targets}\n"))?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    for scenario in Scenario::ALL {
        for route in Route::all() {
            let lines: Vec<plot::Series<'_>> = report
                .rows
                .iter()
                .filter(|r| r.scenario == scenario && r.route == route)
                .filter_map(|r| {
                    let l = r.latency.as_ref()?;
                    Some(plot::Series {
                        name: r.via.label(),
                        points: l
                            .run
                            .latency_ms
                            .iter()
                            .map(|(k, v)| (k.as_str(), *v))
                            .collect(),
                    })
                })
                .collect();
            if lines.is_empty() {
                continue;
            }
            let title = format!(
                "{} {}: latency at {} requests/s (open loop)",
                scenario.label(),
                route.label(),
                report.rate
            );
            let file = out.join(format!(
                "latency-{}-{}-{}.svg",
                scenario.label(),
                route.placement.label(),
                route.security.label()
            ));
            std::fs::write(&file, plot::latency_svg(&title, &lines))?;
        }
    }
    println!("\nwritten to {}", out.display());
    Ok(())
}
