//! Signer keys: the Ed25519 keys whose signatures a node accepts on a bundle, and the key files
//! of the operator or CI system that signs.
//!
//! A node pins a [`SignerSet`] (a JSON file beside its trust bundle):
//! `{"signers":[{"keyId":"<32 hex>","publicKey":"<64 hex>","state":"active"}]}`. Keys rotate
//! as the CA's roots do: a new key is **added** (`pending`: known, its signatures do not count
//! yet), then **activated** (its signatures count; the old key still does, so bundles signed
//! during the switch verify either way), then the old key is **retired** (its signatures never
//! count again; a retired key cannot be activated or added back — a compromised key must not
//! return by a typo).
//!
//! The signing key is a PKCS#8 file (DER, as `config keygen` writes it, or PEM, as `openssl
//! genpkey -algorithm ed25519` does), mode 0600; its public half a one-line hex file.

use std::{
    fmt, fs,
    io::{self, Read as _, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    str::FromStr,
};

use ring::{
    rand::SystemRandom,
    signature::{Ed25519KeyPair, KeyPair as _},
};
use serde::{Deserialize, Serialize};

use super::hex;
use crate::files::{self, FileError};

/// Largest signer set file read.
pub const MAX_SIGNERS_FILE_BYTES: u64 = 1024 * 1024;
/// Most signers in a set.
pub const MAX_SIGNERS: usize = 1_000;
/// Largest private key file read.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// A key's id: the first 16 bytes of SHA-256 of its 32-byte public key, written as 32
/// lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 16]);

impl KeyId {
    /// The id of `public_key`.
    pub fn of(public_key: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, public_key);
        let mut id = [0u8; 16];
        id.copy_from_slice(&d.as_ref()[..16]);
        Self(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A string that is not a key id.
#[derive(Debug, Clone, thiserror::Error)]
#[error("key id {0:?}: not a key id (32 lower-case hex digits, see `config signers list`)")]
pub struct BadKeyId(String);

impl FromStr for KeyId {
    type Err = BadKeyId;
    fn from_str(s: &str) -> Result<Self, BadKeyId> {
        hex::decode::<16>(s)
            .map(Self)
            .ok_or_else(|| BadKeyId(s.chars().take(80).collect()))
    }
}

impl Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        hex::serde_array::serialize(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        hex::serde_array::deserialize(d).map(Self)
    }
}

/// Where a signer is in its rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignerState {
    /// Added, not activated: its signatures do not count yet.
    Pending,
    /// Its signatures count.
    Active,
    /// Its signatures never count again.
    Retired,
}

impl SignerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Retired => "retired",
        }
    }
}

/// One signer key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Signer {
    /// [`KeyId::of`] `public_key` (checked when the set is read).
    pub key_id: KeyId,
    #[serde(with = "hex::serde_array")]
    pub public_key: [u8; 32],
    pub state: SignerState,
}

/// The signer keys a node trusts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignerSet {
    signers: Vec<Signer>,
}

/// Why a signer set could not be read, written or changed.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("signer set {}: {size} bytes (at most {MAX_SIGNERS_FILE_BYTES})", path.display())]
    TooLarge { path: PathBuf, size: u64 },
    #[error("signer set {}: {detail}", path.display())]
    Malformed { path: PathBuf, detail: String },
    #[error("signer {key_id} is already in the set ({})", state.as_str())]
    AlreadyPresent { key_id: KeyId, state: SignerState },
    #[error("signer {key_id} is not in the set")]
    Unknown { key_id: KeyId },
    #[error(
        "signer {key_id} is retired: a retired key is never activated again (generate a new key)"
    )]
    Retired { key_id: KeyId },
    #[error("the set has {MAX_SIGNERS} signers already")]
    Full,
}

