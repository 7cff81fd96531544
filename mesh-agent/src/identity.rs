//! Workload identity: SPIFFE IDs, the mesh authority (CA), and mutual-TLS verification.
//!
//! - [`spiffe`]: `spiffe://<td>/ns/<ns>/sa/<sa>` workload IDs, `spiffe://<td>/node/<node>` node
//!   IDs and `spiffe://<td>/authority`, strictly validated.
//! - [`authority`]: the CA. A long-lived root (ECDSA P-256) signs an issuing certificate, which
//!   signs short-lived workload certificates (X.509-SVIDs) from CSRs, and node certificates for
//!   bootstrapping. Revocation by serial; trust-bundle rotation (several roots at once).
//! - [`service`]: the authority's network service (mTLS, newline-delimited JSON) and the
//!   agent's [`AuthorityClient`].
//! - [`verify`]: rustls verifiers (chain to the current bundle, revocation, SPIFFE ID checks),
//!   an SNI certificate resolver and the `ServerConfig`/`ClientConfig` builders for the data path.
//! - [`cert`]: [`WorkloadCert`] and certificate serials.
//! - [`cache`]: the agent's certificate cache and its rotate-at-half-life rule.
//! - [`manager`]: the agent's [`IdentityManager`]: obtains, rotates and serves the node's
//!   workload certificates and follows the authority's bundle and revocation list.
//!
//! All TLS is 1.3 only, with rustls' ring provider. No crypto or ASN.1 is written here: rcgen
//! builds and signs certificates, rustls/webpki verify chains, x509-parser reads fields.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;

pub mod authority;
pub mod cache;
pub mod cert;
pub mod manager;
pub mod persist;
pub mod service;
pub mod spiffe;
pub mod verify;

pub use authority::ReloadOutcome;
pub use authority::{authorize_request, Authority, NodeCredentials, RootId, RootInfo};
pub use cache::CertCache;
pub use cert::{Serial, WorkloadCert};
pub use manager::{IdentityManager, ManagerConfig};
pub use service::{serve, serve_with, AuthorityClient, ServeConfig};
pub use spiffe::{NodeId, PeerId, SpiffeId, SpiffeIdError, TrustDomain};
pub use verify::{
    client_config, peer_id, peer_identity, server_config, server_name_for, SniCertResolver,
    SpiffeClientVerifier, SpiffeServerVerifier, TrustStore,
};

/// The rustls crypto provider used everywhere in the mesh: ring, with its default TLS 1.3
/// suites and key-exchange groups. (Protocol versions are restricted by the config builders.)
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Everything that can go wrong in identity handling.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    SpiffeId(#[from] SpiffeIdError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: bad PEM: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("invalid certificate: {reason}")]
    InvalidCertificate { reason: String },
    #[error("invalid serial number {input:?}: expected hex digits")]
    InvalidSerial { input: String },
    #[error("invalid certificate signing request: {reason}")]
    InvalidCsr { reason: String },
    #[error("{context}: {source}")]
    Rcgen {
        context: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("{context}: {source}")]
    Tls {
        context: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("the system random number generator failed")]
    Random,
    #[error(
        "node {node:?} may not obtain a certificate for {identity}: the registry places it on {hosts:?}"
    )]
    NotAuthorized {
        node: String,
        identity: SpiffeId,
        hosts: Vec<String>,
    },
    #[error("identity {identity} is not in trust domain {expected}")]
    ForeignTrustDomain {
        identity: String,
        expected: TrustDomain,
    },
    #[error("requested lifetime {requested:?} is shorter than the minimum {minimum:?}")]
    LifetimeTooShort {
        requested: Duration,
        minimum: Duration,
    },
    #[error("requested lifetime {requested:?} is longer than the maximum {maximum:?}")]
    LifetimeTooLong {
        requested: Duration,
        maximum: Duration,
    },
    #[error("an authority already exists in {dir}")]
    AlreadyInitialised { dir: PathBuf },
    #[error("authority state {path} is invalid: {detail}")]
    BadState { path: PathBuf, detail: String },
    #[error("no root {root} in the trust bundle")]
    UnknownRoot { root: String },
    #[error("root {root} is the active issuing root: activate another root before retiring it")]
    RetireActiveRoot { root: String },
    #[error("the trust bundle must hold at least one root certificate")]
    EmptyBundle,
    #[error("peer identity {got} is not the expected {expected}")]
    WrongPeer { expected: String, got: String },
    #[error("peer identity {got} is not a {expected} identity")]
    WrongPeerKind { expected: &'static str, got: String },
    #[error("certificate serial {serial} is revoked")]
    Revoked { serial: Serial },
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
