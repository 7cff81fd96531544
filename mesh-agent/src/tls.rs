//! TLS for the mesh: SPIFFE IDs, certificates and keys, and the rustls configuration both the
//! data path and the authority connection use.
//!
//! - [`spiffe`]: `spiffe://<td>/ns/<ns>/sa/<sa>` workload IDs, `spiffe://<td>/node/<node>` node
//!   IDs and `spiffe://<td>/authority`, strictly validated.
//! - [`cert`]: [`WorkloadCert`], certificate serials, PEM parsing, key and CSR parameters.
//! - [`verify`]: rustls verifiers (chain to the current bundle, revocation, SPIFFE ID checks),
//!   an SNI certificate resolver and the `ServerConfig`/`ClientConfig` builders.
//!
//! All TLS is 1.3 only, with rustls' ring provider. No crypto or ASN.1 is written here: rcgen
//! builds certificates, rustls/webpki verify chains, x509-parser reads fields.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

pub mod cert;
pub mod spiffe;
pub mod verify;

pub use cert::{Serial, WorkloadCert};
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

/// What can go wrong reading certificates and keys, building TLS configurations and checking
/// a peer.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    SpiffeId(#[from] SpiffeIdError),
    #[error("{what}: bad PEM: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("invalid certificate: {reason}")]
    InvalidCertificate { reason: String },
    #[error("invalid serial number {input:?}: expected hex digits")]
    InvalidSerial { input: String },
    #[error("{context}: {source}")]
    Rcgen {
        context: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("{context}: {source}")]
    Rustls {
        context: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("the system random number generator failed")]
    Random,
    #[error("identity {identity} is not in trust domain {expected}")]
    ForeignTrustDomain {
        identity: String,
        expected: TrustDomain,
    },
    #[error("the trust bundle must hold at least one root certificate")]
    EmptyBundle,
    #[error("peer identity {got} is not the expected {expected}")]
    WrongPeer { expected: String, got: String },
    #[error("peer identity {got} is not a {expected} identity")]
    WrongPeerKind { expected: &'static str, got: String },
}
