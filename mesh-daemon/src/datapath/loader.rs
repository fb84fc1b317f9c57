use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use mesh_common::{map_names, program_names};

use super::{
    inbound::InboundCapture,
    maps::{OrigDstMap, PodsMap, StatsMap},
};

/// The compiled kernel programs, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

const BPF_FS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "preparing bpffs at {path}: {source} (is /sys/fs/bpf mountable? the daemon needs CAP_SYS_ADMIN or a pre-mounted bpffs)"
    )]
    BpfFs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("eBPF program {0} is missing from the object (build mismatch)")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} is missing from the object or has the wrong type: {1}")]
    Map(&'static str, String),
    #[error(
        "the kernel (Linux {kernel}) refused eBPF program {program}: {reason}\n\
         verifier log (last lines):\n{log}"
    )]
    Rejected {
        program: &'static str,
        kernel: String,
        reason: std::io::Error,
        log: String,
    },
    #[error("program {program}: {action}: {message} (kernel {kernel})")]
    Program {
        program: &'static str,
        action: &'static str,
        message: String,
        kernel: String,
    },
    #[error("opening cgroup {path}: {source} (does the cgroup exist on the cgroup2 mount?)")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Paths of the pins one program leaves under the pin directory.
#[derive(Debug, Clone)]
pub struct ProgramPins {
    pub program: PathBuf,
    pub link: PathBuf,
}

impl ProgramPins {
    pub fn new(pin_dir: &Path, name: &str) -> Self {
        Self {
            program: pin_dir.join(name),
            link: pin_dir.join(format!("{name}_link")),
        }
    }
}

/// The loaded and attached programs, plus the maps the daemon uses. Programs stay attached
/// through their pinned links when the daemon exits, so a restart does not open a window in
/// which enrolled pods' connections leave unredirected.
pub struct Datapath {
    /// Owns the programs' file descriptors (keep it for the daemon's life) and attaches
    /// inbound capture to pods.
    pub inbound: InboundCapture,
    pub pods: PodsMap,
    pub orig_dst: OrigDstMap,
    pub stats: StatsMap,
    /// True when this start found pins of an earlier daemon and took them over.
    pub adopted: bool,
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

impl Datapath {
    /// Loads the programs, adopts or creates the pinned maps under `pin_dir`, and attaches to
    /// the cgroup at `cgroup` (a path on the cgroup2 mount).
    pub fn load(pin_dir: &Path, cgroup: &Path) -> Result<Self, DatapathError> {
        ensure_bpffs(pin_dir)?;
        std::fs::create_dir_all(pin_dir).map_err(|source| DatapathError::BpfFs {
            path: pin_dir.into(),
            source,
        })?;
        let adopted = pin_dir.join(map_names::PODS).exists();
        let mut loader = EbpfLoader::new();
        let pins: Vec<(&str, PathBuf)> = [
            map_names::PODS,
            map_names::PENDING,
            map_names::ORIG_DST,
            map_names::STATS,
            map_names::INBOUND,
            map_names::INBOUND_SOCKETS,
        ]
        .into_iter()
        .map(|m| (m, pin_dir.join(m)))
        .collect();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT)?;

        let cgroup_file = File::open(cgroup).map_err(|source| DatapathError::Cgroup {
            path: cgroup.into(),
            source,
        })?;
        for name in [program_names::CONNECT4, program_names::CONNECT6] {
            install(
                program::<CgroupSockAddr>(&mut ebpf, name)?,
                name,
                pin_dir,
                &cgroup_file,
            )?;
        }
        let name = program_names::SOCKOPS;
        install(
            program::<SockOps>(&mut ebpf, name)?,
            name,
            pin_dir,
            &cgroup_file,
        )?;

        let pods = take_map(&mut ebpf, map_names::PODS, |m| {
            HashMap::<MapData, _, _>::try_from(m)
        })?;
        let orig_dst = take_map(&mut ebpf, map_names::ORIG_DST, |m| {
            HashMap::<MapData, _, _>::try_from(m)
        })?;
        let stats = take_map(&mut ebpf, map_names::STATS, |m| {
            PerCpuArray::<MapData, u64>::try_from(m)
        })?;
        let name = program_names::SK_LOOKUP;
        let sk_lookup = program::<SkLookup>(&mut ebpf, name)?;
        sk_lookup.load().map_err(|e| rejected(name, e))?;
        repin_program(name, &ProgramPins::new(pin_dir, name).program, |p| {
            sk_lookup.pin(p)
        })?;
        let inbound_policies = take_map(&mut ebpf, map_names::INBOUND, |m| {
            HashMap::<MapData, _, _>::try_from(m)
        })?;
        let inbound_sockets = take_map(&mut ebpf, map_names::INBOUND_SOCKETS, |m| {
            SockHash::<MapData, _>::try_from(m)
        })?;
        Ok(Self {
            inbound: InboundCapture::new(ebpf, inbound_policies, inbound_sockets, pin_dir),
            pods: PodsMap::new(pods),
            orig_dst: OrigDstMap::new(orig_dst),
            stats: StatsMap::new(stats),
            adopted,
        })
    }

