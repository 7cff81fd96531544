//! Certificate verification for the data path and the authority service, and the rustls
//! configuration builders.
//!
//! A peer certificate is accepted only if all of these hold:
//! 1. its chain verifies against the *current* trust bundle of a shared [`TrustStore`] (any of
//!    its roots; the bundle can be replaced at run time, e.g. during root rotation);
//! 2. neither the leaf nor a presented intermediate has a revoked serial (the revocation set
//!    lives in the same `TrustStore` and can be updated at run time);
//! 3. the leaf has exactly one URI SAN, which parses as a mesh SPIFFE ID in the store's trust
//!    domain, of the kind the verifier wants (workload, node, authority);
//! 4. on the client side, the server's identity equals the expected one.
//!
//! **How the expected server identity is passed**: one [`rustls::ClientConfig`] per
//! destination identity ([`client_config`] takes the expected [`SpiffeId`]); the verifier
//! ignores the TLS `ServerName`. The `ServerName` to connect with is [`server_name_for`] the
//! destination identity: it travels as SNI, and the server's [`SniCertResolver`] uses it to pick
//! the certificate of that destination workload (one node agent serves many workloads on one
//! port). The SNI is an opaque hash label, so workload names do not appear in it verbatim.
//!
//! Session resumption is disabled on both sides: every connection performs a full handshake,
//! so every connection's peer certificate is verified against the current bundle and
//! revocation list, and [`peer_identity`] always reflects a certificate that was verified.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tracing::debug;

use super::cert::{certs_from_pem, hex, CertInfo, Serial, WorkloadCert};
use super::spiffe::{PeerId, SpiffeId, TrustDomain};
use super::{provider, TlsError};

/// ALPN of the HBONE data path (HTTP/2).
pub const ALPN_H2: &[u8] = b"h2";

/// The trust bundle (roots) and the revocation list, shared by all verifiers of a process and
/// updatable at run time. New handshakes see updates at once; established connections are not
/// re-verified here (see [`TrustStore::still_trusted`]).
pub struct TrustStore {
    trust_domain: TrustDomain,
    roots: RwLock<Arc<Roots>>,
    revoked: RwLock<HashSet<Serial>>,
}

struct Roots {
    ders: Vec<CertificateDer<'static>>,
    store: Arc<RootCertStore>,
    /// webpki client-certificate chain verification for these roots.
    client: Arc<dyn ClientCertVerifier>,
}

impl fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustStore")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.read_roots().ders.len())
            .field("revoked", &self.read_revoked().len())
            .finish()
    }
}

/// Which side's certificate is being verified (the EKU webpki requires differs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Presenter {
    Client,
    Server,
}

