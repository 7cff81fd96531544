//! The node agent's identity manager: the workload certificates of this node, the trust bundle
//! and the revocation list, kept current in the background.
//!
//! - **Keys stay here.** Every certificate is obtained with a fresh ECDSA P-256 key generated in
//!   the agent; only a CSR travels to the authority ([`AuthorityClient::sign`]).
//! - **Start-up.** [`IdentityManager::start`] returns once every configured workload has a
//!   certificate, retrying with capped exponential backoff until `startup_timeout`.
//! - **Rotation.** A certificate is replaced half-way through its lifetime
//!   ([`WorkloadCert::rotation_due_at`]). While the authority is unreachable the current
//!   certificate keeps being served (it stays valid for the other half of its lifetime); the
//!   request is retried with capped exponential backoff per identity, each failure counted and
//!   logged with the identity and the error. Successful issuances (initial ones included) and
//!   failures are counted in [`IdentityManager::rotations`].
//! - **Trust.** Every `refresh` (default 1 s) the bundle and the revocation list are fetched and
//!   installed in the shared [`TrustStore`], which the server and client configurations verify
//!   peers against at each handshake: every root in the bundle is trusted, so a root rotation
//!   (new root added, activated, old retired) never drops traffic. A certificate of ours is
//!   re-issued *promptly* (not at its next half-life) when the authority's active root is no
//!   longer the one it chains to, when it no longer verifies against the bundle, or when it is
//!   revoked. So once a new root is activated, every agent moves to it within about one
//!   refresh interval, and the old root can be retired soon after.
//! - **Revocation.** [`IdentityManager::revocation_generation`] is bumped whenever the revoked
//!   set changes; proxies re-check live connections with [`TrustStore::is_revoked`].

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use rustls::{ClientConfig, ServerConfig};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::cache::CertCache;
use super::client::AuthorityClient;
use super::credentials::NodeCredentials;
use super::persist::{PersistedTrust, StateDir};
use super::IdentityError;
use crate::audit::AuditLog;
use crate::authority::ca::{check_lifetime, RootId, DEFAULT_WORKLOAD_LIFETIME};
use crate::tls::cert::{Serial, WorkloadCert};
use crate::tls::spiffe::{NodeId, SpiffeId};
use crate::tls::verify::{self, SniCertResolver, TrustStore};
use crate::tls::TlsError;

/// First retry delay after a failed request.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Time allowed for connecting to the authority plus one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Shortest accepted refresh interval.
const MIN_REFRESH: Duration = Duration::from_millis(50);
/// Client configurations cached at most (source × destination pairs); the cache is emptied
/// when full (they are cheap to rebuild).
const MAX_CLIENT_CONFIGS: usize = 4096;
/// Workload identities one node may hold.
pub const MAX_WORKLOADS: usize = 10_000;

/// What [`IdentityManager::start`] needs.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// The authority service.
    pub authority: SocketAddr,
    /// This node's credentials (`mesh-agent authority join`); the trust domain is theirs.
    pub creds: NodeCredentials,
    /// The identities of the workloads on this node (duplicates are ignored).
    pub workloads: Vec<SpiffeId>,
    /// Requested certificate lifetime: at least 60 s, at most 30 days. Default 24 h.
    pub lifetime: Duration,
    /// How often the bundle and the revocation list are fetched (and due rotations checked).
    /// At least 50 ms. Default 1 s.
    pub refresh: Duration,
    /// How long [`IdentityManager::start`] keeps trying to obtain the first certificates.
    /// Default 30 s.
    pub startup_timeout: Duration,
    /// Where certificates, keys and the trust state are persisted ([`super::persist`]). With
    /// it, a start restores the persisted certificates that are still valid and does not wait
    /// for the authority when they cover every workload; past `startup_timeout` it starts
    /// with what it has (workloads without a certificate cannot connect until the authority
    /// issues one) instead of failing. Without it (tests), start-up needs the authority.
    pub state_dir: Option<std::path::PathBuf>,
    /// Where certificate events go (kind `cert`: `issued`, `rotated`, `refused` by the
    /// authority, `revoked`). Default none.
    pub audit: Option<AuditLog>,
}

impl ManagerConfig {
    /// A configuration with the documented defaults.
    pub fn new(authority: SocketAddr, creds: NodeCredentials, workloads: Vec<SpiffeId>) -> Self {
        Self {
            authority,
            creds,
            workloads,
            lifetime: DEFAULT_WORKLOAD_LIFETIME,
            refresh: Duration::from_secs(1),
            startup_timeout: Duration::from_secs(30),
            state_dir: None,
            audit: None,
        }
    }
}

/// Mutable state, behind one (never await-held) lock.
#[derive(Default)]
struct State {
    certs: CertCache,
    /// The root each certificate chains to, as the authority named it.
    roots: HashMap<SpiffeId, RootId>,
    /// Identities whose certificate must be replaced as soon as possible.
    forced: HashSet<SpiffeId>,
    /// Identities whose last request failed: when to try again, and the delay after that.
    retry: HashMap<SpiffeId, (Instant, Duration)>,
    /// The bundle and active root last installed.
    bundle_pem: String,
    active_root: Option<RootId>,
    /// Bumped when the bundle changes (client configurations are rebuilt).
    bundle_gen: u64,
    revoked: BTreeSet<Serial>,
}

struct CachedClient {
    serial: Serial,
    bundle_gen: u64,
    config: Arc<ClientConfig>,
}

