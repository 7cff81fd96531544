//! Authorization policy: Istio `AuthorizationPolicy` and `PeerAuthentication` in, pinned BPF
//! maps out (docs/CONTRACTS.md, issue 4).
//!
//! - [`model`]: the typed objects;
//! - [`parse`]: Istio YAML (a file, or a directory of them) → [`model::PolicyBundle`], strict;
//! - [`eval`]: the reference evaluator (Istio semantics), used by tests and to cross-check;

pub mod eval;
pub mod model;
pub mod parse;

pub use parse::PolicyError;
