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
    /// Where the signers are pinned (re-read when it changes: a rotation at the authority is
    /// pinned again by `authority join`), and the stamp of the copy in `signers`.
    signers_file: Option<(PathBuf, Option<files::Stamp>)>,
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
            signers_file: None,
            highest,
            path,
        })
    }

    /// Re-reads the pinned signers from `file` whenever it changes ([`Guard::reload_signers`]).
    pub fn following(mut self, file: PathBuf) -> Self {
        let stamp = files::Stamp::of(&file);
        self.signers_file = Some((file, stamp));
        self
    }

    /// Picks up a changed signers file (keys added, activated, retired). A file that is gone
    /// or does not load changes nothing: the pinned set stays (logged), so neither deleting
    /// nor corrupting it lowers what the node requires.
    pub fn reload_signers(&mut self) {
        let Some((file, seen)) = &mut self.signers_file else {
            return;
        };
        let now = files::Stamp::of(file);
        if now == *seen {
            return;
        }
        *seen = now;
        match SignerSet::load(file) {
            Ok(set) => {
                tracing::info!(signers = %file.display(), active = set.active().count(),
                               "pinned signers changed: reloaded");
                self.signers = set;
            }
            Err(e) => tracing::warn!(signers = %file.display(), error = %crate::error_chain(&e),
                                     "pinned signers unreadable: the previous set stays"),
        }
    }

    /// The highest version applied (0: none).
    pub fn highest(&self) -> &Highest {
        &self.highest
    }

    /// Checks `snapshot` against the pinned signers and the highest version, and that its
    /// registry, parsed for `node` (`published`: that parse, when the caller has it), is the
    /// bundle's. Changes nothing.
    pub fn check(
        &self,
        snapshot: &Snapshot,
        published: Option<&Registry>,
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
        same_content(snapshot, published, b.registry_text(), node, cgroup_root).map_err(
            |detail| SignedError::ContentMismatch {
                version: snapshot.version,
                detail,
            },
        )?;
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

/// Whether the snapshot's registry is the bundle's: its text byte for byte, with the ids beside
/// it (what the authority publishes), or — a snapshot rendered with `id:`s, as published and
/// persisted before — the same entries with the same fields once ids are added. `Err` says
/// the first difference.
fn same_content(
    snapshot: &Snapshot,
    published: Option<&Registry>,
    signed_registry: &str,
    node: &str,
    cgroup_root: &Path,
) -> Result<(), String> {
    if snapshot.ids.is_some() {
        return if snapshot.registry == signed_registry {
            Ok(())
        } else {
            Err("its registry text is not the bundle's".to_owned())
        };
    }
    let label = Path::new("state");
    let parse = |text: &str| {
        Registry::parse_entries(text, label, Some(node), cgroup_root)
            .map(|p| p.registry)
            .map_err(|e| e.to_string())
    };
    let parsed_here;
    let published = match published {
        Some(p) => p,
        None => {
            parsed_here = parse(&snapshot.registry)?;
            &parsed_here
        }
    };
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
    if &signed != published {
        return Err("an entry differs from the bundle's".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{sign, Bundle, SignedBundle};
    use crate::state::ids::IdAllocator;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    const REGISTRY: &str = "nodes:\n  - {name: n1, address: 10.0.0.1}\nworkloads:\n  - {name: a, namespace: default, serviceAccount: sa-a, node: n1, ips: [\"10.1.0.2\"], cgroup: x/a}\n  - {name: b, namespace: default, serviceAccount: sa-b, node: n1, ips: [\"10.1.0.3\"], cgroup: x/b}\n";

    fn key() -> Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn pinned(keys: &[&Ed25519KeyPair]) -> SignerSet {
        let mut set = SignerSet::new();
        for k in keys {
            let public: [u8; 32] = k.public_key().as_ref().try_into().unwrap();
            let id = set.add(public).unwrap();
            set.activate(&id).unwrap();
        }
        set
    }

    /// A state as the authority publishes it: `registry` rendered with ids, the bundle attached.
    fn state(version: u64, registry: &str, by: &Ed25519KeyPair) -> Snapshot {
        let bundle = Bundle::new(
            version,
            "2026-11-26T00:00:00Z".into(),
            None,
            registry.into(),
            Vec::new(),
        )
        .unwrap();
        let signed = SignedBundle::new(bundle.clone(), vec![sign(&bundle, by)]);
        let parsed =
            Registry::parse_entries(registry, Path::new("r"), None, Path::new("/")).unwrap();
        let mut ids = IdAllocator::in_memory();
        let rendered = parsed
            .registry
            .with_ids(
                |k| ids.id(crate::state::ids::Kind::Workload, k).unwrap(),
                |_| 1,
            )
            .to_yaml();
        let mut s = Snapshot::new(version, "test".into(), rendered, 0);
        s.bundle = Some(String::from_utf8(signed.to_json()).unwrap());
        s
    }

    /// A state as the authority publishes it now: the bundle's registry text as it is, the
    /// ids beside it.
    fn state_verbatim(version: u64, registry: &str, by: &Ed25519KeyPair) -> Snapshot {
        let rendered = state(version, registry, by);
        let ids = crate::state::Ids::of(
            &rendered
                .parse_registry(Path::new("r"), None, Path::new("/"))
                .unwrap()
                .registry,
        );
        let mut s = Snapshot::new(version, "test".into(), registry.into(), 0).with_ids(ids);
        s.bundle = rendered.bundle;
        s
    }

    #[test]
    fn verbatim_registry_must_be_the_bundles_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = key();
        let g = guard(pinned(&[&k1]), dir.path());
        let ok = state_verbatim(2, REGISTRY, &k1);
        check(&g, &ok).unwrap();
        // One more workload (or any byte) beside the signed bundle, digest recomputed.
        for edit in [
            REGISTRY.to_owned() + "  - {name: z, namespace: default, serviceAccount: sa-z, node: n1, ips: [\"10.1.0.9\"], cgroup: x/z}\n",
            REGISTRY.replace("sa-b", "sa-c"),
            REGISTRY.replacen(' ', "  ", 1),
        ] {
            let mut t = ok.clone();
            t.registry = edit;
            t = t.clone().with_ids(t.ids.clone().unwrap());
            assert_eq!(check(&g, &t).unwrap_err().reason(), CONTENT_MISMATCH);
        }
    }

    fn guard(set: SignerSet, dir: &Path) -> Guard {
        Guard::open(set, dir).unwrap()
    }

    fn check(g: &Guard, s: &Snapshot) -> Result<Verified, SignedError> {
        g.check(s, None, "n9", Path::new("/"))
    }

    #[test]
    fn only_pinned_signers_newer_versions_and_the_signed_content_pass() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, k2) = (key(), key());
        let mut g = guard(pinned(&[&k1]), dir.path());

        let v2 = state(2, REGISTRY, &k1);
        let ok = check(&g, &v2).unwrap();
        g.applied(&ok).unwrap();

        // Unsigned, another signer, a tampered bundle, extra content beside the bundle.
        let mut unsigned = v2.clone();
        unsigned.bundle = None;
        assert_eq!(
            check(&g, &unsigned).unwrap_err().reason(),
            "missing_signature"
        );
        assert_eq!(
            check(&g, &state(3, REGISTRY, &k2)).unwrap_err().reason(),
            "unknown_signer"
        );
        let mut tampered = state(3, REGISTRY, &k1);
        tampered.bundle = tampered.bundle.map(|b| b.replacen("sa-b", "sa-c", 1));
        assert_eq!(
            check(&g, &tampered).unwrap_err().reason(),
            "digest_mismatch"
        );
        let mut widened = state(3, REGISTRY, &k1);
        let extra = "  - {name: z, namespace: default, serviceAccount: sa-z, node: n1, ips: [\"10.1.0.9\"], cgroup: x/z, id: 99}\n";
        widened.registry = widened.registry.replace("services:", "") + extra;
        widened.digest = Snapshot::content_digest(&widened.registry);
        assert_eq!(check(&g, &widened).unwrap_err().reason(), CONTENT_MISMATCH);

        // Rollback: lower, or the same version with other content; the same bundle again is
        // fine (a restart re-reads it).
        assert_eq!(
            check(&g, &state(1, REGISTRY, &k1)).unwrap_err().reason(),
            "rollback"
        );
        let other = REGISTRY.replace("10.1.0.3", "10.1.0.4");
        assert_eq!(
            check(&g, &state(2, &other, &k1)).unwrap_err().reason(),
            "rollback"
        );
        check(&g, &v2).unwrap();

        // The highest version survives a restart (a new guard on the same directory).
        let g2 = guard(pinned(&[&k1]), dir.path());
        assert_eq!(g2.highest().version, 2);
        assert_eq!(
            check(&g2, &state(1, REGISTRY, &k1)).unwrap_err().reason(),
            "rollback"
        );
        check(&g2, &state(3, &other, &k1)).unwrap();

        // A corrupt record of the highest version refuses to open (it could not stop a
        // rollback).
        std::fs::write(dir.path().join(HIGHEST), "{").unwrap();
        assert!(Guard::open(pinned(&[&k1]), dir.path()).is_err());
    }

    #[test]
    fn pinned_signers_follow_their_file_and_a_bad_file_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("signers.json");
        let (k1, k2) = (key(), key());
        pinned(&[&k1]).save(&file).unwrap();
        let mut g = guard(SignerSet::load(&file).unwrap(), dir.path()).following(file.clone());
        g.reload_signers();
        check(&g, &state(1, REGISTRY, &k1)).unwrap();
        assert_eq!(
            check(&g, &state(1, REGISTRY, &k2)).unwrap_err().reason(),
            "unknown_signer"
        );

        // Rotated (re-pinned by `authority join`): k2 active, k1 gone.
        pinned(&[&k2]).save(&file).unwrap();
        g.reload_signers();
        check(&g, &state(1, REGISTRY, &k2)).unwrap();
        assert_eq!(
            check(&g, &state(1, REGISTRY, &k1)).unwrap_err().reason(),
            "unknown_signer"
        );

        // Corrupted, emptied of active keys by garbage, or deleted: the k2 set stays.
        for bad in [&b"{"[..], b"", b"{\"signers\": 7}", &[0xff; 64]] {
            std::fs::write(&file, bad).unwrap();
            g.reload_signers();
            check(&g, &state(1, REGISTRY, &k2)).unwrap();
        }
        std::fs::remove_file(&file).unwrap();
        g.reload_signers();
        check(&g, &state(1, REGISTRY, &k2)).unwrap();
        assert_eq!(
            check(&g, &state(1, REGISTRY, &k1)).unwrap_err().reason(),
            "unknown_signer"
        );
    }
}
