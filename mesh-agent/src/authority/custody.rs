//! The authority's custody of the nodes' audit checkpoints.
//!
//! Each node's audit public key is registered here, bound to the node identity: either by
//! an operator (`mesh-agent authority audit-key`), or on first use, by the first checkpoint
//! the node sends over its mutually-authenticated channel (the node name is the one its
//! certificate proves). Another key for the same node is refused; re-keying is an explicit
//! operator action (`--replace`), which also starts a new chain epoch (the old copy is kept
//! beside it).
//!
//! A checkpoint is accepted when it names the sending node, is signed by the registered key
//! and moves the chain forward (a seq not after the last accepted one is a rollback or replay
//! and is refused; the identical last checkpoint, resent after a lost answer, is acknowledged
//! without a second copy). Accepted checkpoints are appended, one JSON line each, in the
//! format of the node's own checkpoints file, to `<authority-dir>/audit-nodes/<node>/
//! checkpoints.jsonl`: `mesh-agent audit verify DIR --checkpoints <that file>` then catches a
//! deleted segment or a truncated tail that the node's own copy no longer shows.

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use crate::audit::{
    checkpoint::{self, Checkpoint},
    record::{hex, unhex, SCHEMA_VERSION},
};

/// The directory, in the authority's state directory, holding one directory per node.
pub const NODES_DIR: &str = "audit-nodes";
/// The registered public key (hex, one line) in a node's directory.
pub const KEY_FILE: &str = "audit-key.pub";
/// The node's checkpoints, as accepted, in a node's directory.
pub const CHECKPOINTS_FILE: &str = "checkpoints.jsonl";

/// Why a key registration or a checkpoint was refused. Nothing is changed by a refusal.
#[derive(Debug, thiserror::Error)]
pub enum CustodyError {
    #[error("invalid node name {0:?}")]
    BadNode(String),
    #[error("malformed checkpoint: {0}")]
    Malformed(&'static str),
    #[error("checkpoint names node {claimed:?} but was sent by node {node:?}")]
    WrongNode { node: String, claimed: String },
    #[error(
        "node {node:?} has audit key {registered} registered, not {got}: re-keying is an operator action (`mesh-agent authority audit-key --replace`)"
    )]
    KeyMismatch {
        node: String,
        registered: String,
        got: String,
    },
    #[error("checkpoint signature does not verify with node {node:?}'s registered audit key")]
    BadSignature { node: String },
    #[error(
        "checkpoint seq {got} of node {node:?} is not after the last accepted seq {last}: rollback or replay refused"
    )]
    Rollback { node: String, got: u64, last: u64 },
    #[error("audit custody {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("audit custody {path}: {detail}")]
    BadState { path: PathBuf, detail: String },
}

/// What happened to an accepted checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Appended to the node's copy.
    Appended,
    /// The identical last checkpoint again (a retry): acknowledged, not appended twice.
    AlreadyHeld,
}

/// Counters of the custody, for tests and logs.
#[derive(Debug, Default)]
pub struct CustodyStats {
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub keys_registered: AtomicU64,
}

#[derive(Clone)]
struct NodeState {
    key: [u8; 32],
    last: Option<(u64, String)>,
    /// Length of the checkpoints file when `last` was read or written: an operator's
    /// `--replace` (which moves the file) is noticed.
    len: u64,
}

/// The checkpoints kept for the nodes, under an authority directory.
#[derive(Debug)]
pub struct Custody {
    dir: PathBuf,
    nodes: Mutex<HashMap<String, NodeState>>,
    stats: CustodyStats,
}

impl std::fmt::Debug for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeState")
            .field("key", &hex(&self.key))
            .field("last", &self.last)
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CustodyError + '_ {
    move |source| CustodyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Parses a hex Ed25519 public key.
pub fn parse_key(text: &str) -> Option<[u8; 32]> {
    unhex::<32>(text.trim())
}

impl Custody {
    /// The custody under the authority directory `authority_dir`.
    pub fn new(authority_dir: &Path) -> Self {
        Self {
            dir: authority_dir.join(NODES_DIR),
            nodes: Mutex::new(HashMap::new()),
            stats: CustodyStats::default(),
        }
    }

    pub fn stats(&self) -> &CustodyStats {
        &self.stats
    }

