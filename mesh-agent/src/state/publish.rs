//! The authority side of the state stream: watch the source, publish versions, answer agents.
//!
//! [`watch_source`] stats the registry file every `interval` (a stat per tick; the file is read
//! only when its mtime, size or inode changed — an editor's or `git checkout`'s rename counts),
//! validates it entry by entry (a bad entry is refused and logged with `file:line`, the rest is
//! published), assigns stable ids ([`super::ids`]) and publishes a new version when the
//! accepted content changed. The response line of every version is rendered once and shared
//! by all the agents waiting for it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    ids::{IdAllocator, Kind},
    now_unix_ms,
    rollout::{Halt, RolloutRecord, Transition, VersionRef, ROLLOUT_FILE},
    Snapshot, StateError,
};
use crate::registry::{Registry, RegistryError};

/// One published version, with its response line rendered.
#[derive(Debug)]
pub struct Published {
    pub snapshot: Snapshot,
    /// `{"ok":true,"state":{…}}\n`.
    pub line: Vec<u8>,
    /// When it was published.
    pub at: std::time::Instant,
}

/// What an agent last reported (the `after` of its last state request).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentReport {
    /// The version the agent last received (0: none yet).
    pub version: u64,
    /// The version it reports it applied, and that version's digest (what it enforces).
    #[serde(default)]
    pub active_version: u64,
    #[serde(default)]
    pub active_digest: String,
    /// When it asked (Unix milliseconds).
    pub seen_unix_ms: u64,
    /// The last version it refused to apply, its digest and why (none: no refusal reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<crate::authority::protocol::Refused>,
}

/// The published versions, as the authority's service reads them.
#[derive(Clone, Debug)]
pub struct StateFeed {
    rx: watch::Receiver<Option<Arc<Published>>>,
    agents: Arc<Mutex<BTreeMap<String, AgentReport>>>,
    /// Where the reports are written when an agent's version changes (`state/agents.json`).
    reports: Option<PathBuf>,
    /// Which version each node is meant to run ([`super::rollout`]).
    release: Arc<Mutex<Release>>,
    /// Bumped whenever any node's intended version may have changed.
    generation: Arc<watch::Sender<u64>>,
}

/// The rollout of the newest version and the versions some node may be meant to run.
#[derive(Default)]
struct Release {
    record: Option<RolloutRecord>,
    /// By version: the target, the base and the held versions of `record`.
    versions: BTreeMap<u64, Arc<Published>>,
    /// The authority directory: `state/rollout.json` and `state/rollout/v<N>.json`.
    dir: Option<PathBuf>,
    audit: Option<crate::audit::AuditLog>,
}

impl std::fmt::Debug for Release {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Release")
            .field("record", &self.record)
            .field("versions", &self.versions.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Where the versions a rollout may serve are kept across restarts, in the authority dir.
const ROLLOUT_VERSIONS_DIR: &str = "state/rollout";

/// Name of the agents' reports in the authority directory.
pub const AGENTS_FILE: &str = "state/agents.json";

/// Name of the record of the published version (the intended one) in the authority directory.
pub const PUBLISHED_FILE: &str = "state/published.json";

/// The published version, as `config status` reads it.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishedRecord {
    pub version: u64,
    pub digest: String,
    pub source: String,
    pub published_unix_ms: u64,
}

/// Publishes versions into a [`StateFeed`].
#[derive(Debug)]
pub struct Publisher {
    tx: watch::Sender<Option<Arc<Published>>>,
    /// What the service reads: the same versions and reports.
    feed: StateFeed,
}

impl Publisher {
    /// A publisher; with `dir`, what each agent runs is also written to `dir`/[`AGENTS_FILE`]
    /// whenever it changes.
    pub fn new(dir: Option<&Path>) -> (Self, StateFeed) {
        let (tx, rx) = watch::channel(None);
        let feed = StateFeed {
            rx,
            agents: Arc::new(Mutex::new(BTreeMap::new())),
            reports: dir.map(|d| d.join(AGENTS_FILE)),
            release: Arc::new(Mutex::new(Release {
                dir: dir.map(Path::to_owned),
                ..Release::default()
            })),
            generation: Arc::new(watch::channel(0).0),
        };
        (
            Self {
                tx,
                feed: feed.clone(),
            },
            feed,
        )
    }