impl TrustStore {
    /// A store for `trust_domain` with these root certificates (at least one).
    pub fn new(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            trust_domain,
            roots: RwLock::new(Arc::new(build_roots(roots)?)),
            revoked: RwLock::new(HashSet::new()),
        }))
    }

    /// A store from a bundle file's contents (one or more PEM root certificates).
    pub fn from_bundle_pem(
        trust_domain: TrustDomain,
        bundle_pem: &str,
    ) -> Result<Arc<Self>, TlsError> {
        Self::new(trust_domain, certs_from_pem(bundle_pem, "trust bundle")?)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Replaces the whole bundle (several roots are fine: rotation keeps old and new).
    pub fn set_roots(&self, roots: Vec<CertificateDer<'static>>) -> Result<(), TlsError> {
        let next = Arc::new(build_roots(roots)?);
        *self.roots.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    pub fn set_bundle_pem(&self, bundle_pem: &str) -> Result<(), TlsError> {
        self.set_roots(certs_from_pem(bundle_pem, "trust bundle")?)
    }

    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.read_roots().ders.clone()
    }

    pub fn revoke(&self, serial: Serial) {
        self.revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(serial);
    }

    /// Replaces the revocation set (e.g. with the authority's published list).
    pub fn set_revoked(&self, serials: impl IntoIterator<Item = Serial>) {
        let next: HashSet<Serial> = serials.into_iter().collect();
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = next;
    }

    pub fn is_revoked(&self, serial: &Serial) -> bool {
        self.read_revoked().contains(serial)
    }

    pub fn revoked_count(&self) -> usize {
        self.read_revoked().len()
    }

    /// For live connections after a revocation or bundle change: false if the peer's
    /// certificate (or an intermediate it sent) is now revoked. Chains are not re-built here.
    pub fn still_trusted(&self, conn: &CommonState) -> bool {
        let Some(certs) = conn.peer_certificates() else {
            return false;
        };
        let revoked = self.read_revoked();
        certs.iter().all(|c| match CertInfo::parse(c) {
            Ok(info) => !revoked.contains(&info.serial),
            Err(_) => false,
        })
    }

    /// Checks a certificate of our own (e.g. just issued) as a peer would: chain to the
    /// current bundle, not revoked, a workload identity of this trust domain.
    pub fn verify_workload_cert(&self, cert: &WorkloadCert) -> Result<(), TlsError> {
        let chain = certs_from_pem(cert.chain_pem(), "certificate chain")?;
        let id = self
            .verify(Presenter::Server, &chain[0], &chain[1..], UnixTime::now())
            .map_err(|source| TlsError::Rustls {
                context: "verifying a workload certificate against the trust bundle",
                source,
            })?;
        match id {
            PeerId::Workload(_) => Ok(()),
            other => Err(TlsError::WrongPeerKind {
                expected: "workload",
                got: other.to_string(),
            }),
        }
    }

    fn read_roots(&self) -> Arc<Roots> {
        self.roots.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn read_revoked(&self) -> std::sync::RwLockReadGuard<'_, HashSet<Serial>> {
        self.revoked.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Steps 1–3 of the module documentation; returns the peer's identity.
    fn verify(
        &self,
        presenter: Presenter,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<PeerId, rustls::Error> {
        let roots = self.read_roots();
        match presenter {
            Presenter::Client => {
                roots
                    .client
                    .verify_client_cert(end_entity, intermediates, now)?;
            }
            Presenter::Server => {
                let parsed = ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &parsed,
                    &roots.store,
                    intermediates,
                    now,
                    provider().signature_verification_algorithms.all,
                )?;
            }
        }
        let info = CertInfo::parse(end_entity).map_err(reject)?;
        {
            let revoked = self.read_revoked();
            if revoked.contains(&info.serial) {
                debug!(serial = %info.serial, "peer certificate revoked");
                return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
            }
            for i in intermediates {
                let ii = CertInfo::parse(i).map_err(reject)?;
                if revoked.contains(&ii.serial) {
                    debug!(serial = %ii.serial, "peer's intermediate certificate revoked");
                    return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
                }
            }
        }
        let id = info.peer_id().map_err(reject)?;
        if id.trust_domain() != &self.trust_domain {
            return Err(reject(TlsError::ForeignTrustDomain {
                identity: id.to_string(),
                expected: self.trust_domain.clone(),
            }));
        }
        Ok(id)
    }
}

fn build_roots(ders: Vec<CertificateDer<'static>>) -> Result<Roots, TlsError> {
    if ders.is_empty() {
        return Err(TlsError::EmptyBundle);
    }
    let mut store = RootCertStore::empty();
    for der in &ders {
        store.add(der.clone()).map_err(|source| TlsError::Rustls {
            context: "adding a root to the trust store",
            source,
        })?;
    }
    let store = Arc::new(store);
    let client = WebPkiClientVerifier::builder_with_provider(store.clone(), provider())
        .build()
        .map_err(|e| TlsError::InvalidCertificate {
            reason: format!("building the client verifier: {e}"),
        })?;
    Ok(Roots {
        ders,
        store,
        client,
    })
}

/// An identity-level refusal, as rustls reports it (the message names the problem).
fn reject(e: TlsError) -> rustls::Error {
    debug!(error = %e, "peer certificate refused");
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refusal(
        e.to_string(),
    )))))
}

/// Carries the refusal's message; rustls prints the `Debug` form, so that is the message too.
struct Refusal(String);

impl fmt::Debug for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