impl SignerSet {
    /// An empty set (trusts nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads and checks the set at `path`.
    pub fn load(path: &Path) -> Result<Self, SignerError> {
        let bytes = read_bounded(path, MAX_SIGNERS_FILE_BYTES)
            .map_err(|source| FileError {
                op: "reading",
                path: path.to_owned(),
                source,
            })?
            .map_err(|size| SignerError::TooLarge {
                path: path.to_owned(),
                size,
            })?;
        Self::parse(&bytes, path)
    }

    /// [`SignerSet::load`], or an empty set when `path` does not exist.
    pub fn load_or_empty(path: &Path) -> Result<Self, SignerError> {
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::new()),
            _ => Self::load(path),
        }
    }

    /// Parses and checks a set (`path` only names it in errors): strict JSON, every key id
    /// that of its public key, each key once, at most [`MAX_SIGNERS`].
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, SignerError> {
        let malformed = |detail: String| SignerError::Malformed {
            path: path.to_owned(),
            detail,
        };
        let set: Self = serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
        if set.signers.len() > MAX_SIGNERS {
            return Err(malformed(format!(
                "{} signers (at most {MAX_SIGNERS})",
                set.signers.len()
            )));
        }
        for (i, s) in set.signers.iter().enumerate() {
            if KeyId::of(&s.public_key) != s.key_id {
                return Err(malformed(format!(
                    "signer {}: key id is not that of its public key ({})",
                    s.key_id,
                    KeyId::of(&s.public_key)
                )));
            }
            if set.signers[..i].iter().any(|t| t.key_id == s.key_id) {
                return Err(malformed(format!("signer {} is listed twice", s.key_id)));
            }
        }
        Ok(set)
    }

    /// Writes the set to `path` (atomically, mode 0644: public keys only).
    pub fn save(&self, path: &Path) -> Result<(), SignerError> {
        let mut text = serde_json::to_vec_pretty(self).unwrap_or_default();
        text.push(b'\n');
        files::write_atomic(path, &text, 0o644)?;
        Ok(())
    }

    /// Every signer, in the order added.
    pub fn signers(&self) -> &[Signer] {
        &self.signers
    }

    pub fn get(&self, key_id: &KeyId) -> Option<&Signer> {
        self.signers.iter().find(|s| s.key_id == *key_id)
    }

    /// The signers whose signatures count.
    pub fn active(&self) -> impl Iterator<Item = &Signer> {
        self.signers
            .iter()
            .filter(|s| s.state == SignerState::Active)
    }

    /// Adds `public_key`, pending. A key already in the set (whatever its state) is refused.
    pub fn add(&mut self, public_key: [u8; 32]) -> Result<KeyId, SignerError> {
        let key_id = KeyId::of(&public_key);
        if let Some(s) = self.get(&key_id) {
            return Err(SignerError::AlreadyPresent {
                key_id,
                state: s.state,
            });
        }
        if self.signers.len() >= MAX_SIGNERS {
            return Err(SignerError::Full);
        }
        self.signers.push(Signer {
            key_id,
            public_key,
            state: SignerState::Pending,
        });
        Ok(key_id)
    }

    /// Makes a pending signer active (an active one stays so); a retired one is refused.
    pub fn activate(&mut self, key_id: &KeyId) -> Result<(), SignerError> {
        let s = self.get_mut(key_id)?;
        if s.state == SignerState::Retired {
            return Err(SignerError::Retired { key_id: *key_id });
        }
        s.state = SignerState::Active;
        Ok(())
    }

    /// Retires a signer (for good).
    pub fn retire(&mut self, key_id: &KeyId) -> Result<(), SignerError> {
        self.get_mut(key_id)?.state = SignerState::Retired;
        Ok(())
    }

    fn get_mut(&mut self, key_id: &KeyId) -> Result<&mut Signer, SignerError> {
        self.signers
            .iter_mut()
            .find(|s| s.key_id == *key_id)
            .ok_or(SignerError::Unknown { key_id: *key_id })
    }
}

