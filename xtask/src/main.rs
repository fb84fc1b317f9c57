//! `cargo xtask`: everything a fresh machine needs to build, test and demo Sidelane.
mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent; seconds when already done).
    Setup,
    /// Build the daemon, CLI, eBPF programs and test binaries.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// cargo fmt --check and clippy -D warnings (host crates and the eBPF crate).
    Lint,
    /// Set up, lint, build, then run unit and end-to-end tests (needs root).
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// Set up, build for release, then measure Sidelane against a direct connection, nginx
    /// and haproxy in the netns cluster (results in target/bench/<time>/).
    Bench {
        /// Run the criterion micro-benchmarks of the hot path instead.
        #[arg(long)]
        micro: bool,
        /// Count the daemon's user-space instructions per request under callgrind instead:
        /// a figure that repeats between runs, to compare two commits on a noisy machine.
        #[arg(long, conflicts_with = "micro")]
        instructions: bool,
        /// Passed on to sidelane-bench, e.g. `-- --only http1-keepalive --latency-secs 20`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, then build a demo cluster, apply the tutorial's YAML and show the traffic.
    Demo,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Build { release } => {
            setup::run()?;
            build(release)
        }
        Cmd::Lint => {
            setup::run()?;
            lint()
        }
        Cmd::Test { filter, no_lint } => {
            setup::run()?;
            require_root()?;
            if !no_lint {
                lint()?;
            }
            build(false)?;
            test(filter.as_deref())
        }
        Cmd::Bench {
            micro,
            instructions,
            mut args,
        } => {
            setup::run()?;
            if micro {
                return cargo(&["bench", "--package", "mesh-daemon"]).status_ok("cargo bench");
            }
            setup::bench_tools()?;
            if instructions {
                setup::instruction_counter()?;
                args.insert(0, "--instructions".into());
                // Compared with the counts committed with the last results.
                let committed = workspace_root()?.join("benches/results/instructions.json");
                if committed.exists() && !args.iter().any(|a| a == "--baseline") {
                    args.insert(1, "--baseline".into());
                    args.insert(2, committed.to_string_lossy().into_owned());
                }
            }
            require_root()?;
            build(true)?;
            bench(&args)
        }
        Cmd::Demo => {
            setup::run()?;
            require_root()?;
            build(true)?;
            let root = workspace_root()?;
            cargo(&[
                "run",
                "--release",
                "--quiet",
                "--package",
                "tests",
                "--bin",
                "sidelane-demo",
                "--",
                "--tutorial",
            ])
            .arg(root.join("demo/tutorial"))
            .status_ok("running the demo")
        }
    }
}

pub fn workspace_root() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    dir.parent()
        .map(std::path::Path::to_path_buf)
        .context("xtask has no parent directory")
}

fn require_root() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("this task loads eBPF programs and creates network namespaces: run it as root");
    }
    Ok(())
}

pub trait StatusOk {
    fn status_ok(&mut self, what: &str) -> anyhow::Result<()>;
}

impl StatusOk for Command {
    fn status_ok(&mut self, what: &str) -> anyhow::Result<()> {
        let status = self
            .status()
            .with_context(|| format!("{what}: cannot start {:?}", self.get_program()))?;
        if !status.success() {
            bail!("{what} failed ({status})");
        }
        Ok(())
    }
}

fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(args);
    if let Ok(root) = workspace_root() {
        c.current_dir(root);
    }
    without_run_env(&mut c);
    c
}

/// `cargo run` gives the xtask the package variables of the xtask itself. Passed on to a
/// child cargo they reach every build script, and ring's watches `CARGO_MANIFEST_DIR`: a
/// build from here and one from a shell then rebuilt each other's whole dependency tree.
fn without_run_env(c: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
        {
            c.env_remove(key);
        }
    }
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut args = vec!["build", "--bins", "--tests"];
    if release {
        args = vec!["build", "--bins", "--release"];
    }
    cargo(&args).status_ok("cargo build")
}

fn target_dir() -> anyhow::Result<std::path::PathBuf> {
    Ok(std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or(workspace_root()?.join("target")))
}

fn bench(args: &[String]) -> anyhow::Result<()> {
    let release = target_dir()?.join("release");
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let out = target_dir()?.join("bench").join(stamp.to_string());
    let result = Command::new(release.join("sidelane-bench"))
        .arg("--out")
        .arg(&out)
        .arg("--oha")
        .arg(setup::oha())
        .args(args)
        .env("SIDELANE_BIN_DIR", &release)
        .status_ok("sidelane-bench");
    let left = leftovers();
    if !left.is_empty() {
        bail!(
            "the benchmark left resources behind:\n  {}",
            left.join("\n  ")
        );
    }
    result
}

fn lint() -> anyhow::Result<()> {
    cargo(&["fmt", "--all", "--check"]).status_ok("cargo fmt --check (run `cargo fmt --all`)")?;
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"]).status_ok("cargo clippy")?;
    let mut ebpf = Command::new("cargo");
    without_run_env(&mut ebpf);
    ebpf.args([
        "+nightly",
        "clippy",
        "--package",
        "mesh-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ])
    .current_dir(workspace_root()?)
    .env_remove("RUSTC")
    .env_remove("RUSTC_WORKSPACE_WRAPPER")
    .env(
        "CARGO_TARGET_DIR",
        workspace_root()?.join("target/ebpf-clippy"),
    )
    .status_ok("clippy on mesh-ebpf")
}

fn test(filter: Option<&str>) -> anyhow::Result<()> {
    let mut args = vec!["test", "--lib", "--bins", "--tests"];
    if let Some(f) = filter {
        args.extend(["--", f]);
    }
    let mut child = cargo(&args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                passed += count(rest, " passed");
                failed += count(rest, " failed");
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    let left = leftovers();
    if !left.is_empty() {
        bail!("the tests left resources behind:\n  {}", left.join("\n  "));
    }
    println!("no network namespace, cgroup, pin or process left behind");
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    println!("{passed} passed, {failed} failed");
    Ok(())
}

/// The number before `what` in a libtest summary ("ok. 7 passed; 0 failed; ...").
fn count(summary: &str, what: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| {
            part.trim_end()
                .strip_suffix(what)?
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// The same check as `sidelane_tests::leftovers("sl")`, without linking the harness.
fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        found.extend(
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("sl") && n.contains('-'))
                .map(|n| format!("netns {n}")),
        );
    }
    if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf/sidelane") {
        found.extend(
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("test-"))
                .map(|n| format!("pin /sys/fs/bpf/sidelane/{n}")),
        );
    }
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let program = cmdline.split(' ').next().unwrap_or_default();
            // Test daemons and the control plane's processes name their run's directory or
            // cgroup on the command line.
            let ours = ["mesh-daemon", "sidelane-ca", "sidelane-workload"];
            if ours.iter().any(|p| program.ends_with(p)) && cmdline.contains("sidelane-test-") {
                found.push(format!(
                    "process {}: {cmdline}",
                    e.file_name().to_string_lossy()
                ));
            }
        }
    }
    if let Some(root) = setup::cgroup2_mount()
        && let Ok(rd) = std::fs::read_dir(&root)
    {
        found.extend(
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("sidelane-test-"))
                .map(|n| format!("cgroup {}/{n}", root.display())),
        );
    }
    found
}
