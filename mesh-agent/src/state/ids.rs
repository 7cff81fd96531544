//! Stable ids for workloads and services, assigned by the authority.
//!
//! The kernel maps of every node carry workload and service ids (destinations, enrolment,
//! policy). An id must therefore mean the same entry for as long as that entry exists, whatever
//! else is added, removed or reordered at the source: the authority gives each `namespace/name`
//! an id on first sight and keeps it; an id is never handed to another entry (the counter only
//! grows), so a connection or a map entry of a removed workload can never be taken for a new
//! one. The assignment is persisted in the authority directory (`state/ids.json`).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::StateError;
use crate::files;

/// The persisted assignment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Assigned {
    /// The last published version (versions grow across authority restarts).
    version: u64,
    /// Its content digest: a restart that finds the same content publishes the same version.
    #[serde(default)]
    digest: String,
    next_workload: u32,
    next_service: u32,
    workloads: BTreeMap<String, u32>,
    services: BTreeMap<String, u32>,
}

/// Workload and service ids by `namespace/name`, and the state version counter.
#[derive(Debug)]
pub struct IdAllocator {
    path: Option<PathBuf>,
    assigned: Assigned,
}

/// Which kind of entry an id is for (separate id spaces).
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Workload,
    Service,
}

impl IdAllocator {
    /// The allocator persisted at `dir`/`state/ids.json` (created empty when absent).
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join("state").join("ids.json");
        let assigned = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| StateError::Malformed {
                path: path.clone(),
                detail: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Assigned::default(),
            Err(source) => {
                return Err(files::FileError {
                    op: "reading",
                    path,
                    source,
                }
                .into())
            }
        };
        Ok(Self {
            path: Some(path),
            assigned,
        })
    }

    /// An allocator that is not persisted (tests, `config bundle`).
    pub fn in_memory() -> Self {
        Self {
            path: None,
            assigned: Assigned::default(),
        }
    }

    /// The id of `key`, assigned now if it has none. `None` once the id space is exhausted.
    pub fn id(&mut self, kind: Kind, key: &str) -> Option<u32> {
        let (map, next) = match kind {
            Kind::Workload => (
                &mut self.assigned.workloads,
                &mut self.assigned.next_workload,
            ),
            Kind::Service => (&mut self.assigned.services, &mut self.assigned.next_service),
        };
        if let Some(id) = map.get(key) {
            return Some(*id);
        }
        let id = next.checked_add(1)?;
        *next = id;
        map.insert(key.to_owned(), id);
        Some(id)
    }

    /// Forgets the keys not in `keep` (their ids are not reused).
    pub fn retain(&mut self, kind: Kind, keep: &dyn Fn(&str) -> bool) {
        let map = match kind {
            Kind::Workload => &mut self.assigned.workloads,
            Kind::Service => &mut self.assigned.services,
        };
        map.retain(|k, _| keep(k));
    }

    /// The version for content `digest`: the last one again when its content is the same,
    /// else the next (persisted by [`IdAllocator::save`]).
    pub fn version_for(&mut self, digest: &str) -> u64 {
        if self.assigned.version == 0 || self.assigned.digest != digest {
            self.assigned.version += 1;
            self.assigned.digest = digest.to_owned();
        }
        self.assigned.version
    }

    /// The last version handed out.
    pub fn version(&self) -> u64 {
        self.assigned.version
    }

    /// Whether `digest` is the content of the last version handed out.
    pub fn is_published_digest(&self, digest: &str) -> bool {
        self.assigned.digest == digest
    }

    /// Records `version` (a signed bundle's, chosen by its signer) with its `digest` as the
    /// last published.
    pub fn set_published(&mut self, version: u64, digest: &str) {
        self.assigned.version = version;
        self.assigned.digest = digest.to_owned();
    }

    /// The directory the assignment is persisted in (`None`: in memory).
    pub fn dir(&self) -> Option<&Path> {
        self.path.as_deref().and_then(Path::parent)
    }

    /// Persists the assignment (atomically, 0600).
    pub fn save(&self) -> Result<(), StateError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if let Some(parent) = path.parent() {
            files::create_private_dir(parent)?;
        }
        let text = serde_json::to_vec(&self.assigned).map_err(|e| StateError::Malformed {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        files::write_atomic(path, &text, 0o600)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_never_reused_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = IdAllocator::open(dir.path()).unwrap();
        assert_eq!(ids.id(Kind::Workload, "default/a"), Some(1));
        assert_eq!(ids.id(Kind::Workload, "default/b"), Some(2));
        assert_eq!(ids.id(Kind::Service, "default/s"), Some(1));
        assert_eq!(ids.id(Kind::Workload, "default/a"), Some(1));
        ids.retain(Kind::Workload, &|k| k != "default/a");
        // Removed and re-added: a new id, never the old one.
        assert_eq!(ids.id(Kind::Workload, "default/a"), Some(3));
        assert_eq!(ids.version_for("d1"), 1);
        assert_eq!(ids.version_for("d1"), 1);
        ids.save().unwrap();
        let mut again = IdAllocator::open(dir.path()).unwrap();
        assert_eq!(again.id(Kind::Workload, "default/b"), Some(2));
        assert_eq!(again.id(Kind::Workload, "default/c"), Some(4));
        assert_eq!(again.version_for("d1"), 1);
        assert_eq!(again.version_for("d2"), 2);
    }

    #[test]
    fn a_corrupt_assignment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::write(dir.path().join("state/ids.json"), "{").unwrap();
        assert!(IdAllocator::open(dir.path()).is_err());
    }
}
