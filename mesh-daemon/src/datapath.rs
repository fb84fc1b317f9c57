//! The kernel side: loading, pinning and attaching the eBPF programs, and the typed maps
//! the daemon reads and writes.
mod loader;
mod maps;

pub use loader::{Datapath, DatapathError, ProgramPins, kernel_release as kernel_release_string};
pub use maps::{OrigDstMap, PodsMap, StatsMap, pod_policy};
