//! CPU time and memory of the proxies under test, read from /proc as `top` reads them.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// The fields of `/proc/<pid>/stat` after the command name (which may hold spaces), so
/// index 0 is field 3 (`state`) of proc(5).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// `pid` and the processes it forked (nginx's workers run as its children).
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in dir.flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // Field 4 of proc(5): the parent's pid.
        let parent = stat_fields(child).and_then(|f| f.get(1)?.parse::<u32>().ok());
        if parent == Some(pid) {
            pids.push(child);
        }
    }
    pids
}

fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// User plus system CPU seconds the processes (all their threads) have used so far.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .filter_map(|&pid| {
            let f = stat_fields(pid)?;
            // Fields 14 and 15: utime and stime, in clock ticks.
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks as f64 / ticks_per_second()
}

/// Resident memory of the processes now, in bytes.
pub fn rss_bytes(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|&pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            vm_rss_kib(&status)
        })
        .sum::<u64>()
        * 1024
}

fn vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The highest resident memory seen while a measurement runs, sampled every 100 ms.
pub struct PeakRss {
    stop: Arc<AtomicBool>,
    sampler: JoinHandle<u64>,
}

impl PeakRss {
    /// Samples each group of processes (a proxy on one node: nginx's master and workers)
    /// and keeps the highest any one group reached.
    pub fn start(groups: Vec<Vec<u32>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let sampler = std::thread::spawn(move || {
            let sample = || groups.iter().map(|g| rss_bytes(g)).max().unwrap_or(0);
            let mut peak = sample();
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                peak = peak.max(sample());
            }
            peak
        });
        Self { stop, sampler }
    }

    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.sampler.join().unwrap_or(0)
    }
}

/// CPU seconds used by `pids` between two points of a measurement.
pub struct CpuMeter {
    pids: Vec<u32>,
    start: f64,
}

impl CpuMeter {
    pub fn start(pids: &[u32]) -> Self {
        Self {
            pids: pids.to_vec(),
            start: cpu_seconds(pids),
        }
    }

    pub fn seconds(&self) -> f64 {
        (cpu_seconds(&self.pids) - self.start).max(0.0)
    }
}

/// The whole machine's CPU time so far, from the first line of `/proc/stat`, in ticks.
#[derive(Clone, Copy, Debug, PartialEq)]
struct HostTicks {
    total: u64,
    /// Idle and waiting for I/O: nothing was runnable.
    idle: u64,
    /// Taken by the hypervisor for other guests.
    steal: u64,
}

fn parse_host_ticks(stat: &str) -> Option<HostTicks> {
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = cpu
        .split_whitespace()
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal; guest time is inside user and nice.
    let first = f.get(..8)?;
    Some(HostTicks {
        total: first.iter().sum(),
        idle: f[3] + f[4],
        steal: f[7],
    })
}

/// Where the machine's CPU time went during one measurement, in percent of all its CPUs'
/// time. Idle time under a closed-loop load means the path left cores unused: its
/// throughput was bound by how its work was placed on the cores, not by CPU. Steal is the
/// hypervisor serving other guests, one reason two runs on one machine may disagree.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct HostCpu {
    pub idle_percent: f64,
    pub steal_percent: f64,
}

/// Reads `/proc/stat` around a measurement.
pub struct HostMeter(Option<HostTicks>);

impl HostMeter {
    fn read() -> Option<HostTicks> {
        parse_host_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    pub fn start() -> Self {
        Self(Self::read())
    }

    pub fn finish(self) -> Option<HostCpu> {
        let (a, b) = (self.0?, Self::read()?);
        let total = b.total.checked_sub(a.total).filter(|t| *t > 0)? as f64;
        let share = |x: u64, y: u64| y.saturating_sub(x) as f64 / total * 100.0;
        Some(HostCpu {
            idle_percent: share(a.idle, b.idle),
            steal_percent: share(a.steal, b.steal),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        // Burn a little CPU so the counter cannot legitimately read zero.
        let meter = CpuMeter::start(&[me]);
        let until = std::time::Instant::now() + Duration::from_millis(60);
        let mut x = 0u64;
        while std::time::Instant::now() < until {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        assert!(meter.seconds() > 0.0);
        assert!(rss_bytes(&[me]) > 1 << 20);
        assert_eq!(vm_rss_kib("Name:\tx\nVmRSS:\t   2048 kB\n"), Some(2048));
    }

    #[test]
    fn host_ticks_count_iowait_as_idle_and_guests_once() {
        let t = parse_host_ticks("cpu  100 5 50 800 20 3 7 15 40 0\ncpu0 1 2 3\n");
        assert_eq!(
            t,
            Some(HostTicks {
                total: 1000,
                idle: 820,
                steal: 15
            })
        );
        assert_eq!(parse_host_ticks("intr 1 2 3\n"), None);
        // Over a real interval the shares are percentages of the machine's time.
        let meter = HostMeter::start();
        std::thread::sleep(Duration::from_millis(50));
        if let Some(h) = meter.finish() {
            assert!((0.0..=100.0).contains(&h.idle_percent), "{h:?}");
            assert!((0.0..=100.0).contains(&h.steal_percent), "{h:?}");
        }
    }
}
