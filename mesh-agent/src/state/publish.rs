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
    now_unix_ms, Snapshot, StateError,
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
}

/// The published versions, as the authority's service reads them.
#[derive(Clone, Debug)]
pub struct StateFeed {
    rx: watch::Receiver<Option<Arc<Published>>>,
    agents: Arc<Mutex<BTreeMap<String, AgentReport>>>,
    /// Where the reports are written when an agent's version changes (`state/agents.json`).
    reports: Option<PathBuf>,
}

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
        };
        (
            Self {
                tx,
                feed: feed.clone(),
            },
            feed,
        )
    }

    /// Makes `snapshot` the current version.
    pub fn publish(&self, snapshot: Snapshot) {
        #[derive(Serialize)]
        struct Line<'a> {
            ok: bool,
            state: &'a Snapshot,
        }
        let mut line = serde_json::to_vec(&Line {
            ok: true,
            state: &snapshot,
        })
        .unwrap_or_else(|_| {
            br#"{"ok":false,"error":"internal error: unserialisable state"}"#.to_vec()
        });
        line.push(b'\n');
        self.tx.send_replace(Some(Arc::new(Published {
            snapshot,
            line,
            at: std::time::Instant::now(),
        })));
    }

    /// The current version and the agents' reports, as the service sees them.
    pub fn feed(&self) -> &StateFeed {
        &self.feed
    }
}

impl StateFeed {
    /// Waits up to `wait` for a version other than `after` (an agent with nothing, `None`,
    /// gets the current version at once); `None` when there is none by then. Records `after`
    /// as what `node` runs.
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
            };
            let before = agents.insert(node.to_owned(), report.clone());
            let same = before.is_some_and(|b| {
                b.version == report.version
                    && b.active_version == report.active_version
                    && b.active_digest == report.active_digest
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
        let mut rx = self.rx.clone();
        let differs = |p: &Option<Arc<Published>>| {
            p.as_ref()
                .is_some_and(|p| Some(p.snapshot.version) != after)
        };
        let next = match tokio::time::timeout(wait, rx.wait_for(differs)).await {
            Ok(Ok(p)) => p.clone(),
            _ => None,
        };
        next
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

    /// How long `node` has not run the current version, if it reported that it does not (a
    /// node that never reported — a fresh join — is not stale).
    pub fn stale_for(&self, node: &str) -> Option<std::time::Duration> {
        let current = self.current()?;
        let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let report = agents.get(node)?;
        let runs_it = report.active_version == current.snapshot.version
            && report.active_digest == current.snapshot.digest;
        (!runs_it).then(|| current.at.elapsed())
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
}

impl Sink for Publisher {
    fn current_digest(&self) -> Option<String> {
        self.feed.current().map(|p| p.snapshot.digest.clone())
    }

    fn publish(&self, snapshot: Snapshot) {
        Publisher::publish(self, snapshot);
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
              "signed configuration published");
        self.publish(snapshot);
        Ok(Some(b.version()))
    }

    /// Publishes `snapshot` and records it as the intended version
    /// (`<dir>/`[`PUBLISHED_FILE`]).
    fn publish(&self, snapshot: Snapshot) {
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
        self.sink.publish(snapshot);
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