/// The workload identities of one node. Shared as `Arc<IdentityManager>`; a background task
/// keeps it current until the stop signal.
pub struct IdentityManager {
    node: NodeId,
    workloads: Vec<SpiffeId>,
    lifetime: Duration,
    trust: Arc<TrustStore>,
    resolver: Arc<SniCertResolver>,
    server: Arc<ServerConfig>,
    /// Requests are sequential; held across awaits, so a tokio mutex.
    client: tokio::sync::Mutex<AuthorityClient>,
    state: Mutex<State>,
    clients: Mutex<HashMap<(SpiffeId, SpiffeId), CachedClient>>,
    rotations_ok: AtomicU64,
    rotations_err: AtomicU64,
    revocation_gen: watch::Sender<u64>,
    /// Whether the last refresh reached the authority (log transitions only).
    authority_up: AtomicBool,
    /// Persisted state, if configured.
    persist: Option<StateDir>,
    audit: Option<AuditLog>,
}

impl std::fmt::Debug for IdentityManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityManager")
            .field("node", &self.node.to_string())
            .field("workloads", &self.workloads.len())
            .finish_non_exhaustive()
    }
}

/// Why a certificate is being requested (the `rotation` field of the log line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Issue {
    Initial,
    Rotation,
}

impl Issue {
    fn as_str(self) -> &'static str {
        match self {
            Self::Initial => "initial",
            Self::Rotation => "rotation",
        }
    }
}

