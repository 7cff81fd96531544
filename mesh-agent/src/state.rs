//! The mesh state stream: what the authority pushes to every agent, and how an agent follows it.
//!
//! A [`Snapshot`] is the whole mesh as one versioned, digested document: nodes, workloads and
//! services (the registry format, every entry with the id the authority assigned it and keeps
//! for as long as the entry exists). The authority ([`publish`]) watches its source of truth —
//! today a registry file, meant to be a checkout of a version-controlled repository; later a
//! controller watching the Kubernetes API renders the same entries — and publishes a new
//! version whenever the accepted content changes. Each agent ([`follow`]) long-polls the
//! authority over the mutually-authenticated channel (`{"op":"state","after":N}`, answered as
//! soon as the authority's version differs from `N`, or after the wait with "unchanged"), checks
//! the digest, applies the state in place ([`live`]) and persists it, so it starts from the last
//! state it verified when the authority is unreachable.
//!
//! Snapshots rather than deltas: an agent that was slow or disconnected catches up with one
//! message, and applying is always "make the node match this", which is idempotent. The agent
//! computes the delta itself (what to enrol, unenrol, re-key), in [`live`].

pub mod follow;
pub mod ids;
pub mod live;
pub mod publish;
pub mod rollout;
pub mod signed;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::files::{self, FileError};

/// The snapshot format this build reads and writes.
pub const SCHEMA: u32 = 1;

/// Largest snapshot accepted on the wire or from disk (about 100,000 workloads).
pub const MAX_SNAPSHOT_BYTES: usize = 64 * 1024 * 1024;

/// Name of the persisted last verified snapshot in the agent's state directory.
pub const PERSISTED: &str = "mesh-state.json";

/// One version of the mesh state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Snapshot {
    /// [`SCHEMA`].
    pub schema: u32,
    /// Increases with every published change (never reused by one authority directory).
    pub version: u64,
    /// `sha256:<hex>` over the content (see [`Snapshot::content_digest`]).
    pub digest: String,
    /// When the authority saw the change at its source (Unix milliseconds): agents measure the
    /// propagation time from it.
    pub changed_unix_ms: u64,
    /// Where the content came from (e.g. `file:/etc/mesh/registry.yaml`).
    pub source: String,
    /// Nodes, workloads and services: registry YAML, every entry with its `id:`.
    pub registry: String,
    /// Entries of the source the authority refused (`file:line: problem`): they are not in
    /// `registry`. Informational; not covered by the digest.
    #[serde(default)]
    pub refused: Vec<String>,
    /// The signed configuration bundle this state was published from (JSON), when the
    /// authority follows a bundle: nodes with pinned signers apply nothing else (see
    /// [`signed`]). Covered by its own signature, not by `digest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
    /// The ids of the entries, when `registry` is the source text as it is (the signed
    /// bundle's registry, byte for byte) rather than rendered with `id:`s: `namespace/name` →
    /// id, per kind. Covered by `digest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<Ids>,
}

/// The ids of a registry's entries: `namespace/name` → id, per kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ids {
    pub workloads: std::collections::BTreeMap<String, u32>,
    pub services: std::collections::BTreeMap<String, u32>,
}

impl Ids {
    /// The ids `registry` carries.
    pub fn of(registry: &crate::registry::Registry) -> Self {
        Self {
            workloads: registry.workloads.iter().map(|w| (w.key(), w.id)).collect(),
            services: registry
                .services
                .services
                .iter()
                .map(|s| (s.key(), s.id))
                .collect(),
        }
    }

    /// `registry` with these ids. Every entry must have one, non-zero and unique within its
    /// kind (entries are not dropped silently: the whole state is refused).
    pub fn apply(
        &self,
        registry: crate::registry::Registry,
    ) -> Result<crate::registry::Registry, String> {
        fn check(
            kind: &str,
            keys: impl Iterator<Item = String>,
            ids: &std::collections::BTreeMap<String, u32>,
        ) -> Result<(), String> {
            let mut seen = std::collections::HashSet::new();
            for k in keys {
                match ids.get(&k) {
                    None | Some(0) => return Err(format!("{kind} {k} has no id")),
                    Some(id) if !seen.insert(*id) => {
                        return Err(format!("{kind} {k}: id {id} is given twice"))
                    }
                    Some(_) => {}
                }
            }
            Ok(())
        }
        check(
            "workload",
            registry.workloads.iter().map(|w| w.key()),
            &self.workloads,
        )?;
        check(
            "service",
            registry.services.services.iter().map(|s| s.key()),
            &self.services,
        )?;
        Ok(registry.with_ids(
            |k| self.workloads.get(k).copied().unwrap_or(0),
            |k| self.services.get(k).copied().unwrap_or(0),
        ))
    }
}

