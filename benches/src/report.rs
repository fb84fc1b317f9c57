//! Results: what each measurement found, as JSON for machines and a table for people, with
//! every figure that the issue sets a target for put as a ratio to direct in the same run.
use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use crate::{
    load::HttpRun,
    procstat::HostCpu,
    topology::{Route, Via},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    // As its label: the name in the table, in `--only` and in the JSON is the same.
    #[serde(rename = "http1-keepalive")]
    Http1KeepAlive,
    Http2Multiplexed,
    Http1NewConnection,
    TcpBulk,
}

impl Scenario {
    pub const ALL: [Scenario; 4] = [
        Scenario::Http1KeepAlive,
        Scenario::Http2Multiplexed,
        Scenario::Http1NewConnection,
        Scenario::TcpBulk,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Scenario::Http1KeepAlive => "http1-keepalive",
            Scenario::Http2Multiplexed => "http2-multiplexed",
            Scenario::Http1NewConnection => "http1-new-connection",
            Scenario::TcpBulk => "tcp-bulk",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Saturation {
    pub run: HttpRun,
    /// Proxy CPU seconds per 1000 responses (none for direct).
    pub cpu_s_per_1000: Option<f64>,
    /// The whole machine's idle and stolen time during the run.
    pub host: Option<HostCpu>,
}

/// One saturation round of a path, in the order the rounds ran: round `i` of every path was
/// taken within seconds of the others', so ratios are best taken round by round.
#[derive(Debug, Serialize)]
pub struct SaturationRound {
    pub rps: f64,
    pub host: Option<HostCpu>,
}

impl From<&Saturation> for SaturationRound {
    fn from(s: &Saturation) -> Self {
        Self {
            rps: s.run.rps,
            host: s.host,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub target_rps: u32,
    pub run: HttpRun,
    pub cpu_s_per_1000: Option<f64>,
    /// The proxy's highest resident memory during the run.
    pub peak_rss_mb: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Bulk {
    pub gbit_per_s: f64,
    /// Proxy CPU seconds per GiB carried.
    pub cpu_s_per_gib: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub scenario: Scenario,
    /// As `placement` and `security`.
    #[serde(flatten)]
    pub route: Route,
    pub via: Via,
    /// The median saturation round.
    pub saturation: Option<Saturation>,
    /// Every saturation round, the median one included.
    pub saturation_rounds: Vec<SaturationRound>,
    pub latency: Option<Latency>,
    pub bulk: Option<Bulk>,
    /// Why this measurement has no figures.
    pub error: Option<String>,
}

impl Row {
    /// The row's first columns; `None` after writing the whole line of a failed row.
    fn head(&self, out: &mut String) -> Option<String> {
        let head = format!(
            "{:<21} {:<10} {:<9} {:<8}",
            self.scenario.label(),
            self.route.placement.label(),
            self.route.security.label(),
            self.via.label()
        );
        match &self.error {
            Some(e) => {
                let _ = writeln!(out, "{head} failed: {e}");
                None
            }
            None => Some(head),
        }
    }

    pub fn failed(scenario: Scenario, route: Route, via: Via, error: String) -> Self {
        Row {
            scenario,
            route,
            via,
            saturation: None,
            saturation_rounds: Vec::new(),
            latency: None,
            bulk: None,
            error: Some(error),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub cpus: usize,
    pub saturation_secs: u32,
    /// Saturation and latency rounds per path (the median round of each is reported).
    pub rounds: u32,
    pub latency_secs: u32,
    pub rate: u32,
    pub bulk_secs: u32,
    /// Resident memory of each proxy before any load, in MB.
    pub idle_rss_mb: BTreeMap<String, f64>,
    /// CPU each proxy uses with no traffic, in percent of one core.
    pub idle_cpu_percent: BTreeMap<String, f64>,
    pub rows: Vec<Row>,
}

impl Report {
    fn find(&self, scenario: Scenario, route: Route, via: Via) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.scenario == scenario && r.route == route && r.via == via)
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<21} {:<10} {:<9} {:<8} {:>9} {:>6} {:>6} {:>7} {:>7} {:>7} {:>8} {:>7} {:>8} {:>7} {:>7}",
            "scenario",
            "placement",
            "security",
            "via",
            "max rps",
            "xdir",
            "idle%",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "+p99",
            "CPU/1k",
            "RSS MB",
            "errors"
        );
        for r in self.rows.iter().filter(|r| r.scenario != Scenario::TcpBulk) {
            let direct = self.find(r.scenario, r.route, Via::Direct);
            let direct_rps = direct.and_then(|d| Some(d.saturation.as_ref()?.run.rps));
            let direct_p99 = direct.and_then(|d| d.latency.as_ref()?.run.percentile("p99"));
            let Some(head) = r.head(&mut out) else {
                continue;
            };
            let sat = r.saturation.as_ref();
            let lat = r.latency.as_ref();
            let p = |q: &str| lat.and_then(|l| l.run.percentile(q));
            let errors = sat.map_or(0, |s| s.run.failures.values().sum::<u64>())
                + lat.map_or(0, |l| l.run.failures.values().sum::<u64>());
            let _ = writeln!(
                out,
                "{head} {:>9} {:>6} {:>6} {:>7} {:>7} {:>7} {:>8} {:>7} {:>8} {:>7} {:>7}",
                num(sat.map(|s| s.run.rps), 0),
                num(ratio(sat.map(|s| s.run.rps), direct_rps), 2),
                num(sat.and_then(|s| Some(s.host?.idle_percent)), 1),
                num(p("p50"), 3),
                num(p("p90"), 3),
                num(p("p99"), 3),
                num(p("p99.9"), 3),
                num(p("p99").zip(direct_p99).map(|(a, b)| a - b), 3),
                num(lat.and_then(|l| l.cpu_s_per_1000), 4),
                num(lat.and_then(|l| l.peak_rss_mb), 1),
                errors
            );
        }
        let _ = writeln!(
            out,
            "\n{:<21} {:<10} {:<9} {:<8} {:>9} {:>6} {:>9}",
            "scenario", "placement", "security", "via", "Gbit/s", "xdir", "CPU/GiB"
        );
        for r in self.rows.iter().filter(|r| r.scenario == Scenario::TcpBulk) {
            let Some(head) = r.head(&mut out) else {
                continue;
            };
            let direct = self
                .find(r.scenario, r.route, Via::Direct)
                .and_then(|d| Some(d.bulk.as_ref()?.gbit_per_s));
            let gbps = r.bulk.as_ref().map(|b| b.gbit_per_s);
            let _ = writeln!(
                out,
                "{head} {:>9} {:>6} {:>9}",
                num(gbps, 2),
                num(ratio(gbps, direct), 2),
                num(r.bulk.as_ref().and_then(|b| b.cpu_s_per_gib), 3)
            );
        }
        let idle: Vec<String> = self
            .idle_rss_mb
            .iter()
            .map(|(k, v)| format!("{k} {v:.1} MB"))
            .collect();
        let _ = writeln!(out, "\nidle RSS: {}", idle.join(", "));
        let idle_cpu: Vec<String> = self
            .idle_cpu_percent
            .iter()
            .map(|(k, v)| format!("{k} {v:.2}%"))
            .collect();
        let _ = writeln!(out, "idle CPU (of one core): {}", idle_cpu.join(", "));
        let steal = self
            .rows
            .iter()
            .flat_map(|r| &r.saturation_rounds)
            .filter_map(|r| Some(r.host?.steal_percent))
            .reduce(f64::max);
        let _ = writeln!(
            out,
            "CPU stolen by the hypervisor in any saturation round: at most {}%",
            num(steal, 1)
        );
        let _ = writeln!(
            out,
            "columns: max rps = closed-loop saturation; xdir = ratio to direct; idle% = the machine's \
             idle CPU during that saturation round (cores the path left unused); latencies at {} rps open loop \
             (corrected for coordinated omission); +p99 = p99 minus direct's; CPU/1k = proxy CPU-seconds \
             per 1000 requests at that rate; RSS = proxy peak resident memory at that rate",
            self.rate
        );
        out
    }

    /// The targets, each as found in this run. On the mTLS routes the daemon
    /// figures count both hops: CPU summed over the nodes the path crosses, RSS the highest
    /// of any one daemon.
    pub fn targets(&self) -> Vec<String> {
        let mut out = Vec::new();
        for route in Route::all() {
            let s = Scenario::Http1KeepAlive;
            let name = format!("{} {}", s.label(), route.label());
            let get = |via| self.find(s, route, via);
            let p99 = |via| get(via)?.latency.as_ref()?.run.percentile("p99");
            let mesh_lat = get(Via::Sidelane).and_then(|r| r.latency.as_ref());
            let verdict = |ok: Option<bool>| match ok {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "not measured",
            };
            let added = p99(Via::Sidelane).zip(p99(Via::Direct)).map(|(m, d)| m - d);
            let nginx_added = p99(Via::Nginx).zip(p99(Via::Direct)).map(|(m, d)| m - d);
            out.push(format!(
                "{name}: p99 added over direct at {} rps: {} ms (target <= 0.2): {} (nginx {})",
                self.rate,
                num(added, 3),
                verdict(added.map(|a| a <= 0.2)),
                num(nginx_added, 3)
            ));
            // Every measured row holds its rounds (its `saturation` is one of them).
            let rounds = get(Via::Sidelane)
                .zip(get(Via::Nginx))
                .map(|(m, n)| paired_ratios(m, n))
                .unwrap_or_default();
            let each: Vec<String> = rounds.iter().map(|r| format!("{r:.2}")).collect();
            let vs_nginx = crate::measure::median(rounds, |r| *r);
            out.push(format!(
                "{name}: saturation throughput / nginx's: {} (target >= 1): {}{}",
                // Three places: a ratio a hair under 1 must not print as "1.00 NOT met".
                num(vs_nginx, 3),
                verdict(vs_nginx.map(|r| r >= 1.0)),
                if each.is_empty() {
                    String::new()
                } else {
                    format!(" (median of rounds {})", each.join(" "))
                }
            ));
            let cpu = mesh_lat.and_then(|l| l.cpu_s_per_1000);
            // nginx's figure on the same path says how much of an absolute miss is the host.
            let nginx_cpu = get(Via::Nginx).and_then(|r| r.latency.as_ref()?.cpu_s_per_1000);
            out.push(format!(
                "{name}: daemon CPU-seconds per 1000 requests: {} (target <= 0.1): {} (nginx {})",
                num(cpu, 4),
                verdict(cpu.map(|c| c <= 0.1)),
                num(nginx_cpu, 4)
            ));
            let rss = mesh_lat.and_then(|l| l.peak_rss_mb);
            out.push(format!(
                "{name}: daemon RSS under that load: {} MB (target <= 30): {}",
                num(rss, 1),
                verdict(rss.map(|r| r <= 30.0))
            ));
        }
        out
    }
}

/// `a`'s throughput over `b`'s, round by round. Round `i` of both ran seconds apart, so a
/// host that slows down or speeds up during the run moves both alike.
fn paired_ratios(a: &Row, b: &Row) -> Vec<f64> {
    a.saturation_rounds
        .iter()
        .zip(&b.saturation_rounds)
        .filter(|(_, b)| b.rps > 0.0)
        .map(|(a, b)| a.rps / b.rps)
        .collect()
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    a.zip(b).filter(|(_, b)| *b > 0.0).map(|(a, b)| a / b)
}

fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Placement, Security};

    #[test]
    fn scenarios_are_named_alike_in_the_json_and_the_table() {
        for s in Scenario::ALL {
            assert_eq!(serde_json::to_value(s).expect("json"), s.label());
        }
    }

    fn run(rps: f64, p99: f64) -> HttpRun {
        HttpRun {
            rps,
            ok: 1000,
            failures: BTreeMap::new(),
            latency_ms: [("p50".to_owned(), p99 / 2.0), ("p99".to_owned(), p99)].into(),
        }
    }

    fn row(via: Via, rps: f64, rounds: [f64; 3], p99: f64, cpu: Option<f64>) -> Row {
        Row {
            scenario: Scenario::Http1KeepAlive,
            route: Route {
                placement: Placement::SameNode,
                security: Security::Plaintext,
            },
            via,
            saturation: Some(Saturation {
                run: run(rps, p99),
                cpu_s_per_1000: cpu,
                host: Some(HostCpu {
                    idle_percent: 12.5,
                    steal_percent: 0.5,
                }),
            }),
            saturation_rounds: rounds
                .iter()
                .map(|&rps| SaturationRound { rps, host: None })
                .collect(),
            latency: Some(Latency {
                target_rps: 1000,
                run: run(1000.0, p99),
                cpu_s_per_1000: cpu,
                peak_rss_mb: cpu.map(|_| 12.0),
            }),
            bulk: None,
            error: None,
        }
    }

    #[test]
    fn targets_are_ratios_to_the_same_run() {
        let report = Report {
            kernel: "6.18".into(),
            cpus: 2,
            saturation_secs: 5,
            rounds: 3,
            latency_secs: 10,
            rate: 1000,
            bulk_secs: 5,
            idle_rss_mb: BTreeMap::new(),
            idle_cpu_percent: BTreeMap::new(),
            rows: vec![
                row(Via::Direct, 20000.0, [20000.0; 3], 0.5, None),
                // Round 3 was slow for every path but worst for the mesh: the ratio comes
                // from each round's pair, not from the medians of two unrelated rounds.
                row(
                    Via::Sidelane,
                    9000.0,
                    [9000.0, 9800.0, 7000.0],
                    0.8,
                    Some(0.05),
                ),
                row(
                    Via::Nginx,
                    10000.0,
                    [9200.0, 10000.0, 12000.0],
                    0.6,
                    Some(0.04),
                ),
            ],
        };
        let t = report.targets().join("\n");
        assert!(
            t.contains(
                "same-node plaintext: p99 added over direct at 1000 rps: 0.300 ms (target <= 0.2): NOT met (nginx 0.100)"
            ),
            "{t}"
        );
        assert!(
            t.contains("/ nginx's: 0.978 (target >= 1): NOT met (median of rounds 0.98 0.98 0.58)"),
            "{t}"
        );
        assert!(
            t.contains("per 1000 requests: 0.0500 (target <= 0.1): met (nginx 0.0400)"),
            "{t}"
        );
        assert!(
            t.contains(
                "cross-node mtls: p99 added over direct at 1000 rps: - ms (target <= 0.2): not measured"
            ),
            "{t}"
        );
        let table = report.table();
        assert!(
            table.contains("same-node  plaintext sidelane      9000   0.45   12.5"),
            "{table}"
        );
        assert!(
            table.contains("hypervisor in any saturation round: at most -%"),
            "{table}"
        );
    }
}