impl IdentityManager {
    /// Validates `cfg`, obtains a certificate for every workload (retrying with capped
    /// exponential backoff until `cfg.startup_timeout`), then starts the background task that
    /// rotates certificates and follows the bundle and revocation list until `stop` becomes
    /// true or its sender is dropped (keep the sender alive for as long as the agent runs).
    pub async fn start(
        cfg: ManagerConfig,
        mut stop: watch::Receiver<bool>,
    ) -> Result<Arc<Self>, IdentityError> {
        check_lifetime(cfg.lifetime)?;
        if cfg.refresh < MIN_REFRESH {
            return Err(IdentityError::BadConfig {
                what: "the refresh interval",
                bound: "at least 50 ms",
                got: cfg.refresh,
            });
        }
        let node = cfg.creds.node.clone();
        let td = node.trust_domain().clone();
        let mut workloads: Vec<SpiffeId> = cfg.workloads.clone();
        workloads.sort();
        workloads.dedup();
        if workloads.len() > MAX_WORKLOADS {
            return Err(IdentityError::Protocol {
                detail: format!(
                    "{} workload identities on one node, at most {MAX_WORKLOADS}",
                    workloads.len()
                ),
            });
        }
        if let Some(foreign) = workloads.iter().find(|w| w.trust_domain() != &td) {
            return Err(TlsError::ForeignTrustDomain {
                identity: foreign.to_string(),
                expected: td,
            }
            .into());
        }
        let trust = TrustStore::from_bundle_pem(td, &cfg.creds.bundle_pem)?;
        let mut client = AuthorityClient::new(
            &cfg.authority.to_string(),
            &cfg.creds.chain_pem,
            &cfg.creds.key_pem,
            trust.clone(),
        )?;
        client.set_timeout(REQUEST_TIMEOUT.min(cfg.startup_timeout.max(MIN_REFRESH)));
        let resolver = SniCertResolver::new();
        let server = verify::server_config(trust.clone(), resolver.clone())?;
        let (revocation_gen, _) = watch::channel(0u64);
        let manager = Arc::new(Self {
            node,
            workloads,
            lifetime: cfg.lifetime,
            trust,
            resolver,
            server,
            client: tokio::sync::Mutex::new(client),
            state: Mutex::new(State {
                bundle_pem: cfg.creds.bundle_pem.clone(),
                ..State::default()
            }),
            clients: Mutex::new(HashMap::new()),
            rotations_ok: AtomicU64::new(0),
            rotations_err: AtomicU64::new(0),
            revocation_gen,
            authority_up: AtomicBool::new(true),
            audit: cfg.audit.clone(),
            persist: match &cfg.state_dir {
                None => None,
                Some(dir) => Some(StateDir::open(dir).map_err(|e| IdentityError::Protocol {
                    detail: format!("state directory {}: {e}", dir.display()),
                })?),
            },
        });
        let restored = manager.restore();

        let started = Instant::now();
        let deadline = started + cfg.startup_timeout;
        let mut backoff = BACKOFF_MIN;
        // The last real failure: a round cut short by the deadline does not hide it.
        let mut last_err: Option<IdentityError> = None;
        while !(restored > 0 && manager.missing().is_empty()) {
            let round = async {
                manager.refresh_logged().await;
                let mut last = None;
                for id in manager.missing() {
                    if let Err(e) = manager.issue(&id, Issue::Initial).await {
                        last = Some(e);
                    }
                }
                last
            };
            match tokio::time::timeout_at(deadline, round).await {
                Ok(None) if manager.missing().is_empty() => break,
                Ok(Some(e)) => last_err = Some(e),
                Ok(None) | Err(_) => {}
            }
            let now = Instant::now();
            if now >= deadline && manager.persist.is_some() {
                let pending = manager.missing();
                warn!(pending = pending.len(), restored, after_secs = cfg.startup_timeout.as_secs(),
                      "starting without certificates for some workloads; they cannot connect until the authority issues them");
                break;
            }
            if now >= deadline {
                return Err(IdentityError::Startup {
                    pending: manager.missing().iter().map(ToString::to_string).collect(),
                    after: cfg.startup_timeout,
                    last: Box::new(last_err.unwrap_or(IdentityError::Timeout {
                        op: "obtaining the initial workload certificates",
                        after: cfg.startup_timeout,
                    })),
                });
            }
            tokio::select! {
                () = tokio::time::sleep(backoff.min(deadline - now)) => {}
                stopped = stop.wait_for(|s| *s) => {
                    let _ = stopped;
                    return Err(IdentityError::Stopped);
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        info!(node = %manager.node, workloads = manager.workloads.len(),
              elapsed_ms = started.elapsed().as_millis() as u64, "workload identities ready");

        let weak = Arc::downgrade(&manager);
        tokio::spawn(background(weak, cfg.refresh, stop));
        Ok(manager)
    }

    /// The trust store (bundle and revocation list) every configuration here verifies with;
    /// it follows the authority.
    pub fn trust(&self) -> Arc<TrustStore> {
        self.trust.clone()
    }

    /// Inbound (HBONE) server configuration: TLS 1.3 only, ALPN `h2`, the certificate of the
    /// local workload named by SNI ([`verify::server_name_for`]), client certificates required
    /// and verified (workload identity of the trust domain, chain to the current bundle, not
    /// revoked). Built once: certificates and trust are looked up at each handshake.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// Outbound configuration presenting `src`'s current certificate and accepting only a
    /// server that proves to be `dst`; ALPN `h2`. Connect with
    /// [`verify::server_name_for`]`(dst)`. Cached per pair, rebuilt when `src`'s certificate
    /// rotates or the bundle changes.
    pub fn client_config(
        &self,
        src: &SpiffeId,
        dst: &SpiffeId,
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        let (cert, bundle_gen) = {
            let state = self.lock();
            let cert =
                state
                    .certs
                    .get(src)
                    .cloned()
                    .ok_or_else(|| IdentityError::NoCertificate {
                        identity: src.clone(),
                    })?;
            (cert, state.bundle_gen)
        };
        let key = (src.clone(), dst.clone());
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            if &c.serial == cert.serial() && c.bundle_gen == bundle_gen {
                return Ok(c.config.clone());
            }
        }
        let config = verify::client_config(self.trust.clone(), &cert, dst)?;
        if clients.len() >= MAX_CLIENT_CONFIGS {
            clients.clear();
        }
        clients.insert(
            key,
            CachedClient {
                serial: cert.serial().clone(),
                bundle_gen,
                config: config.clone(),
            },
        );
        Ok(config)
    }

    /// The current certificate of `id`, if this node holds one.
    pub fn certificate(&self, id: &SpiffeId) -> Option<WorkloadCert> {
        self.lock().certs.get(id).cloned()
    }

    /// The identities this node holds certificates for (its workloads).
    pub fn identities(&self) -> &[SpiffeId] {
        &self.workloads
    }

    /// Remaining lifetime per identity, sorted by identity (`mesh_cert_expiry_seconds`).
    pub fn expiries(&self) -> Vec<(SpiffeId, Duration)> {
        self.lock().certs.expiries(SystemTime::now())
    }

    /// Certificates obtained (initial ones included) and failed requests, since start
    /// (`mesh_cert_rotations_total{result="ok|error"}`).
    pub fn rotations(&self) -> (u64, u64) {
        (
            self.rotations_ok.load(Ordering::Relaxed),
            self.rotations_err.load(Ordering::Relaxed),
        )
    }

    /// Bumped whenever the revoked set changes.
    pub fn revocation_generation(&self) -> watch::Receiver<u64> {
        self.revocation_gen.subscribe()
    }

    /// Fetches the bundle and revocations and re-issues every certificate now, regardless of
    /// its age (for operators and tests). On failure the current certificates stay in use and
    /// the background task retries them with backoff.
    pub async fn rotate_now(&self) -> Result<(), IdentityError> {
        self.refresh_trust().await?;
        let mut first_err = None;
        for id in self.workloads.clone() {
            let kind = if self.lock().certs.get(&id).is_some() {
                Issue::Rotation
            } else {
                Issue::Initial
            };
            if let Err(e) = self.issue(&id, kind).await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Installs the persisted trust and the persisted certificates that are still usable
    /// (wanted, not expired, chaining to the bundle, not revoked). Returns how many.
    fn restore(&self) -> usize {
        let Some(persist) = &self.persist else {
            return 0;
        };
        match persist.load_trust() {
            Ok(Some(t)) => match self.trust.set_bundle_pem(&t.bundle_pem) {
                Ok(()) => {
                    self.trust.set_revoked(t.revoked.iter().cloned());
                    let mut state = self.lock();
                    state.bundle_pem = t.bundle_pem;
                    state.revoked = t.revoked;
                }
                Err(e) => {
                    warn!(error = %e, "persisted trust bundle unusable; using the join bundle")
                }
            },
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, dir = %persist.path().display(), "persisted trust unreadable; using the join bundle")
            }
        }
        let (certs, bad) = match persist.load_certs(&self.workloads) {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, dir = %persist.path().display(), "persisted certificates unreadable");
                return 0;
            }
        };
        for (path, why) in bad {
            warn!(file = %path.display(), error = %why, "persisted certificate skipped");
        }
        let now = SystemTime::now();
        let mut restored = 0;
        for cert in certs {
            let usable = !cert.is_expired_at(now)
                && self.trust.verify_workload_cert(&cert).is_ok()
                && !self.trust.is_revoked(cert.serial());
            if !usable {
                info!(identity = %cert.identity(), serial = %cert.serial(), "persisted certificate no longer usable");
                continue;
            }
            let mut state = self.lock();
            self.resolver.insert(&cert);
            info!(identity = %cert.identity(), serial = %cert.serial(),
                  expires_in_secs = cert.remaining().as_secs(), "workload certificate restored");
            state.certs.insert(cert);
            restored += 1;
        }
        restored
    }

