//! One measurement: a scenario over one path, with the proxy's CPU and memory read around
//! the load.
use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};

use crate::{
    baselines::Listener,
    load::{self, HttpKind, HttpRun, Load},
    procstat::{CpuMeter, HostMeter, PeakRss},
    report::{Bulk, Latency, Row, Saturation, Scenario},
    topology::{Bench, Carried, Route, Target, Via},
};

/// How long and how hard to load each path.
pub struct Plan {
    pub oha: PathBuf,
    pub saturation_secs: u32,
    pub latency_secs: u32,
    pub rate: u32,
    pub bulk_secs: u32,
}

/// Concurrent requests of a saturation run: enough to keep both cores busy.
const SATURATION_WORKERS: u32 = 64;
/// Slack beyond a run's own duration before its generator is killed.
const GRACE: Duration = Duration::from_secs(30);
/// The longest a run of a fixed number of requests may take (the daemon may be running
/// under valgrind, tens of times slower).
const COUNT_LIMIT: Duration = Duration::from_secs(300);

fn http_kind(s: Scenario) -> Option<HttpKind> {
    match s {
        Scenario::Http1KeepAlive => Some(HttpKind::KeepAlive),
        Scenario::Http2Multiplexed => Some(HttpKind::Multiplexed),
        Scenario::Http1NewConnection => Some(HttpKind::NewConnection),
        Scenario::TcpBulk => None,
    }
}

/// Runs oha in the path's client pod.
pub fn oha(b: &Bench, plan: &Plan, p: &HttpPath, load: Load) -> anyhow::Result<HttpRun> {
    let t = &p.target;
    let url = format!("http://{}:{}/", t.host, t.port);
    let args = load::oha_args(p.kind, &url, load);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let limit = match load {
        Load::Saturate { secs, .. } | Load::Rate { secs, .. } => {
            Duration::from_secs(u64::from(secs)) + GRACE
        }
        Load::Count { .. } => COUNT_LIMIT,
    };
    let out = b
        .cluster
        .run_in_for(t.client, &plan.oha, &args, limit)
        .with_context(|| format!("oha {url}"))?;
    load::parse_oha(&out)
}

fn per_1000(cpu_s: f64, pids: &[u32], responses: u64) -> Option<f64> {
    (!pids.is_empty() && responses > 0).then(|| cpu_s / responses as f64 * 1000.0)
}

/// An HTTP scenario over one path, warmed up and ready to measure.
pub struct HttpPath {
    target: Target,
    kind: HttpKind,
}

impl HttpPath {
    /// Where `via` sends `scenario`'s traffic.
    pub fn to(b: &Bench, scenario: Scenario, route: Route, via: Via) -> anyhow::Result<Self> {
        let kind = http_kind(scenario).context("not an HTTP scenario")?;
        let listener = match kind {
            HttpKind::Multiplexed => Listener::Http2,
            HttpKind::KeepAlive | HttpKind::NewConnection => Listener::Http1,
        };
        Ok(Self {
            target: b.target(route, via, listener),
            kind,
        })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }
}

/// Where `via` sends `scenario`'s traffic, after a warm-up: connections pooled, code paged
/// in, and the path shown to answer at all.
pub fn http_path(
    b: &Bench,
    plan: &Plan,
    scenario: Scenario,
    route: Route,
    via: Via,
) -> anyhow::Result<HttpPath> {
    let path = HttpPath::to(b, scenario, route, via)?;
    let before = mesh_carried(b, route, via)?;
    let warm = oha(
        b,
        plan,
        &path,
        Load::Saturate {
            secs: 1,
            workers: 8,
        },
    )?;
    if warm.ok == 0 {
        bail!(
            "no response with status 200 in warm-up: {:?}",
            warm.failures
        );
    }
    check_carried(b, route, via, before)?;
    Ok(path)
}

fn mesh_carried(b: &Bench, route: Route, via: Via) -> anyhow::Result<Option<Carried>> {
    Ok(match via {
        Via::Sidelane => Some(b.carried(route)?),
        Via::Direct | Via::Nginx | Via::Haproxy => None,
    })
}

