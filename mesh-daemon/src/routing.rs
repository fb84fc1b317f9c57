//! Compiled routing: which VirtualService and DestinationRule apply to a client, the HTTP
//! routes in order, and the clusters (service, port, subset) with their endpoints.
//!
//! Istio's selection rules, as its sidecars apply them:
//! * A VirtualService applies to the mesh when `gateways` is empty or names `mesh`; its hosts
//!   and destination hosts are resolved in its own namespace. Several mesh VirtualServices
//!   for one host are not merged: the oldest (creation time, then name, then namespace)
//!   wins, which is why `analyze` reports IST0109.
//! * `exportTo` limits who sees a resource: `*` (default) everyone, `.` its own namespace,
//!   or listed namespaces.
//! * A DestinationRule for a host is taken from the client's namespace, else the service's
//!   namespace, else the root namespace; rules for the same host in the chosen namespace are
//!   merged (subsets added, first traffic policy kept).
//! * A destination without a port goes to the Service's only port, or to the port the
//!   client dialled.
pub mod compile;
pub mod eval;
pub mod l4;
pub mod memo;
pub mod policy;
pub mod retry;
pub mod table;
pub mod view;

pub use compile::compile;
pub use table::*;