    fn persist_cert(&self, cert: &WorkloadCert) {
        if let Some(p) = &self.persist {
            if let Err(e) = p.save_cert(cert) {
                warn!(identity = %cert.identity(), error = %e, "persisting a certificate");
            }
        }
    }

    fn persist_trust(&self) {
        if let Some(p) = &self.persist {
            let t = {
                let state = self.lock();
                PersistedTrust {
                    bundle_pem: state.bundle_pem.clone(),
                    revoked: state.revoked.clone(),
                }
            };
            if let Err(e) = p.save_trust(&t) {
                warn!(error = %e, "persisting the trust state");
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Workloads without a certificate, sorted.
    fn missing(&self) -> Vec<SpiffeId> {
        let state = self.lock();
        self.workloads
            .iter()
            .filter(|id| state.certs.get(id).is_none())
            .cloned()
            .collect()
    }

    /// Requests a certificate for `id` and installs it; on failure counts, logs and schedules
    /// the retry.
    async fn issue(&self, id: &SpiffeId, kind: Issue) -> Result<(), IdentityError> {
        let result = self
            .client
            .lock()
            .await
            .sign_rooted(id, self.lifetime)
            .await;
        match result {
            Ok((cert, root)) => {
                let replaced = {
                    let mut state = self.lock();
                    // Requests are sequential: the newest answer always wins.
                    let replaced = state.certs.remove(id);
                    state.certs.insert(cert.clone());
                    match root {
                        Some(r) => state.roots.insert(id.clone(), r),
                        None => state.roots.remove(id),
                    };
                    state.forced.remove(id);
                    state.retry.remove(id);
                    self.resolver.insert(&cert);
                    replaced
                };
                self.rotations_ok.fetch_add(1, Ordering::Relaxed);
                self.persist_cert(&cert);
                info!(identity = %id, serial = %cert.serial(),
                      expires_in_secs = cert.remaining().as_secs(),
                      rotation = kind.as_str(),
                      replaced = replaced.as_ref().map(|c| c.serial().to_string()),
                      "workload certificate issued");
                if let Some(a) = &self.audit {
                    let detail = format!(
                        "serial {}, expires in {} s ({}){}",
                        cert.serial(),
                        cert.remaining().as_secs(),
                        kind.as_str(),
                        replaced
                            .as_ref()
                            .map(|c| format!(", replaces {}", c.serial()))
                            .unwrap_or_default()
                    );
                    let action = if replaced.is_some() {
                        "rotated"
                    } else {
                        "issued"
                    };
                    a.cert_event(action, &id.to_string(), Some(detail));
                }
                Ok(())
            }
            Err(e) => {
                self.rotations_err.fetch_add(1, Ordering::Relaxed);
                let delay = {
                    let mut state = self.lock();
                    let delay = match state.retry.get(id) {
                        Some((_, d)) => (*d * 2).min(BACKOFF_MAX),
                        None => BACKOFF_MIN,
                    };
                    state
                        .retry
                        .insert(id.clone(), (Instant::now() + delay, delay));
                    delay
                };
                let remaining = self.lock().certs.get(id).map(|c| c.remaining().as_secs());
                warn!(identity = %id, rotation = kind.as_str(), error = %e,
                      retry_in_ms = delay.as_millis() as u64,
                      current_expires_in_secs = remaining,
                      "workload certificate request failed");
                if let (Some(a), IdentityError::Refused { message }) = (&self.audit, &e) {
                    a.cert_event("refused", &id.to_string(), Some(message.clone()));
                }
                Err(e)
            }
        }
    }

    /// Fetches the bundle, active root and revocations, and installs what changed.
    async fn refresh_trust(&self) -> Result<(), IdentityError> {
        let (bundle, active, revoked) = {
            let mut client = self.client.lock().await;
            let (bundle, active) = client.bundle_rooted().await?;
            let revoked = client.revocations().await?;
            (bundle, active, revoked)
        };
        let revoked: BTreeSet<Serial> = revoked.into_iter().collect();
        let mut revocations_changed = false;
        let mut bundle_changed = false;
        {
            let mut state = self.lock();
            if state.bundle_pem != bundle {
                self.trust.set_bundle_pem(&bundle)?;
                state.bundle_pem = bundle;
                state.bundle_gen += 1;
                bundle_changed = true;
                info!(roots = self.trust.roots().len(), "trust bundle updated");
                // Ours must still verify (e.g. their root was retired): re-issue those now.
                let stale: Vec<SpiffeId> = state
                    .certs
                    .iter()
                    .filter(|(_, c)| self.trust.verify_workload_cert(c).is_err())
                    .map(|(id, _)| id.clone())
                    .collect();
                state.forced.extend(stale);
            }
            if active.is_some() && state.active_root != active {
                if let Some(active) = &active {
                    let moved: Vec<SpiffeId> = state
                        .roots
                        .iter()
                        .filter(|(_, r)| *r != active)
                        .map(|(id, _)| id.clone())
                        .collect();
                    if !moved.is_empty() {
                        info!(active_root = %active, certificates = moved.len(),
                              "issuing root changed, re-issuing certificates");
                    }
                    state.forced.extend(moved);
                }
                state.active_root = active;
            }
            if state.revoked != revoked {
                self.trust.set_revoked(revoked.iter().cloned());
                let ours: Vec<SpiffeId> = state
                    .certs
                    .iter()
                    .filter(|(_, c)| revoked.contains(c.serial()))
                    .map(|(id, _)| id.clone())
                    .collect();
                if let Some(a) = &self.audit {
                    for (id, c) in state.certs.iter() {
                        if revoked.contains(c.serial()) && !state.revoked.contains(c.serial()) {
                            a.cert_event(
                                "revoked",
                                &id.to_string(),
                                Some(format!("serial {}: re-issuing", c.serial())),
                            );
                        }
                    }
                }
                if !ours.is_empty() {
                    warn!(
                        certificates = ours.len(),
                        "a certificate of this node was revoked, re-issuing"
                    );
                }
                state.forced.extend(ours);
                info!(revoked = revoked.len(), "revocation list updated");
                state.revoked = revoked;
                revocations_changed = true;
            }
        }
        if revocations_changed {
            self.revocation_gen.send_modify(|g| *g += 1);
        }
        if revocations_changed || bundle_changed {
            self.persist_trust();
        }
        Ok(())
    }

    /// [`Self::refresh_trust`], logging transitions between reachable and unreachable.
    async fn refresh_logged(&self) {
        match self.refresh_trust().await {
            Ok(()) => {
                if !self.authority_up.swap(true, Ordering::Relaxed) {
                    info!(node = %self.node, "authority reachable again");
                }
            }
            Err(e) => {
                if self.authority_up.swap(false, Ordering::Relaxed) {
                    warn!(node = %self.node, error = %e, "authority unreachable, serving with the current certificates");
                } else {
                    debug!(error = %e, "authority still unreachable");
                }
            }
        }
    }

    /// Requests every certificate that is missing, past half-life or forced, unless its retry
    /// time has not come.
    async fn rotate_due(&self) {
        let due: Vec<(SpiffeId, Issue)> = {
            let state = self.lock();
            let now_wall = SystemTime::now();
            let now = Instant::now();
            self.workloads
                .iter()
                .filter(|id| state.forced.contains(*id) || state.certs.needs_rotation(id, now_wall))
                .filter(|id| state.retry.get(*id).is_none_or(|(at, _)| *at <= now))
                .map(|id| {
                    let kind = if state.certs.get(id).is_some() {
                        Issue::Rotation
                    } else {
                        Issue::Initial
                    };
                    (id.clone(), kind)
                })
                .collect()
        };
        for (id, kind) in due {
            let _ = self.issue(&id, kind).await;
        }
    }
}

/// The background task: every `refresh`, follow the authority and rotate what is due.
async fn background(
    weak: Weak<IdentityManager>,
    refresh: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        // No strong reference is held while waiting: a dropped manager ends the task.
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tick.tick() => {}
        }
        let Some(manager) = weak.upgrade() else { break };
        manager.refresh_logged().await;
        manager.rotate_due().await;
    }
    debug!("identity manager stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::ca::tests::{td, wid, TempDir};
    use crate::authority::{serve_with, Authority, ServeConfig};
    use crate::tls::spiffe::{PeerId, TrustDomain};
    use crate::tls::verify::{peer_identity, peer_serial, server_name_for};
    use std::io::Write as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    /// Registry: sa-a and sa-c on n1, sa-b on n2.
    fn registry(id: &SpiffeId) -> Vec<String> {
        match id.service_account() {
            "sa-a" | "sa-c" => vec!["n1".into()],
            "sa-b" => vec!["n2".into()],
            _ => vec![],
        }
    }

    type Serving = (
        oneshot::Sender<()>,
        JoinHandle<Result<(), crate::authority::AuthorityError>>,
    );

    struct Ca {
        dir: TempDir,
        ca: Arc<Authority>,
        addr: SocketAddr,
        running: Option<Serving>,
    }

    impl Ca {
        async fn new(tag: &str) -> Self {
            let dir = TempDir::new(tag);
            let ca = Arc::new(Authority::init(&dir.0, td()).unwrap());
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut me = Self {
                dir,
                ca,
                addr,
                running: None,
            };
            me.serve(listener);
            me
        }

        fn serve(&mut self, listener: TcpListener) {
            let (tx, rx) = oneshot::channel::<()>();
            let task = tokio::spawn(serve_with(
                listener,
                self.ca.clone(),
                registry,
                ServeConfig::default(),
                async {
                    let _ = rx.await;
                },
            ));
            self.running = Some((tx, task));
        }

        async fn stop(&mut self) {
            let (tx, task) = self.running.take().unwrap();
            let _ = tx.send(());
            task.await.unwrap().unwrap();
        }

        /// Restarts on the same address, from the directory (as a restarted process would).
        async fn restart(&mut self) {
            self.ca = Arc::new(Authority::load(&self.dir.0).unwrap());
            let listener = TcpListener::bind(self.addr).await.unwrap();
            self.serve(listener);
        }

        fn config(&self, node: &str, sas: &[&str]) -> ManagerConfig {
            let mut cfg = ManagerConfig::new(
                self.addr,
                self.ca.node_credentials(node).unwrap(),
                sas.iter().map(|sa| wid("default", sa)).collect(),
            );
            cfg.lifetime = Duration::from_secs(600);
            cfg.refresh = Duration::from_millis(100);
            cfg.startup_timeout = Duration::from_secs(5);
            cfg
        }
    }

    /// Waits (bounded) until `cond` holds.
    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    type Side = Result<(Option<SpiffeId>, Option<Serial>), String>;

    /// A real TLS handshake over TCP on 127.0.0.1, then one byte each way. Returns what each
    /// side saw of its peer.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        dst: &SpiffeId,
    ) -> (Side, Side) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_side = async move {
            let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let mut tls = TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .map_err(|e| e.to_string())?;
            let seen = (peer_identity(tls.get_ref().1), peer_serial(tls.get_ref().1));
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            tls.write_all(&b).await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            Ok(seen)
        };
        let name = server_name_for(dst);
        let client_side = async move {
            let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let mut tls = TlsConnector::from(client)
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            let conn = tls.get_ref().1;
            assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
            assert_eq!(
                conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            let seen = (peer_identity(conn), peer_serial(conn));
            tls.write_all(b"x").await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            Ok(seen)
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(server_side, client_side)
        })
        .await
        .expect("handshake timed out")
    }