/// Why a snapshot's registry could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error("entry ids: {0}")]
    Ids(String),
}

/// Why a snapshot was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state schema {got} is not supported (this build reads {SCHEMA})")]
    Schema { got: u32 },
    #[error("state version {version}: digest {got} does not match its content ({want})")]
    Digest {
        version: u64,
        got: String,
        want: String,
    },
    #[error("state of {size} bytes exceeds the limit of {MAX_SNAPSHOT_BYTES}")]
    TooLarge { size: usize },
    #[error("state version 0 is not a version")]
    ZeroVersion,
    #[error("malformed state in {}: {detail}", path.display())]
    Malformed { path: PathBuf, detail: String },
    #[error(transparent)]
    File(#[from] FileError),
}

impl Snapshot {
    /// A snapshot of `registry` (rendered registry YAML) as version `version`.
    pub fn new(version: u64, source: String, registry: String, changed_unix_ms: u64) -> Self {
        Self {
            schema: SCHEMA,
            version,
            digest: Self::content_digest(&registry),
            changed_unix_ms,
            source,
            registry,
            refused: Vec::new(),
            bundle: None,
            ids: None,
        }
    }

    /// This snapshot with `registry` given as source text and its entries' ids beside it.
    pub fn with_ids(mut self, ids: Ids) -> Self {
        self.digest = Self::digest_of(&self.registry, Some(&ids));
        self.ids = Some(ids);
        self
    }