    /// A node's directory.
    pub fn node_dir(&self, node: &str) -> Result<PathBuf, CustodyError> {
        if !crate::names::is_dns_subdomain(node) {
            return Err(CustodyError::BadNode(node.chars().take(260).collect()));
        }
        Ok(self.dir.join(node))
    }

    /// The authority's copy of `node`'s checkpoints.
    pub fn checkpoints_path(&self, node: &str) -> Result<PathBuf, CustodyError> {
        Ok(self.node_dir(node)?.join(CHECKPOINTS_FILE))
    }

    /// The key registered for `node`, if any.
    pub fn registered_key(&self, node: &str) -> Result<Option<[u8; 32]>, CustodyError> {
        let path = self.node_dir(node)?.join(KEY_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => parse_key(&text)
                .map(Some)
                .ok_or_else(|| CustodyError::BadState {
                    path,
                    detail: "not a hex Ed25519 public key".into(),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Registers `key` for `node` (operator action). The same key again is a no-op; another
    /// key is refused unless `replace`, which moves the node's current checkpoints copy aside
    /// (`checkpoints.<unix-secs>.jsonl`) and starts a new one. Returns whether anything changed.
    pub fn register(&self, node: &str, key: [u8; 32], replace: bool) -> Result<bool, CustodyError> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.node_dir(node)?;
        match self.registered_key(node)? {
            Some(current) if current == key && !replace => return Ok(false),
            Some(current) if !replace => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                return Err(CustodyError::KeyMismatch {
                    node: node.to_owned(),
                    registered: hex(&current),
                    got: hex(&key),
                });
            }
            Some(_) => {
                let cps = dir.join(CHECKPOINTS_FILE);
                if cps.exists() {
                    let secs = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    let aside = dir.join(format!("checkpoints.{secs}.jsonl"));
                    fs::rename(&cps, &aside).map_err(io_err(&cps))?;
                }
            }
            None => {}
        }
        write_key(&dir, &key)?;
        nodes.remove(node);
        self.stats.keys_registered.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Accepts a checkpoint sent by `node` (the identity its certificate proves), or refuses
    /// it, changing nothing. The first checkpoint of a node without a registered key
    /// registers the key it was signed with (trust on first use, bound to `node`).
    pub fn accept(&self, node: &str, cp: &Checkpoint) -> Result<Accepted, CustodyError> {
        let result = self.accept_inner(node, cp);
        let counter = if result.is_ok() {
            &self.stats.accepted
        } else {
            &self.stats.refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    fn accept_inner(&self, node: &str, cp: &Checkpoint) -> Result<Accepted, CustodyError> {
        let dir = self.node_dir(node)?;
        check_shape(cp)?;
        if cp.node != node {
            return Err(CustodyError::WrongNode {
                node: node.to_owned(),
                claimed: cp.node.chars().take(260).collect(),
            });
        }
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let cps = dir.join(CHECKPOINTS_FILE);
        let len = file_len(&cps)?;
        let state = match nodes.get(node) {
            Some(s) if s.len == len && self.registered_key(node)? == Some(s.key) => s.clone(),
            _ => match self.registered_key(node)? {
                Some(key) => NodeState {
                    key,
                    last: last_checkpoint(&cps)?,
                    len,
                },
                None => {
                    // Trust on first use: the key must at least have signed this checkpoint.
                    let key = parse_key(&cp.key).ok_or(CustodyError::Malformed("key"))?;
                    if !cp.signature_valid(&key) {
                        return Err(CustodyError::BadSignature {
                            node: node.to_owned(),
                        });
                    }
                    write_key(&dir, &key)?;
                    self.stats.keys_registered.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(node, key = %cp.key, "audit key registered on first use");
                    NodeState {
                        key,
                        last: last_checkpoint(&cps)?,
                        len,
                    }
                }
            },
        };
        if cp.key != hex(&state.key) {
            return Err(CustodyError::KeyMismatch {
                node: node.to_owned(),
                registered: hex(&state.key),
                got: cp.key.clone(),
            });
        }
        if !cp.signature_valid(&state.key) {
            return Err(CustodyError::BadSignature {
                node: node.to_owned(),
            });
        }
        if let Some((last, head)) = &state.last {
            if cp.seq == *last && cp.head == *head {
                return Ok(Accepted::AlreadyHeld);
            }
            if cp.seq <= *last {
                return Err(CustodyError::Rollback {
                    node: node.to_owned(),
                    got: cp.seq,
                    last: *last,
                });
            }
        }
        checkpoint::append(&cps, cp).map_err(io_err(&cps))?;
        let len = file_len(&cps)?;
        nodes.insert(
            node.to_owned(),
            NodeState {
                last: Some((cp.seq, cp.head.clone())),
                len,
                ..state
            },
        );
        Ok(Accepted::Appended)
    }
}

/// Bounds on every field: what is not a checkpoint of this schema is refused before any
/// signature work.
fn check_shape(cp: &Checkpoint) -> Result<(), CustodyError> {
    if cp.v != SCHEMA_VERSION {
        return Err(CustodyError::Malformed("unsupported schema version"));
    }
    if !crate::names::is_dns_subdomain(&cp.node) {
        return Err(CustodyError::Malformed("node"));
    }
    if cp.head_hash().is_none() {
        return Err(CustodyError::Malformed("head (64 hex digits)"));
    }
    if parse_key(&cp.key).is_none() || cp.key.len() != 64 {
        return Err(CustodyError::Malformed("key (64 hex digits)"));
    }
    if unhex::<64>(&cp.sig).is_none() {
        return Err(CustodyError::Malformed("sig (128 hex digits)"));
    }
    if cp.time.len() > 64 {
        return Err(CustodyError::Malformed("time"));
    }
    Ok(())
}

fn write_key(dir: &Path, key: &[u8; 32]) -> Result<(), CustodyError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let path = dir.join(KEY_FILE);
    let tmp = dir.join(format!("{KEY_FILE}.tmp"));
    fs::write(&tmp, format!("{}\n", hex(key))).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))
}

fn file_len(path: &Path) -> Result<u64, CustodyError> {
    match fs::metadata(path) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// The highest checkpoint (seq, head) in the copy, if any.
fn last_checkpoint(path: &Path) -> Result<Option<(u64, String)>, CustodyError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut last: Option<(u64, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let cp: Checkpoint = serde_json::from_str(line).map_err(|e| CustodyError::BadState {
            path: path.to_owned(),
            detail: format!("line {}: {e}", i + 1),
        })?;
        if last.as_ref().is_none_or(|(seq, _)| cp.seq > *seq) {
            last = Some((cp.seq, cp.head));
        }
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::checkpoint::AuditKey;

    fn cp(key: &AuditKey, node: &str, seq: u64) -> Checkpoint {
        key.checkpoint(node, seq, &[seq as u8; 32], "2026-01-01T00:00:00Z".into())
    }

    fn copy(c: &Custody, node: &str) -> String {
        fs::read_to_string(c.checkpoints_path(node).unwrap()).unwrap_or_default()
    }

    #[test]
    fn first_use_registers_then_forward_only_with_that_key() {
        let dir = tempfile::tempdir().unwrap();
        let c = Custody::new(dir.path());
        let k1 = AuditKey::ephemeral().unwrap();
        assert_eq!(
            c.accept("n1", &cp(&k1, "n1", 3)).unwrap(),
            Accepted::Appended
        );
        assert_eq!(
            hex(&c.registered_key("n1").unwrap().unwrap()),
            k1.public_hex()
        );
        assert_eq!(
            c.accept("n1", &cp(&k1, "n1", 5)).unwrap(),
            Accepted::Appended
        );
        // A retry of the last one: acknowledged, not kept twice.
        assert_eq!(
            c.accept("n1", &cp(&k1, "n1", 5)).unwrap(),
            Accepted::AlreadyHeld
        );
        assert_eq!(copy(&c, "n1").lines().count(), 2);
        assert_eq!(c.stats().accepted.load(Ordering::Relaxed), 3);
        assert_eq!(c.stats().keys_registered.load(Ordering::Relaxed), 1);
        // A fresh custody (authority restart) reads the copy back.
        let again = Custody::new(dir.path());
        let err = again.accept("n1", &cp(&k1, "n1", 4)).unwrap_err();
        assert!(
            matches!(err, CustodyError::Rollback { last: 5, .. }),
            "{err}"
        );
    }

    #[test]
    fn attacks_are_refused_counted_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let c = Custody::new(dir.path());
        let k1 = AuditKey::ephemeral().unwrap();
        let k2 = AuditKey::ephemeral().unwrap();
        c.accept("n1", &cp(&k1, "n1", 10)).unwrap();
        c.accept("n2", &cp(&k2, "n2", 1)).unwrap();
        let before = (copy(&c, "n1"), copy(&c, "n2"));
        let mut forged_sig = cp(&k1, "n1", 11);
        forged_sig.seq = 12;
        let mut bad_hex = cp(&k1, "n1", 13);
        bad_hex.sig = "zz".repeat(64);
        let mut long_time = cp(&k1, "n1", 14);
        long_time.time = "x".repeat(100);
        let mut old_schema = cp(&k1, "n1", 15);
        old_schema.v = 99;
        type Expect = fn(&CustodyError) -> bool;
        let cases: Vec<(&str, Checkpoint, Expect)> = vec![
            // Signed by another node's key.
            ("n1", cp(&k2, "n1", 11), |e| {
                matches!(e, CustodyError::KeyMismatch { .. })
            }),
            // Another node's key, claiming the registered key.
            (
                "n1",
                {
                    let mut c = cp(&k2, "n1", 11);
                    c.key = k1.public_hex();
                    c
                },
                |e| matches!(e, CustodyError::BadSignature { .. }),
            ),
            // n2 sending n1's (validly signed) checkpoint.
            ("n2", cp(&k1, "n1", 11), |e| {
                matches!(e, CustodyError::WrongNode { .. })
            }),
            // Replays: older, and the same seq with another head.
            ("n1", cp(&k1, "n1", 9), |e| {
                matches!(e, CustodyError::Rollback { .. })
            }),
            (
                "n1",
                k1.checkpoint("n1", 10, &[0xee; 32], "t".into()),
                |e| matches!(e, CustodyError::Rollback { .. }),
            ),
            ("n1", forged_sig, |e| {
                matches!(e, CustodyError::BadSignature { .. })
            }),
            ("n1", bad_hex, |e| matches!(e, CustodyError::Malformed(_))),
            ("n1", long_time, |e| matches!(e, CustodyError::Malformed(_))),
            ("n1", old_schema, |e| {
                matches!(e, CustodyError::Malformed(_))
            }),
            ("../etc", cp(&k1, "n1", 20), |e| {
                matches!(e, CustodyError::BadNode(_))
            }),
        ];
        let n = cases.len() as u64;
        for (node, checkpoint, expected) in cases {
            let err = c.accept(node, &checkpoint).unwrap_err();
            assert!(expected(&err), "{node} {checkpoint:?}: {err}");
        }
        assert_eq!(c.stats().refused.load(Ordering::Relaxed), n);
        assert_eq!((copy(&c, "n1"), copy(&c, "n2")), before);
        assert_eq!(
            hex(&c.registered_key("n1").unwrap().unwrap()),
            k1.public_hex()
        );
    }

    #[test]
    fn a_second_key_needs_the_operator() {
        let dir = tempfile::tempdir().unwrap();
        let c = Custody::new(dir.path());
        let k1 = AuditKey::ephemeral().unwrap();
        let k2 = AuditKey::ephemeral().unwrap();
        let pk = |k: &AuditKey| parse_key(&k.public_hex()).unwrap();
        assert!(c.register("n1", pk(&k1), false).unwrap());
        assert!(!c.register("n1", pk(&k1), false).unwrap());
        c.accept("n1", &cp(&k1, "n1", 7)).unwrap();
        let err = c.register("n1", pk(&k2), false).unwrap_err();
        assert!(matches!(err, CustodyError::KeyMismatch { .. }), "{err}");
        assert!(c.accept("n1", &cp(&k2, "n1", 8)).is_err());
        // Re-keying: the old copy is kept aside, the new chain starts afresh.
        assert!(c.register("n1", pk(&k2), true).unwrap());
        assert_eq!(
            c.accept("n1", &cp(&k2, "n1", 0)).unwrap(),
            Accepted::Appended
        );
        assert!(c.accept("n1", &cp(&k1, "n1", 9)).is_err());
        let aside = fs::read_dir(c.node_dir("n1").unwrap())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with("checkpoints.") && n != CHECKPOINTS_FILE
            })
            .count();
        assert_eq!(aside, 1);
    }
}
