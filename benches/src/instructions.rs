//! `sidelane-bench --instructions`: the instructions the daemon executes in user space per
//! request, counted by callgrind over a fixed number of requests. Wall-clock figures on a
//! shared 2-core machine move by 10–20% between runs; this count repeats to a fraction of a
//! percent for the same build, so it shows whether a change made the daemon cheaper. It
//! leaves out the kernel (about half the daemon's CPU: sockets, eBPF, scheduling).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use serde::Serialize;
use sidelane_tests::sys;

use crate::{
    callgrind,
    load::Load,
    measure::{self, Plan},
    report::Scenario,
    topology::{Bench, Route, Security, Via},
};

/// Requests of the warm-up, before counting starts: connections pooled and every path of
/// the code translated by valgrind once.
const WARM_UP_REQUESTS: u32 = 200;
/// Concurrent requests while counting: the daemon is the bottleneck under valgrind, so it
/// sees full batches as at saturation.
const WORKERS: u32 = 16;
/// Functions listed per measurement, by their own instructions.
const TOP_FUNCTIONS: usize = 20;
const DUMP_TIMEOUT: Duration = Duration::from_secs(30);

/// The program and arguments every daemon runs under; dumps go to `out`.
pub fn daemon_wrapper(out: &Path) -> Vec<String> {
    vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        format!("--callgrind-out-file={}/callgrind.%p", out.display()),
    ]
}

#[derive(Serialize)]
pub struct Count {
    pub scenario: Scenario,
    /// As `placement` and `security`.
    #[serde(flatten)]
    pub route: Route,
    pub requests: u32,
    pub instructions: u64,
    pub instructions_per_request: f64,
    /// The callgrind dumps (one per daemon on the path: the mTLS path crosses two), for
    /// `callgrind_annotate` or KCachegrind.
    pub dumps: Vec<PathBuf>,
    /// Functions with the most instructions of their own, per request.
    pub top_functions: Vec<(String, f64)>,
}

/// Counts the instructions of the daemons on the path over `requests` requests of
/// `scenario` from the client in the mesh.
pub fn count(
    b: &Bench,
    plan: &Plan,
    out: &Path,
    scenario: Scenario,
    route: Route,
    requests: u32,
) -> anyhow::Result<Count> {
    let path = measure::HttpPath::to(b, scenario, route, Via::Sidelane)?;
    let pids = path.target().pids();
    ensure!(!pids.is_empty(), "the daemon is not running");
    // Exactly `n` requests, every one answered 200: the count is divided by `n`.
    let all_ok = |n: u32, what: &str| -> anyhow::Result<()> {
        let load = Load::Count {
            requests: n,
            workers: WORKERS,
        };
        let run = measure::oha(b, plan, &path, load)?;
        ensure!(
            run.ok == u64::from(n),
            "{what}: {} of {n} answered 200: {:?}",
            run.ok,
            run.failures
        );
        Ok(())
    };
    all_ok(WARM_UP_REQUESTS, "warm-up")?;
    for &pid in &pids {
        callgrind_control("-z", pid)?;
    }
    all_ok(requests, "counted run")?;
    let mut total = 0;
    let mut by_function: BTreeMap<String, u64> = BTreeMap::new();
    let mut dumps_made = Vec::new();
    for &pid in &pids {
        let before = dumps(out, pid);
        callgrind_control("-d", pid)?;
        let dump = sys::wait_for("the callgrind dump", DUMP_TIMEOUT, || {
            dumps(out, pid).difference(&before).next().cloned()
        })?;
        let text = std::fs::read_to_string(&dump)
            .with_context(|| format!("reading {}", dump.display()))?;
        let profile = callgrind::parse(&text)?;
        total += profile.total;
        for (f, n) in profile.by_function {
            *by_function.entry(f).or_default() += n;
        }
        dumps_made.push(dump);
    }
    let mut by_function: Vec<(String, u64)> = by_function.into_iter().collect();
    by_function.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let per = f64::from(requests);
    Ok(Count {
        scenario,
        route,
        requests,
        instructions: total,
        instructions_per_request: total as f64 / per,
        dumps: dumps_made,
        top_functions: by_function
            .into_iter()
            .take(TOP_FUNCTIONS)
            .map(|(f, n)| (f, n as f64 / per))
            .collect(),
    })
}

