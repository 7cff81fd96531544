//! The mesh authority (CA).
//!
//! Layout of the authority directory (created by [`Authority::init`], mode 0700):
//!
//! ```text
//! authority.json              trust domain, active root, roots in the bundle (the commit point)
//! bundle.pem                  every root certificate in the bundle (what nodes trust)
//! revoked.txt                 revoked certificate serials, lower-case hex, one per line
//! roots/<root-id>/root.pem            root certificate (self-signed, ECDSA P-256, 10 years)
//! roots/<root-id>/root.key.pem        its key (0600)
//! roots/<root-id>/issuing.pem         issuing certificate signed by that root (5 years, pathlen 0)
//! roots/<root-id>/issuing.key.pem     its key (0600)
//! ```
//!
//! A `<root-id>` is the first 16 hex digits of the SHA-256 of the root certificate's DER.
//!
//! Leaf certificates (workloads, nodes, the authority's own TLS server) carry exactly one URI
//! SAN, set by the authority from the *requested and authorised* identity — never copied from a
//! CSR — a random 126-bit serial, `notBefore` back-dated by [`CLOCK_SKEW_BACKDATE`], the
//! `serverAuth` and `clientAuth` EKUs, and chain to the active root through its issuing
//! certificate. The chain handed out is leaf + issuing; the root travels in the bundle only.
//!
//! Root rotation without dropping traffic: [`Authority::add_root`] puts a new root (with its
//! issuing certificate) into the bundle but keeps issuing from the old one; once every node has
//! the new bundle, [`Authority::activate_root`] switches issuance to it; once every certificate
//! under the old root has expired or been replaced (node certificates included: re-issue them
//! first), [`Authority::retire_root`] removes the old root from the bundle and deletes its keys.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::AuthorityError;
use crate::files::{create_private_dir, read_string, write_atomic};
use crate::identity::NodeCredentials;
use crate::tls::cert::{
    certified_key, certs_from_pem, csr_pem, hex, identity_params, new_key, CertInfo, Serial,
    WorkloadCert,
};
use crate::tls::spiffe::{NodeId, PeerId, SpiffeId, TrustDomain};
use crate::tls::verify::TrustStore;
use crate::tls::TlsError;

/// Workload certificate lifetime when the request names none.
pub const DEFAULT_WORKLOAD_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Shortest workload certificate lifetime the authority signs.
pub const MIN_WORKLOAD_LIFETIME: Duration = Duration::from_secs(60);
/// Longest workload certificate lifetime the authority signs (they are meant to be short-lived).
pub const MAX_WORKLOAD_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// `notBefore` is set this far in the past, so that peers with slightly slow clocks accept it.
pub const CLOCK_SKEW_BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Lifetime of a node certificate (bootstrapped by the operator).
pub const NODE_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Lifetime of the authority's own TLS server certificate (kept in memory, renewed at half-life).
pub const AUTHORITY_CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const ISSUING_LIFETIME: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

const STATE_FILE: &str = "authority.json";
const BUNDLE_FILE: &str = "bundle.pem";
const REVOKED_FILE: &str = "revoked.txt";
const ROOTS_DIR: &str = "roots";
const ROOT_CERT: &str = "root.pem";
const ROOT_KEY: &str = "root.key.pem";
const ISSUING_CERT: &str = "issuing.pem";
const ISSUING_KEY: &str = "issuing.key.pem";

/// Names a root in the bundle: the first 16 hex digits of SHA-256 over its DER.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RootId(String);

impl RootId {
    fn of(der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        Self(hex(&digest.as_ref()[..8]))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RootId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for RootId {
    type Err = AuthorityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 16 && s.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')) {
            Ok(Self(s.to_owned()))
        } else {
            Err(AuthorityError::UnknownRoot {
                root: s.chars().take(40).collect(),
            })
        }
    }
}

impl TryFrom<String> for RootId {
    type Error = AuthorityError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<RootId> for String {
    fn from(id: RootId) -> String {
        id.0
    }
}

/// What [`Authority::reload`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// The bundle or the active root changed.
    pub roots_changed: bool,
    /// The revocation list changed.
    pub revocations_changed: bool,
}

/// One root of the bundle, as [`Authority::roots`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootInfo {
    pub id: RootId,
    pub not_after: SystemTime,
    /// New certificates are issued under this root.
    pub active: bool,
}

/// Whether `node` may obtain a certificate for `requested`: only if the registry places a
/// workload with that identity on `node`. `registry_lookup` returns the nodes hosting a workload
/// with the given identity. The caller logs a refusal.
pub fn authorize_request(
    node: &str,
    requested: &SpiffeId,
    registry_lookup: impl Fn(&SpiffeId) -> Vec<String>,
) -> Result<(), AuthorityError> {
    let hosts = registry_lookup(requested);
    if hosts.iter().any(|h| h == node) {
        Ok(())
    } else {
        Err(AuthorityError::NotAuthorized {
            node: node.to_owned(),
            identity: requested.clone(),
            hosts,
        })
    }
}

/// A root and the issuing certificate it signed.
struct CaPair {
    id: RootId,
    root_pem: String,
    root_der: CertificateDer<'static>,
    root_not_after: SystemTime,
    issuing_pem: String,
    issuing_not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
}

struct State {
    /// In the order they were added; all are in the bundle.
    roots: Vec<CaPair>,
    active: RootId,
    revoked: BTreeSet<Serial>,
}

impl State {
    fn active(&self) -> &CaPair {
        self.roots
            .iter()
            .find(|r| r.id == self.active)
            .expect("the active root is always in the bundle (checked on load and change)")
    }

    fn bundle_pem(&self) -> String {
        let mut out = String::new();
        for r in &self.roots {
            push_pem(&mut out, &r.root_pem);
        }
        out
    }

    fn root_ders(&self) -> Vec<CertificateDer<'static>> {
        self.roots.iter().map(|r| r.root_der.clone()).collect()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    trust_domain: TrustDomain,
    active_root: RootId,
    roots: Vec<RootId>,
}