    /// Makes `snapshot` the current version, released to every node at once.
    pub fn publish(&self, snapshot: Snapshot) {
        self.publish_rollout(snapshot, None, &[], now_unix_ms());
    }

    /// Makes `snapshot` the newest version, released as `rollout` says (`nodes`: the
    /// registry's node names, for canary patterns) from `now` (Unix ms). The same version
    /// published again after a restart resumes its persisted rollout.
    pub fn publish_rollout(
        &self,
        snapshot: Snapshot,
        rollout: Option<&crate::bundle::Rollout>,
        nodes: &[String],
        now: u64,
    ) {
        let published = Arc::new(render(snapshot));
        let target = VersionRef {
            version: published.snapshot.version,
            digest: published.snapshot.digest.clone(),
        };
        {
            let mut release = self.feed.lock_release();
            let r = &mut *release;
            let mut previous = r.record.take();
            if previous.is_none() {
                if let Some(dir) = &r.dir {
                    (previous, r.versions) = load_rollout(dir);
                }
            }
            let record = match previous {
                Some(p) if p.target == target => {
                    info!(
                        version = target.version,
                        phase = p.phase.as_str(),
                        "rollout resumed"
                    );
                    p
                }
                previous => {
                    let record = RolloutRecord::start(
                        target.clone(),
                        rollout,
                        nodes,
                        previous.as_ref(),
                        now,
                    );
                    info!(
                        version = target.version,
                        phase = record.phase.as_str(),
                        canaries = record.canaries.len(),
                        base = record.base.as_ref().map_or(0, |b| b.version),
                        "rollout started"
                    );
                    if let Some(h) = &record.halt {
                        r.halted(&record, h);
                    }
                    record
                }
            };
            r.versions.insert(target.version, Arc::clone(&published));
            let keep = record.versions();
            r.versions.retain(|v, p| {
                keep.iter()
                    .any(|k| k.version == *v && k.digest == p.snapshot.digest)
            });
            r.record = Some(record);
            r.persist(true);
        }
        self.tx.send_replace(Some(published));
        self.feed.generation.send_modify(|g| *g += 1);
    }

    /// The current version and the agents' reports, as the service sees them.
    pub fn feed(&self) -> &StateFeed {
        &self.feed
    }
}

/// `{"ok":true,"state":{…}}\n` for `snapshot`.
fn render(snapshot: Snapshot) -> Published {
    #[derive(Serialize)]
    struct Line<'a> {
        ok: bool,
        state: &'a Snapshot,
    }
    let mut line = serde_json::to_vec(&Line {
        ok: true,
        state: &snapshot,
    })
    .unwrap_or_else(|_| br#"{"ok":false,"error":"internal error: unserialisable state"}"#.to_vec());
    line.push(b'\n');
    Published {
        snapshot,
        line,
        at: std::time::Instant::now(),
    }
}

/// The persisted rollout of `dir` and the versions it serves (absent or unreadable: none,
/// logged; a version whose file is missing or does not verify is left out — the nodes meant
/// to run it are then answered nothing until a version they may run is published).
fn load_rollout(dir: &Path) -> (Option<RolloutRecord>, BTreeMap<u64, Arc<Published>>) {
    let path = dir.join(ROLLOUT_FILE);
    let record: RolloutRecord = match std::fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Default::default(),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "reading the rollout record");
            return Default::default();
        }
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "rollout record refused");
                return Default::default();
            }
        },
    };
    let mut versions = BTreeMap::new();
    for v in record.versions() {
        let file = dir
            .join(ROLLOUT_VERSIONS_DIR)
            .join(format!("v{}.json", v.version));
        let loaded = std::fs::read(&file)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Snapshot>(&b).map_err(|e| e.to_string()))
            .and_then(|s| {
                s.verify().map_err(|e| e.to_string())?;
                if s.version != v.version || s.digest != v.digest {
                    return Err("another version".into());
                }
                Ok(s)
            });
        match loaded {
            Ok(s) => {
                versions.insert(v.version, Arc::new(render(s)));
            }
            Err(e) => {
                if v != record.target {
                    warn!(path = %file.display(), error = %e, "a version of the rollout is unavailable");
                }
            }
        }
    }
    (Some(record), versions)
}

