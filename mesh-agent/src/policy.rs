//! Authorization policy: Istio `AuthorizationPolicy` and `PeerAuthentication` in, pinned BPF
//! maps out (docs/CONTRACTS.md, issue 4).
//!
//! - [`model`]: the typed objects;
//! - [`compile`]: bundle + registry → the contents of one generation of the policy maps;
//! - [`maps`]: the pinned policy maps: write a generation and swap, read one back as a
//!   [`maps::PolicyView`] (the agent's per-request decisions come from the same maps the
//!   kernel reads);
//! - [`source`]: where bundles come from (a policy directory), and the agent's policy task.

pub mod compile;
pub mod load_stub;
pub mod maps;
pub mod model;
pub mod source;
