//! Authorization policy: Istio `AuthorizationPolicy` and `PeerAuthentication` in, pinned BPF
//! maps out (docs/CONTRACTS.md, issue 4).
//!
//! - [`model`]: the typed objects;
//! - [`parse`]: Istio YAML (a file, or a directory of them) → [`model::PolicyBundle`], strict;
//! - [`eval`]: the reference evaluator (Istio semantics), used by tests and to cross-check;
//! - [`compile`]: bundle + registry → the contents of one generation of the policy maps;
//! - [`maps`]: the pinned policy maps: write a generation and swap, read one back as a
//!   [`maps::PolicyView`] (the agent's per-request decisions come from the same maps the
//!   kernel reads);
//! - [`source`]: where bundles come from (a policy directory), and the agent's policy task;
//! - [`authorize`]: a generation as the proxies' `Authorizer` snapshot.
//! - [`check`]: `mesh-agent policy check`, one request decided by the agent's own code.

pub mod authorize;
pub mod check;
pub mod compile;
#[cfg(test)]
mod conformance;
pub mod eval;
pub mod maps;
pub mod model;
pub mod parse;
pub mod source;
#[cfg(test)]
mod strategies;

pub use parse::PolicyError;