/// Which client identities a server accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AcceptClients {
    Workloads,
    Nodes,
}

/// Server side: verifies the client's certificate (mandatory).
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    trust: Arc<TrustStore>,
    accept: AcceptClients,
}

impl SpiffeClientVerifier {
    /// Accepts workload identities (`/ns/<ns>/sa/<sa>`): the data path.
    pub fn workloads(trust: Arc<TrustStore>) -> Arc<Self> {
        Arc::new(Self {
            trust,
            accept: AcceptClients::Workloads,
        })
    }

    /// Accepts node identities (`/node/<node>`): the authority service.
    pub fn nodes(trust: Arc<TrustStore>) -> Arc<Self> {
        Arc::new(Self {
            trust,
            accept: AcceptClients::Nodes,
        })
    }
}

/// The handshake-signature methods both verifier traits require, identical for both.
macro_rules! handshake_signature_methods {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            handshake_signature(message, cert, dss, false)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            handshake_signature(message, cert, dss, true)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            signature_schemes()
        }
    };
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Optional in TLS 1.3; every mesh client has exactly one certificate anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = self
            .trust
            .verify(Presenter::Client, end_entity, intermediates, now)?;
        match (self.accept, &id) {
            (AcceptClients::Workloads, PeerId::Workload(_))
            | (AcceptClients::Nodes, PeerId::Node(_)) => Ok(ClientCertVerified::assertion()),
            (AcceptClients::Workloads, _) => Err(reject(TlsError::WrongPeerKind {
                expected: "workload",
                got: id.to_string(),
            })),
            (AcceptClients::Nodes, _) => Err(reject(TlsError::WrongPeerKind {
                expected: "node",
                got: id.to_string(),
            })),
        }
    }

    handshake_signature_methods!();
}

/// Client side: verifies the server's certificate and that it is exactly the expected identity.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    trust: Arc<TrustStore>,
    expected: PeerId,
}

impl SpiffeServerVerifier {
    /// The server must be the workload `expected`.
    pub fn new(trust: Arc<TrustStore>, expected: SpiffeId) -> Arc<Self> {
        Self::for_peer(trust, PeerId::Workload(expected))
    }

    /// The server must be `expected` (e.g. [`PeerId::Authority`]).
    pub fn for_peer(trust: Arc<TrustStore>, expected: PeerId) -> Arc<Self> {
        Arc::new(Self { trust, expected })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self
            .trust
            .verify(Presenter::Server, end_entity, intermediates, now)?;
        if id != self.expected {
            return Err(reject(TlsError::WrongPeer {
                expected: self.expected.to_string(),
                got: id.to_string(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signature_methods!();
}

/// The handshake signature check both verifiers delegate to (ring's algorithms). Only TLS 1.3
/// is ever negotiated; the 1.2 path exists because the traits require it.
fn handshake_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    tls13: bool,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    let algorithms = &provider().signature_verification_algorithms;
    if tls13 {
        verify_tls13_signature(message, cert, dss, algorithms)
    } else {
        verify_tls12_signature(message, cert, dss, algorithms)
    }
}

fn signature_schemes() -> Vec<SignatureScheme> {
    provider()
        .signature_verification_algorithms
        .supported_schemes()
}

/// The verified identity of the peer of an established connection (any mesh kind).
pub fn peer_id(conn: &CommonState) -> Option<PeerId> {
    let leaf = conn.peer_certificates()?.first()?;
    CertInfo::parse(leaf).ok()?.peer_id().ok()
}

/// The verified workload identity of the peer of an established connection.
pub fn peer_identity(conn: &CommonState) -> Option<SpiffeId> {
    match peer_id(conn)? {
        PeerId::Workload(id) => Some(id),
        _ => None,
    }
}

/// The serial of the peer's certificate (to match against later revocations).
pub fn peer_serial(conn: &CommonState) -> Option<Serial> {
    let leaf = conn.peer_certificates()?.first()?;
    Some(CertInfo::parse(leaf).ok()?.serial)
}

/// The TLS server name (SNI) under which a node agent serves the workload `id`: a hash label,
/// `<32 hex digits>.id.mesh.internal`. Connect with this name; see the module documentation.
pub fn server_name_for(id: &SpiffeId) -> ServerName<'static> {
    ServerName::try_from(sni_for(id)).expect("a hex label under a fixed suffix is a valid DNS name")
}

fn sni_for(id: &SpiffeId) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, id.to_string().as_bytes());
    format!("{}.id.mesh.internal", hex(&digest.as_ref()[..16]))
}

/// Chooses the server certificate by SNI ([`server_name_for`] the destination identity); a
/// connection without SNI gets the default certificate, if one is set. An unknown SNI aborts
/// the handshake. Certificates can be replaced at any time (rotation): new handshakes use the
/// new one.
#[derive(Debug, Default)]
pub struct SniCertResolver {
    by_name: RwLock<HashMap<String, (SpiffeId, Arc<CertifiedKey>)>>,
    default: RwLock<Option<Arc<CertifiedKey>>>,
}

impl SniCertResolver {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Adds or replaces the certificate served for `cert.identity()`.
    pub fn insert(&self, cert: &WorkloadCert) {
        self.by_name
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                sni_for(cert.identity()),
                (cert.identity().clone(), cert.certified_key()),
            );
    }

    pub fn remove(&self, id: &SpiffeId) {
        self.by_name
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&sni_for(id));
    }

