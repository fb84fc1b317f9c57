//! The kernel side: loading, pinning and attaching the eBPF programs, and the typed maps
//! the daemon reads and writes.
mod inbound;
mod loader;
mod maps;

pub use inbound::{InboundCapture, inbound_key, inbound_policy};
pub use loader::{Datapath, DatapathError, ProgramPins, kernel_release as kernel_release_string};
pub use maps::{OrigDstMap, PodsMap, StatsMap, pod_policy};
