//! The agent side of the mesh state: the applied version as the proxies read it
//! ([`MeshHandle`]), and the one place that makes the node match a version ([`Applier`]).
//!
//! Applying a version, in this order:
//! 1. verify the snapshot (schema, digest) and validate it entry by entry — a bad entry is
//!    refused (logged with its line in the snapshot, counted), the rest applied; a snapshot
//!    that cannot be read at all changes nothing;
//! 2. hand the node's workload identities to the identity manager (new ones get certificates,
//!    removed ones lose theirs);
//! 3. publish the version to the proxies (they look up each new connection in it);
//! 4. program the kernel maps from it: destinations (every workload address and service VIP:
//!    what is sent to a new workload is captured at once, never plaintext), this node's
//!    addresses, and the enrolled cgroups (a new local workload is enrolled as soon as its
//!    cgroup exists — [`Applier::resolve_pending`] retries; a removed one is unenrolled);
//! 5. close the live connections of removed workloads, and of workloads whose identity, node
//!    or addresses changed ([`Closers`]);
//! 6. persist the snapshot (the agent restarts from it when the authority is unreachable).
//!
//! Ids come with the state (assigned by the authority, stable per `namespace/name`), so a
//! version that only adds a workload leaves every other map entry as it was.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_common::{
    CgroupKey, DestValue, IpKey, PeerValue, WorkloadValue, DEST_F_SERVICE, WORKLOAD_F_CAPTURE,
    WORKLOAD_F_PERMISSIVE,
};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{now_unix_ms, Snapshot, StateError};
use crate::{
    audit::AuditLog,
    bpf::{BpfError, Dataplane},
    metrics::Metrics,
    policy::{engine::PolicyView, Policies},
    proxy::ip_words,
    registry::{Registry, RegistryError, Workload},
    tls::{SpiffeId, TrustDomain},
};

/// One applied version of the mesh.
#[derive(Debug)]
pub struct MeshState {
    /// 0 before any version was applied.
    pub version: u64,
    /// The snapshot's digest (empty before any version).
    pub digest: String,
    pub registry: Arc<Registry>,
    /// The policies of the verified configuration bundle this version came with (nodes with
    /// pinned signers); `None`: policy comes from `--policy-dir` or `policy apply`.
    pub policies: Option<Arc<[crate::bundle::PolicyFile]>>,
    /// Workload id → its SPIFFE identity (workloads whose identity is valid).
    identities: HashMap<u32, SpiffeId>,
}

impl MeshState {
    /// A state of `registry` (identities in `trust_domain`).
    pub fn new(
        version: u64,
        digest: String,
        registry: Registry,
        trust_domain: &TrustDomain,
    ) -> Self {
        let identities = registry
            .workloads
            .iter()
            .filter_map(|w| Some((w.id, w.identity(trust_domain).ok()?)))
            .collect();
        Self {
            version,
            digest,
            registry: Arc::new(registry),
            policies: None,
            identities,
        }
    }

    /// This state with the policies of its verified bundle.
    pub fn with_policies(mut self, policies: Option<Arc<[crate::bundle::PolicyFile]>>) -> Self {
        self.policies = policies;
        self
    }

    /// The identity of workload `id`.
    pub fn identity(&self, id: u32) -> Option<&SpiffeId> {
        self.identities.get(&id)
    }
}

/// The applied mesh state, shared by everything that reads it. A connection reads it once
/// ([`MeshHandle::load`]) and keeps that version for its lifetime; [`MeshHandle::closers`]
/// ends it early when its workload goes away.
#[derive(Clone, Debug)]
pub struct MeshHandle {
    rx: watch::Receiver<Arc<MeshState>>,
    closers: Arc<Closers>,
    /// The last version refused ([`Applier::note_refused`]), reported to the authority.
    refused: watch::Receiver<Option<crate::authority::protocol::Refused>>,
}

