//! The mesh node agent.
//!
//! One agent runs per node. It loads and attaches the kernel programs
//! ([`bpf`]), fills the shared maps from the workload [`registry`], and
//! proxies the connections the kernel captures ([`proxy`]). [`app`] wires it
//! together and owns shutdown.
#![deny(unsafe_code)]

pub mod app;
pub mod audit;
pub mod bpf;
pub mod cgroup;
pub mod handoff;
pub mod identity;
pub mod metrics;
pub mod operator;
pub mod policy;
pub mod proxy;
pub mod registry;
