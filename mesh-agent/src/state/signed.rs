//! Signed configuration on the state stream (issue 12): with signer keys pinned on the node,
//! an agent applies only a state that carries a configuration bundle signed by an active
//! pinned signer, whose version is not below the highest it ever applied, and whose content
//! is exactly what the state says.
//!
//! The authority publishes a verified bundle as a [`Snapshot`]: `registry` is the bundle's
//! registry rendered with the ids the authority assigned, `bundle` the signed bundle itself.
//! The agent checks the bundle ([`crate::bundle::verify`]: structure, digest, signature,
//! signer) and then that the rendered registry is the bundle's registry with ids added —
//! ids only key the maps, they cannot change what is enforced; anything else is refused
//! (`content_mismatch`). The policies of the verified bundle are what the agent compiles.
//!
//! Anti-rollback: the highest version applied (with its digest) is persisted in the state
//! directory (`config-version.json`) and survives restarts; a lower version, or the same
//! version with another digest, is refused (`rollback`).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use super::Snapshot;
use crate::{
    bundle::{self, PolicyFile, Rejection, SignerSet},
    files,
    registry::Registry,
};

/// Name of the persisted highest version in the agent's state directory.
pub const HIGHEST: &str = "config-version.json";

/// The label of every refusal this module adds to [`bundle::REASONS`].
pub const CONTENT_MISMATCH: &str = "content_mismatch";

/// Why a signed state was refused (the applied state stays).
#[derive(Debug, thiserror::Error)]
pub enum SignedError {
    #[error(transparent)]
    Bundle(#[from] Rejection),
    #[error("state version {version}: no configuration bundle (this node requires signed configuration)")]
    Unsigned { version: u64 },
    #[error("state version {version}: the registry is not the signed bundle's ({detail})")]
    ContentMismatch { version: u64, detail: String },
    #[error("bundle version {version} is below the highest applied here, {highest} (rollback)")]
    Rollback { version: u64, highest: u64 },
    #[error("bundle version {version} was applied here with another digest (rollback)")]
    Replayed { version: u64 },
}

impl SignedError {
    /// The `mesh_config_rejected_total` label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Bundle(r) => r.reason(),
            Self::Unsigned { .. } => "missing_signature",
            Self::ContentMismatch { .. } => CONTENT_MISMATCH,
            Self::Rollback { .. } | Self::Replayed { .. } => "rollback",
        }
    }
}

/// The highest bundle version applied on this node, persisted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Highest {
    pub version: u64,
    pub digest: String,
}

/// What a node requires of its configuration: the pinned signers and the highest version.
#[derive(Debug)]
pub struct Guard {
    signers: SignerSet,
    highest: Highest,
    path: PathBuf,
}

/// A verified bundle's parts the agent applies.
#[derive(Clone, Debug)]
pub struct Verified {
    pub version: u64,
    pub digest: String,
    pub policies: Arc<[PolicyFile]>,
}

impl Guard {
    /// The guard of a node whose signers are pinned in `signers` and whose state directory is
    /// `state_dir`. A corrupt persisted highest version refuses the start (it cannot be
    /// trusted to stop a rollback).
    pub fn open(signers: SignerSet, state_dir: &Path) -> Result<Self, String> {
        let path = state_dir.join(HIGHEST);
        let highest = match std::fs::read_to_string(&path) {
            Ok(text) => {
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Highest::default(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Ok(Self {
            signers,
            highest,
            path,
        })
    }

    /// The highest version applied (0: none).
    pub fn highest(&self) -> &Highest {
        &self.highest
    }

    /// Checks `snapshot` against the pinned signers and the highest version, and that its
    /// registry, parsed for `node`, is the bundle's. Changes nothing.
    pub fn check(
        &self,
        snapshot: &Snapshot,
        node: &str,
        cgroup_root: &Path,
    ) -> Result<Verified, SignedError> {
        let Some(text) = &snapshot.bundle else {
            return Err(SignedError::Unsigned {
                version: snapshot.version,
            });
        };
        let signed = bundle::parse_signed(text.as_bytes())?;
        let b = bundle::verify(&signed, &self.signers, None)?;
        if b.version() < self.highest.version {
            return Err(SignedError::Rollback {
                version: b.version(),
                highest: self.highest.version,
            });
        }
        if b.version() == self.highest.version && b.digest() != self.highest.digest {
            return Err(SignedError::Replayed {
                version: b.version(),
            });
        }
        same_content(snapshot, b.registry_text(), node, cgroup_root).map_err(|detail| {
            SignedError::ContentMismatch {
                version: snapshot.version,
                detail,
            }
        })?;
        Ok(Verified {
            version: b.version(),
            digest: b.digest().to_owned(),
            policies: b.policies().to_vec().into(),
        })
    }

    /// Records `v` as applied: from now on nothing below it is.
    pub fn applied(&mut self, v: &Verified) -> Result<(), files::FileError> {
        if v.version < self.highest.version {
            return Ok(());
        }
        let highest = Highest {
            version: v.version,
            digest: v.digest.clone(),
        };
        let text = serde_json::to_vec(&highest).unwrap_or_default();
        if let Some(dir) = self.path.parent() {
            files::create_private_dir(dir)?;
        }
        files::write_atomic(&self.path, &text, 0o600)?;
        self.highest = highest;
        Ok(())
    }
}

/// Whether the snapshot's registry is the bundle's with ids added (the same entries, the same
/// fields). `Err` says the first difference.
fn same_content(
    snapshot: &Snapshot,
    signed_registry: &str,
    node: &str,
    cgroup_root: &Path,
) -> Result<(), String> {
    let label = Path::new("state");
    let parse = |text: &str| {
        Registry::parse_entries(text, label, Some(node), cgroup_root)
            .map(|p| p.registry)
            .map_err(|e| e.to_string())
    };
    let published = parse(&snapshot.registry)?;
    let signed = parse(signed_registry)?;
    let wids: HashMap<String, u32> = published
        .workloads
        .iter()
        .map(|w| (w.key(), w.id))
        .collect();
    let sids: HashMap<String, u32> = published
        .services
        .services
        .iter()
        .map(|s| (s.key(), s.id))
        .collect();
    let same_keys = signed.workloads.len() == wids.len()
        && signed.services.services.len() == sids.len()
        && signed.workloads.iter().all(|w| wids.contains_key(&w.key()))
        && signed
            .services
            .services
            .iter()
            .all(|s| sids.contains_key(&s.key()));
    if !same_keys {
        return Err("its workloads or services are not the bundle's".to_owned());
    }
    let signed = signed.with_ids(|k| wids[k], |k| sids[k]);
    if signed != published {
        return Err("an entry differs from the bundle's".to_owned());
    }
    Ok(())
}