    fn stop_channel() -> (watch::Sender<bool>, watch::Receiver<bool>) {
        watch::channel(false)
    }

    #[tokio::test]
    async fn obtains_certificates_and_serves_mtls_between_its_workloads() {
        let ca = Ca::new("mgr-ok").await;
        let (_stop, rx) = stop_channel();
        let m = IdentityManager::start(ca.config("n1", &["sa-a", "sa-c"]), rx)
            .await
            .unwrap();
        let (a, c) = (wid("default", "sa-a"), wid("default", "sa-c"));
        let cert_a = m.certificate(&a).unwrap();
        assert_eq!(cert_a.identity(), &a);
        assert!(m.certificate(&wid("default", "sa-b")).is_none());
        let exp = m.expiries();
        assert_eq!(exp.len(), 2);
        assert!(
            exp.iter()
                .all(|(_, left)| *left > Duration::from_secs(590)
                    && *left <= Duration::from_secs(600))
        );
        assert_eq!(m.rotations(), (2, 0));

        // a → c: both sides see the other's verified identity and current serial.
        let cfg = m.client_config(&a, &c).unwrap();
        assert!(
            Arc::ptr_eq(&cfg, &m.client_config(&a, &c).unwrap()),
            "cached"
        );
        let (s, cl) = handshake(m.server_config(), cfg, &c).await;
        assert_eq!(s.unwrap(), (Some(a.clone()), Some(cert_a.serial().clone())));
        let cert_c = m.certificate(&c).unwrap();
        assert_eq!(
            cl.unwrap(),
            (Some(c.clone()), Some(cert_c.serial().clone()))
        );

        // Wrong destination: the server presents sa-c, the client wants sa-a.
        let wrong = m.client_config(&c, &a).unwrap();
        let listener_name_c = &c;
        let (_, cl) = handshake(m.server_config(), wrong, listener_name_c).await;
        let e = cl.unwrap_err();
        assert!(e.contains("is not the expected"), "{e}");
        // No certificate for a source this node does not host.
        assert!(matches!(
            m.client_config(&wid("default", "sa-b"), &c),
            Err(IdentityError::NoCertificate { .. })
        ));
    }

