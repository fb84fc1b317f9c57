//! The load generators and what they report: oha (HTTP, open or closed loop) and iperf3
//! (TCP bulk), both run inside the client pod. Neither is ours: `cargo xtask setup --bench`
//! installs them, so the numbers come from tools anyone can rerun.
use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use serde::Serialize;
use serde_json::Value;

/// How the client speaks HTTP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum HttpKind {
    /// HTTP/1.1, connections kept alive.
    KeepAlive,
    /// HTTP/2 with prior knowledge, many streams per connection.
    Multiplexed,
    /// HTTP/1.1, a new TCP connection for every request.
    NewConnection,
}

/// The shape of an oha run.
#[derive(Clone, Copy, Debug)]
pub enum Load {
    /// Closed loop: as fast as `workers` concurrent requests allow.
    Saturate { secs: u32, workers: u32 },
    /// Open loop: `rps` requests per second on schedule, latency measured from when each
    /// request was due, so a stall is charged to every request it delays (no coordinated
    /// omission).
    Rate { secs: u32, rps: u32 },
    /// Closed loop, exactly `requests` requests: a measurement bounded by work done, not
    /// by time (the instruction counts).
    Count { requests: u32, workers: u32 },
}

/// oha's arguments for one run.
pub fn oha_args(kind: HttpKind, url: &str, load: Load) -> Vec<String> {
    let mut a: Vec<String> = vec!["--no-tui".into(), "--output-format".into(), "json".into()];
    let workers = match load {
        Load::Saturate { secs, workers } => {
            a.extend(["-z".into(), format!("{secs}s")]);
            workers
        }
        Load::Rate { secs, rps } => {
            a.extend([
                "-q".into(),
                rps.to_string(),
                "--latency-correction".into(),
                "-z".into(),
                format!("{secs}s"),
            ]);
            // Enough workers that a slow response never holds back the schedule.
            32
        }
        Load::Count { requests, workers } => {
            a.extend(["-n".into(), requests.to_string()]);
            workers
        }
    };
    match kind {
        HttpKind::KeepAlive => a.extend(["-c".into(), workers.to_string()]),
        HttpKind::NewConnection => {
            a.extend([
                "-c".into(),
                workers.to_string(),
                "--disable-keepalive".into(),
            ]);
        }
        HttpKind::Multiplexed => {
            // Few connections, many streams each: what HTTP/2 clients (gRPC) do.
            let connections = workers.div_ceil(16).max(1);
            a.extend([
                "--http2".into(),
                "-c".into(),
                connections.to_string(),
                "-p".into(),
                "16".into(),
            ]);
        }
    }
    a.push(url.to_owned());
    a
}

/// What an oha run measured.
#[derive(Clone, Debug, Serialize)]
pub struct HttpRun {
    /// Responses per second over the run.
    pub rps: f64,
    /// Responses with status 200.
    pub ok: u64,
    /// Responses with another status, and requests that failed, by reason.
    pub failures: BTreeMap<String, u64>,
    /// Latency percentiles in milliseconds (`p50`, `p90`, `p99`, `p99.9`, ...).
    pub latency_ms: BTreeMap<String, f64>,
}

impl HttpRun {
    pub fn responses(&self) -> u64 {
        self.ok + self.failures.values().sum::<u64>()
    }

    pub fn percentile(&self, p: &str) -> Option<f64> {
        self.latency_ms.get(p).copied()
    }
}

/// Reads oha's `--output-format json`.
pub fn parse_oha(json: &str) -> anyhow::Result<HttpRun> {
    let v: Value = serde_json::from_str(json).context("oha's JSON output")?;
    let rps = v["summary"]["requestsPerSec"]
        .as_f64()
        .context("oha output without summary.requestsPerSec")?;
    let mut ok = 0;
    let mut failures = BTreeMap::new();
    for (status, n) in v["statusCodeDistribution"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let n = n.as_u64().unwrap_or(0);
        if status == "200" {
            ok += n;
        } else {
            failures.insert(format!("HTTP {status}"), n);
        }
    }
    for (error, n) in v["errorDistribution"].as_object().into_iter().flatten() {
        // Requests still in flight when the duration ends are cut off, not failed.
        if error.contains("aborted due to deadline") {
            continue;
        }
        failures.insert(error.clone(), n.as_u64().unwrap_or(0));
    }
    let latency_ms = v["latencyPercentiles"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(p, secs)| Some((p.clone(), secs.as_f64()? * 1000.0)))
        .collect();
    Ok(HttpRun {
        rps,
        ok,
        failures,
        latency_ms,
    })
}

/// iperf3's arguments for a `secs`-second transfer to `host:port`.
pub fn iperf_args(host: &str, port: u16, secs: u32) -> Vec<String> {
    vec![
        "-c".into(),
        host.into(),
        "-p".into(),
        port.to_string(),
        "-t".into(),
        secs.to_string(),
        "-J".into(),
    ]
}

/// Bits per second the receiver got, from iperf3's `-J` report.
pub fn parse_iperf(json: &str) -> anyhow::Result<f64> {
    let v: Value = serde_json::from_str(json).context("iperf3's JSON output")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 output without end.sum_received.bits_per_second")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_oha_json() {
        let run = parse_oha(
            r#"{"summary":{"successRate":1.0,"requestsPerSec":1234.5},
                "latencyPercentiles":{"p50":0.0005,"p99":0.002,"p99.9":0.004},
                "statusCodeDistribution":{"200":990,"503":10},
                "errorDistribution":{"aborted due to deadline":3,"connection reset":2}}"#,
        )
        .expect("parses");
        assert_eq!(run.rps, 1234.5);
        assert_eq!(run.ok, 990);
        assert_eq!(run.responses(), 1002);
        assert_eq!(run.failures.get("HTTP 503"), Some(&10));
        assert_eq!(run.percentile("p99"), Some(2.0));
        assert_eq!(run.percentile("p99.9"), Some(4.0));
    }

    #[test]
    fn counted_runs_stop_after_their_requests() {
        let a = oha_args(
            HttpKind::NewConnection,
            "http://x/",
            Load::Count {
                requests: 500,
                workers: 4,
            },
        )
        .join(" ");
        assert!(a.contains("-n 500"), "{a}");
        assert!(a.contains("-c 4 --disable-keepalive"), "{a}");
        assert!(!a.contains("-z"), "a count, not a duration: {a}");
    }

    #[test]
    fn open_loop_runs_correct_for_coordinated_omission() {
        let a = oha_args(
            HttpKind::KeepAlive,
            "http://x/",
            Load::Rate { secs: 3, rps: 1000 },
        );
        let s = a.join(" ");
        assert!(s.contains("-q 1000 --latency-correction"), "{s}");
        assert!(s.ends_with("http://x/"));
        let h2 = oha_args(
            HttpKind::Multiplexed,
            "http://x/",
            Load::Saturate {
                secs: 3,
                workers: 64,
            },
        )
        .join(" ");
        assert!(h2.contains("--http2 -c 4 -p 16"), "{h2}");
    }

    #[test]
    fn reads_iperf_json() {
        let bps = parse_iperf(r#"{"end":{"sum_received":{"bits_per_second":9.5e9}}}"#);
        assert_eq!(bps.ok(), Some(9.5e9));
        assert!(parse_iperf(r#"{"error":"unable to connect"}"#).is_err());
    }
}
