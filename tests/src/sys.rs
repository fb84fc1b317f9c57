//! Thin wrappers over the system tools and syscalls the harness needs.
#![allow(unsafe_code)]

use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::{fd::AsFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, HarnessError>;

pub fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// Runs a command to completion; fails with its stderr if it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("running {program}")))?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            cmd: format!("{program} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn ip(args: &[&str]) -> Result<()> {
    run("ip", args).map(drop)
}

pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Sets a sysctl inside a network namespace (net.* sysctls are per namespace).
pub fn sysctl_in(netns: &str, key: &str, value: &str) -> Result<()> {
    run(
        "ip",
        &[
            "netns",
            "exec",
            netns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ],
    )
    .map(drop)
}

/// Runs `f` on a fresh thread that has entered `netns`: namespaces are per thread, so the
/// test's own threads never move.
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let path = netns_path(netns);
    let ns = File::open(&path).map_err(io_err(format!("opening {}", path.display())))?;
    std::thread::spawn(move || {
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|e| HarnessError::Other(format!("setns: {e}")))?;
        Ok(f())
    })
    .join()
    .map_err(|_| HarnessError::Other("netns thread panicked".into()))?
}

/// A minimal HTTP/1.0 GET, made from inside `netns`, returning status and body.
pub fn http_get_in(netns: &str, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let path = path.to_owned();
    in_netns(netns, move || -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(io_err(format!("connecting to {addr}")))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")
            .map_err(io_err("sending request"))?;
        let mut text = String::new();
        s.read_to_string(&mut text)
            .map_err(io_err("reading response"))?;
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| HarnessError::Other(format!("bad HTTP response: {text:.100}")))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    })?
}

/// Where cgroup v2 is mounted, found as the daemon finds it.
pub fn cgroup2_root() -> Result<PathBuf> {
    mesh_daemon::cgroup::find_v2_mount().map_err(|e| HarnessError::Other(e.to_string()))
}

/// Spawns `cmd` inside `netns` and the cgroup whose `cgroup.procs` is given, both entered
/// before `exec`, so the program's first socket is already in place.
pub fn spawn_in(netns: &str, cgroup_dir: &Path, cmd: &mut Command) -> Result<Child> {
    let ns = File::open(netns_path(netns)).map_err(io_err(format!("opening netns {netns}")))?;
    let procs = OpenOptions::new()
        .write(true)
        .open(cgroup_dir.join("cgroup.procs"))
        .map_err(io_err(format!(
            "opening {}/cgroup.procs",
            cgroup_dir.display()
        )))?;
    // SAFETY: the closure only makes async-signal-safe syscalls (write, setns) on fds
    // opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // "0" moves the writing process itself.
            nix::unistd::write(procs.as_fd(), b"0").map_err(std::io::Error::from)?;
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    cmd.stdin(Stdio::null())
        .spawn()
        .map_err(io_err(format!("spawning {:?}", cmd.get_program())))
}

/// Waits for a child with a deadline, killing it when the deadline passes.
pub fn wait_output(child: Child, timeout: Duration, what: &str) -> Result<Output> {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.map_err(io_err(what.to_owned())),
        Err(_) => {
            kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = rx.recv_timeout(Duration::from_secs(2));
            Err(HarnessError::Timeout {
                what: what.into(),
                after: timeout,
            })
        }
    }
}

pub fn kill(pid: u32, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// Polls `f` until it returns `Some`, for at most `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            return Err(HarnessError::Timeout {
                what: what.into(),
                after: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Kills every process in a cgroup subtree and removes the cgroups, deepest first.
pub fn remove_cgroup_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    // cgroup.kill (Linux 5.14+) kills the whole subtree at once.
    if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
        for pid in procs_below(dir) {
            kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !procs_below(dir).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut dirs = Vec::new();
    collect_dirs(dir, &mut dirs);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        // A killed task can keep its cgroup busy until its parent reaps it: try again for
        // a moment rather than leave the directory behind.
        while std::fs::remove_dir(&d).is_err() && d.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_owned());
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

fn procs_below(dir: &Path) -> Vec<u32> {
    let mut dirs = Vec::new();
    collect_dirs(dir, &mut dirs);
    dirs.iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// What a test run with id prefix `prefix` ("sl" for all of them) left behind: network
/// namespaces, cgroups, bpffs pins and processes. Empty means clean.
pub fn leftovers(prefix: &str) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(prefix) {
                found.push(format!("netns {n}"));
            }
        }
    }
    if let Ok(root) = cgroup2_root()
        && let Ok(rd) = std::fs::read_dir(&root)
    {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&format!(
                "sidelane-test-{}",
                prefix.trim_start_matches("sl")
            )) {
                found.push(format!("cgroup {}", e.path().display()));
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf/sidelane") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&format!("test-{}", prefix.trim_start_matches("sl"))) {
                found.push(format!("bpffs pin {}", e.path().display()));
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let ours = ["mesh-daemon", "sidelane-workload"]
                .iter()
                .any(|b| cmdline.split(' ').next().is_some_and(|p| p.ends_with(b)));
            if ours
                && cmdline.contains(&format!(
                    "sidelane-test-{}",
                    prefix.trim_start_matches("sl")
                ))
            {
                found.push(format!(
                    "process {}: {cmdline}",
                    e.file_name().to_string_lossy()
                ));
            }
        }
    }
    found
}