impl Release {
    /// Logs and audits a halt.
    fn halted(&self, record: &RolloutRecord, h: &Halt) {
        warn!(version = record.target.version, node = h.node.as_deref().unwrap_or("-"),
              reason = %h.reason, "rollout halted");
        if let Some(a) = &self.audit {
            a.config_event(
                "rollout_halted",
                &format!("state v{}", record.target.version),
                Some(record.target.version),
                Some(format!(
                    "canary {}: {}",
                    h.node.as_deref().unwrap_or("-"),
                    h.reason
                )),
            );
        }
    }

    /// Moves the rollout through what is due at `now`, and what `node` reported; `true`
    /// when something changed (logged, audited, persisted).
    fn advance(&mut self, now: u64, report: Option<(&str, &AgentReport)>) -> bool {
        let Some(mut record) = self.record.take() else {
            return false;
        };
        let mut transitions = Vec::new();
        let active_before = record.canaries_active.len();
        if let Some((node, r)) = report {
            let active = VersionRef {
                version: r.active_version,
                digest: r.active_digest.clone(),
            };
            let refused = r.refused.as_ref().map(|f| {
                (
                    VersionRef {
                        version: f.version,
                        digest: f.digest.clone(),
                    },
                    f.reason.as_str(),
                )
            });
            transitions.extend(record.observe(
                node,
                Some(&active),
                refused.as_ref().map(|(v, reason)| (v, *reason)),
                now,
            ));
        }
        transitions.extend(record.tick(now));
        let changed = !transitions.is_empty() || record.canaries_active.len() != active_before;
        for t in &transitions {
            match t {
                Transition::Canary => {
                    info!(
                        version = record.target.version,
                        canaries = record.canaries.len(),
                        "rollout: released to the canaries"
                    );
                }
                Transition::Released => {
                    info!(
                        version = record.target.version,
                        "rollout: released to every node"
                    );
                    if let Some(a) = &self.audit {
                        a.config_event(
                            "rollout_released",
                            &format!("state v{}", record.target.version),
                            Some(record.target.version),
                            None,
                        );
                    }
                }
                Transition::Halted(h) => self.halted(&record, h),
            }
        }
        if changed {
            let keep = record.versions();
            self.versions.retain(|v, p| {
                keep.iter()
                    .any(|k| k.version == *v && k.digest == p.snapshot.digest)
            });
        }
        self.record = Some(record);
        if changed {
            self.persist(false);
        }
        changed
    }

