//! Telemetry: the agent's Prometheus metrics and the admin endpoint that serves them.
//!
//! Metrics are plain atomics updated on the data path (no allocation per event: label sets
//! are small enums); values that are read rather than counted (certificate expiry, kernel
//! counters) are refreshed from their owners at scrape time through [`ScrapeHook`].
//!
//! The admin endpoint speaks just enough HTTP/1.1 for a scraper and a probe: `GET /metrics`
//! (OpenMetrics text), `GET /healthz` (`ok`). Requests are bounded in size and time; anything
//! else is answered `404`/`400` and the connection closed.

use std::{fmt::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{watch, Semaphore},
    time::timeout,
};
use tracing::{debug, warn};

/// Which end of a TLS or HBONE exchange the agent was.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Side {
    /// The outbound agent, dialling a peer.
    Client,
    /// The inbound agent, accepting.
    Server,
}

/// How something ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Error,
}

/// What the kernel did with a plaintext connection to an enrolled workload.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum PlaintextVerdict {
    Refused,
    Permissive,
    /// PERMISSIVE, but refused by authorization policy.
    Denied,
}

/// Direction of a proxied connection.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

/// How applying a policy directory ended (this agent's `--policy-dir`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ApplyResult {
    Ok,
    /// Bad YAML, an unsupported field, over capacity, or the maps could not be written: the
    /// active generation stays.
    Refused,
}

/// The layer a policy denial was decided at.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum PolicyLayer {
    /// The connection (the kernel at connect(), or the destination agent's re-check).
    L4,
    /// One HTTP request.
    L7,
}

/// Where a policy denial was decided.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum DenialSide {
    /// `connect()` refused by the kernel (reported through the event ring buffer).
    Kernel,
    /// The destination agent, for a connection that arrived over HBONE.
    Inbound,
    /// The agent as both ends of a same-node connection.
    Local,
}

/// Why a connection (or an HBONE tunnel, or an incomplete request head) was refused by the
/// resource limits (`proxy::limits`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RefusalReason {
    /// The connection budget (`--max-connections`) is in use.
    Cap,
    /// The source's share (`--max-connections-per-source`) is in use.
    SourceCap,
    /// `accept()` failed for want of descriptors (EMFILE, ENFILE) or memory.
    FdLimit,
    /// The source has too many incomplete request heads (`--max-pending-heads-per-source`).
    PendingHeads,
}

impl RefusalReason {
    pub const ALL: [Self; 4] = [
        Self::Cap,
        Self::SourceCap,
        Self::FdLimit,
        Self::PendingHeads,
    ];

    /// Position in [`Self::ALL`].
    pub fn index(self) -> usize {
        match self {
            Self::Cap => 0,
            Self::SourceCap => 1,
            Self::FdLimit => 2,
            Self::PendingHeads => 3,
        }
    }
}

/// Label values are the Prometheus-conventional lower-case names.
macro_rules! label_names {
    ($($ty:ident { $($variant:ident => $name:literal),+ $(,)? })+) => {$(
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $name),+ }
            }
        }
    )+};
}