    /// The certificate for connections without SNI (`None`: refuse them).
    pub fn set_default(&self, cert: Option<&WorkloadCert>) {
        *self.default.write().unwrap_or_else(|p| p.into_inner()) =
            cert.map(WorkloadCert::certified_key);
    }

    pub fn identities(&self) -> Vec<SpiffeId> {
        self.by_name
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(id, _)| id.clone())
            .collect()
    }
}

impl ResolvesServerCert for SniCertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match hello.server_name() {
            Some(name) => {
                let found = self
                    .by_name
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&name.to_ascii_lowercase())
                    .map(|(_, ck)| ck.clone());
                if found.is_none() {
                    debug!(sni = name, "no certificate for the requested server name");
                }
                found
            }
            None => self
                .default
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// Always presents the same client certificate.
#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Data-path server (inbound HBONE): TLS 1.3 only, ring, ALPN `h2`, client certificate
/// required and verified as a workload of the trust domain, server certificate chosen by
/// `resolver` (usually an [`SniCertResolver`]), no session resumption.
pub fn server_config(
    trust: Arc<TrustStore>,
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<ServerConfig>, TlsError> {
    Ok(Arc::new(tls13_server(
        SpiffeClientVerifier::workloads(trust),
        resolver,
        &[ALPN_H2],
    )?))
}

/// Data-path client (outbound HBONE) presenting `source` and accepting only a server that is
/// `expected`: TLS 1.3 only, ring, ALPN `h2`, no session resumption. Build one per
/// (source, destination identity) and connect with [`server_name_for`]`(expected)`.
pub fn client_config(
    trust: Arc<TrustStore>,
    source: &WorkloadCert,
    expected: &SpiffeId,
) -> Result<Arc<ClientConfig>, TlsError> {
    Ok(Arc::new(tls13_client(
        SpiffeServerVerifier::new(trust, expected.clone()),
        source.certified_key(),
        &[ALPN_H2],
    )?))
}

pub(crate) fn tls13_server(
    verifier: Arc<dyn ClientCertVerifier>,
    resolver: Arc<dyn ResolvesServerCert>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            context: "building the server config",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

pub(crate) fn tls13_client(
    verifier: Arc<dyn ServerCertVerifier>,
    client_cert: Arc<CertifiedKey>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            context: "building the client config",
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(FixedClientCert(client_cert)));
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.resumption = Resumption::disabled();
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::ca::tests::{td, wid, TempDir};
    use crate::authority::ca::DEFAULT_WORKLOAD_LIFETIME;
    use crate::authority::Authority;
    use std::time::{Duration, SystemTime};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    type Side = Result<Option<SpiffeId>, String>;

    /// A real TLS handshake over an in-memory duplex pipe, then one byte each way.
    /// Returns what each side saw: the peer's verified identity, or the error.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> (Side, Side) {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let server_side = async move {
            let mut tls = TlsAcceptor::from(server)
                .accept(s)
                .await
                .map_err(|e| e.to_string())?;
            let (_, conn) = tls.get_ref();
            assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
            assert_eq!(
                conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            let id = peer_identity(conn);
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            tls.write_all(&b).await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            Ok(id)
        };
        let client_side = async move {
            let mut tls = TlsConnector::from(client)
                .connect(name, c)
                .await
                .map_err(|e| e.to_string())?;
            let id = peer_identity(tls.get_ref().1);
            tls.write_all(b"x").await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            Ok(id)
        };
        tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(server_side, client_side)
        })
        .await
        .expect("handshake test timed out")
    }

    struct Mesh {
        _dir: TempDir,
        ca: Authority,
        trust: Arc<TrustStore>,
    }

    fn mesh(tag: &str) -> Mesh {
        let dir = TempDir::new(tag);
        let ca = Authority::init(&dir.0, td()).unwrap();
        let trust = TrustStore::from_bundle_pem(td(), &ca.bundle_pem()).unwrap();
        Mesh {
            _dir: dir,
            ca,
            trust,
        }
    }

    fn cert(ca: &Authority, sa: &str) -> WorkloadCert {
        ca.issue_workload_cert(&wid("default", sa), DEFAULT_WORKLOAD_LIFETIME)
            .unwrap()
    }

    fn expired(ca: &Authority, sa: &str) -> WorkloadCert {
        let now = SystemTime::now();
        let (chain, key) = ca
            .issue_with_validity(
                &PeerId::Workload(wid("default", sa)),
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            )
            .unwrap();
        WorkloadCert::from_pem(&chain, &key).unwrap()
    }

    fn serve_one(trust: &Arc<TrustStore>, c: &WorkloadCert) -> Arc<ServerConfig> {
        let r = SniCertResolver::new();
        r.insert(c);
        server_config(trust.clone(), r).unwrap()
    }

    async fn connect(
        server: Arc<ServerConfig>,
        trust: &Arc<TrustStore>,
        client: &WorkloadCert,
        expected: &SpiffeId,
    ) -> (Side, Side) {
        let cfg = client_config(trust.clone(), client, expected).unwrap();
        handshake(server, cfg, server_name_for(expected)).await
    }

    #[tokio::test]
    async fn mutual_tls_carries_verified_identities() {
        let m = mesh("mtls-ok");
        let a = cert(&m.ca, "sa-a");
        let b = cert(&m.ca, "sa-b");
        let (s, c) = connect(serve_one(&m.trust, &b), &m.trust, &a, b.identity()).await;
        assert_eq!(
            s.unwrap(),
            Some(a.identity().clone()),
            "server sees the client"
        );
        assert_eq!(
            c.unwrap(),
            Some(b.identity().clone()),
            "client sees the server"
        );
    }

    #[tokio::test]
    async fn sni_selects_the_destination_certificate() {
        let m = mesh("sni");
        let a = cert(&m.ca, "sa-a");
        let b = cert(&m.ca, "sa-b");
        let c = cert(&m.ca, "sa-c");
        let r = SniCertResolver::new();
        r.insert(&b);
        r.insert(&c);
        let server = server_config(m.trust.clone(), r.clone()).unwrap();
        let (_, cl) = connect(server.clone(), &m.trust, &a, c.identity()).await;
        assert_eq!(cl.unwrap(), Some(c.identity().clone()));
        let (_, cl) = connect(server.clone(), &m.trust, &a, b.identity()).await;
        assert_eq!(cl.unwrap(), Some(b.identity().clone()));
        // A destination this server does not host: no certificate, no handshake.
        let (s, cl) = connect(server.clone(), &m.trust, &a, &wid("default", "sa-z")).await;
        assert!(s.is_err() && cl.is_err());
        // Rotation: the resolver serves the replacement.
        let c2 = cert(&m.ca, "sa-c");
        r.insert(&c2);
        m.trust.revoke(c.serial().clone());
        let (_, cl) = connect(server, &m.trust, &a, c.identity()).await;
        assert_eq!(cl.unwrap(), Some(c.identity().clone()));
    }

    #[tokio::test]
    async fn expired_certificates_are_refused() {
        let m = mesh("expired");
        let a = cert(&m.ca, "sa-a");
        let b = cert(&m.ca, "sa-b");
        let a_old = expired(&m.ca, "sa-a");
        let b_old = expired(&m.ca, "sa-b");
        let (s, _) = connect(serve_one(&m.trust, &b), &m.trust, &a_old, b.identity()).await;
        let e = s.unwrap_err();
        assert!(e.to_lowercase().contains("expired"), "server: {e}");
        let (_, c) = connect(serve_one(&m.trust, &b_old), &m.trust, &a, b.identity()).await;
        let e = c.unwrap_err();
        assert!(e.to_lowercase().contains("expired"), "client: {e}");
    }

    #[tokio::test]
    async fn revoked_certificates_are_refused() {
        let m = mesh("revoked");
        let a = cert(&m.ca, "sa-a");
        let b = cert(&m.ca, "sa-b");
        let server = serve_one(&m.trust, &b);
        let (s, _) = connect(server.clone(), &m.trust, &a, b.identity()).await;
        assert!(s.is_ok());
        // The client's certificate is revoked: the server refuses it.
        m.trust.revoke(a.serial().clone());
        let (s, _) = connect(server.clone(), &m.trust, &a, b.identity()).await;
        let e = s.unwrap_err();
        assert!(e.to_lowercase().contains("revoked"), "server: {e}");
        // The server's certificate is revoked: the client refuses it.
        let a2 = cert(&m.ca, "sa-a");
        m.trust.set_revoked([b.serial().clone()]);
        let (_, c) = connect(server, &m.trust, &a2, b.identity()).await;
        let e = c.unwrap_err();
        assert!(e.to_lowercase().contains("revoked"), "client: {e}");
    }

    #[tokio::test]
    async fn other_trust_domains_are_refused() {
        let m = mesh("td-here");
        let a = cert(&m.ca, "sa-a");
        let b = cert(&m.ca, "sa-b");
        let other_dir = TempDir::new("td-other");
        let other_td = TrustDomain::new("other.domain").unwrap();
        let other = Authority::init(&other_dir.0, other_td.clone()).unwrap();
        let foreign_id = SpiffeId::new(other_td, "default", "sa-a").unwrap();
        let foreign = other
            .issue_workload_cert(&foreign_id, DEFAULT_WORKLOAD_LIFETIME)
            .unwrap();

        // Its root is not in our bundle: unknown issuer.
        let (s, _) = connect(serve_one(&m.trust, &b), &m.trust, &foreign, b.identity()).await;
        let e = s.unwrap_err();
        assert!(e.contains("UnknownIssuer"), "server: {e}");

        // Even with its root in our bundle, the trust domain does not match.
        let mut roots = m.trust.roots();
        roots.extend(other.trust_store().roots());
        let both = TrustStore::new(td(), roots).unwrap();
        let (s, _) = connect(serve_one(&both, &b), &both, &foreign, b.identity()).await;
        let e = s.unwrap_err();
        assert!(
            e.contains("not in trust domain cluster.local"),
            "server: {e}"
        );
        // Same on the client side, for a foreign server.
        let (_, c) = connect(serve_one(&both, &foreign), &both, &a, &foreign_id).await;
        let e = c.unwrap_err();
        assert!(
            e.contains("not in trust domain cluster.local"),
            "client: {e}"
        );
    }

    #[tokio::test]
    async fn wrong_identities_are_refused() {
        let m = mesh("wrong-id");
        let a = cert(&m.ca, "sa-a");
        let c = cert(&m.ca, "sa-c");
        // The client expects sa-b; the server (default certificate, no SNI match needed)
        // presents sa-c.
        let r = SniCertResolver::new();
        r.set_default(Some(&c));
        let server = server_config(m.trust.clone(), r).unwrap();
        let want = wid("default", "sa-b");
        let cfg = client_config(m.trust.clone(), &a, &want).unwrap();
        // Connecting by address sends no SNI: the resolver's default certificate is used.
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let (_, cl) = handshake(server.clone(), cfg, name.clone()).await;
        let e = cl.unwrap_err();
        assert!(
            e.contains("is not the expected spiffe://cluster.local/ns/default/sa/sa-b"),
            "client: {e}"
        );

        // A node certificate is not a workload identity, on either side.
        let (node_chain, node_key) = m.ca.issue_node_cert("n1").unwrap();
        let node_ck =
            crate::tls::cert::certified_key(certs_from_pem(&node_chain, "t").unwrap(), &node_key)
                .unwrap();
        let node_client = Arc::new(
            tls13_client(
                SpiffeServerVerifier::new(m.trust.clone(), c.identity().clone()),
                node_ck,
                &[ALPN_H2],
            )
            .unwrap(),
        );
        let (s, _) = handshake(server, node_client, name).await;
        let e = s.unwrap_err();
        assert!(e.contains("is not a workload identity"), "server: {e}");
    }

    #[tokio::test]
    async fn root_rotation_accepts_old_and_new_then_refuses_retired() {
        let m = mesh("rotation");
        let server_old = cert(&m.ca, "sa-b");
        let client_old = cert(&m.ca, "sa-a");
        let old_root = m.ca.active_root();

        // Phase 1: the new root joins the bundle; nodes install it.
        let new_root = m.ca.add_root().unwrap();
        m.trust.set_bundle_pem(&m.ca.bundle_pem()).unwrap();
        assert_eq!(m.trust.roots().len(), 2);
        // Phase 2: issuance switches to the new root.
        m.ca.activate_root(&new_root).unwrap();
        let server_new = cert(&m.ca, "sa-b");
        let client_new = cert(&m.ca, "sa-a");
        let issuing = |c: &WorkloadCert| certs_from_pem(c.chain_pem(), "t").unwrap()[1].clone();
        assert_ne!(issuing(&server_old), issuing(&server_new));
        for (srv, cli) in [
            (&server_old, &client_old),
            (&server_old, &client_new),
            (&server_new, &client_old),
            (&server_new, &client_new),
        ] {
            let (s, c) = connect(serve_one(&m.trust, srv), &m.trust, cli, srv.identity()).await;
            assert!(s.is_ok() && c.is_ok(), "{s:?} {c:?}");
        }

        // Phase 3: the old root is retired; certificates under it are refused.
        m.ca.retire_root(&old_root).unwrap();
        m.trust.set_bundle_pem(&m.ca.bundle_pem()).unwrap();
        assert_eq!(m.trust.roots().len(), 1);
        assert_eq!(m.ca.trust_store().roots().len(), 1);
        let (s, _) = connect(
            serve_one(&m.trust, &server_new),
            &m.trust,
            &client_old,
            server_new.identity(),
        )
        .await;
        let e = s.unwrap_err();
        assert!(e.contains("UnknownIssuer"), "server: {e}");
        let (_, c) = connect(
            serve_one(&m.trust, &server_old),
            &m.trust,
            &client_new,
            server_old.identity(),
        )
        .await;
        let e = c.unwrap_err();
        assert!(e.contains("UnknownIssuer"), "client: {e}");
        let (s, c) = connect(
            serve_one(&m.trust, &server_new),
            &m.trust,
            &client_new,
            server_new.identity(),
        )
        .await;
        assert!(s.is_ok() && c.is_ok());
    }

    #[test]
    fn sni_names_are_stable_valid_and_distinct() {
        let a = server_name_for(&wid("default", "sa-a"));
        assert_eq!(a, server_name_for(&wid("default", "sa-a")));
        assert_ne!(a, server_name_for(&wid("default", "sa-b")));
        let ServerName::DnsName(d) = &a else {
            panic!("not a DNS name")
        };
        assert!(d.as_ref().ends_with(".id.mesh.internal"));
        assert!(TrustStore::new(td(), vec![]).is_err());
    }
}