    /// Writes the record (and, with `versions`, the snapshots it may serve; files of versions
    /// it no longer serves are removed).
    fn persist(&self, versions: bool) {
        let (Some(dir), Some(record)) = (&self.dir, &self.record) else {
            return;
        };
        let write = |path: &Path, bytes: &[u8]| {
            if let Err(e) = crate::files::write_atomic(path, bytes, 0o600) {
                warn!(path = %path.display(), error = %e.source, "writing the rollout record");
            }
        };
        if versions {
            let vdir = dir.join(ROLLOUT_VERSIONS_DIR);
            if let Err(e) = crate::files::create_private_dir(&vdir) {
                warn!(path = %vdir.display(), error = %e, "creating the rollout directory");
            }
            for (v, p) in &self.versions {
                let file = vdir.join(format!("v{v}.json"));
                if std::fs::metadata(&file).is_err() {
                    write(&file, &serde_json::to_vec(&p.snapshot).unwrap_or_default());
                }
            }
            for entry in std::fs::read_dir(&vdir).into_iter().flatten().flatten() {
                let name = entry.file_name();
                let version = name.to_str().and_then(|n| {
                    n.strip_prefix('v')?
                        .strip_suffix(".json")?
                        .parse::<u64>()
                        .ok()
                });
                if version.is_some_and(|v| !self.versions.contains_key(&v)) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        write(
            &dir.join(ROLLOUT_FILE),
            &serde_json::to_vec_pretty(record).unwrap_or_default(),
        );
    }

    /// What `node` is meant to run now.
    fn intended(&self, node: &str) -> Option<Arc<Published>> {
        let v = self.record.as_ref()?.intended(node)?;
        self.versions
            .get(&v.version)
            .filter(|p| p.snapshot.digest == v.digest)
            .cloned()
    }
}

impl StateFeed {
    fn lock_release(&self) -> std::sync::MutexGuard<'_, Release> {
        self.release.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rollout halts and releases are also audited to `audit`.
    pub fn set_audit(&self, audit: crate::audit::AuditLog) {
        self.lock_release().audit = Some(audit);
    }

    /// Moves the rollout through what is due now (the source watch calls it every tick, so
    /// that a window ends on time even when no agent asks).
    pub fn tick(&self) {
        if self.lock_release().advance(now_unix_ms(), None) {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// The rollout record, if any.
    pub fn rollout(&self) -> Option<RolloutRecord> {
        self.lock_release().record.clone()
    }

    /// What `node` is meant to run now (its version of the rollout).
    pub fn intended(&self, node: &str) -> Option<Arc<Published>> {
        self.lock_release().intended(node)
    }

    /// Waits up to `wait` for a version for `node` other than `after` (an agent with nothing,
    /// `None`, gets its intended version at once); `None` when there is none by then. Records
    /// `after` and `active` as what `node` runs (a canary's report moves its rollout).
    pub async fn next(
        &self,
        node: &str,
        after: Option<u64>,
        active: Option<crate::authority::protocol::Active>,
        wait: Duration,
    ) -> Option<Arc<Published>> {
        let changed = {
            let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
            let active = active.unwrap_or_default();
            let report = AgentReport {
                version: after.unwrap_or(0),
                active_version: active.version,
                active_digest: active.digest,
                seen_unix_ms: now_unix_ms(),
                refused: active.refused,
            };
            if self
                .lock_release()
                .advance(report.seen_unix_ms, Some((node, &report)))
            {
                self.generation.send_modify(|g| *g += 1);
            }
            let before = agents.insert(node.to_owned(), report.clone());
            let same = before.is_some_and(|b| {
                b.version == report.version
                    && b.active_version == report.active_version
                    && b.active_digest == report.active_digest
                    && b.refused == report.refused
            });
            (!same).then(|| agents.clone())
        };
        if let (Some(agents), Some(path)) = (changed, &self.reports) {
            info!(
                node,
                version = after.unwrap_or(0),
                "agent runs state version"
            );
            let write = serde_json::to_vec_pretty(&agents)
                .map_err(std::io::Error::other)
                .and_then(|text| {
                    crate::files::write_atomic(path, &text, 0o600).map_err(|e| e.source)
                });
            if let Err(e) = write {
                warn!(path = %path.display(), error = %e, "writing the agents' state versions");
            }
        }
        let until = tokio::time::Instant::now() + wait;
        let mut generation = self.generation.subscribe();
        loop {
            generation.borrow_and_update();
            let (intended, deadline) = {
                let mut release = self.lock_release();
                if release.advance(now_unix_ms(), None) {
                    self.generation.send_modify(|g| *g += 1);
                    generation.borrow_and_update();
                }
                let deadline = release.record.as_ref().and_then(RolloutRecord::deadline);
                (release.intended(node), deadline)
            };
            if let Some(p) = intended.filter(|p| Some(p.snapshot.version) != after) {
                return Some(p);
            }
            // Wake at the next phase change (plus a millisecond: the deadline is inclusive).
            let wake = deadline.map_or(until, |d| {
                let ms = d.saturating_sub(now_unix_ms()).saturating_add(1);
                (tokio::time::Instant::now() + Duration::from_millis(ms)).min(until)
            });
            if tokio::time::timeout_at(wake, generation.changed())
                .await
                .is_err()
                && tokio::time::Instant::now() >= until
            {
                return None;
            }
        }
    }

    /// The current version, if any.
    pub fn current(&self) -> Option<Arc<Published>> {
        self.rx.borrow().clone()
    }

    /// What each agent last reported.
    pub fn agents(&self) -> BTreeMap<String, AgentReport> {
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How long `node` has not run the version meant for it ([`StateFeed::intended`]: during
    /// a rollout, a node not yet given the newest version is not stale), if it reported that
    /// it does not (a node that never reported — a fresh join — is not stale).
    pub fn stale_for(&self, node: &str) -> Option<std::time::Duration> {
        let (intended, since) = {
            let release = self.lock_release();
            let record = release.record.as_ref()?;
            (record.intended(node)?.clone(), record.intended_since(node))
        };
        let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let report = agents.get(node)?;
        let runs_it =
            report.active_version == intended.version && report.active_digest == intended.digest;
        (!runs_it).then(|| Duration::from_millis(now_unix_ms().saturating_sub(since)))
    }
}

/// The content of one read of the source: the registry to publish and the refused entries.
pub struct Built {
    pub registry: Registry,
    pub refused: Vec<RegistryError>,
}

/// Reads and validates the registry at `path` entry by entry, with the ids of `ids`.
pub fn build(path: &Path, ids: &mut IdAllocator) -> Result<Built, RegistryError> {
    let parsed = Registry::load_entries(path, None, Path::new("/"))?;
    Ok(Built {
        registry: assign_ids(parsed.registry, ids),
        refused: parsed.refused,
    })
}

/// `registry` with the stable ids of `ids`: the keys it no longer has are forgotten, new ones
/// get ids in file order (a registry seen for the first time gets its positions: what
/// `policy apply --registry` compiles with).
fn assign_ids(registry: Registry, ids: &mut IdAllocator) -> Registry {
    let keep_w: std::collections::HashSet<String> =
        registry.workloads.iter().map(|w| w.key()).collect();
    let keep_s: std::collections::HashSet<String> =
        registry.services.services.iter().map(|s| s.key()).collect();
    ids.retain(Kind::Workload, &|k| keep_w.contains(k));
    ids.retain(Kind::Service, &|k| keep_s.contains(k));
    // Exhaustion (4 billion entries seen) refuses nothing here: the id stays 0, which the
    // agents refuse entry by entry.
    let wids: std::collections::HashMap<String, u32> = registry
        .workloads
        .iter()
        .map(|w| {
            let k = w.key();
            let id = ids.id(Kind::Workload, &k).unwrap_or(0);
            (k, id)
        })
        .collect();
    let sids: std::collections::HashMap<String, u32> = registry
        .services
        .services
        .iter()
        .map(|s| {
            let k = s.key();
            let id = ids.id(Kind::Service, &k).unwrap_or(0);
            (k, id)
        })
        .collect();
    registry.with_ids(
        |k| wids.get(k).copied().unwrap_or(0),
        |k| sids.get(k).copied().unwrap_or(0),
    )
}

/// Identifies a version of a file without reading it.
fn stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Where a [`SourceWatch`] publishes: the authority's [`Publisher`], or an agent that reads
/// its own file (`--registry`).
pub trait Sink: Send + Sync {
    /// The digest of the current version, if any.
    fn current_digest(&self) -> Option<String>;
    fn publish(&self, snapshot: Snapshot);
    /// Publishes `snapshot` with a bundle's rollout (`nodes`: the registry's node names).
    /// A sink without rollouts publishes it at once.
    fn publish_rollout(
        &self,
        snapshot: Snapshot,
        _rollout: Option<&crate::bundle::Rollout>,
        _nodes: &[String],
    ) {
        self.publish(snapshot);
    }
    /// Called every source tick (rollout windows end on time).
    fn tick(&self) {}
}

impl Sink for Publisher {
    fn current_digest(&self) -> Option<String> {
        self.feed.current().map(|p| p.snapshot.digest.clone())
    }

    fn publish(&self, snapshot: Snapshot) {
        Publisher::publish(self, snapshot);
    }

    fn publish_rollout(
        &self,
        snapshot: Snapshot,
        rollout: Option<&crate::bundle::Rollout>,
        nodes: &[String],
    ) {
        Publisher::publish_rollout(self, snapshot, rollout, nodes, now_unix_ms());
    }

    fn tick(&self) {
        self.feed.tick();
    }
}

impl Sink for watch::Sender<Option<Arc<Snapshot>>> {
    fn current_digest(&self) -> Option<String> {
        self.borrow().as_ref().map(|s| s.digest.clone())
    }

    fn publish(&self, snapshot: Snapshot) {
        self.send_replace(Some(Arc::new(snapshot)));
    }
}

/// Follows a registry file: publishes it once ([`SourceWatch::refresh`]), then on every
/// change ([`SourceWatch::run`]).
pub struct SourceWatch {
    /// The registry file — or, with `signers`, the signed configuration bundle — followed.
    pub registry_path: PathBuf,
    /// The signer set (`<authority dir>/signers.json`, re-read at each change): the followed
    /// file is a signed bundle, published only when it verifies.
    pub signers: Option<PathBuf>,
    pub ids: IdAllocator,
    pub sink: Arc<dyn Sink>,
    /// Called with every accepted registry (the authority's own certificate checks follow it).
    pub on_registry: Box<dyn FnMut(&Registry) + Send>,
}

impl SourceWatch {
    /// Reads the source and publishes a new version if the accepted content changed.
    /// `Err` only when the source cannot be read or parsed at all (then nothing changes).
    pub fn refresh(&mut self, changed_unix_ms: u64) -> Result<Option<u64>, RefreshError> {
        if let Some(signers) = self.signers.clone() {
            return self.refresh_signed(&signers, changed_unix_ms);
        }
        let built = build(&self.registry_path, &mut self.ids)?;
        for e in &built.refused {
            warn!(error = %e, "state entry refused at the source; the rest is published");
        }
        let text = built.registry.to_yaml();
        let digest = Snapshot::content_digest(&text);
        if self.sink.current_digest().as_deref() == Some(digest.as_str()) {
            return Ok(None);
        }
        (self.on_registry)(&built.registry);
        let version = self.ids.version_for(&digest);
        let mut snapshot = Snapshot::new(
            version,
            format!("file:{}", self.registry_path.display()),
            text,
            changed_unix_ms,
        );
        snapshot.refused = built.refused.iter().map(ToString::to_string).collect();
        // The version (and the ids in it) are persisted before anyone can see them.
        self.ids.save()?;
        info!(version, digest = %snapshot.short_digest(),
              workloads = built.registry.workloads.len(),
              services = built.registry.services.services.len(),
              nodes = built.registry.nodes.len(),
              refused = snapshot.refused.len(), "state published");
        self.publish(snapshot);
        Ok(Some(version))
    }

    /// The followed file is a signed bundle: verified against `signers` and the version
    /// published before (persisted with the ids: an authority restarted on an older bundle
    /// does not publish it), then published with the bundle attached (agents verify it again).
    fn refresh_signed(
        &mut self,
        signers: &Path,
        changed_unix_ms: u64,
    ) -> Result<Option<u64>, RefreshError> {
        use crate::bundle::{self, Rejection};
        // Never more than a bundle may be: a huge file is refused without being read.
        let bytes = crate::bundle::signers::read_bounded(
            &self.registry_path,
            crate::bundle::MAX_BUNDLE_BYTES as u64,
        )
        .map_err(|e| {
            RefreshError::Bundle(Rejection::Malformed {
                detail: format!("{}: {e}", self.registry_path.display()),
            })
        })?
        .map_err(|size| {
            RefreshError::Bundle(Rejection::Oversized {
                detail: format!(
                    "{}: {size} bytes (at most {})",
                    self.registry_path.display(),
                    crate::bundle::MAX_BUNDLE_BYTES
                ),
            })
        })?;
        let set = bundle::SignerSet::load_or_empty(signers).map_err(|e| {
            RefreshError::Bundle(Rejection::Malformed {
                detail: format!("signers {}: {e}", signers.display()),
            })
        })?;
        let signed = bundle::parse_signed(&bytes)?;
        let b = bundle::verify(&signed, &set, None)?;
        let published = self.ids.version();
        if b.version() < published
            || (b.version() == published && !self.ids.is_published_digest(b.digest()))
        {
            return Err(Rejection::Rollback {
                version: b.version(),
                active: published,
            }
            .into());
        }
        let parsed =
            Registry::parse_entries(b.registry_text(), &self.registry_path, None, Path::new("/"))?;
        let registry = assign_ids(parsed.registry, &mut self.ids);
        for e in &parsed.refused {
            warn!(error = %e, "state entry refused at the source; the rest is published");
        }
        // The bundle's registry as it is, the ids beside it: agents check it byte for byte
        // against the signed bundle and parse it once.
        let text = b.registry_text().to_owned();
        let ids = super::Ids::of(&registry);
        if self.sink.current_digest().as_deref()
            == Some(Snapshot::digest_of(&text, Some(&ids)).as_str())
            && b.version() == published
        {
            return Ok(None);
        }
        (self.on_registry)(&registry);
        self.ids.set_published(b.version(), b.digest());
        let mut snapshot = Snapshot::new(
            b.version(),
            format!(
                "bundle:{} v{} rev {}",
                self.registry_path.display(),
                b.version(),
                b.source_revision().unwrap_or("-")
            ),
            text,
            changed_unix_ms,
        )
        .with_ids(ids);
        snapshot.refused = parsed.refused.iter().map(ToString::to_string).collect();
        snapshot.bundle = Some(String::from_utf8_lossy(&bytes).into_owned());
        self.ids.save()?;
        info!(version = b.version(), digest = %b.short_digest(),
              workloads = registry.workloads.len(), policies = b.policies().len(),
              rollout = %b.rollout().map(crate::bundle::Rollout::describe).unwrap_or_default(),
              "signed configuration published");
        let nodes: Vec<String> = registry.nodes.iter().map(|n| n.name.clone()).collect();
        self.record_published(&snapshot);
        self.sink.publish_rollout(snapshot, b.rollout(), &nodes);
        Ok(Some(b.version()))
    }

    /// Publishes `snapshot` and records it as the intended version
    /// (`<dir>/`[`PUBLISHED_FILE`]).
    fn publish(&self, snapshot: Snapshot) {
        self.record_published(&snapshot);
        self.sink.publish(snapshot);
    }

    /// Records `snapshot` as the newest published version (`<dir>/`[`PUBLISHED_FILE`]).
    fn record_published(&self, snapshot: &Snapshot) {
        if let Some(dir) = self.ids.dir() {
            let record = PublishedRecord {
                version: snapshot.version,
                digest: snapshot.digest.clone(),
                source: snapshot.source.clone(),
                published_unix_ms: now_unix_ms(),
            };
            let path = dir.join("published.json");
            let write = serde_json::to_vec_pretty(&record)
                .map_err(std::io::Error::other)
                .and_then(|t| crate::files::write_atomic(&path, &t, 0o600).map_err(|e| e.source));
            if let Err(e) = write {
                warn!(path = %path.display(), error = %e, "recording the published version");
            }
        }
    }

    /// Follows the source every `interval` until `stop` turns true.
    pub async fn run(mut self, interval: Duration, mut stop: watch::Receiver<bool>) {
        let mut seen = stamp(&self.registry_path);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = stop.changed() => if changed.is_err() || *stop.borrow() { return },
            }
            self.sink.tick();
            let now = stamp(&self.registry_path);
            if now == seen {
                continue;
            }
            seen = now;
            let changed_ms = now_unix_ms();
            // Reading and validating 10,000 entries takes milliseconds: blocking here keeps
            // the order of versions simple, and this task does nothing else.
            // One line per refused change (a change is read once: no repeats while it stays).
            if let Err(e) = tokio::task::block_in_place(|| self.refresh(changed_ms)) {
                warn!(error = %e, "state source refused as a whole; the published version stays");
            }
        }
    }
}

/// Why the source could not be published.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("configuration bundle refused: {0}")]
    Bundle(#[from] crate::bundle::Rejection),
    #[error(transparent)]
    State(#[from] StateError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::protocol::{Active, Refused};
    use crate::bundle::Rollout;

    fn snap(version: u64) -> Snapshot {
        Snapshot::new(
            version,
            format!("test v{version}"),
            format!("nodes: []\nworkloads: []\n# v{version}\n"),
            1,
        )
    }

    fn canary(nodes: &[&str], window: u64) -> Rollout {
        Rollout {
            activate_at: None,
            canary_nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            canary_window_secs: Some(window),
        }
    }

    fn active(s: &Snapshot, refused: Option<&Snapshot>) -> Option<Active> {
        Some(Active {
            version: s.version,
            digest: s.digest.clone(),
            refused: refused.map(|r| Refused {
                version: r.version,
                digest: r.digest.clone(),
                reason: "unknown_signer: key 00".into(),
            }),
        })
    }

    const SHORT: Duration = Duration::from_millis(30);

    #[tokio::test]
    async fn each_node_gets_its_version_a_refusal_halts_and_a_restart_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = vec!["n1".to_owned(), "n2".to_owned()];
        let (v1, v2) = (snap(1), snap(2));
        {
            let (publisher, feed) = Publisher::new(Some(dir.path()));
            publisher.publish(v1.clone());
            publisher.publish_rollout(
                v2.clone(),
                Some(&canary(&["n1"], 3600)),
                &nodes,
                now_unix_ms(),
            );
            // n2 keeps v1 during the window: nothing new for it, and it is not stale.
            assert_eq!(
                feed.next("n2", None, active(&v1, None), SHORT)
                    .await
                    .unwrap()
                    .snapshot
                    .version,
                1
            );
            assert!(feed
                .next("n2", Some(1), active(&v1, None), SHORT)
                .await
                .is_none());
            assert_eq!(feed.stale_for("n2"), None);
            // n1, the canary, gets v2; reporting v1 active it is behind its intended version.
            let got = feed
                .next("n1", Some(1), active(&v1, None), SHORT)
                .await
                .unwrap();
            assert_eq!(got.snapshot.version, 2);
            assert!(feed.stale_for("n1").is_some());
            // n1 refuses v2: halted at once, persisted, n1 is meant to keep v1.
            let got = feed
                .next("n1", Some(2), active(&v1, Some(&v2)), SHORT)
                .await;
            assert_eq!(
                got.map(|p| p.snapshot.version),
                Some(1),
                "the version meant for n1"
            );
            let record = feed.rollout().unwrap();
            assert!(record.halted());
            assert_eq!(record.halt.as_ref().unwrap().node.as_deref(), Some("n1"));
            assert!(record
                .halt
                .as_ref()
                .unwrap()
                .reason
                .contains("unknown_signer"));
            assert_eq!(feed.stale_for("n1"), None);
            let on_disk: RolloutRecord =
                serde_json::from_slice(&std::fs::read(dir.path().join(ROLLOUT_FILE)).unwrap())
                    .unwrap();
            assert_eq!(on_disk, record);
            let agents: BTreeMap<String, AgentReport> =
                serde_json::from_slice(&std::fs::read(dir.path().join(AGENTS_FILE)).unwrap())
                    .unwrap();
            assert_eq!(agents["n1"].refused.as_ref().unwrap().version, 2);
        }
        // Restart: the same bundle published again resumes the halted rollout, and v1 (no
        // longer the followed file) is still served from the persisted copy.
        let (publisher, feed) = Publisher::new(Some(dir.path()));
        publisher.publish_rollout(
            v2.clone(),
            Some(&canary(&["n1"], 3600)),
            &nodes,
            now_unix_ms(),
        );
        assert!(feed.rollout().unwrap().halted());
        let got = feed.next("n2", None, None, SHORT).await.unwrap();
        assert_eq!(
            (got.snapshot.version, &got.snapshot.digest),
            (1, &v1.digest)
        );
        assert!(feed
            .next("n2", Some(1), active(&v1, None), SHORT)
            .await
            .is_none());
        // v3 without a rollout supersedes the halted one: everyone, and v1's copy goes.
        let v3 = snap(3);
        publisher.publish_rollout(v3.clone(), None, &nodes, now_unix_ms());
        assert_eq!(
            feed.next("n2", Some(1), active(&v1, None), SHORT)
                .await
                .unwrap()
                .snapshot
                .version,
            3
        );
        assert!(!dir.path().join("state/rollout/v1.json").exists());
        assert!(dir.path().join("state/rollout/v3.json").exists());
    }

    #[tokio::test]
    async fn the_window_ends_into_a_release_when_every_canary_runs_it() {
        let (publisher, feed) = Publisher::new(None);
        let nodes = vec!["n1".to_owned(), "n2".to_owned()];
        let (v1, v2) = (snap(1), snap(2));
        publisher.publish(v1.clone());
        // Published 10 s ago with a 1 s window... but n1 reports it active first: the
        // report is taken before the window's end is judged.
        publisher.publish_rollout(
            v2.clone(),
            Some(&canary(&["n1"], 1)),
            &nodes,
            now_unix_ms() - 10_000,
        );
        let got = feed.next("n1", Some(2), active(&v2, None), SHORT).await;
        assert!(got.is_none());
        assert_eq!(
            feed.rollout().unwrap().phase,
            super::super::rollout::Phase::Released
        );
        assert_eq!(
            feed.next("n2", Some(1), active(&v1, None), SHORT)
                .await
                .unwrap()
                .snapshot
                .version,
            2
        );
    }

    #[tokio::test]
    async fn a_waiting_node_is_answered_when_the_window_ends() {
        let (publisher, feed) = Publisher::new(None);
        let nodes = vec!["n1".to_owned(), "n2".to_owned()];
        let (v1, v2) = (snap(1), snap(2));
        publisher.publish(v1.clone());
        publisher.publish_rollout(v2.clone(), Some(&canary(&["n1"], 1)), &nodes, now_unix_ms());
        feed.next("n1", Some(2), active(&v2, None), SHORT).await;
        // n2 waits (up to 10 s): answered with v2 once the 1 s window ends, not before.
        let started = std::time::Instant::now();
        let got = feed
            .next("n2", Some(1), active(&v1, None), Duration::from_secs(10))
            .await;
        assert_eq!(got.unwrap().snapshot.version, 2);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }
}
