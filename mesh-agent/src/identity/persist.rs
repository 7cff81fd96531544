//! The agent's persisted identity state: the workload certificates it holds (with their keys)
//! and the trust bundle and revocation list it last followed. An agent restarted while the
//! authority is unreachable starts from them — the ones still valid, chaining to the bundle and
//! not revoked — serves, and catches up when the authority returns.
//!
//! Layout under the state directory (created 0700; files 0600, written to a temporary name and
//! renamed, so a crash never leaves a half-written file in place):
//! - `trust.json`: `{ "bundle_pem": …, "revoked": [serial, …] }`
//! - `certs/<hex of the SPIFFE ID>.json`: `{ "chain_pem": …, "key_pem": … }`

use std::{
    collections::BTreeSet,
    fs, io,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::tls::{Serial, SpiffeId, WorkloadCert};

/// Largest file read back (a chain and a key are a few KiB; a bundle a few roots).
const MAX_FILE: u64 = 1 << 20;

#[derive(Serialize, Deserialize)]
pub struct PersistedTrust {
    pub bundle_pem: String,
    pub revoked: BTreeSet<Serial>,
}

#[derive(Serialize, Deserialize)]
struct PersistedCert {
    chain_pem: String,
    key_pem: String,
}

/// A persisted file that could not be used, and why.
pub type Skipped = (PathBuf, String);

/// The state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    dir: PathBuf,
}

fn file_name(id: &SpiffeId) -> String {
    let hex: String = id.to_string().bytes().map(|b| format!("{b:02x}")).collect();
    format!("{hex}.json")
}

fn write_private(path: &Path, body: &[u8]) -> io::Result<()> {
    use io::Write as _;
    // Per process: an agent and its successor may write the same file during a handoff.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(body)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    use io::Read as _;
    let mut out = Vec::new();
    fs::File::open(path)?
        .take(MAX_FILE + 1)
        .read_to_end(&mut out)?;
    if out.len() as u64 > MAX_FILE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "too large"));
    }
    Ok(out)
}

impl StateDir {
    /// Opens (creating, root-only) the state directory.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir.join("certs"))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn save_trust(&self, trust: &PersistedTrust) -> io::Result<()> {
        let body = serde_json::to_vec(trust).map_err(io::Error::other)?;
        write_private(&self.dir.join("trust.json"), &body)
    }

    /// The persisted trust, `None` when there is none; an unreadable file is an error (the
    /// caller logs it and starts from the node's join bundle).
    pub fn load_trust(&self) -> io::Result<Option<PersistedTrust>> {
        match read_bounded(&self.dir.join("trust.json")) {
            Ok(body) => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Where the certificate of `id` is persisted.
    pub fn cert_path(&self, id: &SpiffeId) -> PathBuf {
        self.dir.join("certs").join(file_name(id))
    }

    pub fn save_cert(&self, cert: &WorkloadCert) -> io::Result<()> {
        let body = serde_json::to_vec(&PersistedCert {
            chain_pem: cert.chain_pem().to_owned(),
            key_pem: cert.key_pem().to_owned(),
        })
        .map_err(io::Error::other)?;
        write_private(&self.cert_path(cert.identity()), &body)
    }

    /// Removes the persisted certificate of `id` (a workload that left the node); none is not
    /// an error.
    pub fn remove_cert(&self, id: &SpiffeId) -> io::Result<()> {
        match fs::remove_file(self.cert_path(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every persisted certificate of an identity in `wanted`; files of other identities are
    /// removed, unreadable ones skipped and reported in the second list.
    pub fn load_certs(&self, wanted: &[SpiffeId]) -> io::Result<(Vec<WorkloadCert>, Vec<Skipped>)> {
        let names: BTreeSet<String> = wanted.iter().map(file_name).collect();
        let mut certs = Vec::new();
        let mut bad = Vec::new();
        for entry in fs::read_dir(self.dir.join("certs"))?.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.contains(".tmp.") {
                // A write cut short by a crash; the previous file (if any) is intact.
                continue;
            }
            if !names.contains(&name) {
                let _ = fs::remove_file(&path);
                continue;
            }
            let parsed = read_bounded(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    serde_json::from_slice::<PersistedCert>(&b).map_err(|e| e.to_string())
                })
                .and_then(|p| {
                    WorkloadCert::from_pem(&p.chain_pem, &p.key_pem).map_err(|e| e.to_string())
                });
            match parsed {
                Ok(c)
                    if names.contains(&file_name(c.identity()))
                        && file_name(c.identity()) == name =>
                {
                    certs.push(c)
                }
                Ok(c) => bad.push((path, format!("holds {} under another name", c.identity()))),
                Err(e) => bad.push((path, e)),
            }
        }
        Ok((certs, bad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_path_safe() {
        let id: SpiffeId = "spiffe://mesh.local/ns/a/sa/b".parse().unwrap();
        let n = file_name(&id);
        assert!(n
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'.' || b.is_ascii_alphabetic()));
        assert_eq!(n, file_name(&id));
        assert!(!n.contains('/'));
    }

    #[test]
    fn trust_round_trips_and_garbage_is_an_error_not_a_panic() {
        let dir = std::env::temp_dir().join(format!("mesh-persist-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let s = StateDir::open(&dir).unwrap();
        assert!(s.load_trust().unwrap().is_none());
        s.save_trust(&PersistedTrust {
            bundle_pem: "x".into(),
            revoked: BTreeSet::new(),
        })
        .unwrap();
        assert_eq!(s.load_trust().unwrap().unwrap().bundle_pem, "x");
        fs::write(dir.join("trust.json"), b"{not json").unwrap();
        assert!(s.load_trust().is_err());
        fs::write(dir.join("certs").join("zz.json"), b"junk").unwrap();
        let (certs, bad) = s.load_certs(&[]).unwrap();
        assert!(certs.is_empty() && bad.is_empty());
        assert!(
            !dir.join("certs").join("zz.json").exists(),
            "unwanted files are removed"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