    /// Detaches the programs and removes every pin: what an uninstall does.
    pub fn remove_pins(pin_dir: &Path) -> std::io::Result<()> {
        match std::fs::remove_dir_all(pin_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// What installing a cgroup program takes, for the program types Sidelane uses.
trait CgroupProgram {
    fn load_program(&mut self) -> Result<(), ProgramError>;
    fn pin_program(&mut self, path: &Path) -> Result<(), aya::pin::PinError>;
    fn attach_link(&mut self, cgroup: &File) -> Result<FdLink, String>;
}

macro_rules! cgroup_program {
    ($($t:ty),*) => {$(
        impl CgroupProgram for $t {
            fn load_program(&mut self) -> Result<(), ProgramError> {
                self.load()
            }
            fn pin_program(&mut self, path: &Path) -> Result<(), aya::pin::PinError> {
                self.pin(path)
            }
            fn attach_link(&mut self, cgroup: &File) -> Result<FdLink, String> {
                // bpf_link attachments to a cgroup always coexist with others (the kernel
                // rejects an explicit BPF_F_ALLOW_MULTI there), so "single" is right here.
                let id = self
                    .attach(cgroup, CgroupAttachMode::Single)
                    .map_err(|e| error_chain(&e))?;
                let link = self.take_link(id).map_err(|e| error_chain(&e))?;
                FdLink::try_from(link).map_err(|e| error_chain(&e))
            }
        }
    )*};
}
cgroup_program!(CgroupSockAddr, SockOps);

fn install(
    prog: &mut impl CgroupProgram,
    name: &'static str,
    pin_dir: &Path,
    cgroup: &File,
) -> Result<(), DatapathError> {
    prog.load_program().map_err(|e| rejected(name, e))?;
    let pins = ProgramPins::new(pin_dir, name);
    repin_program(name, &pins.program, |p| prog.pin_program(p))?;
    let link = prog
        .attach_link(cgroup)
        .map_err(|e| program_error(name, "attach", e))?;
    replace_link(name, &pins.link, link)
}

pub(super) fn program<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(DatapathError::MissingProgram(name))
}

fn take_map<T, E: std::fmt::Display>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<T, E>,
) -> Result<T, DatapathError> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| DatapathError::Map(name, "not in object".into()))?;
    convert(map).map_err(|e| DatapathError::Map(name, e.to_string()))
}

pub(super) fn rejected(program: &'static str, e: ProgramError) -> DatapathError {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            DatapathError::Rejected {
                program,
                kernel: kernel_release(),
                reason: io_error,
                log: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            }
        }
        other => program_error(program, "load", error_chain(&other)),
    }
}

/// An error and all its causes on one line: aya's own messages omit the errno.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub(super) fn program_error(
    program: &'static str,
    action: &'static str,
    e: impl std::fmt::Display,
) -> DatapathError {
    DatapathError::Program {
        program,
        action,
        message: e.to_string(),
        kernel: kernel_release(),
    }
}

/// Pins the freshly loaded program where the previous daemon's was, so `bpftool prog show
/// pinned` always names the running one.
fn repin_program(
    name: &'static str,
    path: &Path,
    pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
) -> Result<(), DatapathError> {
    if path.exists() {
        std::fs::remove_file(path).map_err(|e| program_error(name, "unpin old program", e))?;
    }
    pin(path).map_err(|e| program_error(name, "pin", error_chain(&e)))
}

/// Swaps in `new`: it is already attached, so for a moment both the old and new programs
/// run (harmless: the second sees a loopback destination and leaves it), then the old link
/// is unpinned and dropped, which detaches it.
pub(super) fn replace_link(
    name: &'static str,
    path: &Path,
    new: FdLink,
) -> Result<(), DatapathError> {
    if path.exists() {
        match PinnedLink::from_pin(path) {
            Ok(old) => {
                let old = old
                    .unpin()
                    .map_err(|e| program_error(name, "unpin old link", e))?;
                drop(old);
            }
            Err(e) => {
                tracing::warn!(program = name, error = %e, "stale link pin; replacing it");
                std::fs::remove_file(path)
                    .map_err(|e| program_error(name, "remove stale link pin", e))?;
            }
        }
    }
    new.pin(path)
        .map(drop)
        .map_err(|e| program_error(name, "pin link", error_chain(&e)))
}

fn ensure_bpffs(pin_dir: &Path) -> Result<(), DatapathError> {
    if !pin_dir.starts_with(BPF_FS) {
        return Ok(());
    }
    let err = |source| DatapathError::BpfFs {
        path: BPF_FS.into(),
        source,
    };
    std::fs::create_dir_all(BPF_FS).map_err(err)?;
    let is_bpffs = nix::sys::statfs::statfs(BPF_FS)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false);
    if !is_bpffs {
        nix::mount::mount(
            Some("bpf"),
            BPF_FS,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| err(std::io::Error::from(e)))?;
        tracing::info!("mounted bpffs at {BPF_FS}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_program_is_named_with_the_verifiers_reason_and_the_kernel() {
        let log: String = (0..30).map(|i| format!("insn {i}\n")).collect::<String>()
            + "dereference of modified ctx ptr R6 off=48 disallowed\n";
        let e = rejected(
            "sl_sockops",
            ProgramError::LoadError {
                io_error: std::io::Error::from_raw_os_error(libc::EACCES),
                verifier_log: aya_obj::VerifierLog::new(log),
            },
        );
        let text = e.to_string();
        assert!(text.contains("refused eBPF program sl_sockops"), "{text}");
        assert!(
            text.contains(&format!("Linux {}", kernel_release())),
            "{text}"
        );
        assert!(text.contains("Permission denied"), "{text}");
        assert!(text.contains("dereference of modified ctx ptr"), "{text}");
        // Only the tail of a long log: the reason is at the end.
        assert!(!text.contains("insn 0\n"), "{text}");
    }
}
