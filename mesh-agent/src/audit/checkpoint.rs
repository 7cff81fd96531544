//! Signed checkpoints and the node audit key.
//!
//! A checkpoint says "the chain of node N reached record `seq`, whose line hashes to `head`",
//! signed with the node's audit key (Ed25519). The key is generated on the node at first
//! start and kept `0600` in the state directory; its public half is exported beside it (hex,
//! one line) for the authority to register. Checkpoints are appended, one JSON object per
//! line, to the checkpoints file; a copy kept elsewhere (by the authority) catches the
//! deletion of whole segments or of the tail together with the local checkpoints.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use ring::{
    rand::SystemRandom,
    signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519},
};
use serde::{Deserialize, Serialize};

use super::record::{hex, unhex, Hash, SCHEMA_VERSION};

/// What a checkpoint signature covers, besides the fields: a domain separator so that the
/// key signs nothing else by accident.
const DOMAIN: &str = "mesh-audit-checkpoint-v1";

/// Errors about the audit key and checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("audit key {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("audit key {path}: not an Ed25519 PKCS#8 key")]
    Malformed { path: PathBuf },
    #[error("audit key {path}: mode {mode:o}, must not be readable by group or others")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("generating the audit key failed")]
    Generate,
}

/// The node's audit signing key.
pub struct AuditKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey")
            .field("public", &self.public_hex())
            .finish_non_exhaustive()
    }
}

impl AuditKey {
    /// Loads the key at `path` (PKCS#8), or generates one there (mode 0600) if there is
    /// none; (re)writes the public key to `public_path` either way.
    pub fn load_or_generate(path: &Path, public_path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let key = match fs::read(path) {
            Ok(bytes) => {
                let mode = fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(KeyError::Permissions {
                        path: path.to_owned(),
                        mode,
                    });
                }
                Ed25519KeyPair::from_pkcs8(&bytes).map_err(|_| KeyError::Malformed {
                    path: path.to_owned(),
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                    .map_err(|_| KeyError::Generate)?;
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(io)?;
                }
                let tmp = path.with_extension("tmp");
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(io)?;
                f.write_all(doc.as_ref()).map_err(io)?;
                f.sync_all().map_err(io)?;
                fs::rename(&tmp, path).map_err(io)?;
                Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|_| KeyError::Generate)?
            }
            Err(e) => return Err(io(e)),
        };
        let key = Self { pair: key };
        let public_io = |source| KeyError::Io {
            path: public_path.to_owned(),
            source,
        };
        if let Some(parent) = public_path.parent() {
            fs::create_dir_all(parent).map_err(public_io)?;
        }
        fs::write(public_path, format!("{}\n", key.public_hex())).map_err(public_io)?;
        Ok(key)
    }

    /// A fresh key that lives only in memory (tests).
    pub fn ephemeral() -> Result<Self, KeyError> {
        let doc =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Generate)?;
        Ed25519KeyPair::from_pkcs8(doc.as_ref())
            .map(|pair| Self { pair })
            .map_err(|_| KeyError::Generate)
    }

    /// The public key, hex (what the public key file holds).
    pub fn public_hex(&self) -> String {
        hex(self.pair.public_key().as_ref())
    }

    /// A signed checkpoint of the chain head.
    pub fn checkpoint(&self, node: &str, seq: u64, head: &Hash, time: String) -> Checkpoint {
        let mut cp = Checkpoint {
            v: SCHEMA_VERSION,
            node: node.to_owned(),
            seq,
            head: hex(head),
            time,
            key: self.public_hex(),
            sig: String::new(),
        };
        cp.sig = hex(self.pair.sign(cp.signed_bytes().as_bytes()).as_ref());
        cp
    }
}

/// Reads a public key file (hex of the 32-byte Ed25519 key).
pub fn read_public_key(path: &Path) -> io::Result<[u8; 32]> {
    let text = fs::read_to_string(path)?;
    unhex::<32>(text.trim()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "not a hex Ed25519 public key (64 hex digits)",
        )
    })
}

/// One line of the checkpoints file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub v: u32,
    pub node: String,
    /// The last record covered.
    pub seq: u64,
    /// Hex SHA-256 of that record's line.
    pub head: String,
    pub time: String,
    /// Hex public key of the signer (informative: verification uses the key it is given).
    pub key: String,
    /// Hex Ed25519 signature over the fields above.
    pub sig: String,
}

impl Checkpoint {
    fn signed_bytes(&self) -> String {
        format!(
            "{DOMAIN}\nv={}\nnode={}\nseq={}\nhead={}\ntime={}\n",
            self.v, self.node, self.seq, self.head, self.time
        )
    }

    /// Whether the signature is `public_key`'s over this checkpoint's fields.
    pub fn signature_valid(&self, public_key: &[u8; 32]) -> bool {
        let Some(sig) = unhex::<64>(&self.sig) else {
            return false;
        };
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(self.signed_bytes().as_bytes(), &sig)
            .is_ok()
    }

    /// The head hash, if well-formed.
    pub fn head_hash(&self) -> Option<Hash> {
        unhex::<32>(&self.head)
    }
}

/// Appends a checkpoint line to `path` and syncs it.
pub fn append(path: &Path, cp: &Checkpoint) -> io::Result<()> {
    let mut line = serde_json::to_vec(cp).map_err(io::Error::other)?;
    line.push(b'\n');
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(path)?;
    f.write_all(&line)?;
    f.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_covers_every_field() {
        let key = AuditKey::ephemeral().unwrap();
        let public = unhex::<32>(&key.public_hex()).unwrap();
        let cp = key.checkpoint("n1", 7, &[1; 32], "2026-01-01T00:00:00Z".into());
        assert!(cp.signature_valid(&public));
        for tampered in [
            Checkpoint {
                seq: 8,
                ..cp.clone()
            },
            Checkpoint {
                node: "n2".into(),
                ..cp.clone()
            },
            Checkpoint {
                head: hex(&[2; 32]),
                ..cp.clone()
            },
            Checkpoint {
                sig: "00".repeat(64),
                ..cp.clone()
            },
            Checkpoint {
                sig: "zz".into(),
                ..cp.clone()
            },
        ] {
            assert!(!tampered.signature_valid(&public), "{tampered:?}");
        }
        let other = AuditKey::ephemeral().unwrap();
        assert!(!cp.signature_valid(&unhex::<32>(&other.public_hex()).unwrap()));
    }

    #[test]
    fn key_is_generated_0600_then_reloaded_and_a_loose_key_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/audit.key");
        let public = dir.path().join("audit/audit-key.pub");
        let a = AuditKey::load_or_generate(&path, &public).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = AuditKey::load_or_generate(&path, &public).unwrap();
        assert_eq!(a.public_hex(), b.public_hex());
        assert_eq!(hex(&read_public_key(&public).unwrap()), a.public_hex());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            AuditKey::load_or_generate(&path, &public),
            Err(KeyError::Permissions { .. })
        ));
        fs::write(&path, b"junk").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            AuditKey::load_or_generate(&path, &public),
            Err(KeyError::Malformed { .. })
        ));
    }
}