impl MeshHandle {
    /// A handle whose state never changes (tests, one-shot commands).
    pub fn fixed(registry: Registry, trust_domain: &TrustDomain) -> Self {
        let closers = Arc::new(Closers::default());
        closers.sync(registry.workloads.iter().map(|w| w.id), &BTreeSet::new());
        let (_tx, rx) = watch::channel(Arc::new(MeshState::new(
            0,
            String::new(),
            registry,
            trust_domain,
        )));
        let (_refused_tx, refused) = watch::channel(None);
        Self {
            rx,
            closers,
            refused,
        }
    }

    /// The last version this node refused to apply (rollouts halt on a canary's refusal).
    pub fn refused(&self) -> watch::Receiver<Option<crate::authority::protocol::Refused>> {
        self.refused.clone()
    }

    /// The current version.
    pub fn load(&self) -> Arc<MeshState> {
        Arc::clone(&self.rx.borrow())
    }

    /// The current registry.
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.rx.borrow().registry)
    }

    /// Wakes when a new version is applied.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MeshState>> {
        self.rx.clone()
    }

    pub fn closers(&self) -> &Closers {
        &self.closers
    }
}

/// Per-workload signals that close the live connections of a workload that went away.
#[derive(Debug, Default)]
pub struct Closers {
    map: Mutex<HashMap<u32, watch::Sender<bool>>>,
}

/// Resolves when any of the watched workloads is closed.
pub struct Closed {
    rx: Vec<watch::Receiver<bool>>,
}

impl Closers {
    /// A signal for the connections of workloads `ids` (0 stands for none). A workload that
    /// is not (or no longer) in the state is closed already.
    pub fn watch(&self, ids: &[u32]) -> Closed {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let rx = ids
            .iter()
            .filter(|&&id| id != 0)
            .map(|id| match map.get(id) {
                Some(tx) => tx.subscribe(),
                None => watch::channel(true).1,
            })
            .collect();
        Closed { rx }
    }

    /// Keeps a signal for every id of `live`; closes `close` and every id not in `live`.
    fn sync(&self, live: impl Iterator<Item = u32>, close: &BTreeSet<u32>) -> usize {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let live: std::collections::HashSet<u32> = live.collect();
        let mut closed = 0;
        map.retain(|id, tx| {
            if live.contains(id) && !close.contains(id) {
                return true;
            }
            if tx.receiver_count() > 0 {
                closed += tx.receiver_count();
            }
            tx.send_replace(true);
            false
        });
        for id in live {
            map.entry(id).or_insert_with(|| watch::channel(false).0);
        }
        closed
    }
}

impl Closed {
    /// A signal that never fires (connections no state change can close).
    pub fn never() -> Self {
        Self { rx: Vec::new() }
    }

    /// Never resolves when nothing is watched.
    pub async fn wait(mut self) {
        if self.rx.is_empty() {
            return std::future::pending().await;
        }
        let waits = self.rx.iter_mut().map(|rx| {
            Box::pin(async move {
                let _ = rx.wait_for(|c| *c).await;
            })
        });
        futures_select_all(waits).await;
    }
}