/// A measurement of the mesh's mTLS route that ran in plaintext, or the other way round,
/// would be a wrong figure under the right name: the mesh's own metrics say which it was.
fn check_carried(b: &Bench, route: Route, via: Via, before: Option<Carried>) -> anyhow::Result<()> {
    let (Some(before), Some(after)) = (before, mesh_carried(b, route, via)?) else {
        return Ok(());
    };
    if !after.only(before, route.security) {
        bail!(
            "the mesh did not carry this as {}: before {before:?}, after {after:?}",
            route.security.label()
        );
    }
    Ok(())
}

/// One closed-loop run at saturation.
pub fn saturation(b: &Bench, plan: &Plan, p: &HttpPath) -> anyhow::Result<Saturation> {
    let pids = p.target.pids();
    let cpu = CpuMeter::start(&pids);
    let host = HostMeter::start();
    let run = oha(
        b,
        plan,
        p,
        Load::Saturate {
            secs: plan.saturation_secs,
            workers: SATURATION_WORKERS,
        },
    )?;
    Ok(Saturation {
        cpu_s_per_1000: per_1000(cpu.seconds(), &pids, run.responses()),
        host: host.finish(),
        run,
    })
}

/// The open-loop run at the plan's rate, with the proxy's CPU and peak memory.
pub fn latency(b: &Bench, plan: &Plan, p: &HttpPath) -> anyhow::Result<Latency> {
    let pids = p.target.pids();
    let rss = PeakRss::start(p.target.per_node.clone());
    let cpu = CpuMeter::start(&pids);
    let run = oha(
        b,
        plan,
        p,
        Load::Rate {
            secs: plan.latency_secs,
            rps: plan.rate,
        },
    );
    let peak = rss.finish();
    let run = run?;
    Ok(Latency {
        target_rps: plan.rate,
        cpu_s_per_1000: per_1000(cpu.seconds(), &pids, run.responses()),
        peak_rss_mb: (!pids.is_empty()).then(|| peak as f64 / 1e6),
        run,
    })
}

/// The round with the median `key` (throughput, p99): one slow or lucky round does not
/// decide a ratio.
pub fn median<T>(mut runs: Vec<T>, key: impl Fn(&T) -> f64) -> Option<T> {
    runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let mid = runs.len() / 2;
    runs.into_iter().nth(mid)
}

pub fn bulk(b: &Bench, plan: &Plan, route: Route, via: Via) -> anyhow::Result<Row> {
    let t = b.target(route, via, Listener::Tcp);
    let pids = t.pids();
    let before = mesh_carried(b, route, via)?;
    let args = load::iperf_args(&t.host, t.port, plan.bulk_secs);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cpu = CpuMeter::start(&pids);
    let out = b
        .cluster
        .run_in_for(
            t.client,
            std::path::Path::new("iperf3"),
            &args,
            Duration::from_secs(u64::from(plan.bulk_secs)) + GRACE,
        )
        .context("iperf3")?;
    let bps = load::parse_iperf(&out)?;
    let gib = bps * f64::from(plan.bulk_secs) / 8.0 / f64::from(1u32 << 30);
    let cpu_s = cpu.seconds();
    check_carried(b, route, via, before)?;
    Ok(Row {
        scenario: Scenario::TcpBulk,
        route,
        via,
        saturation: None,
        saturation_rounds: Vec::new(),
        latency: None,
        bulk: Some(Bulk {
            gbit_per_s: bps / 1e9,
            cpu_s_per_gib: (!pids.is_empty() && gib > 0.0).then(|| cpu_s / gib),
        }),
        error: None,
    })
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_round_by_key() {
        let rounds = vec![(1, 30.0), (2, 10.0), (3, 20.0)];
        assert_eq!(median(rounds, |r| r.1), Some((3, 20.0)));
        assert_eq!(median(vec![(1, 5.0)], |r| r.1), Some((1, 5.0)));
        assert_eq!(median(Vec::<(u8, f64)>::new(), |r| r.1), None);
    }
}
