//! Authorization policy: Istio `AuthorizationPolicy` and `PeerAuthentication` in, pinned BPF
//! maps out (docs/CONTRACTS.md, issue 4).
//!
//! - [`model`]: the typed objects;
//! - [`parse`]: Istio YAML (a file, or a directory of them) → [`model::PolicyBundle`], strict;
//! - [`eval`]: the reference evaluator (Istio semantics), used by tests and to cross-check;
//! - [`compile`]: bundle + registry → the contents of one generation of the policy maps;
//! - [`maps`]: the pinned policy maps: write a generation and swap, read one back;
//! - [`engine`]: one generation in memory ([`PolicyView`]), the agent's decision engine: it
//!   decides as the kernel does, from the same entries, and is the proxies' [`Authorizer`];
//! - [`authorize`]: what the proxies ask ([`Authorizer`], [`ConnInfo`], [`RequestAttrs`]) and
//!   the verdicts ([`ConnVerdict`], [`RequestVerdict`]);
//! - [`source`]: where bundles come from (a policy directory), and the agent's policy tasks
//!   (the directory watcher, the generation watcher that publishes [`PolicyView`]s);
//! - [`check`]: `mesh-agent policy check`, one request decided by the agent's own code.

pub mod authorize;
pub mod check;
pub mod compile;
#[cfg(test)]
mod conformance;
pub mod engine;
pub mod eval;
pub mod maps;
pub mod model;
pub mod parse;
pub mod source;
#[cfg(test)]
mod strategies;

pub use authorize::{
    allow_all, Authorizer, ConnDecision, ConnInfo, ConnVerdict, Policies, RequestAttrs,
    RequestVerdict,
};
pub use engine::{PolicyView, RequestHeaders};
pub use parse::PolicyError;
