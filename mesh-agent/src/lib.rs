//! The mesh node agent.
//!
//! One agent runs per node. It loads and attaches the kernel programs
//! ([`bpf`]), fills the shared maps from the workload [`registry`], and
//! proxies the connections the kernel captures ([`proxy`]). [`app`] wires it
//! together and owns shutdown.
#![deny(unsafe_code)]

pub mod app;
pub mod audit;
pub mod authority;
pub mod bpf;
pub mod bundle;
pub mod cgroup;
pub mod config;
pub mod files;
pub mod handoff;
pub mod identity;
pub mod metrics;
pub mod names;
pub mod operator;
pub mod policy;
pub mod proxy;
pub mod registry;
pub mod state;
pub mod tls;
pub mod yaml;

/// An error and its sources, `outer: inner: innermost` (kernel errnos live at the bottom). A
/// source whose text the chain already shows (a variant that prints its source in its own
/// message) is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}