label_names! {
    Side { Client => "client", Server => "server" }
    Outcome { Ok => "ok", Error => "error" }
    PlaintextVerdict { Refused => "refused", Permissive => "permissive", Denied => "denied" }
    Direction { Outbound => "outbound", Inbound => "inbound" }
    ApplyResult { Ok => "ok", Refused => "refused" }
    PolicyLayer { L4 => "l4", L7 => "l7" }
    DenialSide { Kernel => "kernel", Inbound => "inbound", Local => "local" }
    RefusalReason {
        Cap => "cap",
        SourceCap => "source_cap",
        FdLimit => "fd_limit",
        PendingHeads => "pending_heads",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideOutcome {
    side: &'static str,
    result: &'static str,
}

impl SideOutcome {
    fn new(side: Side, result: Outcome) -> Self {
        Self {
            side: side.as_str(),
            result: result.as_str(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabel {
    identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DenialLabels {
    layer: &'static str,
    side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    proxy: &'static str,
    reason: &'static str,
}

/// The values of `mesh_config_state{state}`.
const CONFIG_STATES: [&str; 2] = ["baseline", "active"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConfigStateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CounterLabel {
    counter: &'static str,
}

/// The audit log's metrics (refreshed at scrape time from [`crate::audit::AuditStats`]).
/// The mesh state this agent follows (see [`crate::state`]).
struct StateMetrics {
    config_state: Family<ConfigStateLabel, Gauge>,
    config_rejected: Family<ReasonLabel, Counter>,
    config_unauthorized: Counter,
    config_drift: Gauge,
    config_active_version: Gauge,
    config_last_verified: Gauge,
    version: Gauge,
    updates: Family<ResultLabel, Counter>,
    entries_refused: Counter,
    propagation: prometheus_client::metrics::histogram::Histogram,
    pending: Gauge,
}

impl StateMetrics {
    fn register(registry: &mut Registry) -> Self {
        let version = Gauge::default();
        registry.register(
            "state_version",
            "The version of the mesh state this agent has applied (0: none)",
            version.clone(),
        );
        let updates = Family::<ResultLabel, Counter>::default();
        registry.register(
            "state_updates",
            "Mesh state versions received, by result: applied, or refused (bad digest or schema, \
             unreadable as a whole; the applied state stays)",
            updates.clone(),
        );
        let entries_refused = Counter::default();
        registry.register(
            "state_entries_refused",
            "Entries of received mesh states refused on their own (the rest was applied)",
            entries_refused.clone(),
        );
        let propagation = prometheus_client::metrics::histogram::Histogram::new([
            0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        registry.register(
            "state_propagation_seconds",
            "Time from a change at the authority's source to this agent having applied it",
            propagation.clone(),
        );
        let config_rejected = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "config_rejected",
            "Configuration refused by this agent (nodes with pinned signers), by reason: \
             malformed, oversized, schema, digest_mismatch, missing_signature, bad_signature, \
             unknown_signer, retired_signer, rollback, content_mismatch (the active one stays)",
            config_rejected.clone(),
        );
        for reason in crate::bundle::REASONS
            .iter()
            .chain(&[crate::state::signed::CONTENT_MISMATCH])
        {
            let _ = config_rejected.get_or_create(&ReasonLabel { reason });
        }
        let config_unauthorized = Counter::default();
        registry.register(
            "config_unauthorized_loads",
            "Policy generations found active that this agent did not write from verified \
             configuration (policy apply by hand, a direct map write); each was replaced by the \
             verified policy",
            config_unauthorized.clone(),
        );
        let config_drift = Gauge::default();
        registry.register(
            "config_drift",
            "1 while the newest configuration received from the authority (the intended one) \
             is not the one applied (it was refused), else 0",
            config_drift.clone(),
        );
        let config_active_version = Gauge::default();
        registry.register(
            "config_active_version",
            "The version of the signed configuration bundle this agent applied (0: none)",
            config_active_version.clone(),
        );
        let config_state = Family::<ConfigStateLabel, Gauge>::default();
        registry.register(
            "config_state",
            "1 for the state the kernel enforces, read from the pinned config slot: baseline \
             (no verified configuration: the pod tree neither sends nor receives) or active (a \
             configuration is programmed); 0 for the other",
            config_state.clone(),
        );
        for state in CONFIG_STATES {
            let _ = config_state.get_or_create(&ConfigStateLabel { state });
        }
        let config_last_verified = Gauge::default();
        registry.register(
            "config_last_verified_timestamp_seconds",
            "When this agent last verified and applied a signed configuration bundle (Unix time)",
            config_last_verified.clone(),
        );
        let pending = Gauge::default();
        registry.register(
            "state_pending_workloads",
            "Workloads of this node in the state whose cgroup does not exist yet (enrolled when \
             it appears)",
            pending.clone(),
        );
        Self {
            config_state,
            config_rejected,
            config_unauthorized,
            config_drift,
            config_active_version,
            config_last_verified,
            version,
            updates,
            entries_refused,
            propagation,
            pending,
        }
    }
}

struct AuditMetrics {
    records: Family<ResultLabel, Counter>,
    checkpoints: Counter,
    write_errors: Counter,
    forwarded: Family<ResultLabel, Counter>,
}

impl AuditMetrics {
    fn register(registry: &mut Registry) -> Self {
        let records = Family::<ResultLabel, Counter>::default();
        registry.register(
            "audit_records",
            "Audit records by result: written, or lost (the queue was full or a write failed; \
             every loss is itself recorded in a records_lost record)",
            records.clone(),
        );
        let checkpoints = Counter::default();
        registry.register(
            "audit_checkpoints",
            "Signed checkpoints of the audit chain head written",
            checkpoints.clone(),
        );
        let write_errors = Counter::default();
        registry.register(
            "audit_write_errors",
            "Failed writes to the audit log (segments or checkpoints)",
            write_errors.clone(),
        );
        let forwarded = Family::<ResultLabel, Counter>::default();
        registry.register(
            "audit_checkpoints_forwarded",
            "Audit checkpoints handed to the authority, by result: sent (kept there), refused \
             (by the authority), dropped (the queue to it was full), retried (it was unreachable)",
            forwarded.clone(),
        );
        Self {
            records,
            checkpoints,
            write_errors,
            forwarded,
        }
    }
}

/// Refreshes scrape-time values (certificate expiries, rotations, kernel counters).
pub trait ScrapeHook: Send + Sync {
    fn refresh(&self, metrics: &Metrics);
}

/// Every metric the agent exports. Cheap to share (`Arc<Metrics>`).
pub struct Metrics {
    registry: Registry,
    tls_handshakes: Family<SideOutcome, Counter>,
    hbone_streams: Family<SideOutcome, Counter>,
    cert_expiry: Family<IdentityLabel, Gauge>,
    service_connections: Family<ServiceLabels, Counter>,
    cert_rotations: Family<ResultLabel, Counter>,
    plaintext: Family<VerdictLabel, Counter>,
    active: Family<DirectionLabel, Gauge>,
    kernel: Family<CounterLabel, Counter>,
    policy_generation: Gauge,
    policy_applies: Family<ResultLabel, Counter>,
    policy_denials: Family<DenialLabels, Counter>,
    connections_refused: Family<RefusalLabels, Counter>,
    connection_limit: Gauge,
    audit: AuditMetrics,
    state: StateMetrics,
    /// Last totals seen for counters whose owners keep totals (advanced by the delta).
    seen: std::sync::Mutex<std::collections::HashMap<&'static str, u64>>,
    hooks: std::sync::RwLock<Vec<Arc<dyn ScrapeHook>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mesh");
        let tls_handshakes = Family::<SideOutcome, Counter>::default();
        registry.register(
            "tls_handshakes",
            "mTLS handshakes on the HBONE port, by side and result",
            tls_handshakes.clone(),
        );
        let hbone_streams = Family::<SideOutcome, Counter>::default();
        registry.register(
            "hbone_streams",
            "HBONE CONNECT streams, by side and result",
            hbone_streams.clone(),
        );
        let cert_expiry = Family::<IdentityLabel, Gauge>::default();
        registry.register(
            "cert_expiry_seconds",
            "Seconds until the workload certificate of each local identity expires",
            cert_expiry.clone(),
        );
        let service_connections = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "service_connections",
            "Connections to service virtual IPs, by service (namespace/name) and result \
             (ok: an endpoint was reached; failed: none was; refused: not a service port, or \
             no endpoint)",
            service_connections.clone(),
        );
        let cert_rotations = Family::<ResultLabel, Counter>::default();
        registry.register(
            "cert_rotations",
            "Workload certificate issuances and rotations, by result",
            cert_rotations.clone(),
        );
        let plaintext = Family::<VerdictLabel, Counter>::default();
        registry.register(
            "plaintext_connections",
            "Plaintext connection attempts to enrolled workloads that did not come through \
             the mesh: refused (STRICT) or accepted and flagged (PERMISSIVE)",
            plaintext.clone(),
        );
        let active = Family::<DirectionLabel, Gauge>::default();
        registry.register(
            "connections_active",
            "Proxied connections in flight, by direction",
            active.clone(),
        );
        let kernel = Family::<CounterLabel, Counter>::default();
        registry.register(
            "kernel",
            "The kernel programs' counters (map mesh_counters, summed over CPUs)",
            kernel.clone(),
        );
        let policy_generation = Gauge::default();
        registry.register(
            "policy_generation",
            "The active authorization policy generation (0: no policy loaded)",
            policy_generation.clone(),
        );
        let policy_applies = Family::<ResultLabel, Counter>::default();
        registry.register(
            "policy_applies",
            "Policy directory applies by this agent (--policy-dir), by result: ok or refused \
             (the active generation stays)",
            policy_applies.clone(),
        );
        let policy_denials = Family::<DenialLabels, Counter>::default();
        registry.register(
            "policy_denials",
            "Connections and requests denied by authorization policy, by layer (l4, l7) and \
             where it was decided (kernel, inbound, local)",
            policy_denials.clone(),
        );
        let connections_refused = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections refused by the resource limits, by proxy (outbound, inbound) and reason: \
             cap (--max-connections), source_cap (--max-connections-per-source), fd_limit \
             (accept failed: out of descriptors), pending_heads (too many incomplete HTTP \
             request heads from one source)",
            connections_refused.clone(),
        );
        let connection_limit = Gauge::default();
        registry.register(
            "connections_limit",
            "Proxied connections the agent serves at once, both proxies together \
             (--max-connections or its default from the open files limit)",
            connection_limit.clone(),
        );
        let audit = AuditMetrics::register(&mut registry);
        let state = StateMetrics::register(&mut registry);
        Self {
            registry,
            audit,
            state,
            tls_handshakes,
            hbone_streams,
            cert_expiry,
            service_connections,
            cert_rotations,
            plaintext,
            active,
            kernel,
            policy_generation,
            policy_applies,
            policy_denials,
            connections_refused,
            connection_limit,
            seen: std::sync::Mutex::new(std::collections::HashMap::new()),
            hooks: std::sync::RwLock::new(Vec::new()),
        }
    }

    pub fn add_hook(&self, hook: Arc<dyn ScrapeHook>) {
        self.hooks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(hook);
    }

    pub fn tls_handshake(&self, side: Side, result: Outcome) {
        self.tls_handshakes
            .get_or_create(&SideOutcome::new(side, result))
            .inc();
    }

    pub fn hbone_stream(&self, side: Side, result: Outcome) {
        self.hbone_streams
            .get_or_create(&SideOutcome::new(side, result))
            .inc();
    }

    pub fn plaintext(&self, verdict: PlaintextVerdict) {
        self.plaintext
            .get_or_create(&VerdictLabel {
                verdict: verdict.as_str(),
            })
            .inc();
    }

    /// A mesh state version applied; `propagation`: since the change at the source.
    pub fn state_applied(&self, version: u64, propagation: Option<Duration>, pending: usize) {
        self.state
            .version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        self.state
            .updates
            .get_or_create(&ResultLabel { result: "applied" })
            .inc();
        if let Some(d) = propagation {
            self.state.propagation.observe(d.as_secs_f64());
        }
        self.state.pending.set(pending as i64);
    }

    /// A configuration refused (`reason`: a `mesh_config_rejected_total` label).
    pub fn config_rejected(&self, reason: &'static str) {
        self.state
            .config_rejected
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// An unauthorized policy load found (and reverted).
    pub fn config_unauthorized_load(&self) {
        self.state.config_unauthorized.inc();
    }

    /// Whether the kernel enforces the safe baseline (else a programmed configuration).
    pub fn set_config_state(&self, baseline: bool) {
        for state in CONFIG_STATES {
            let on = (state == "baseline") == baseline;
            self.state
                .config_state
                .get_or_create(&ConfigStateLabel { state })
                .set(i64::from(on));
        }
    }

    /// Whether the intended configuration is not the active one.
    pub fn set_config_drift(&self, drift: bool) {
        self.state.config_drift.set(i64::from(drift));
    }

    /// A signed configuration bundle `version` verified and applied now.
    pub fn config_verified(&self, version: u64) {
        self.state
            .config_active_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        self.state
            .config_last_verified
            .set(crate::state::now_unix_ms() as i64 / 1000);
    }

    /// A mesh state version refused as a whole.
    pub fn state_refused(&self) {
        self.state
            .updates
            .get_or_create(&ResultLabel { result: "refused" })
            .inc();
    }

    /// Entries of a mesh state refused on their own.
    pub fn state_entries_refused(&self, n: usize) {
        self.state.entries_refused.inc_by(n as u64);
    }

    /// Local workloads waiting for their cgroup.
    pub fn set_state_pending(&self, pending: usize) {
        self.state.pending.set(pending as i64);
    }

    /// The active policy generation.
    pub fn set_policy_generation(&self, generation: u32) {
        self.policy_generation.set(i64::from(generation));
    }

    pub fn policy_apply(&self, result: ApplyResult) {
        self.policy_applies
            .get_or_create(&ResultLabel {
                result: result.as_str(),
            })
            .inc();
    }

    /// One connection or request denied by policy.
    pub fn policy_denial(&self, layer: PolicyLayer, side: DenialSide) {
        self.policy_denials
            .get_or_create(&DenialLabels {
                layer: layer.as_str(),
                side: side.as_str(),
            })
            .inc();
    }

    /// One connection, tunnel or request head refused by the resource limits.
    pub fn connection_refused(&self, proxy: Direction, reason: RefusalReason) {
        self.connections_refused
            .get_or_create(&RefusalLabels {
                proxy: proxy.as_str(),
                reason: reason.as_str(),
            })
            .inc();
    }

    /// The connection budget in force.
    pub fn set_connection_limit(&self, limit: usize) {
        self.connection_limit
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
    }

    /// Counts a connection in flight until the guard is dropped.
    pub fn active(&self, direction: Direction) -> ActiveGuard {
        let gauge = self
            .active
            .get_or_create(&DirectionLabel {
                direction: direction.as_str(),
            })
            .clone();
        gauge.inc();
        ActiveGuard(gauge)
    }

    /// One connection to service `service` (`namespace/name`) ended set-up with `result`
    /// (`ok`, `failed` or `refused`).
    pub fn service_connection(&self, service: &str, result: &'static str) {
        self.service_connections
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
                result,
            })
            .inc();
    }

    /// Sets every workload certificate's remaining lifetime; identities not listed (workloads
    /// that left the node) are removed from the family.
    pub fn set_cert_expiries(&self, expiries: &[(String, Duration)]) {
        self.cert_expiry.clear();
        for (id, remaining) in expiries {
            self.set_cert_expiry(id, *remaining);
        }
    }

    pub fn set_cert_expiry(&self, identity: &str, remaining: Duration) {
        self.cert_expiry
            .get_or_create(&IdentityLabel {
                identity: identity.to_owned(),
            })
            .set(i64::try_from(remaining.as_secs()).unwrap_or(i64::MAX));
    }

    /// Brings the rotation counters up to the identity manager's totals.
    pub fn set_cert_rotations(&self, ok: u64, error: u64) {
        for (result, key, total) in [
            (Outcome::Ok, "rot_ok", ok),
            (Outcome::Error, "rot_err", error),
        ] {
            let delta = self.advance(key, total);
            self.cert_rotations
                .get_or_create(&ResultLabel {
                    result: result.as_str(),
                })
                .inc_by(delta);
        }
    }

    /// Brings a kernel counter up to its current total (read from the per-CPU map).
    pub fn set_kernel_counter(&self, counter: &'static str, total: u64) {
        let delta = self.advance(counter, total);
        self.kernel
            .get_or_create(&CounterLabel { counter })
            .inc_by(delta);
    }

    /// Brings the audit log's counters up to its totals.
    pub fn set_audit(&self, stats: &crate::audit::AuditStats) {
        use std::sync::atomic::Ordering::Relaxed;
        for (result, key, total) in [
            ("written", "audit_written", stats.written.load(Relaxed)),
            ("lost", "audit_lost", stats.lost.load(Relaxed)),
        ] {
            let delta = self.advance(key, total);
            self.audit
                .records
                .get_or_create(&ResultLabel { result })
                .inc_by(delta);
        }
        let delta = self.advance("audit_checkpoints", stats.checkpoints.load(Relaxed));
        self.audit.checkpoints.inc_by(delta);
        let delta = self.advance("audit_write_errors", stats.write_errors.load(Relaxed));
        self.audit.write_errors.inc_by(delta);
    }

    /// Brings the checkpoint forwarding counters up to their totals.
    pub fn set_audit_forward(&self, stats: &crate::audit::forward::ForwardStats) {
        use std::sync::atomic::Ordering::Relaxed;
        for (result, key, total) in [
            ("sent", "audit_fwd_sent", stats.sent.load(Relaxed)),
            ("refused", "audit_fwd_refused", stats.refused.load(Relaxed)),
            ("dropped", "audit_fwd_dropped", stats.dropped.load(Relaxed)),
            ("retried", "audit_fwd_retried", stats.retries.load(Relaxed)),
        ] {
            let delta = self.advance(key, total);
            self.audit
                .forwarded
                .get_or_create(&ResultLabel { result })
                .inc_by(delta);
        }
    }

    /// How far `total` is past the last total seen under `key` (0 if it went backwards,
    /// e.g. a map recreated by a restarted agent: counters never decrease).
    fn advance(&self, key: &'static str, total: u64) -> u64 {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let last = seen.entry(key).or_insert(0);
        let delta = total.saturating_sub(*last);
        *last = (*last).max(total);
        delta
    }

    /// The OpenMetrics text of every metric, scrape hooks run first.
    pub fn render(&self) -> String {
        let hooks = self.hooks.read().unwrap_or_else(|p| p.into_inner()).clone();
        for hook in hooks {
            hook.refresh(self);
        }
        let mut out = String::with_capacity(4096);
        if let Err(e) = encode(&mut out, &self.registry) {
            // Only a fmt::Write failure, which String does not have.
            let _ = write!(out, "# encoding failed: {e}\n# EOF\n");
        }
        out
    }
}

/// Decrements a `connections_active` gauge on drop.
#[derive(Debug)]
pub struct ActiveGuard(Gauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Largest admin request head accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// Admin connections served at once.
const MAX_ADMIN_CONNS: usize = 64;
const ADMIN_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `/metrics` and `/healthz` on `listener` until `stop` turns true (the shared
/// accept loop, [`crate::proxy::listen::accept_loop`]).
pub async fn serve_admin(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    allow: AdminAllow,
    stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNS));
    let mut refused: u64 = 0;
    let accept = || crate::proxy::listen::accept_retrying("admin", || listener.accept());
    crate::proxy::listen::accept_loop(
        accept,
        stop,
        ADMIN_IO_TIMEOUT,
        "admin connections",
        |(stream, peer): (TcpStream, SocketAddr)| {
            if !allow.permits(peer.ip()) {
                // Pods reach the node address too: only the node itself and the configured
                // scrapers may read the admin port.
                refused += 1;
                if refused.is_power_of_two() {
                    warn!(%peer, refused, "admin: connection from an address not allowed (--admin-allow); closed");
                }
                return None;
            }
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                debug!(%peer, "admin: too many connections");
                return None;
            };
            let metrics = Arc::clone(&metrics);
            Some(async move {
                let _permit = permit;
                if let Err(e) = timeout(ADMIN_IO_TIMEOUT, admin_conn(stream, &metrics)).await {
                    debug!(%peer, error = %e, "admin request timed out");
                }
            })
        },
    )
    .await;
}

/// Who may connect to the admin port: the node's own addresses (processes on the host), and
/// the networks of `--admin-allow` (loopback by default; add the Prometheus scrapers'). Pods,
/// whose addresses are their own, are refused.
#[derive(Clone, Debug, Default)]
pub struct AdminAllow {
    pub nets: Vec<crate::policy::model::IpNet>,
    pub node_addrs: Vec<std::net::IpAddr>,
}

impl AdminAllow {
    pub fn permits(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.node_addrs.iter().any(|a| a.to_canonical() == ip)
            || self.nets.iter().any(|n| n.contains(ip))
    }
}

async fn admin_conn(mut stream: TcpStream, metrics: &Metrics) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_REQUEST {
            let _ = respond(
                &mut stream,
                "400 Bad Request",
                "text/plain",
                "request too large\n",
            )
            .await;
            return;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let _ = match (method, path) {
        ("GET", "/metrics") => {
            respond(
                &mut stream,
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                &metrics.render(),
            )
            .await
        }
        ("GET", "/healthz") => respond(&mut stream, "200 OK", "text/plain", "ok\n").await,
        ("GET", _) => respond(&mut stream, "404 Not Found", "text/plain", "not found\n").await,
        _ => {
            respond(
                &mut stream,
                "400 Bad Request",
                "text/plain",
                "bad request\n",
            )
            .await
        }
    };
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Binds the admin listener (before anything is attached, like the proxies).
pub async fn bind_admin(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_documented_names() {
        let m = Metrics::new();
        m.tls_handshake(Side::Server, Outcome::Ok);
        m.tls_handshake(Side::Client, Outcome::Error);
        m.plaintext(PlaintextVerdict::Refused);
        m.set_cert_expiry("spiffe://td/ns/default/sa/a", Duration::from_secs(3600));
        m.set_cert_rotations(2, 1);
        m.hbone_stream(Side::Server, Outcome::Ok);
        let _g = m.active(Direction::Inbound);
        m.set_policy_generation(7);
        m.policy_apply(ApplyResult::Ok);
        m.policy_apply(ApplyResult::Refused);
        m.policy_apply(ApplyResult::Refused);
        m.policy_denial(PolicyLayer::L4, DenialSide::Kernel);
        m.policy_denial(PolicyLayer::L7, DenialSide::Local);
        m.connection_refused(Direction::Outbound, RefusalReason::Cap);
        m.connection_refused(Direction::Inbound, RefusalReason::PendingHeads);
        m.set_connection_limit(832);
        let fwd = crate::audit::forward::ForwardStats::default();
        fwd.sent.store(3, std::sync::atomic::Ordering::Relaxed);
        fwd.dropped.store(1, std::sync::atomic::Ordering::Relaxed);
        m.set_audit_forward(&fwd);
        let text = m.render();
        for needle in [
            r#"mesh_tls_handshakes_total{side="server",result="ok"} 1"#,
            r#"mesh_tls_handshakes_total{side="client",result="error"} 1"#,
            r#"mesh_plaintext_connections_total{verdict="refused"} 1"#,
            r#"mesh_cert_expiry_seconds{identity="spiffe://td/ns/default/sa/a"} 3600"#,
            r#"mesh_cert_rotations_total{result="ok"} 2"#,
            r#"mesh_hbone_streams_total{side="server",result="ok"} 1"#,
            r#"mesh_connections_active{direction="inbound"} 1"#,
            "mesh_policy_generation 7",
            r#"mesh_policy_applies_total{result="ok"} 1"#,
            r#"mesh_policy_applies_total{result="refused"} 2"#,
            r#"mesh_policy_denials_total{layer="l4",side="kernel"} 1"#,
            r#"mesh_policy_denials_total{layer="l7",side="local"} 1"#,
            r#"mesh_connections_refused_total{proxy="outbound",reason="cap"} 1"#,
            r#"mesh_connections_refused_total{proxy="inbound",reason="pending_heads"} 1"#,
            "mesh_connections_limit 832",
            r#"mesh_audit_checkpoints_forwarded_total{result="sent"} 3"#,
            r#"mesh_audit_checkpoints_forwarded_total{result="dropped"} 1"#,
        ] {
            assert!(text.contains(needle), "missing {needle} in:\n{text}");
        }
    }

    #[tokio::test]
    async fn admin_serves_metrics_and_refuses_junk() {
        let listener = bind_admin("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        metrics.plaintext(PlaintextVerdict::Permissive);
        let (stop_tx, stop_rx) = watch::channel(false);
        let allow = AdminAllow {
            nets: vec![crate::policy::parse::parse_cidr("127.0.0.0/8").unwrap()],
            node_addrs: vec![],
        };
        let server = tokio::spawn(serve_admin(listener, Arc::clone(&metrics), allow, stop_rx));
        let get = |req: &'static [u8]| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(req).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains(r#"mesh_plaintext_connections_total{verdict="permissive"} 1"#));
        assert!(get(b"GET /nope HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 404"));
        assert!(get(b"\x16\x03\x01garbage\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 400"));
        let _ = stop_tx.send(true);
        server.await.unwrap();
    }

    #[test]
    fn admin_allow_admits_the_node_and_listed_networks_only() {
        let allow = AdminAllow {
            nets: vec![
                crate::policy::parse::parse_cidr("127.0.0.0/8").unwrap(),
                crate::policy::parse::parse_cidr("fd00:9::/64").unwrap(),
            ],
            node_addrs: vec!["10.0.0.1".parse().unwrap()],
        };
        for ok in ["127.0.0.1", "10.0.0.1", "::ffff:10.0.0.1", "fd00:9::5"] {
            assert!(allow.permits(ok.parse().unwrap()), "{ok}");
        }
        for no in ["10.1.0.2", "10.0.0.2", "::1", "fd00:8::1", "0.0.0.0"] {
            assert!(!allow.permits(no.parse().unwrap()), "{no}");
        }
    }
}
