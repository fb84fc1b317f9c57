//! Configuration sources. Each source produces [`objects::Objects`]; what happens after
//! (compiling a [`crate::state::Snapshot`]) does not depend on the source.
pub mod hosts;
pub mod istio;
pub mod kube_source;
pub mod manifest_dir;
pub mod objects;