/// The first of `futs` to complete.
async fn futures_select_all<F: std::future::Future<Output = ()> + Unpin>(
    futs: impl Iterator<Item = F>,
) {
    let mut futs: Vec<F> = futs.collect();
    std::future::poll_fn(|cx| {
        for f in &mut futs {
            if std::pin::Pin::new(f).poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Why a version was not applied (the applied state stays).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Snapshot(#[from] StateError),
    #[error("state version {version}: {source}")]
    Registry {
        version: u64,
        #[source]
        source: super::ContentError,
    },
    #[error("programming the kernel maps: {0}")]
    Maps(#[from] BpfError),
    #[error(transparent)]
    Signed(#[from] super::signed::SignedError),
}

/// What the identity layer does with the node's workloads (the identity manager; tests can
/// record the calls).
pub trait WorkloadIdentities: Send + Sync {
    fn set_workloads(&self, ids: Vec<SpiffeId>);
}

/// The fixed parts of the node the state is applied to.
pub struct NodeContext {
    pub node: String,
    pub cgroup_root: PathBuf,
    pub trust_domain: TrustDomain,
    /// Where the last applied snapshot is persisted (`None`: not persisted).
    pub state_dir: Option<PathBuf>,
    /// Pinned signers and the highest version applied: with them, only signed configuration
    /// is applied ([`super::signed`]).
    pub guard: Option<super::signed::Guard>,
}

/// Makes the node match each version it is given.
pub struct Applier {
    ctx: NodeContext,
    tx: watch::Sender<Arc<MeshState>>,
    closers: Arc<Closers>,
    programmer: Arc<Programmer>,
    identities: Arc<dyn WorkloadIdentities>,
    metrics: Arc<Metrics>,
    audit: Option<AuditLog>,
    /// The registry as applied, with local cgroups resolved since (pending ones).
    current: Registry,
    refused: watch::Sender<Option<crate::authority::protocol::Refused>>,
}

/// What one apply did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub version: u64,
    pub added: usize,
    pub removed: usize,
    pub changed: usize,
    pub refused: usize,
    pub pending: usize,
}

impl Applier {
    /// An applier starting from `initial` (already validated; see [`Applier::parse`]).
    /// Returns it and the handle the proxies read.
    pub fn new(
        ctx: NodeContext,
        initial: MeshState,
        programmer: Arc<Programmer>,
        identities: Arc<dyn WorkloadIdentities>,
        metrics: Arc<Metrics>,
        audit: Option<AuditLog>,
    ) -> (Self, MeshHandle) {
        let closers = Arc::new(Closers::default());
        closers.sync(
            initial.registry.workloads.iter().map(|w| w.id),
            &BTreeSet::new(),
        );
        let current = (*initial.registry).clone();
        let (tx, rx) = watch::channel(Arc::new(initial));
        let (refused, refused_rx) = watch::channel(None);
        (
            Self {
                refused,
                ctx,
                tx,
                closers: Arc::clone(&closers),
                programmer,
                identities,
                metrics,
                audit,
                current,
            },
            MeshHandle {
                rx,
                closers,
                refused: refused_rx,
            },
        )
    }

    /// Validates `snapshot` for node `node` entry by entry: the registry and the refused
    /// entries. `Err` when it cannot be used at all.
    pub fn parse(
        snapshot: &Snapshot,
        node: &str,
        cgroup_root: &Path,
    ) -> Result<(Registry, Vec<RegistryError>), ApplyError> {
        snapshot.verify()?;
        let label = PathBuf::from(format!("state v{}", snapshot.version));
        let parsed = snapshot
            .parse_registry(&label, Some(node), cgroup_root)
            .map_err(|source| ApplyError::Registry {
                version: snapshot.version,
                source,
            })?;
        let registry = parsed.registry;
        Ok((registry, parsed.refused))
    }

    /// The applied version.
    pub fn version(&self) -> u64 {
        self.tx.borrow().version
    }

    /// The applied version's digest.
    pub fn digest(&self) -> String {
        self.tx.borrow().digest.clone()
    }

    /// `mesh_config_drift`: 1 while the newest state received (`intended`) is not the one
    /// applied (it was refused), else 0.
    pub fn report_drift(&self, intended: &Snapshot) {
        let applied = self.tx.borrow();
        self.metrics.set_config_drift(
            applied.version != intended.version || applied.digest != intended.digest,
        );
    }

    /// Records that `snapshot` was refused (`reason`: its label and detail), for the
    /// authority's rollout ([`MeshHandle::refused`]).
    pub fn note_refused(&self, snapshot: &Snapshot, reason: &str) {
        let max = crate::authority::protocol::MAX_REFUSED_REASON;
        let mut end = reason.len().min(max);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        self.refused
            .send_replace(Some(crate::authority::protocol::Refused {
                version: snapshot.version,
                digest: snapshot.digest.clone(),
                reason: reason[..end].to_owned(),
            }));
    }

    /// Applies `snapshot`. A refusal changes nothing.
    pub fn apply(&mut self, snapshot: &Snapshot) -> Result<Applied, ApplyError> {
        let started = std::time::Instant::now();
        // Parsed first: the signed check compares this parse with the bundle's registry.
        let parsed = Self::parse(snapshot, &self.ctx.node, &self.ctx.cgroup_root);
        let parse_ms = started.elapsed().as_millis() as u64;
        let verify_started = std::time::Instant::now();
        let verified = match self.ctx.guard.as_mut() {
            None => None,
            Some(guard) => {
                guard.reload_signers();
                let published = parsed.as_ref().ok().map(|(r, _)| r);
                match guard.check(snapshot, published, &self.ctx.node, &self.ctx.cgroup_root) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        self.metrics.config_rejected(e.reason());
                        warn!(version = snapshot.version, reason = e.reason(), error = %e,
                              source = %snapshot.source, "configuration refused; the active one stays");
                        if let Some(a) = &self.audit {
                            a.config_event(
                                "refused",
                                "bundle",
                                Some(snapshot.version),
                                Some(format!("{}: {e}", e.reason())),
                            );
                        }
                        return Err(e.into());
                    }
                }
            }
        };
        let verify_ms = verify_started.elapsed().as_millis() as u64;
        let (registry, refused) = match parsed {
            Ok(p) => p,
            Err(e) => {
                self.metrics.state_refused();
                if let Some(a) = &self.audit {
                    a.config_event(
                        "refused",
                        "state",
                        Some(snapshot.version),
                        Some(crate::error_chain(&e)),
                    );
                }
                return Err(e);
            }
        };
        for e in &refused {
            warn!(version = snapshot.version, error = %e, "state entry refused; the rest is applied");
        }
        self.metrics.state_entries_refused(refused.len());
        if registry.node(&self.ctx.node).is_none() {
            warn!(node = %self.ctx.node, version = snapshot.version,
                  "this node is not in the state's nodes: no local workload is enrolled");
        }
        let old = std::mem::replace(&mut self.current, registry.clone());
        let diff = Diff::of(&old, &registry);

        // 2. Identities of this node's workloads.
        let local: Vec<SpiffeId> = registry
            .local(&self.ctx.node)
            .filter_map(|w| w.identity(&self.ctx.trust_domain).ok())
            .collect();
        self.identities.set_workloads(local);

        // 3. The proxies see the new version.
        let state = Arc::new(
            MeshState::new(
                snapshot.version,
                snapshot.digest.clone(),
                registry,
                &self.ctx.trust_domain,
            )
            .with_policies(verified.as_ref().map(|v| Arc::clone(&v.policies))),
        );
        self.tx.send_replace(Arc::clone(&state));

        // 4. The kernel maps.
        let maps_started = std::time::Instant::now();
        let programmed = self.programmer.program(&state.registry);
        let maps_ms = maps_started.elapsed().as_millis() as u64;

        // 5. Connections of workloads gone or re-keyed.
        let closed = self
            .closers
            .sync(state.registry.workloads.iter().map(|w| w.id), &diff.changed);

        // 6. Persisted (and, signed, never anything below this version again).
        if let (Some(guard), Some(v)) = (self.ctx.guard.as_mut(), &verified) {
            match guard.applied(v) {
                Ok(()) => self.metrics.config_verified(v.version),
                Err(e) => warn!(error = %e, "persisting the highest configuration version"),
            }
        }
        if let Some(dir) = &self.ctx.state_dir {
            if let Err(e) = snapshot.persist(dir) {
                warn!(error = %e, "persisting the applied state; a restart without the authority uses the previous one");
            }
        }
        let pending = state.registry.pending(&self.ctx.node).count();
        let propagation = now_unix_ms().checked_sub(snapshot.changed_unix_ms);
        self.metrics.state_applied(
            snapshot.version,
            propagation.map(Duration::from_millis),
            pending,
        );
        let applied = Applied {
            version: snapshot.version,
            added: diff.added,
            removed: diff.removed,
            changed: diff.changed.len(),
            refused: refused.len(),
            pending,
        };
        info!(
            version = snapshot.version,
            digest = %snapshot.short_digest(),
            workloads = state.registry.workloads.len(),
            services = state.registry.services.services.len(),
            nodes = state.registry.nodes.len(),
            added = applied.added,
            removed = applied.removed,
            changed = applied.changed,
            refused = applied.refused,
            pending,
            connections_closed = closed,
            propagation_ms = propagation,
            apply_ms = started.elapsed().as_millis() as u64,
            parse_ms,
            verify_ms,
            maps_ms,
            "state applied"
        );
        if let Some(a) = &self.audit {
            a.config_event(
                "accepted",
                "state",
                Some(snapshot.version),
                Some(format!(
                    "{} added, {} removed, {} changed, {} refused",
                    applied.added, applied.removed, applied.changed, applied.refused
                )),
            );
        }
        programmed?;
        Ok(applied)
    }

    /// Enrols local workloads whose cgroup appeared since; true when any did.
    pub fn resolve_pending(&mut self) -> bool {
        if self.current.pending(&self.ctx.node).next().is_none() {
            return false;
        }
        let resolved = self
            .current
            .resolve_pending(&self.ctx.node, &self.ctx.cgroup_root);
        if resolved.is_empty() {
            return false;
        }
        let prev = self.tx.borrow().clone();
        let state = Arc::new(
            MeshState::new(
                prev.version,
                prev.digest.clone(),
                self.current.clone(),
                &self.ctx.trust_domain,
            )
            .with_policies(prev.policies.clone()),
        );
        self.tx.send_replace(Arc::clone(&state));
        let pending = state.registry.pending(&self.ctx.node).count();
        self.metrics.set_state_pending(pending);
        match self.programmer.program(&state.registry) {
            Ok(()) => info!(resolved = ?resolved, pending, "workload cgroups appeared: enrolled"),
            Err(e) => warn!(error = %e, "enrolling workloads whose cgroup appeared"),
        }
        true
    }
}

/// What changed between two registries, by workload id.
struct Diff {
    added: usize,
    removed: usize,
    /// Ids whose identity, node or addresses changed: their connections are closed.
    changed: BTreeSet<u32>,
}

impl Diff {
    fn of(old: &Registry, new: &Registry) -> Self {
        let mut added = 0;
        let mut changed = BTreeSet::new();
        for w in &new.workloads {
            match old.by_id(w.id) {
                None => added += 1,
                Some(o) if rekeyed(o, w) => {
                    changed.insert(w.id);
                }
                Some(_) => {}
            }
        }
        let removed = old
            .workloads
            .iter()
            .filter(|w| new.by_id(w.id).is_none())
            .count();
        Self {
            added,
            removed,
            changed,
        }
    }
}

/// Whether a workload's live connections no longer describe it.
fn rekeyed(old: &Workload, new: &Workload) -> bool {
    old.key() != new.key()
        || old.service_account != new.service_account
        || old.node != new.node
        || old.ips != new.ips
        || old.cgroup_id.is_some() && new.cgroup_id.is_some() && old.cgroup_id != new.cgroup_id
}

/// Writes the kernel maps from a registry and the active policy generation. Serialized: the
/// state applier and the policy generation follower both program through it, each time from
/// the latest of both.
pub struct Programmer {
    dataplane: Arc<Dataplane>,
    node: String,
    policies: Mutex<Option<Policies>>,
    /// The registry last programmed (the generation follower re-programs from it).
    last: Mutex<Option<Arc<Registry>>>,
    /// What was last written to the maps (read back by [`Programmer::restore_changed`]).
    written: Mutex<Option<Written>>,
    /// Serializes writers.
    lock: Mutex<()>,
}

/// The entries last written to the maps the state programs.
#[derive(Default)]
struct Written {
    peers: Vec<(IpKey, PeerValue)>,
    dests: Vec<(IpKey, DestValue)>,
    workloads: Vec<(CgroupKey, WorkloadValue)>,
}

impl Programmer {
    pub fn new(dataplane: Arc<Dataplane>, node: String) -> Self {
        Self {
            dataplane,
            node,
            policies: Mutex::new(None),
            last: Mutex::new(None),
            written: Mutex::new(None),
            lock: Mutex::new(()),
        }
    }

    /// From now on, PERMISSIVE comes from the generations of `policies`.
    pub fn follow_policies(&self, policies: Policies) {
        *self.policies.lock().unwrap_or_else(|p| p.into_inner()) = Some(policies);
    }

    fn view(&self) -> Option<Arc<PolicyView>> {
        self.policies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|p| Arc::clone(&p.borrow()))
    }

    /// Destinations, this node's addresses, then enrolment (last: nothing is captured before
    /// the destinations it may reach are known).
    pub fn program(&self, registry: &Arc<Registry>) -> Result<(), BpfError> {
        let _serial = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(registry));
        let peers = node_peers(registry, &self.node);
        self.dataplane.sync_peers(&peers)?;
        let dests = destinations(registry);
        self.dataplane.sync_dests(&dests)?;
        let view = self.view();
        let workloads = enrolled(registry, &self.node, view.as_deref());
        self.dataplane.sync_workloads(&workloads)?;
        tracing::debug!(
            destinations = dests.len(),
            enrolled = workloads.len(),
            peers = peers.len(),
            "maps programmed"
        );
        *self.written.lock().unwrap_or_else(|p| p.into_inner()) = Some(Written {
            peers,
            dests,
            workloads,
        });
        // A configuration is programmed: the safe baseline (if on) is left, last.
        if self.dataplane.set_baseline(false)? {
            info!("safe baseline left: a configuration is programmed");
        }
        Ok(())
    }

    /// Reads the programmed maps and the config slot back and rewrites any that someone else
    /// changed (a direct map write: an entry added, removed or altered; the redirect target
    /// or the safe baseline bit). Returns the names of those maps.
    pub fn restore_changed(&self) -> Result<Vec<&'static str>, BpfError> {
        let _serial = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = Vec::new();
        if self.dataplane.restore_config()? {
            changed.push(mesh_common::names::MAP_CONFIG);
        }
        let written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let Some(w) = written.as_ref() else {
            return Ok(changed);
        };
        let maps = self
            .dataplane
            .changed_maps(&w.peers, &w.dests, &w.workloads);
        for map in &maps {
            match *map {
                mesh_common::names::MAP_PEERS => self.dataplane.sync_peers(&w.peers)?,
                mesh_common::names::MAP_DESTS => self.dataplane.sync_dests(&w.dests)?,
                _ => self.dataplane.sync_workloads(&w.workloads)?,
            }
        }
        changed.extend(maps);
        Ok(changed)
    }

    /// Re-programs enrolment from the last registry and the current policy generation (its
    /// PERMISSIVE flags). Returns the number enrolled and PERMISSIVE when anything changed.
    pub fn reprogram_enrolment(
        &self,
        before: &mut Vec<(CgroupKey, WorkloadValue)>,
    ) -> Result<Option<(usize, usize)>, BpfError> {
        let _serial = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(registry) = self.last.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Ok(None);
        };
        let view = self.view();
        let want = enrolled(&registry, &self.node, view.as_deref());
        if &want == before {
            return Ok(None);
        }
        self.dataplane.sync_workloads(&want)?;
        if let Some(w) = self
            .written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            w.workloads = want.clone();
        }
        let permissive = want
            .iter()
            .filter(|(_, v)| v.flags & WORKLOAD_F_PERMISSIVE != 0)
            .count();
        let n = want.len();
        *before = want;
        Ok(Some((n, permissive)))
    }
}

