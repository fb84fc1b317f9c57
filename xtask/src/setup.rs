//! `cargo xtask setup`: each step checks first and acts only when needed.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::StatusOk as _;

/// The bpf-linker release the eBPF build is tested with.
const BPF_LINKER_VERSION: &str = "0.13";
/// Debian packages the tests and the demo use: `ip` for the netns cluster, bpftool to show
/// the pinned maps.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[("ip", "iproute2"), ("bpftool", "bpftool")];
/// What `cargo xtask bench` adds: the reference proxies, nginx's stream module (for its L4
/// baseline), iperf3 for TCP bulk transfer, and openssl to issue the proxies' certificate
/// for the mTLS route.
const BENCH_DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("nginx", "nginx"),
    (
        "/usr/lib/nginx/modules/ngx_stream_module.so",
        "libnginx-mod-stream",
    ),
    ("haproxy", "haproxy"),
    ("iperf3", "iperf3"),
    ("openssl", "openssl"),
];
/// The HTTP load generator of the benchmarks: open loop with latency correction, HTTP/2.
const OHA_VERSION: &str = "1.16.0";
/// Python modules the tests use, by import name and package: grpcio is the real gRPC client
/// and server of the gRPC tests.
const PYTHON_PACKAGES: &[(&str, &str)] = &[("grpc", "grpcio")];

pub fn run() -> anyhow::Result<()> {
    nightly_components()?;
    bpf_linker()?;
    debian_packages(DEBIAN_PACKAGES)?;
    python_packages()?;
    bpffs()?;
    if cgroup2_mount().is_none() {
        bail!("no cgroup2 filesystem is mounted; Sidelane needs cgroup v2 (unified or hybrid)");
    }
    Ok(())
}

/// The benchmarks' tools, on top of [`run`]'s.
pub fn bench_tools() -> anyhow::Result<()> {
    debian_packages(BENCH_DEBIAN_PACKAGES)?;
    let have = output(&oha().to_string_lossy(), &["--version"]).unwrap_or_default();
    if !have.contains(OHA_VERSION) {
        println!("setup: building oha {OHA_VERSION} (the HTTP load generator; a few minutes)");
        Command::new("cargo")
            .args(["install", "oha", "--locked", "--version", OHA_VERSION])
            .env_remove("RUSTC")
            .env_remove("CARGO_TARGET_DIR")
            .status_ok("cargo install oha")?;
    }
    Ok(())
}

/// valgrind, for `cargo xtask bench --instructions`.
pub fn instruction_counter() -> anyhow::Result<()> {
    debian_packages(&[("callgrind_control", "valgrind")])
}

/// Where `cargo install` puts oha.
pub fn oha() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("bin/oha")
}

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_components() -> anyhow::Result<()> {
    if output("rustc", &["+nightly", "--version"]).is_none() {
        println!("setup: installing the nightly toolchain (eBPF programs need it)");
        Command::new("rustup")
            .args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ])
            .status_ok("rustup toolchain install nightly")?;
    }
    let installed =
        output("rustup", &["+nightly", "component", "list", "--installed"]).unwrap_or_default();
    // rust-src for -Z build-std=core; clippy to lint the eBPF crate.
    for component in ["rust-src", "clippy"] {
        if !installed.lines().any(|l| l.starts_with(component)) {
            println!("setup: adding {component} to the nightly toolchain");
            Command::new("rustup")
                .args(["component", "add", component, "--toolchain", "nightly"])
                .status_ok("rustup component add")?;
        }
    }
    Ok(())
}

/// bpf-linker must use the same LLVM as the nightly that compiles the programs, so it is
/// built against that toolchain's own libLLVM rather than a system LLVM.
fn bpf_linker() -> anyhow::Result<()> {
    let have = output("bpf-linker", &["--version"]).unwrap_or_default();
    if have.contains(&format!(" {BPF_LINKER_VERSION}")) {
        return Ok(());
    }
    let sysroot =
        output("rustc", &["+nightly", "--print", "sysroot"]).context("nightly sysroot")?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let verbose = output("rustc", &["+nightly", "-vV"]).context("rustc -vV")?;
    let llvm_major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("nightly rustc does not report its LLVM version")?
        .to_owned();
    let libllvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {llvm_major} (about a minute)"
    );
    let l = lib.display();
    Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            &format!("~{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major},no-llvm-linking"),
        ])
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-L{l} -C link-arg=-l:{libllvm} -C link-arg=-Wl,-rpath,{l}"),
        )
        .env_remove("RUSTC")
        .env_remove("CARGO_TARGET_DIR")
        .status_ok("cargo install bpf-linker")
}

/// Installs the packages of `wanted` whose file (absolute path) or command is missing.
fn debian_packages(wanted: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(file, _)| {
            if file.starts_with('/') {
                !std::path::Path::new(file).exists()
            } else {
                output("which", &[file]).is_none()
            }
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if output("apt-get", &["--version"]).is_none() {
        bail!("missing tools from packages {missing:?} and no apt-get to install them");
    }
    println!("setup: installing {}", missing.join(" "));
    Command::new("apt-get")
        .arg("update")
        .arg("-qq")
        .status_ok("apt-get update")?;
    let _no_services = NoServiceStarts::new();
    Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status_ok("apt-get install")
}

/// Keeps packages (nginx, haproxy, iperf3) from starting their system services while they
/// install: a host nginx on port 80 is not ours to start. Debian's invoke-rc.d asks
/// /usr/sbin/policy-rc.d, and 101 means "not allowed"; one already there is left alone.
struct NoServiceStarts(Option<PathBuf>);

impl NoServiceStarts {
    fn new() -> Self {
        let path = PathBuf::from("/usr/sbin/policy-rc.d");
        if path.exists() {
            return Self(None);
        }
        let written = std::fs::write(&path, "#!/bin/sh\nexit 101\n").and_then(|()| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        });
        Self(written.ok().map(|()| path))
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Installs into the `python3` first on PATH, the one the tests run.
fn python_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PYTHON_PACKAGES
        .iter()
        .filter(|(module, _)| output("python3", &["-c", &format!("import {module}")]).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing Python packages {}", missing.join(" "));
    let pip = |extra: &[&str]| {
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet"])
            .args(extra)
            .args(&missing)
            .status_ok("pip install")
    };
    // Debian's own python3 refuses plain installs (PEP 668); the tests only need the module.
    pip(&[]).or_else(|_| pip(&["--break-system-packages"]))
}

/// Mounts bpffs at /sys/fs/bpf when it is not mounted (it often is not outside systemd).
fn bpffs() -> anyhow::Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let mounted = nix::sys::statfs::statfs("/sys/fs/bpf")
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false);
    if mounted || !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").context("creating /sys/fs/bpf")?;
    nix::mount::mount(
        Some("bpf"),
        "/sys/fs/bpf",
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting bpffs at /sys/fs/bpf")?;
    println!("setup: mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts).
/// The same parse as `mesh_daemon::cgroup::find_v2_mount`: xtask cannot depend on the daemon,
/// whose build needs the bpf-linker that this very setup installs.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? == "cgroup2" {
            left.split_whitespace().nth(4).map(PathBuf::from)
        } else {
            None
        }
    })
}
