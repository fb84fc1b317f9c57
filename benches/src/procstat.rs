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
    pub fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let sampler = std::thread::spawn(move || {
            let mut peak = rss_bytes(&pids);
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                peak = peak.max(rss_bytes(&pids));
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
}