/// The mesh CA. Cheap to share (`Arc<Authority>`): signing takes a read lock, rotation and
/// revocation a write lock, and every change is written to disk before it takes effect.
pub struct Authority {
    dir: PathBuf,
    trust_domain: TrustDomain,
    state: RwLock<State>,
    /// Kept in step with the bundle and the revocation list; the authority's service verifies
    /// node certificates against it.
    trust: Arc<TrustStore>,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Creates a new authority in `dir` (created if missing): a root and an issuing key pair.
    /// Refuses to overwrite an existing authority.
    pub fn init(dir: impl AsRef<Path>, trust_domain: TrustDomain) -> Result<Self, AuthorityError> {
        let dir = dir.as_ref().to_path_buf();
        if dir.join(STATE_FILE).exists() {
            return Err(AuthorityError::AlreadyInitialised { dir });
        }
        create_private_dir(&dir)?;
        let ca = new_ca_pair(&dir, &trust_domain)?;
        let state = State {
            active: ca.id.clone(),
            roots: vec![ca],
            revoked: BTreeSet::new(),
        };
        write_revoked(&dir, &state.revoked)?;
        write_atomic(&dir.join(BUNDLE_FILE), state.bundle_pem().as_bytes(), 0o644)?;
        write_state(&dir, &trust_domain, &state)?;
        info!(dir = %dir.display(), trust_domain = %trust_domain, root = %state.active, "authority initialised");
        Self::from_state(dir, trust_domain, state)
    }

