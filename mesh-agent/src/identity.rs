//! The node side of workload identity: what an agent holds and how it obtains it.
//!
//! - [`credentials`]: the node's own credentials ([`NodeCredentials`]: node certificate, key
//!   and trust bundle) and the CSR-based join.
//! - [`client`]: the agent's [`AuthorityClient`].
//! - [`cache`]: the agent's certificate cache and its rotate-at-half-life rule.
//! - [`persist`]: the last certificates and trust bundle, kept on disk so that an agent starts
//!   while the authority is down.
//! - [`manager`]: the agent's [`IdentityManager`]: obtains, rotates and serves the node's
//!   workload certificates and follows the authority's bundle and revocation list.
//!
//! The authority itself is in [`crate::authority`]; certificates, SPIFFE IDs and the TLS
//! verifiers in [`crate::tls`].

use std::time::Duration;

use crate::authority::LifetimeError;
use crate::files::FileError;
use crate::tls::{SpiffeId, TlsError};

pub mod cache;
pub mod client;
pub mod credentials;
pub mod manager;
pub mod persist;

pub use cache::CertCache;
pub use client::AuthorityClient;
pub use credentials::NodeCredentials;
pub use manager::{IdentityManager, ManagerConfig};

/// What can go wrong on the node side: credentials, talking to the authority, and the
/// identity manager.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Lifetime(#[from] LifetimeError),
    #[error("connecting to the authority at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("authority connection: {source}")]
    Transport {
        #[source]
        source: std::io::Error,
    },
    #[error("{op} timed out after {after:?}")]
    Timeout { op: &'static str, after: Duration },
    #[error("authority protocol: {detail}")]
    Protocol { detail: String },
    #[error("the authority refused: {message}")]
    Refused { message: String },
    #[error("no certificate for {identity} on this node")]
    NoCertificate { identity: SpiffeId },
    #[error("no certificate for {pending:?} after {after:?}; last error: {last}")]
    Startup {
        pending: Vec<String>,
        after: Duration,
        #[source]
        last: Box<IdentityError>,
    },
    #[error("stopped before the workload certificates were obtained")]
    Stopped,
    #[error("{what} must be {bound}, got {got:?}")]
    BadConfig {
        what: &'static str,
        bound: &'static str,
        got: Duration,
    },
}
