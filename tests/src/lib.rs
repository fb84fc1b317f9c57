//! The netns test cluster: nodes and pods made of Linux network namespaces, cgroups and
//! veth pairs, each node running a real `mesh-daemon` with the real eBPF programs.
//! See `tests/README.md` for the layout and the rules every test follows.
#![deny(rust_2018_idioms)]

pub mod capture;
pub mod cluster;
pub mod manifests;
pub mod scenario;
pub mod sys;

pub use cluster::{Cluster, PodRef, PodSpec, RunningClient, ServicePortSpec, ServiceRef};
pub use sys::{HarnessError, Result, leftovers};