    /// Loads an authority created by [`Authority::init`], checking that every file is there,
    /// that each root matches its id and each key its certificate.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, AuthorityError> {
        let dir = dir.as_ref().to_path_buf();
        let file = read_state_file(&dir)?;
        let roots = file
            .roots
            .iter()
            .map(|id| load_ca_pair(&dir, id))
            .collect::<Result<Vec<_>, _>>()?;
        let revoked = read_revoked(&dir)?;
        let state = State {
            roots,
            active: file.active_root,
            revoked,
        };
        info!(dir = %dir.display(), trust_domain = %file.trust_domain, roots = state.roots.len(),
              revoked = state.revoked.len(), "authority loaded");
        Self::from_state(dir, file.trust_domain, state)
    }

    /// Whether `dir` holds an authority (its state file exists).
    pub fn exists(dir: impl AsRef<Path>) -> bool {
        dir.as_ref().join(STATE_FILE).is_file()
    }

    /// Re-reads the state file, the roots it names and the revocation list, written by another
    /// process (`mesh-agent authority revoke|roots`), and applies what changed. All or nothing:
    /// if anything on disk is invalid the error is returned and the in-memory state (and the
    /// trust store) is left exactly as it was. The trust domain cannot change.
    pub fn reload(&self) -> Result<ReloadOutcome, AuthorityError> {
        let file = read_state_file(&self.dir)?;
        if file.trust_domain != self.trust_domain {
            return Err(AuthorityError::BadState {
                path: self.dir.join(STATE_FILE),
                detail: format!(
                    "trust domain changed from {} to {}",
                    self.trust_domain, file.trust_domain
                ),
            });
        }
        let revoked = read_revoked(&self.dir)?;
        let (roots_same, revoked_same) = {
            let state = self.read();
            let ids: Vec<&RootId> = state.roots.iter().map(|r| &r.id).collect();
            let wanted: Vec<&RootId> = file.roots.iter().collect();
            (
                ids == wanted && state.active == file.active_root,
                state.revoked == revoked,
            )
        };
        let mut outcome = ReloadOutcome::default();
        if roots_same && revoked_same {
            return Ok(outcome);
        }
        let roots = if roots_same {
            None
        } else {
            Some(
                file.roots
                    .iter()
                    .map(|id| load_ca_pair(&self.dir, id))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        };
        let mut state = self.write();
        if let Some(roots) = roots {
            // The trust store is replaced first: it is the only step that can still fail.
            self.trust
                .set_roots(roots.iter().map(|r| r.root_der.clone()).collect())?;
            state.roots = roots;
            state.active = file.active_root;
            outcome.roots_changed = true;
        }
        if !revoked_same {
            self.trust.set_revoked(revoked.iter().cloned());
            state.revoked = revoked;
            outcome.revocations_changed = true;
        }
        info!(roots = state.roots.len(), active_root = %state.active, revoked = state.revoked.len(),
              roots_changed = outcome.roots_changed, revocations_changed = outcome.revocations_changed,
              "authority state reloaded");
        Ok(outcome)
    }

    fn from_state(
        dir: PathBuf,
        trust_domain: TrustDomain,
        state: State,
    ) -> Result<Self, AuthorityError> {
        let trust = TrustStore::new(trust_domain.clone(), state.root_ders())?;
        trust.set_revoked(state.revoked.iter().cloned());
        Ok(Self {
            dir,
            trust_domain,
            state: RwLock::new(state),
            trust,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// A trust store that follows this authority's bundle and revocation list.
    pub fn trust_store(&self) -> Arc<TrustStore> {
        self.trust.clone()
    }

    /// Every root certificate of the bundle, PEM, concatenated.
    pub fn bundle_pem(&self) -> String {
        self.read().bundle_pem()
    }

    pub fn roots(&self) -> Vec<RootInfo> {
        let state = self.read();
        state
            .roots
            .iter()
            .map(|r| RootInfo {
                id: r.id.clone(),
                not_after: r.root_not_after,
                active: r.id == state.active,
            })
            .collect()
    }

    pub fn active_root(&self) -> RootId {
        self.read().active.clone()
    }

    /// Revoked serials, sorted.
    pub fn revocations(&self) -> Vec<Serial> {
        self.read().revoked.iter().cloned().collect()
    }

    pub fn is_revoked(&self, serial: &Serial) -> bool {
        self.read().revoked.contains(serial)
    }

    /// Revokes a certificate by serial (persisted first). Returns false if it already was.
    pub fn revoke(&self, serial: Serial) -> Result<bool, AuthorityError> {
        let mut state = self.write();
        if state.revoked.contains(&serial) {
            return Ok(false);
        }
        let mut next = state.revoked.clone();
        next.insert(serial.clone());
        write_revoked(&self.dir, &next)?;
        state.revoked = next;
        self.trust.revoke(serial.clone());
        info!(serial = %serial, "certificate revoked");
        Ok(true)
    }

    /// Adds a new root (and its issuing certificate) to the bundle. Issuance stays on the
    /// current root until [`Authority::activate_root`].
    pub fn add_root(&self) -> Result<RootId, AuthorityError> {
        let mut state = self.write();
        let ca = new_ca_pair(&self.dir, &self.trust_domain)?;
        let id = ca.id.clone();
        state.roots.push(ca);
        if let Err(e) = self.commit(&state) {
            state.roots.pop();
            return Err(e);
        }
        info!(root = %id, roots = state.roots.len(), "root added to the trust bundle");
        Ok(id)
    }

    /// Issues new certificates under `root` from now on.
    pub fn activate_root(&self, root: &RootId) -> Result<(), AuthorityError> {
        let mut state = self.write();
        if !state.roots.iter().any(|r| &r.id == root) {
            return Err(AuthorityError::UnknownRoot {
                root: root.to_string(),
            });
        }
        let previous = std::mem::replace(&mut state.active, root.clone());
        if let Err(e) = self.commit(&state) {
            state.active = previous;
            return Err(e);
        }
        info!(root = %root, previous = %previous, "issuing root activated");
        Ok(())
    }

    /// Removes `root` from the bundle and deletes its keys. Certificates chaining to it are
    /// refused by every verifier that has the new bundle. The active root cannot be retired.
    pub fn retire_root(&self, root: &RootId) -> Result<(), AuthorityError> {
        let mut state = self.write();
        if &state.active == root {
            return Err(AuthorityError::RetireActiveRoot {
                root: root.to_string(),
            });
        }
        let Some(pos) = state.roots.iter().position(|r| &r.id == root) else {
            return Err(AuthorityError::UnknownRoot {
                root: root.to_string(),
            });
        };
        let removed = state.roots.remove(pos);
        if let Err(e) = self.commit(&state) {
            state.roots.insert(pos, removed);
            return Err(e);
        }
        let root_dir = self.dir.join(ROOTS_DIR).join(root.as_str());
        if let Err(e) = fs::remove_dir_all(&root_dir) {
            warn!(dir = %root_dir.display(), error = %e, "could not delete a retired root's keys");
        }
        info!(root = %root, roots = state.roots.len(), "root retired from the trust bundle");
        Ok(())
    }

    /// Writes the state file (the commit point) and the bundle, then updates the trust store.
    fn commit(&self, state: &State) -> Result<(), AuthorityError> {
        write_state(&self.dir, &self.trust_domain, state)?;
        write_atomic(
            &self.dir.join(BUNDLE_FILE),
            state.bundle_pem().as_bytes(),
            0o644,
        )?;
        Ok(self.trust.set_roots(state.root_ders())?)
    }

    /// Signs a workload certificate for `requested` with the CSR's public key.
    ///
    /// Only the CSR's key is used (it must be ECDSA P-256, and the CSR's self-signature must
    /// verify); its subject, SANs and extensions are ignored. The caller authorises the request
    /// first ([`authorize_request`]). Returns the chain PEM: leaf, then issuing certificate.
    pub fn sign_workload_csr(
        &self,
        csr_pem: &str,
        requested: &SpiffeId,
        lifetime: Duration,
    ) -> Result<String, AuthorityError> {
        self.sign_workload_csr_rooted(csr_pem, requested, lifetime)
            .map(|(chain, _)| chain)
    }

    /// [`Authority::sign_workload_csr`], also naming the root the certificate chains to.
    pub fn sign_workload_csr_rooted(
        &self,
        csr_pem: &str,
        requested: &SpiffeId,
        lifetime: Duration,
    ) -> Result<(String, RootId), AuthorityError> {
        if requested.trust_domain() != &self.trust_domain {
            return Err(TlsError::ForeignTrustDomain {
                identity: requested.to_string(),
                expected: self.trust_domain.clone(),
            }
            .into());
        }
        check_lifetime(lifetime)?;
        let public_key = parse_csr(csr_pem)?;
        let now = now_secs();
        let (chain, serial, not_after, root) = self.sign_leaf(
            &public_key,
            &PeerId::Workload(requested.clone()),
            now - CLOCK_SKEW_BACKDATE,
            now + lifetime,
        )?;
        info!(identity = %requested, serial = %serial, root = %root,
              expires_in_secs = not_after.duration_since(now).unwrap_or_default().as_secs(),
              "workload certificate signed");
        Ok((chain, root))
    }

    /// A workload certificate whose key is generated here, in the authority's process. For
    /// tools and tests; agents use CSRs ([`Authority::sign_workload_csr`]) so that workload
    /// keys never leave the agent.
    pub fn issue_workload_cert(
        &self,
        identity: &SpiffeId,
        lifetime: Duration,
    ) -> Result<WorkloadCert, AuthorityError> {
        let key = new_key()?;
        let csr = csr_pem(CertificateParams::default(), &key)?;
        let chain = self.sign_workload_csr(&csr, identity, lifetime)?;
        Ok(WorkloadCert::from_pem(&chain, &key.serialize_pem())?)
    }

    /// A workload certificate with an explicit validity period (`not_after` may lie in the
    /// past: an expired certificate), its key generated here. For tests and tools that need
    /// odd certificates (expired, not yet valid); nothing in the agent or the authority service
    /// calls it, and lifetimes are not bounded here.
    pub fn issue_workload_cert_with_validity(
        &self,
        identity: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, AuthorityError> {
        if identity.trust_domain() != &self.trust_domain {
            return Err(TlsError::ForeignTrustDomain {
                identity: identity.to_string(),
                expected: self.trust_domain.clone(),
            }
            .into());
        }
        let key = new_key()?;
        let (chain, serial, _, _) = self.sign_leaf(
            &key,
            &PeerId::Workload(identity.clone()),
            not_before,
            not_after,
        )?;
        info!(identity = %identity, serial = %serial, "workload certificate issued with explicit validity");
        Ok(WorkloadCert::from_pem(&chain, &key.serialize_pem())?)
    }

    /// A node certificate (`spiffe://<td>/node/<node>`, one year) and its freshly generated
    /// key, both PEM: the operator writes them into the node's directory once.
    pub fn issue_node_cert(&self, node: &str) -> Result<(String, String), AuthorityError> {
        let id = NodeId::new(self.trust_domain.clone(), node)?;
        let key = new_key()?;
        let now = now_secs();
        let (chain, serial, _, _) = self.sign_leaf(
            &key,
            &PeerId::Node(id.clone()),
            now - CLOCK_SKEW_BACKDATE,
            now + NODE_CERT_LIFETIME,
        )?;
        info!(node = %id, serial = %serial, "node certificate issued");
        Ok((chain, key.serialize_pem()))
    }

    /// Signs a node's CSR: the node generated its key and keeps it (`NodeCredentials::request`);
    /// the certificate names `spiffe://<td>/node/<node>` whatever the CSR asks for. Returns the
    /// chain (leaf, then issuing).
    pub fn sign_node_csr(&self, node: &str, csr_pem: &str) -> Result<String, AuthorityError> {
        let id = NodeId::new(self.trust_domain.clone(), node)?;
        let public_key = parse_csr(csr_pem)?;
        let now = now_secs();
        let (chain, serial, _, _) = self.sign_leaf(
            &public_key,
            &PeerId::Node(id.clone()),
            now - CLOCK_SKEW_BACKDATE,
            now + NODE_CERT_LIFETIME,
        )?;
        info!(node = %id, serial = %serial, "node certificate signed from a CSR");
        Ok(chain)
    }

    /// [`Authority::issue_node_cert`] plus the current trust bundle.
    pub fn node_credentials(&self, node: &str) -> Result<NodeCredentials, AuthorityError> {
        let (chain_pem, key_pem) = self.issue_node_cert(node)?;
        Ok(NodeCredentials {
            node: NodeId::new(self.trust_domain.clone(), node)?,
            chain_pem,
            key_pem,
            bundle_pem: self.bundle_pem(),
        })
    }

    /// The authority's own TLS server certificate (`spiffe://<td>/authority`), kept in memory.
    /// Returns it with the instant from which it should be replaced (half-life).
    pub(crate) fn issue_server_cert(
        &self,
    ) -> Result<(Arc<CertifiedKey>, SystemTime), AuthorityError> {
        let key = new_key()?;
        let now = now_secs();
        let (chain, _, not_after, _) = self.sign_leaf(
            &key,
            &PeerId::authority(&self.trust_domain),
            now - CLOCK_SKEW_BACKDATE,
            now + AUTHORITY_CERT_LIFETIME,
        )?;
        let ck = certified_key(
            certs_from_pem(&chain, "authority chain")?,
            &key.serialize_pem(),
        )?;
        let rotate_at = now + not_after.duration_since(now).unwrap_or_default() / 2;
        Ok((ck, rotate_at))
    }

    /// Any validity period, any mesh identity: for tests of expired and odd certificates.
    #[cfg(test)]
    pub(crate) fn issue_with_validity(
        &self,
        id: &PeerId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<(String, String), AuthorityError> {
        let key = new_key()?;
        let (chain, _, _, _) = self.sign_leaf(&key, id, not_before, not_after)?;
        Ok((chain, key.serialize_pem()))
    }

    /// Signs a leaf for `id` under the active issuing certificate. `not_after` is capped at the
    /// issuing certificate's own expiry. Returns chain PEM, serial, the effective not_after and
    /// the root.
    fn sign_leaf(
        &self,
        public_key: &impl PublicKeyData,
        id: &PeerId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<(String, Serial, SystemTime, RootId), AuthorityError> {
        let state = self.read();
        let ca = state.active();
        let not_after = not_after.min(ca.issuing_not_after);
        let serial = Serial::random()?;
        let mut params = identity_params(&id.to_string())?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(SerialNumber::from(serial.as_bytes().to_vec()));
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.use_authority_key_identifier_extension = true;
        let cert =
            params
                .signed_by(public_key, &ca.issuer)
                .map_err(|source| AuthorityError::Rcgen {
                    context: "signing a certificate",
                    source,
                })?;
        let mut chain = String::new();
        push_pem(&mut chain, &cert.pem());
        push_pem(&mut chain, &ca.issuing_pem);
        Ok((chain, serial, not_after, ca.id.clone()))
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// A workload certificate lifetime outside [`MIN_WORKLOAD_LIFETIME`, `MAX_WORKLOAD_LIFETIME`]:
/// refused by the authority, and by an agent configured to request it.
#[derive(Debug, thiserror::Error)]
pub enum LifetimeError {
    #[error("requested lifetime {requested:?} is shorter than the minimum {minimum:?}")]
    TooShort {
        requested: Duration,
        minimum: Duration,
    },
    #[error("requested lifetime {requested:?} is longer than the maximum {maximum:?}")]
    TooLong {
        requested: Duration,
        maximum: Duration,
    },
}

/// Whether the authority signs workload certificates of this lifetime.
pub fn check_lifetime(lifetime: Duration) -> Result<(), LifetimeError> {
    if lifetime < MIN_WORKLOAD_LIFETIME {
        return Err(LifetimeError::TooShort {
            requested: lifetime,
            minimum: MIN_WORKLOAD_LIFETIME,
        });
    }
    if lifetime > MAX_WORKLOAD_LIFETIME {
        return Err(LifetimeError::TooLong {
            requested: lifetime,
            maximum: MAX_WORKLOAD_LIFETIME,
        });
    }
    Ok(())
}

/// Parses a CSR, verifies its self-signature, and returns its public key, which must be an
/// ECDSA P-256 key signing with SHA-256.
fn parse_csr(csr_pem: &str) -> Result<rcgen::PublicKey, AuthorityError> {
    let invalid = |reason: String| AuthorityError::InvalidCsr { reason };
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| invalid(format!("bad PEM: {e}")))?;
    let csr =
        CertificateSigningRequestParams::from_der(&der).map_err(|e| invalid(e.to_string()))?;
    if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(invalid(
            "the key must be ECDSA P-256 (signed with SHA-256)".into(),
        ));
    }
    // rcgen derives the key algorithm from the signature algorithm; check the curve itself.
    use x509_parser::prelude::FromDer;
    let (_, parsed) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| invalid(e.to_string()))?;
    let spki = &parsed.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        || curve != Some(x509_parser::oid_registry::OID_EC_P256)
    {
        return Err(invalid("the key must be ECDSA P-256".into()));
    }
    Ok(csr.public_key)
}

/// Now, truncated to whole seconds (certificates carry seconds).
fn now_secs() -> SystemTime {
    let now = SystemTime::now();
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs())
}

fn ca_params(
    trust_domain: &TrustDomain,
    common_name: String,
    constraint: BasicConstraints,
    lifetime: Duration,
) -> Result<CertificateParams, AuthorityError> {
    let now = now_secs();
    let serial = Serial::random()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "mesh");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(trust_domain.uri().try_into().map_err(
        |source| AuthorityError::Rcgen {
            context: "encoding the trust domain URI",
            source,
        },
    )?)];
    params.is_ca = IsCa::Ca(constraint);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(SerialNumber::from(serial.as_bytes().to_vec()));
    params.not_before = (now - CLOCK_SKEW_BACKDATE).into();
    params.not_after = (now + lifetime).into();
    Ok(params)
}

/// Generates a root and an issuing certificate and writes them (keys 0600) under
/// `roots/<root-id>/`.
fn new_ca_pair(dir: &Path, trust_domain: &TrustDomain) -> Result<CaPair, AuthorityError> {
    let rcgen_err = |context| move |source| AuthorityError::Rcgen { context, source };
    // A random tag keeps the subjects of successive roots apart (path building matches names).
    let tag = &Serial::random()?.to_string()[..8];
    let root_key = new_key()?;
    let root_params = ca_params(
        trust_domain,
        format!("mesh root {trust_domain} {tag}"),
        BasicConstraints::Unconstrained,
        ROOT_LIFETIME,
    )?;
    let root_cert = root_params
        .self_signed(&root_key)
        .map_err(rcgen_err("self-signing the root"))?;
    let root_issuer = Issuer::new(root_params, &root_key);

    let issuing_key = new_key()?;
    let mut issuing_params = ca_params(
        trust_domain,
        format!("mesh issuing {trust_domain} {tag}"),
        BasicConstraints::Constrained(0),
        ISSUING_LIFETIME,
    )?;
    issuing_params.use_authority_key_identifier_extension = true;
    let issuing_cert = issuing_params
        .signed_by(&issuing_key, &root_issuer)
        .map_err(rcgen_err("signing the issuing certificate"))?;

    let id = RootId::of(root_cert.der());
    let root_dir = dir.join(ROOTS_DIR).join(id.as_str());
    create_private_dir(&root_dir)?;
    write_atomic(
        &root_dir.join(ROOT_KEY),
        root_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_atomic(&root_dir.join(ROOT_CERT), root_cert.pem().as_bytes(), 0o644)?;
    write_atomic(
        &root_dir.join(ISSUING_KEY),
        issuing_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_atomic(
        &root_dir.join(ISSUING_CERT),
        issuing_cert.pem().as_bytes(),
        0o644,
    )?;
    drop(root_issuer);
    load_ca_pair(dir, &id)
}

fn load_ca_pair(dir: &Path, id: &RootId) -> Result<CaPair, AuthorityError> {
    let root_dir = dir.join(ROOTS_DIR).join(id.as_str());
    let bad = |path: &Path, detail: String| AuthorityError::BadState {
        path: path.to_path_buf(),
        detail,
    };
    let root_path = root_dir.join(ROOT_CERT);
    let root_pem = read_string(&root_path)?;
    let root_der = certs_from_pem(&root_pem, "root certificate")?.remove(0);
    if &RootId::of(&root_der) != id {
        return Err(bad(&root_path, format!("does not match root id {id}")));
    }
    let root_info = CertInfo::parse(&root_der)?;
    // The root key stays on disk (for future issuing certificates) but must be readable.
    let root_key_path = root_dir.join(ROOT_KEY);
    KeyPair::from_pem(&read_string(&root_key_path)?)
        .map_err(|e| bad(&root_key_path, e.to_string()))?;

    let issuing_path = root_dir.join(ISSUING_CERT);
    let issuing_pem = read_string(&issuing_path)?;
    let issuing_der = certs_from_pem(&issuing_pem, "issuing certificate")?.remove(0);
    let issuing_info = CertInfo::parse(&issuing_der)?;
    let issuing_key_path = root_dir.join(ISSUING_KEY);
    let issuing_key = KeyPair::from_pem(&read_string(&issuing_key_path)?)
        .map_err(|e| bad(&issuing_key_path, e.to_string()))?;
    if issuing_key.public_key_raw() != issuing_info.public_key.as_slice() {
        return Err(bad(
            &issuing_key_path,
            "key does not match issuing.pem".into(),
        ));
    }
    let issuer = Issuer::from_ca_cert_der(&issuing_der, issuing_key)
        .map_err(|e| bad(&issuing_path, e.to_string()))?;
    Ok(CaPair {
        id: id.clone(),
        root_pem,
        root_der,
        root_not_after: root_info.not_after,
        issuing_pem,
        issuing_not_after: issuing_info.not_after,
        issuer,
    })
}

/// Reads and checks `authority.json` in `dir`.
fn read_state_file(dir: &Path) -> Result<StateFile, AuthorityError> {
    let state_path = dir.join(STATE_FILE);
    let text = read_string(&state_path)?;
    let file: StateFile = serde_json::from_str(&text).map_err(|e| AuthorityError::BadState {
        path: state_path.clone(),
        detail: e.to_string(),
    })?;
    if !file.roots.contains(&file.active_root) {
        return Err(AuthorityError::BadState {
            path: state_path,
            detail: format!("active root {} is not among the roots", file.active_root),
        });
    }
    let unique: BTreeSet<&RootId> = file.roots.iter().collect();
    if unique.len() != file.roots.len() {
        return Err(AuthorityError::BadState {
            path: state_path,
            detail: "a root is listed twice".into(),
        });
    }
    Ok(file)
}

fn write_state(dir: &Path, td: &TrustDomain, state: &State) -> Result<(), AuthorityError> {
    let file = StateFile {
        trust_domain: td.clone(),
        active_root: state.active.clone(),
        roots: state.roots.iter().map(|r| r.id.clone()).collect(),
    };
    let mut text = serde_json::to_string_pretty(&file).map_err(|e| AuthorityError::BadState {
        path: dir.join(STATE_FILE),
        detail: e.to_string(),
    })?;
    text.push('\n');
    Ok(write_atomic(&dir.join(STATE_FILE), text.as_bytes(), 0o644)?)
}

fn write_revoked(dir: &Path, revoked: &BTreeSet<Serial>) -> Result<(), AuthorityError> {
    let mut text = String::from("# revoked certificate serials (hex), one per line\n");
    for s in revoked {
        text.push_str(&s.to_string());
        text.push('\n');
    }
    Ok(write_atomic(
        &dir.join(REVOKED_FILE),
        text.as_bytes(),
        0o644,
    )?)
}

fn read_revoked(dir: &Path) -> Result<BTreeSet<Serial>, AuthorityError> {
    let path = dir.join(REVOKED_FILE);
    let text = read_string(&path)?;
    let mut out = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let serial = line.parse().map_err(|e| AuthorityError::BadState {
            path: path.clone(),
            detail: format!("line {}: {e}", n + 1),
        })?;
        out.insert(serial);
    }
    Ok(out)
}

fn push_pem(out: &mut String, pem: &str) {
    out.push_str(pem);
    if !pem.ends_with('\n') {
        out.push('\n');
    }
}

#[cfg(test)]
pub(crate) mod tests {

    #[test]
    fn csr_join_keeps_the_node_key_on_the_node() {
        let tmp = std::env::temp_dir().join(format!("mesh-csr-join-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let ca =
            Authority::init(tmp.join("ca"), TrustDomain::new("cluster.local").unwrap()).unwrap();
        let node_dir = tmp.join("n1");
        let csr = NodeCredentials::request(&node_dir).unwrap();
        let key_before = std::fs::read_to_string(node_dir.join(NodeCredentials::KEY_FILE)).unwrap();
        let chain = ca.sign_node_csr("n1", &csr).unwrap();
        NodeCredentials::write_signed(&node_dir, &chain, &ca.bundle_pem()).unwrap();
        let creds = NodeCredentials::load(&node_dir).unwrap();
        assert_eq!(creds.node.node(), "n1");
        assert_eq!(creds.key_pem, key_before, "the node key was replaced");
        // A second request keeps the key (re-join under a new root).
        NodeCredentials::request(&node_dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(node_dir.join(NodeCredentials::KEY_FILE)).unwrap(),
            key_before
        );
        // A chain for another key is refused and nothing is written.
        let other = tmp.join("other");
        let other_chain = ca
            .sign_node_csr("n1", &NodeCredentials::request(&other).unwrap())
            .unwrap();
        let before = std::fs::read_to_string(node_dir.join(NodeCredentials::CERT_FILE)).unwrap();
        assert!(NodeCredentials::write_signed(&node_dir, &other_chain, &ca.bundle_pem()).is_err());
        assert_eq!(
            std::fs::read_to_string(node_dir.join(NodeCredentials::CERT_FILE)).unwrap(),
            before
        );
        // Garbage is not a CSR (node names are checked by the CLI, as for `join`).
        assert!(ca.sign_node_csr("n1", "not a csr").is_err());
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A unique, self-removing temporary directory.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "mesh-identity-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            Self(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    pub(crate) fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    pub(crate) fn wid(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new(td(), ns, sa).unwrap()
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn explicit_validity_gives_expired_certificates_that_do_not_verify() {
        let dir = TempDir::new("validity");
        let a = Authority::init(&dir.0, td()).unwrap();
        let now = SystemTime::now();
        let id = wid("default", "sa-a");
        let expired = a
            .issue_workload_cert_with_validity(
                &id,
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            )
            .unwrap();
        assert_eq!(expired.identity(), &id);
        assert!(expired.is_expired_at(now));
        assert!(a.trust_store().verify_workload_cert(&expired).is_err());
        let foreign = SpiffeId::new(
            TrustDomain::new("other.example").unwrap(),
            "default",
            "sa-a",
        )
        .unwrap();
        assert!(matches!(
            a.issue_workload_cert_with_validity(&foreign, now, now + Duration::from_secs(60)),
            Err(AuthorityError::Tls(TlsError::ForeignTrustDomain { .. }))
        ));
    }

    #[test]
    fn init_then_load_roundtrip() {
        let dir = TempDir::new("init");
        let a = Authority::init(&dir.0, td()).unwrap();
        let root = a.active_root();
        let key_dir = dir.0.join(ROOTS_DIR).join(root.as_str());
        assert_eq!(mode(&key_dir.join(ROOT_KEY)), 0o600);
        assert_eq!(mode(&key_dir.join(ISSUING_KEY)), 0o600);
        assert_eq!(mode(&dir.0), 0o700);
        assert!(matches!(
            Authority::init(&dir.0, td()),
            Err(AuthorityError::AlreadyInitialised { .. })
        ));
        let cert = a
            .issue_workload_cert(&wid("default", "sa-a"), DEFAULT_WORKLOAD_LIFETIME)
            .unwrap();
        a.revoke(cert.serial().clone()).unwrap();

        let b = Authority::load(&dir.0).unwrap();
        assert_eq!(b.trust_domain(), &td());
        assert_eq!(b.active_root(), root);
        assert_eq!(b.bundle_pem(), a.bundle_pem());
        assert_eq!(b.revocations(), vec![cert.serial().clone()]);
        assert!(b.trust_store().is_revoked(cert.serial()));
        assert_eq!(
            fs::read_to_string(dir.0.join(BUNDLE_FILE)).unwrap(),
            b.bundle_pem()
        );
        // The loaded authority signs under the same issuing certificate.
        let again = b
            .issue_workload_cert(&wid("default", "sa-a"), DEFAULT_WORKLOAD_LIFETIME)
            .unwrap();
        let issuing = |c: &WorkloadCert| certs_from_pem(c.chain_pem(), "t").unwrap()[1].clone();
        assert_eq!(issuing(&cert), issuing(&again));

        // A tampered root is refused on load.
        let root_pem = key_dir.join(ROOT_CERT);
        let other = TempDir::new("other");
        let o = Authority::init(&other.0, td()).unwrap();
        fs::write(&root_pem, o.bundle_pem()).unwrap();
        assert!(matches!(
            Authority::load(&dir.0),
            Err(AuthorityError::BadState { .. })
        ));
        assert!(matches!(
            Authority::load(dir.0.join("missing")),
            Err(AuthorityError::File(_))
        ));
    }

    #[test]
    fn issued_svid_has_exactly_the_requested_san_and_the_issuing_chain() {
        let dir = TempDir::new("svid");
        let a = Authority::init(&dir.0, td()).unwrap();
        let id = wid("default", "sa-a");
        // The CSR asks for something else; the authority ignores it.
        let key = new_key().unwrap();
        let mut asked = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        asked.subject_alt_names.push(SanType::URI(
            "spiffe://cluster.local/ns/kube-system/sa/admin"
                .try_into()
                .unwrap(),
        ));
        let csr = asked.serialize_request(&key).unwrap().pem().unwrap();
        let before = now_secs();
        let chain_pem = a
            .sign_workload_csr(&csr, &id, Duration::from_secs(3600))
            .unwrap();
        let chain = certs_from_pem(&chain_pem, "t").unwrap();
        assert_eq!(chain.len(), 2);
        let leaf = CertInfo::parse(&chain[0]).unwrap();
        assert_eq!(leaf.uri_sans, vec![id.to_string()]);
        assert!(!leaf.is_ca);
        assert_eq!(leaf.public_key, key.public_key_raw());
        let (_, x) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names.len(),
            1,
            "no DNS SAN copied from the CSR"
        );
        assert!(leaf.not_before <= before - CLOCK_SKEW_BACKDATE + Duration::from_secs(1));
        let life = leaf.not_after.duration_since(before).unwrap();
        assert!(life >= Duration::from_secs(3599) && life <= Duration::from_secs(3601));
        // Chain: leaf signed by issuing, issuing by the root in the bundle.
        let issuing = &chain[1];
        let (_, issuing_x) = x509_parser::parse_x509_certificate(issuing).unwrap();
        assert!(issuing_x.is_ca());
        x.verify_signature(Some(issuing_x.public_key())).unwrap();
        let root = certs_from_pem(&a.bundle_pem(), "t").unwrap().remove(0);
        let (_, root_x) = x509_parser::parse_x509_certificate(&root).unwrap();
        issuing_x
            .verify_signature(Some(root_x.public_key()))
            .unwrap();
        // Serials are random.
        let again = a
            .sign_workload_csr(&csr, &id, Duration::from_secs(3600))
            .unwrap();
        let s2 = CertInfo::parse(&certs_from_pem(&again, "t").unwrap()[0])
            .unwrap()
            .serial;
        assert_ne!(leaf.serial, s2);
    }

    #[test]
    fn sign_refuses_bad_requests() {
        let dir = TempDir::new("bad");
        let a = Authority::init(&dir.0, td()).unwrap();
        let key = new_key().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let id = wid("default", "sa-a");
        assert!(matches!(
            a.sign_workload_csr(&csr, &id, Duration::from_secs(59)),
            Err(AuthorityError::Lifetime(LifetimeError::TooShort { .. }))
        ));
        assert!(matches!(
            a.sign_workload_csr(&csr, &id, MAX_WORKLOAD_LIFETIME + Duration::from_secs(1)),
            Err(AuthorityError::Lifetime(LifetimeError::TooLong { .. }))
        ));
        a.sign_workload_csr(&csr, &id, MIN_WORKLOAD_LIFETIME)
            .unwrap();
        let foreign = SpiffeId::parse("spiffe://other.domain/ns/default/sa/sa-a").unwrap();
        assert!(matches!(
            a.sign_workload_csr(&csr, &foreign, DEFAULT_WORKLOAD_LIFETIME),
            Err(AuthorityError::Tls(TlsError::ForeignTrustDomain { .. }))
        ));
        assert!(matches!(
            a.sign_workload_csr("garbage", &id, DEFAULT_WORKLOAD_LIFETIME),
            Err(AuthorityError::InvalidCsr { .. })
        ));
        // A CSR whose signature does not verify: a character of the last base64 line (which
        // holds the signature value) changed.
        let mut lines: Vec<String> = csr.lines().map(str::to_owned).collect();
        let last_body = lines.len() - 2;
        let mut chars: Vec<char> = lines[last_body].chars().collect();
        chars[8] = if chars[8] == 'A' { 'B' } else { 'A' };
        lines[last_body] = chars.into_iter().collect();
        let tampered = lines.join("\n");
        assert!(matches!(
            a.sign_workload_csr(&tampered, &id, DEFAULT_WORKLOAD_LIFETIME),
            Err(AuthorityError::InvalidCsr { .. })
        ));
        // A P-384 key is refused.
        let k384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let csr384 = CertificateParams::default()
            .serialize_request(&k384)
            .unwrap()
            .pem()
            .unwrap();
        assert!(matches!(
            a.sign_workload_csr(&csr384, &id, DEFAULT_WORKLOAD_LIFETIME),
            Err(AuthorityError::InvalidCsr { .. })
        ));
    }

    #[test]
    fn node_a_is_refused_a_workload_that_lives_only_on_node_b() {
        let registry = |id: &SpiffeId| -> Vec<String> {
            match (id.namespace(), id.service_account()) {
                ("default", "sa-a") => vec!["n1".into()],
                ("default", "sa-b") => vec!["n2".into()],
                ("default", "sa-both") => vec!["n1".into(), "n2".into()],
                _ => vec![],
            }
        };
        authorize_request("n1", &wid("default", "sa-a"), registry).unwrap();
        authorize_request("n1", &wid("default", "sa-both"), registry).unwrap();
        authorize_request("n2", &wid("default", "sa-both"), registry).unwrap();
        let err = authorize_request("n1", &wid("default", "sa-b"), registry).unwrap_err();
        assert!(
            matches!(&err, AuthorityError::NotAuthorized { node, hosts, .. } if node == "n1" && hosts == &["n2".to_string()]),
            "{err:?}"
        );
        assert!(err.to_string().contains("n1"));
        assert!(authorize_request("n1", &wid("default", "nobody"), registry).is_err());
    }

    #[test]
    fn node_credentials_roundtrip() {
        let dir = TempDir::new("nodecreds");
        let a = Authority::init(dir.0.join("ca"), td()).unwrap();
        let creds = a.node_credentials("n1").unwrap();
        assert_eq!(creds.node.node(), "n1");
        creds.write_to(dir.0.join("n1")).unwrap();
        assert_eq!(
            mode(&dir.0.join("n1").join(NodeCredentials::KEY_FILE)),
            0o600
        );
        let back = NodeCredentials::load(dir.0.join("n1")).unwrap();
        assert_eq!(back.node, creds.node);
        assert_eq!(back.bundle_pem, a.bundle_pem());
        assert!(!format!("{back:?}").contains("PRIVATE"));
        assert!(a.issue_node_cert("bad/name").is_err());
    }

    #[test]
    fn reload_follows_another_process_and_never_half_applies() {
        let dir = TempDir::new("reload");
        let serving = Authority::init(&dir.0, td()).unwrap();
        let trust = serving.trust_store();
        assert_eq!(serving.reload().unwrap(), ReloadOutcome::default());
        // "Another process": a second instance on the same directory.
        let cli = Authority::load(&dir.0).unwrap();
        let cert = cli
            .issue_workload_cert(&wid("default", "sa-a"), DEFAULT_WORKLOAD_LIFETIME)
            .unwrap();
        cli.revoke(cert.serial().clone()).unwrap();
        let out = serving.reload().unwrap();
        assert!(out.revocations_changed && !out.roots_changed);
        assert!(serving.is_revoked(cert.serial()) && trust.is_revoked(cert.serial()));

        let old = cli.active_root();
        let new = cli.add_root().unwrap();
        cli.activate_root(&new).unwrap();
        let out = serving.reload().unwrap();
        assert!(out.roots_changed && !out.revocations_changed);
        assert_eq!(serving.active_root(), new);
        assert_eq!(trust.roots().len(), 2);
        assert_eq!(serving.bundle_pem(), cli.bundle_pem());

        // Bad files: refused, nothing applied.
        let revoked_path = dir.0.join(REVOKED_FILE);
        let good_revoked = fs::read_to_string(&revoked_path).unwrap();
        fs::write(&revoked_path, "zz-not-hex\n").unwrap();
        assert!(matches!(
            serving.reload(),
            Err(AuthorityError::BadState { .. })
        ));
        assert!(serving.is_revoked(cert.serial()));
        fs::write(&revoked_path, good_revoked).unwrap();
        cli.retire_root(&old).unwrap();
        let state_path = dir.0.join(STATE_FILE);
        let good_state = fs::read_to_string(&state_path).unwrap();
        fs::write(&state_path, "{").unwrap();
        assert!(serving.reload().is_err());
        let missing_root = good_state.replace(new.as_str(), "0123456789abcdef");
        fs::write(&state_path, missing_root).unwrap();
        assert!(serving.reload().is_err());
        assert_eq!(serving.roots().len(), 2, "nothing half-applied");
        assert_eq!(trust.roots().len(), 2);
        fs::write(&state_path, &good_state).unwrap();
        assert!(serving.reload().unwrap().roots_changed);
        assert_eq!(serving.roots().len(), 1);
        assert_eq!(trust.roots().len(), 1);
        // The trust domain cannot change under a running authority.
        fs::write(
            &state_path,
            good_state.replace("cluster.local", "other.domain"),
        )
        .unwrap();
        assert!(serving.reload().is_err());
        assert_eq!(serving.trust_domain(), &td());
    }

    #[test]
    fn root_rotation_state_is_persisted() {
        let dir = TempDir::new("rot");
        let a = Authority::init(&dir.0, td()).unwrap();
        let old = a.active_root();
        let new = a.add_root().unwrap();
        assert_eq!(a.active_root(), old, "adding does not switch issuance");
        assert_eq!(certs_from_pem(&a.bundle_pem(), "t").unwrap().len(), 2);
        assert!(matches!(
            a.retire_root(&old),
            Err(AuthorityError::RetireActiveRoot { .. })
        ));
        a.activate_root(&new).unwrap();
        a.retire_root(&old).unwrap();
        assert!(!dir.0.join(ROOTS_DIR).join(old.as_str()).exists());
        assert!(matches!(
            a.retire_root(&old),
            Err(AuthorityError::UnknownRoot { .. })
        ));
        let b = Authority::load(&dir.0).unwrap();
        assert_eq!(b.active_root(), new);
        assert_eq!(b.roots().len(), 1);
        assert!(b.roots()[0].active);
    }
}