/// Every `interval` until `stop`, reads back the maps the state programs and restores any
/// that someone else changed (an unauthorized load: counted in
/// `mesh_config_unauthorized_loads_total`, logged and audited). A read-back costs one pass
/// over the three maps.
pub fn spawn_map_watch(
    programmer: Arc<Programmer>,
    metrics: Arc<Metrics>,
    audit: Option<AuditLog>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            // A successor agent taking over writes the same maps as it starts.
            if crate::handoff::successor_starting() {
                continue;
            }
            let p = Arc::clone(&programmer);
            let Ok(result) = tokio::task::spawn_blocking(move || p.restore_changed()).await else {
                return;
            };
            match result {
                Ok(changed) if changed.is_empty() => {}
                Ok(changed) => {
                    metrics.config_unauthorized_load();
                    warn!(maps = ?changed,
                          "unauthorized map change: entries the agent did not write; restored");
                    if let Some(a) = &audit {
                        a.config_event(
                            "unauthorized",
                            "maps",
                            None,
                            Some(format!(
                                "{} changed by someone else; restored",
                                changed.join(", ")
                            )),
                        );
                    }
                }
                Err(e) => warn!(error = %e, "reading back the programmed maps"),
            }
        }
    })
}

/// Sources the inbound STRICT check admits besides loopback: this node's own agent
/// addresses only. Traffic from other nodes arrives over HBONE and reaches the pod from
/// this agent, so no other node's address is ever trusted for plaintext.
fn node_peers(registry: &Registry, node: &str) -> Vec<(IpKey, PeerValue)> {
    registry
        .nodes
        .iter()
        .filter(|n| n.name == node)
        .flat_map(|n| {
            n.addresses().map(|ip| {
                (
                    IpKey {
                        addr_be: ip_words(ip),
                    },
                    PeerValue::default(),
                )
            })
        })
        .collect()
}

