//! The mesh authority: the CA with its on-disk store, and its network service.
//!
//! - [`ca`]: the CA. A long-lived root (ECDSA P-256) signs an issuing certificate, which signs
//!   short-lived workload certificates (X.509-SVIDs) from CSRs, and node certificates for
//!   bootstrapping. Revocation by serial; trust-bundle rotation (several roots at once).
//! - [`service`]: the authority's network service (mTLS, newline-delimited JSON).
//! - [`custody`]: the nodes' audit keys and the copies of their signed audit checkpoints.
//! - [`protocol`]: the request and response lines the service and the node's client exchange.

use std::path::PathBuf;

use crate::files::FileError;
use crate::tls::{SpiffeId, SpiffeIdError, TlsError};

pub mod ca;
pub mod custody;
pub mod protocol;
pub mod service;

pub use ca::{authorize_request, Authority, LifetimeError, ReloadOutcome, RootId, RootInfo};
pub use service::{serve, serve_with, ServeConfig};

/// What can go wrong in the authority: its store, signing, and requests it refuses.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    SpiffeId(#[from] SpiffeIdError),
    #[error("invalid certificate signing request: {reason}")]
    InvalidCsr { reason: String },
    #[error("{context}: {source}")]
    Rcgen {
        context: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error(
        "node {node:?} may not obtain a certificate for {identity}: the registry places it on {hosts:?}"
    )]
    NotAuthorized {
        node: String,
        identity: SpiffeId,
        hosts: Vec<String>,
    },
    #[error(transparent)]
    Lifetime(#[from] LifetimeError),
    #[error("an authority already exists in {dir}")]
    AlreadyInitialised { dir: PathBuf },
    #[error("authority state {path} is invalid: {detail}")]
    BadState { path: PathBuf, detail: String },
    #[error("no root {root} in the trust bundle")]
    UnknownRoot { root: String },
    #[error("root {root} is the active issuing root: activate another root before retiring it")]
    RetireActiveRoot { root: String },
}