/// `callgrind_control` zeroes (`-z`) or dumps (`-d`) the counters of a running daemon.
fn callgrind_control(action: &str, pid: u32) -> anyhow::Result<()> {
    let out = Command::new("callgrind_control")
        .args([action, &pid.to_string()])
        .output()
        .context("running callgrind_control (valgrind's)")?;
    if !out.status.success() {
        bail!(
            "callgrind_control {action} {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The dumps of `pid` written so far (`callgrind.<pid>.<n>`).
fn dumps(out: &Path, pid: u32) -> BTreeSet<PathBuf> {
    let prefix = format!("callgrind.{pid}.");
    std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// An earlier run's counts (its `instructions.json`), to compare with.
pub struct Baseline(Vec<serde_json::Value>);

impl Baseline {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let counts = serde_json::from_str(&text)
            .with_context(|| format!("{} is not an instructions.json", path.display()))?;
        Ok(Self(counts))
    }

    /// The earlier count of the same scenario and route (counts from before the mTLS
    /// route existed are plaintext).
    fn per_request(&self, c: &Count) -> Option<f64> {
        let (scenario, placement, security) = (
            serde_json::to_value(c.scenario).ok()?,
            serde_json::to_value(c.route.placement).ok()?,
            serde_json::to_value(c.route.security).ok()?,
        );
        let plaintext = serde_json::to_value(Security::Plaintext).ok()?;
        self.0
            .iter()
            .find(|b| {
                let was = b.get("security").unwrap_or(&plaintext);
                b["scenario"] == scenario && b["placement"] == placement && *was == security
            })?
            .get("instructions_per_request")?
            .as_f64()
    }
}

/// The counts as a table (with the change from `baseline`), then each measurement's busiest
/// functions.
pub fn table(counts: &[Count], baseline: Option<&Baseline>) -> String {
    let mut t = String::from(
        "daemon instructions per request (user space, callgrind; the kernel not counted)\n\
         scenario              placement  security   requests  instructions/request  baseline   change\n",
    );
    for c in counts {
        let _ = write!(
            t,
            "{:<21} {:<10} {:<9} {:>9} {:>21.0}",
            c.scenario.label(),
            c.route.placement.label(),
            c.route.security.label(),
            c.requests,
            c.instructions_per_request
        );
        let _ = match baseline.and_then(|b| b.per_request(c)) {
            Some(before) if before > 0.0 => writeln!(
                t,
                " {before:>9.0} {:>+7.1}%",
                (c.instructions_per_request / before - 1.0) * 100.0
            ),
            _ => writeln!(t, " {:>9} {:>8}", "-", "-"),
        };
    }
    for c in counts {
        let _ = writeln!(
            t,
            "\n{} {}: functions by their own instructions per request ({})",
            c.scenario.label(),
            c.route.label(),
            c.dumps
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (f, n) in &c.top_functions {
            let share = n / c.instructions_per_request * 100.0;
            let name: String = f.chars().take(110).collect();
            let _ = writeln!(t, "{n:>8.0} {share:>5.1}%  {name}");
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::Placement;

    fn count(scenario: Scenario, per_request: f64) -> Count {
        Count {
            scenario,
            route: Route {
                placement: Placement::SameNode,
                security: Security::Plaintext,
            },
            requests: 2000,
            instructions: (per_request * 2000.0) as u64,
            instructions_per_request: per_request,
            dumps: vec![PathBuf::from("callgrind.1.1")],
            top_functions: vec![("memcpy".into(), 10.0)],
        }
    }

    #[test]
    fn the_table_shows_the_change_from_the_baseline() {
        let before = [count(Scenario::Http1KeepAlive, 20_000.0)];
        let baseline = Baseline(
            serde_json::from_str(&serde_json::to_string(&before).expect("json")).expect("parse"),
        );
        let t = table(
            &[
                count(Scenario::Http1KeepAlive, 19_000.0),
                count(Scenario::Http2Multiplexed, 70_000.0),
            ],
            Some(&baseline),
        );
        let row = |name: &str| {
            t.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_default()
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            row("http1-keepalive"),
            [
                "http1-keepalive",
                "same-node",
                "plaintext",
                "2000",
                "19000",
                "20000",
                "-5.0%"
            ],
            "{t}"
        );
        // Not in the baseline: nothing to compare with.
        assert_eq!(row("http2-multiplexed")[5..], ["-", "-"], "{t}");
    }
}