/// Every workload address and service VIP: what the kernel captures.
fn destinations(registry: &Registry) -> Vec<(IpKey, DestValue)> {
    let dest = |ip: &IpAddr, workload_id: u32, flags: u32| {
        (
            IpKey {
                addr_be: ip_words(*ip),
            },
            DestValue { workload_id, flags },
        )
    };
    registry
        .workloads
        .iter()
        .flat_map(|w| w.ips.iter().map(move |ip| dest(ip, w.id, 0)))
        .chain(
            registry
                .services
                .services
                .iter()
                .flat_map(|s| s.vips.iter().map(move |ip| dest(ip, s.id, DEST_F_SERVICE))),
        )
        .collect()
}

/// The enrolled workloads of `node` with their flags. PERMISSIVE comes from the policy
/// generation `view` (`POL_DST_F_PERMISSIVE`: the compiler resolved PeerAuthentication with
/// the registry's `peerAuthentication` as fallback), or from the registry when no policy is
/// loaded (generation 0).
pub fn enrolled(
    registry: &Registry,
    node: &str,
    view: Option<&PolicyView>,
) -> Vec<(CgroupKey, WorkloadValue)> {
    registry
        .local(node)
        .filter_map(|w| {
            w.cgroup_id.map(|id| {
                let permissive = match view {
                    Some(v) if v.generation() != 0 => v.permissive(w.id),
                    _ => w.permissive,
                };
                (
                    CgroupKey { cgroup_id: id },
                    WorkloadValue {
                        workload_id: w.id,
                        flags: WORKLOAD_F_CAPTURE
                            | if permissive { WORKLOAD_F_PERMISSIVE } else { 0 },
                    },
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn closers_close_removed_and_rekeyed_workloads_only() {
        let closers = Closers::default();
        closers.sync([1, 2, 3].into_iter(), &BTreeSet::new());
        let c1 = closers.watch(&[1, 0]);
        let c2 = closers.watch(&[2]);
        let c3 = closers.watch(&[3]);
        // 1 removed, 2 re-keyed, 3 kept.
        let n = closers.sync([2, 3, 4].into_iter(), &BTreeSet::from([2]));
        assert_eq!(n, 2);
        tokio::time::timeout(Duration::from_secs(1), c1.wait())
            .await
            .expect("removed workload's connections closed");
        tokio::time::timeout(Duration::from_secs(1), c2.wait())
            .await
            .expect("re-keyed workload's connections closed");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), c3.wait())
                .await
                .is_err(),
            "kept workload's connections stay"
        );
        // An unknown id is closed at once; nothing watched never closes.
        tokio::time::timeout(Duration::from_secs(1), closers.watch(&[99]).wait())
            .await
            .expect("unknown id closed");
        assert!(
            tokio::time::timeout(Duration::from_millis(20), closers.watch(&[0]).wait())
                .await
                .is_err()
        );
    }
}