/// Reads at most `max` bytes of `path`: `Ok(Err(size))` when it is larger.
pub(crate) fn read_bounded(path: &Path, max: u64) -> io::Result<Result<Vec<u8>, u64>> {
    let file = fs::File::open(path)?;
    let size = file.metadata()?.len();
    if size > max {
        return Ok(Err(size));
    }
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Ok(Err(bytes.len() as u64));
    }
    Ok(Ok(bytes))
}

/// Why a key file could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: exists; refusing to overwrite a key", path.display())]
    Exists { path: PathBuf },
    #[error("{}: mode {mode:o}, must not be readable by group or others (chmod 600)", path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{}: not an Ed25519 PKCS#8 private key (DER or PEM)", path.display())]
    Malformed { path: PathBuf },
    #[error("{}: not an Ed25519 public key (64 lower-case hex digits)", path.display())]
    PublicKey { path: PathBuf },
    #[error("generating a key failed")]
    Generate,
}

/// The public key file beside `key`: `key` with `.pub` appended to its name.
pub fn public_key_path(key: &Path) -> PathBuf {
    let mut name = key.file_name().unwrap_or_default().to_os_string();
    name.push(".pub");
    key.with_file_name(name)
}

/// Generates a signing key: `path` (PKCS#8 DER, 0600) and [`public_key_path`] (hex, one line).
/// Refuses to overwrite either.
pub fn generate_key(path: &Path) -> Result<Ed25519KeyPair, KeyError> {
    let public = public_key_path(path);
    for p in [path, public.as_path()] {
        if fs::symlink_metadata(p).is_ok() {
            return Err(KeyError::Exists { path: p.to_owned() });
        }
    }
    let doc =
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Generate)?;
    let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|_| KeyError::Generate)?;
    write_new(path, doc.as_ref(), 0o600)?;
    let line = format!("{}\n", hex::encode(pair.public_key().as_ref()));
    write_new(&public, line.as_bytes(), 0o644)?;
    Ok(pair)
}

/// Creates `path` (never over an existing file) with `mode` and `contents`, synced.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), KeyError> {
    let io = |source: io::Error| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            KeyError::Exists {
                path: path.to_owned(),
            }
        } else {
            KeyError::Io {
                path: path.to_owned(),
                source,
            }
        }
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(io)
}

/// Reads a signing key: PKCS#8 (DER or PEM, v1 or v2), not readable by group or others.
pub fn load_key(path: &Path) -> Result<Ed25519KeyPair, KeyError> {
    use rustls_pki_types::{pem::PemObject as _, PrivatePkcs8KeyDer};
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let malformed = || KeyError::Malformed {
        path: path.to_owned(),
    };
    let mode = fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let bytes = read_bounded(path, MAX_KEY_FILE_BYTES)
        .map_err(io)?
        .map_err(|_| malformed())?;
    let der = if bytes.starts_with(b"-----BEGIN") {
        PrivatePkcs8KeyDer::from_pem_slice(&bytes)
            .map_err(|_| malformed())?
            .secret_pkcs8_der()
            .to_vec()
    } else {
        bytes
    };
    let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(|_| malformed())?;
    // A v2 file's public key is not checked against the private one by the call above: a
    // signature must verify under the key the id is computed from.
    let probe = pair.sign(b"mesh-config-bundle key check");
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, pair.public_key().as_ref())
        .verify(b"mesh-config-bundle key check", probe.as_ref())
        .map_err(|_| malformed())?;
    Ok(pair)
}

/// Reads a public key file (64 lower-case hex digits, surrounding whitespace ignored).
pub fn read_public_key(path: &Path) -> Result<[u8; 32], KeyError> {
    let bytes = read_bounded(path, 4096)
        .map_err(|source| KeyError::Io {
            path: path.to_owned(),
            source,
        })?
        .ok();
    bytes
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| hex::decode::<32>(s.trim()))
        .ok_or_else(|| KeyError::PublicKey {
            path: path.to_owned(),
        })
}
