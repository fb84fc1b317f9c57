//! Sidelane's node daemon: the pieces `mesh-daemon` and `meshctl` are built from.
//!
//! Data flow: [`config`] reads Kubernetes objects into a [`state::Snapshot`]; the
//! [`reconcile`] loop matches the pods it finds on this node ([`discovery`]) against it,
//! opens their outbound listeners ([`proxy`]) and tells the kernel programs ([`datapath`])
//! which network namespaces to redirect.
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod analyze;
pub mod authz;
pub mod ca_server;
pub mod cgroup;
pub mod config;
pub mod datapath;
pub mod describe;
pub mod dir_changes;
pub mod discovery;
pub mod enrollment;
pub mod handover;
pub mod identity;
pub mod metrics;
pub mod netns;
pub mod peer_authn;
pub mod proxy;
pub mod reconcile;
pub mod routing;
pub mod settings;
pub mod state;
