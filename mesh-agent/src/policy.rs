//! Authorization policy: Istio `AuthorizationPolicy` and `PeerAuthentication` in, pinned BPF
//! maps out (docs/CONTRACTS.md, issue 4).
//!
//! - [`model`]: the typed objects;

pub mod model;