    /// The digest of `registry` and, when given, the ids beside it.
    pub fn digest_of(registry: &str, ids: Option<&Ids>) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(format!("mesh-state/{SCHEMA}\n").as_bytes());
        ctx.update(registry.as_bytes());
        if let Some(ids) = ids {
            // Maps in key order: one encoding per content.
            ctx.update(b"\0ids\n");
            ctx.update(&serde_json::to_vec(ids).unwrap_or_default());
        }
        format!(
            "sha256:{}",
            crate::audit::record::hex(ctx.finish().as_ref())
        )
    }

    /// `sha256:<hex>` of the schema tag and the registry text: equal content, equal digest,
    /// whichever version carries it.
    pub fn content_digest(registry: &str) -> String {
        Self::digest_of(registry, None)
    }

    /// Checks the schema, size, version and digest: what an agent does before applying.
    pub fn verify(&self) -> Result<(), StateError> {
        if self.schema != SCHEMA {
            return Err(StateError::Schema { got: self.schema });
        }
        if self.version == 0 {
            return Err(StateError::ZeroVersion);
        }
        if self.registry.len() > MAX_SNAPSHOT_BYTES {
            return Err(StateError::TooLarge {
                size: self.registry.len(),
            });
        }
        let want = Self::digest_of(&self.registry, self.ids.as_ref());
        if want != self.digest {
            return Err(StateError::Digest {
                version: self.version,
                got: self.digest.clone(),
                want,
            });
        }
        Ok(())
    }

    /// The registry of this snapshot, validated entry by entry (for `node` when given: its
    /// local workloads' cgroups are checked under `cgroup_root`), with its ids applied when
    /// they travel beside the text. `label` names the text in errors.
    pub fn parse_registry(
        &self,
        label: &Path,
        node: Option<&str>,
        cgroup_root: &Path,
    ) -> Result<crate::registry::Parsed, ContentError> {
        let mut parsed =
            crate::registry::Registry::parse_entries(&self.registry, label, node, cgroup_root)?;
        if let Some(ids) = &self.ids {
            parsed.registry = ids.apply(parsed.registry).map_err(ContentError::Ids)?;
        }
        Ok(parsed)
    }

    /// The short form of the digest (first 12 hex digits) for logs.
    pub fn short_digest(&self) -> &str {
        let hex = self.digest.strip_prefix("sha256:").unwrap_or(&self.digest);
        &hex[..hex.len().min(12)]
    }

    /// Writes the snapshot to `dir`/[`PERSISTED`] (atomically, 0600).
    pub fn persist(&self, dir: &Path) -> Result<(), StateError> {
        files::create_private_dir(dir)?;
        let text = serde_json::to_vec(self).map_err(|e| StateError::Malformed {
            path: dir.join(PERSISTED),
            detail: e.to_string(),
        })?;
        files::write_atomic(&dir.join(PERSISTED), &text, 0o600)?;
        Ok(())
    }

    /// Reads and verifies the snapshot persisted in `dir`; `Ok(None)` when there is none.
    pub fn load(dir: &Path) -> Result<Option<Self>, StateError> {
        let path = dir.join(PERSISTED);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(FileError {
                    op: "reading",
                    path,
                    source,
                }
                .into())
            }
        };
        if meta.len() > (MAX_SNAPSHOT_BYTES * 2) as u64 {
            return Err(StateError::TooLarge {
                size: meta.len() as usize,
            });
        }
        let text = files::read_string(&path)?;
        let snapshot: Snapshot =
            serde_json::from_str(&text).map_err(|e| StateError::Malformed {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        snapshot.verify()?;
        Ok(Some(snapshot))
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "nodes:\n  - {name: n1, address: 10.0.0.1}\nworkloads:\n  - {name: a, namespace: default, serviceAccount: sa, node: n1, ips: [\"10.1.0.2\"]}\n  - {name: b, namespace: default, serviceAccount: sa, node: n1, ips: [\"10.1.0.3\"]}\n";

    fn ids(a: u32, b: u32) -> Ids {
        Ids {
            workloads: [("default/a".to_owned(), a), ("default/b".to_owned(), b)].into(),
            services: Default::default(),
        }
    }

    #[test]
    fn ids_beside_the_text_are_digested_and_applied_or_the_state_is_refused() {
        let s = Snapshot::new(2, "b".into(), TEXT.into(), 1).with_ids(ids(40, 7));
        s.verify().unwrap();
        assert_ne!(s.digest, Snapshot::content_digest(TEXT), "ids not digested");
        let root = Path::new("/");
        let r = s
            .parse_registry(Path::new("s"), None, root)
            .unwrap()
            .registry;
        let got: Vec<(String, u32)> = r.workloads.iter().map(|w| (w.key(), w.id)).collect();
        assert_eq!(got, [("default/a".into(), 40), ("default/b".into(), 7)]);
        // Ids changed after digesting: refused.
        let mut t = s.clone();
        t.ids = Some(ids(40, 8));
        assert!(matches!(t.verify(), Err(StateError::Digest { .. })));
        // Missing, zero or duplicate ids refuse the whole state (nothing dropped silently).
        for bad in [
            Ids {
                workloads: [("default/a".to_owned(), 1)].into(),
                services: Default::default(),
            },
            ids(0, 3),
            ids(5, 5),
        ] {
            let t = Snapshot::new(2, "b".into(), TEXT.into(), 1).with_ids(bad.clone());
            t.verify().unwrap();
            assert!(
                matches!(
                    t.parse_registry(Path::new("s"), None, root),
                    Err(ContentError::Ids(_))
                ),
                "{bad:?} accepted"
            );
        }
        // Round trip through the persisted form.
        let dir = tempfile::tempdir().unwrap();
        s.persist(dir.path()).unwrap();
        assert_eq!(Snapshot::load(dir.path()).unwrap(), Some(s));
    }

    #[test]
    fn digest_covers_the_content_and_verify_catches_a_change() {
        let s = Snapshot::new(3, "file:/r".into(), "nodes: []\nworkloads: []\n".into(), 1);
        s.verify().unwrap();
        assert!(s.digest.starts_with("sha256:") && s.digest.len() == 7 + 64);
        let mut t = s.clone();
        t.registry.push(' ');
        assert!(matches!(t.verify(), Err(StateError::Digest { .. })));
        let mut t = s.clone();
        t.schema = 2;
        assert!(matches!(t.verify(), Err(StateError::Schema { got: 2 })));
        let mut t = s.clone();
        t.version = 0;
        assert!(matches!(t.verify(), Err(StateError::ZeroVersion)));
        // Same content, another version: same digest.
        let u = Snapshot::new(4, "x".into(), s.registry.clone(), 2);
        assert_eq!(u.digest, s.digest);
    }

    #[test]
    fn persisted_snapshot_round_trips_and_a_tampered_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Snapshot::load(dir.path()).unwrap().is_none());
        let s = Snapshot::new(7, "file:/r".into(), "workloads: []\n".into(), 5);
        s.persist(dir.path()).unwrap();
        assert_eq!(Snapshot::load(dir.path()).unwrap(), Some(s.clone()));
        let path = dir.path().join(PERSISTED);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("workloads: []", "workloads: [x]")).unwrap();
        assert!(matches!(
            Snapshot::load(dir.path()),
            Err(StateError::Digest { .. })
        ));
        std::fs::write(&path, "{not json").unwrap();
        assert!(matches!(
            Snapshot::load(dir.path()),
            Err(StateError::Malformed { .. })
        ));
        std::fs::write(&path, r#"{"schema":1,"version":1,"digest":"x","changedUnixMs":0,"source":"","registry":"","evil":1}"#).unwrap();
        assert!(matches!(
            Snapshot::load(dir.path()),
            Err(StateError::Malformed { .. })
        ));
    }
}