    #[tokio::test]
    async fn handshakes_fail_for_foreign_expired_and_revoked_peers() {
        let ca = Ca::new("mgr-refuse").await;
        let (_stop, rx) = stop_channel();
        let m = IdentityManager::start(ca.config("n1", &["sa-a", "sa-c"]), rx)
            .await
            .unwrap();
        let c = wid("default", "sa-c");
        let as_client = |cert: &WorkloadCert| verify::client_config(m.trust(), cert, &c).unwrap();

        // Another trust domain (its own authority).
        let other_dir = TempDir::new("mgr-refuse-other");
        let other_td = TrustDomain::new("other.domain").unwrap();
        let other = Authority::init(&other_dir.0, other_td.clone()).unwrap();
        let foreign = other
            .issue_workload_cert(
                &SpiffeId::new(other_td, "default", "sa-a").unwrap(),
                Duration::from_secs(600),
            )
            .unwrap();
        let (s, _) = handshake(m.server_config(), as_client(&foreign), &c).await;
        assert!(s.is_err(), "foreign trust domain accepted");

        // Expired (issued by the right authority).
        let now = SystemTime::now();
        let (chain, key) = ca
            .ca
            .issue_with_validity(
                &PeerId::Workload(wid("default", "sa-a")),
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            )
            .unwrap();
        let expired = WorkloadCert::from_pem(&chain, &key).unwrap();
        let (s, _) = handshake(m.server_config(), as_client(&expired), &c).await;
        assert!(s.unwrap_err().to_lowercase().contains("expired"));

        // Revoked: valid until the authority revokes it; the manager fetches the list, the
        // generation moves, and the next handshake is refused.
        let victim = ca
            .ca
            .issue_workload_cert(&wid("default", "sa-a"), Duration::from_secs(600))
            .unwrap();
        let (s, _) = handshake(m.server_config(), as_client(&victim), &c).await;
        assert!(s.is_ok());
        let mut generation = m.revocation_generation();
        let before = *generation.borrow_and_update();
        ca.ca.revoke(victim.serial().clone()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), generation.changed())
            .await
            .expect("generation not bumped")
            .unwrap();
        assert!(*generation.borrow() > before);
        assert!(m.trust().is_revoked(victim.serial()));
        let (s, _) = handshake(m.server_config(), as_client(&victim), &c).await;
        assert!(s.unwrap_err().to_lowercase().contains("revoked"));

        // A revoked certificate of the node's own is replaced promptly.
        let mine = m.certificate(&c).unwrap();
        ca.ca.revoke(mine.serial().clone()).unwrap();
        eventually("own revoked certificate replaced", || {
            m.certificate(&c).unwrap().serial() != mine.serial()
        })
        .await;
    }

    /// Collects log output (current-thread runtime: the authority runs on this thread).
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_workload_of_another_node_is_refused_and_the_refusal_logged() {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let ca = Ca::new("mgr-other-node").await;
        let (_stop, rx) = stop_channel();
        let mut cfg = ca.config("n1", &["sa-a", "sa-b"]);
        cfg.startup_timeout = Duration::from_secs(1);
        let err = IdentityManager::start(cfg, rx).await.unwrap_err();
        match &err {
            IdentityError::Startup { pending, last, .. } => {
                assert_eq!(pending, &["spiffe://cluster.local/ns/default/sa/sa-b"]);
                assert!(last.to_string().contains("not authorized"), "{last}");
            }
            other => panic!("{other}"),
        }
        let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        let refusal = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == "certificate request refused")
            .expect("refusal logged");
        assert_eq!(
            refusal["identity"],
            "spiffe://cluster.local/ns/default/sa/sa-b"
        );
        assert!(refusal["node"].as_str().unwrap().ends_with("/node/n1"));
        // The agent's own log line for what it did obtain.
        assert!(text
            .lines()
            .any(|l| l.contains("\"workload certificate issued\"")
                && l.contains("\"rotation\":\"initial\"")
                && l.contains("sa-a")));
        let _ = std::io::stderr().flush();
    }

    #[tokio::test]
    async fn certificate_events_are_audited() {
        let ca = Ca::new("mgr-audit").await;
        let audit_dir = TempDir::new("mgr-audit-log");
        let audit = AuditLog::start(crate::audit::AuditConfig::new("n1", &audit_dir.0)).unwrap();
        let (_stop, rx) = stop_channel();
        let mut cfg = ca.config("n1", &["sa-a"]);
        cfg.audit = Some(audit.clone());
        let m = IdentityManager::start(cfg, rx).await.unwrap();
        m.rotate_now().await.unwrap();
        // sa-b lives on n2: the authority refuses it to n1.
        assert!(m
            .issue(&wid("default", "sa-b"), Issue::Rotation)
            .await
            .is_err());
        audit.shutdown("test").await;
        let dir = audit_dir.0.join("audit");
        let mut events = Vec::new();
        for (_, seg) in crate::audit::segment::list_segments(&dir).unwrap() {
            for line in std::fs::read_to_string(seg).unwrap().lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                if v["kind"] == "cert" {
                    events.push((
                        v["action"].as_str().unwrap().to_owned(),
                        v["subject"].as_str().unwrap().to_owned(),
                    ));
                }
            }
        }
        let a = wid("default", "sa-a").to_string();
        let b = wid("default", "sa-b").to_string();
        assert_eq!(
            events,
            [
                ("issued".to_owned(), a.clone()),
                ("rotated".to_owned(), a),
                ("refused".to_owned(), b)
            ],
        );
    }

    #[tokio::test]
    async fn rotation_replaces_certificates_and_client_configs() {
        let ca = Ca::new("mgr-rotate").await;
        let (_stop, rx) = stop_channel();
        let m = IdentityManager::start(ca.config("n1", &["sa-a", "sa-c"]), rx)
            .await
            .unwrap();
        let (a, c) = (wid("default", "sa-a"), wid("default", "sa-c"));
        let old = m.certificate(&a).unwrap();
        let old_cfg = m.client_config(&a, &c).unwrap();
        m.rotate_now().await.unwrap();
        let new = m.certificate(&a).unwrap();
        assert_ne!(old.serial(), new.serial());
        assert_eq!(m.rotations(), (4, 0));
        let new_cfg = m.client_config(&a, &c).unwrap();
        assert!(!Arc::ptr_eq(&old_cfg, &new_cfg), "rebuilt after rotation");
        let (s, _) = handshake(m.server_config(), new_cfg, &c).await;
        assert_eq!(
            s.unwrap().1,
            Some(new.serial().clone()),
            "new cert presented"
        );
        // The superseded certificate stays valid until it expires (connections under it live on).
        let (s, _) = handshake(m.server_config(), old_cfg, &c).await;
        assert_eq!(s.unwrap().1, Some(old.serial().clone()));

        // Root rotation: add (agents trust both), activate (agents re-issue promptly), retire.
        let old_root = ca.ca.active_root();
        let new_root = ca.ca.add_root().unwrap();
        eventually("two roots trusted", || m.trust().roots().len() == 2).await;
        let before = m.certificate(&c).unwrap();
        ca.ca.activate_root(&new_root).unwrap();
        eventually("re-issued under the new root", || {
            m.workloads
                .iter()
                .all(|id| m.lock().roots.get(id) == Some(&new_root))
        })
        .await;
        let after = m.certificate(&c).unwrap();
        assert_ne!(before.serial(), after.serial());
        // Traffic keeps flowing at every step.
        let cfg = m.client_config(&a, &c).unwrap();
        let (s, cl) = handshake(m.server_config(), cfg, &c).await;
        assert!(s.is_ok() && cl.is_ok(), "{s:?} {cl:?}");
        // The node certificate is re-issued before the old root goes (see the README).
        let fresh = ca.ca.node_credentials("n1").unwrap();
        *m.client.lock().await = AuthorityClient::new(
            &ca.addr.to_string(),
            &fresh.chain_pem,
            &fresh.key_pem,
            m.trust(),
        )
        .unwrap();
        ca.ca.retire_root(&old_root).unwrap();
        eventually("old root dropped", || m.trust().roots().len() == 1).await;
        let cfg = m.client_config(&a, &c).unwrap();
        let (s, cl) = handshake(m.server_config(), cfg, &c).await;
        assert!(s.is_ok() && cl.is_ok(), "{s:?} {cl:?}");
        assert_eq!(m.rotations().1, 0);
    }

    #[tokio::test]
    async fn keeps_serving_while_the_authority_is_away_and_recovers() {
        let mut ca = Ca::new("mgr-away").await;
        let (_stop, rx) = stop_channel();
        let m = IdentityManager::start(ca.config("n1", &["sa-a", "sa-c"]), rx)
            .await
            .unwrap();
        let (a, c) = (wid("default", "sa-a"), wid("default", "sa-c"));
        let held = m.certificate(&a).unwrap();
        ca.stop().await;

        assert!(m.rotate_now().await.is_err());
        // The background task also fails (forced rotation), counted, with backoff.
        m.lock().forced.insert(a.clone());
        eventually("errors counted", || m.rotations().1 >= 2).await;
        assert_eq!(m.certificate(&a).unwrap().serial(), held.serial());
        let cfg = m.client_config(&a, &c).unwrap();
        let (s, cl) = handshake(m.server_config(), cfg, &c).await;
        assert!(s.is_ok() && cl.is_ok(), "still serving: {s:?} {cl:?}");

        ca.restart().await;
        // The pending forced rotation goes through once it is back.
        eventually("rotation after recovery", || {
            m.certificate(&a).unwrap().serial() != held.serial()
        })
        .await;
        let victim = ca
            .ca
            .issue_workload_cert(&wid("default", "sa-b"), Duration::from_secs(600))
            .unwrap();
        ca.ca.revoke(victim.serial().clone()).unwrap();
        eventually("revocations followed again", || {
            m.trust().is_revoked(victim.serial())
        })
        .await;
        m.rotate_now().await.unwrap();
    }

    #[tokio::test]
    async fn restarts_from_persisted_certificates_while_the_authority_is_down() {
        let mut ca = Ca::new("mgr-persist").await;
        let state = TempDir::new("mgr-persist-state");
        let mut cfg = ca.config("n1", &["sa-a", "sa-c"]);
        cfg.state_dir = Some(state.0.clone());
        let (a, c) = (wid("default", "sa-a"), wid("default", "sa-c"));
        let (_stop, rx) = stop_channel();
        let first = IdentityManager::start(cfg.clone(), rx.clone())
            .await
            .unwrap();
        let held = first.certificate(&a).unwrap();
        drop(first);
        ca.stop().await;

        // Authority down: the restart takes the persisted certificates, without waiting.
        let started = Instant::now();
        let m = IdentityManager::start(cfg.clone(), rx.clone())
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "waited for the authority"
        );
        assert_eq!(m.certificate(&a).unwrap().serial(), held.serial());
        let (s, cl) = handshake(m.server_config(), m.client_config(&a, &c).unwrap(), &c).await;
        assert!(
            s.is_ok() && cl.is_ok(),
            "serves from persisted state: {s:?} {cl:?}"
        );
        drop(m);

        // A tampered certificate file is skipped, not fatal; with nothing usable and the
        // authority down, the start waits its timeout and then serves what it has.
        for e in std::fs::read_dir(state.0.join("certs")).unwrap().flatten() {
            std::fs::write(e.path(), b"{\"chain_pem\":\"x\",\"key_pem\":\"y\"}").unwrap();
        }
        cfg.startup_timeout = Duration::from_millis(300);
        let m = IdentityManager::start(cfg, rx).await.unwrap();
        assert!(
            m.certificate(&a).is_none(),
            "no certificate from a bad file"
        );
        ca.restart().await;
        eventually("issued once the authority is back", || {
            m.certificate(&a).is_some()
        })
        .await;
    }

    #[tokio::test]
    async fn bad_configurations_are_refused() {
        let ca = Ca::new("mgr-bad").await;
        let (_stop, rx) = stop_channel();
        let mut cfg = ca.config("n1", &["sa-a"]);
        cfg.lifetime = Duration::from_secs(59);
        assert!(matches!(
            IdentityManager::start(cfg, rx.clone()).await,
            Err(IdentityError::Lifetime(
                crate::authority::LifetimeError::TooShort { .. }
            ))
        ));
        let mut cfg = ca.config("n1", &["sa-a"]);
        cfg.workloads
            .push(SpiffeId::parse("spiffe://other.domain/ns/default/sa/sa-a").unwrap());
        assert!(matches!(
            IdentityManager::start(cfg, rx.clone()).await,
            Err(IdentityError::Tls(TlsError::ForeignTrustDomain { .. }))
        ));
        let mut cfg = ca.config("n1", &["sa-a"]);
        cfg.refresh = Duration::from_millis(1);
        assert!(IdentityManager::start(cfg, rx).await.is_err());
        // Stopped while the authority is unreachable.
        let (tx, rx) = stop_channel();
        let mut cfg = ca.config("n1", &["sa-a"]);
        cfg.authority = "127.0.0.1:1".parse().unwrap();
        let start = tokio::spawn(IdentityManager::start(cfg, rx));
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send(true).unwrap();
        assert!(matches!(start.await.unwrap(), Err(IdentityError::Stopped)));
    }
}
