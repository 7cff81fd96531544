//! The node's own credentials: the node certificate chain, its key and the trust bundle, and
//! the node side of a CSR-based join.

use std::fmt;
use std::path::Path;

use rcgen::{CertificateParams, KeyPair};

use super::IdentityError;
use crate::files::{create_private_dir, read_string, write_atomic};
use crate::tls::cert::{certified_key, certs_from_pem, csr_pem, new_key, node_id_of};
use crate::tls::{NodeId, TlsError};

/// What a node agent needs to talk to the authority: its certificate chain, key and the
/// trust bundle. Written by the operator into the node's directory as `node.pem`,
/// `node.key.pem` (0600) and `bundle.pem`.
#[derive(Clone)]
pub struct NodeCredentials {
    pub node: NodeId,
    pub chain_pem: String,
    pub key_pem: String,
    pub bundle_pem: String,
}

impl fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCredentials")
            .field("node", &self.node.to_string())
            .finish_non_exhaustive()
    }
}

impl NodeCredentials {
    pub const CERT_FILE: &'static str = "node.pem";
    pub const KEY_FILE: &'static str = "node.key.pem";
    pub const BUNDLE_FILE: &'static str = "bundle.pem";

    /// Writes the three files into `dir` (created with mode 0700 if missing).
    pub fn write_to(&self, dir: impl AsRef<Path>) -> Result<(), IdentityError> {
        let dir = dir.as_ref();
        create_private_dir(dir)?;
        write_atomic(&dir.join(Self::KEY_FILE), self.key_pem.as_bytes(), 0o600)?;
        write_atomic(&dir.join(Self::CERT_FILE), self.chain_pem.as_bytes(), 0o644)?;
        write_atomic(
            &dir.join(Self::BUNDLE_FILE),
            self.bundle_pem.as_bytes(),
            0o644,
        )?;
        Ok(())
    }

    /// The CSR file [`NodeCredentials::request`] writes.
    pub const CSR_FILE: &'static str = "node.csr.pem";

    /// The node side of a CSR-based join: makes sure `dir` (created 0700 if missing) holds a
    /// node key (`node.key.pem`, 0600, generated here if absent and kept if present, so a
    /// re-join under a new root keeps it) and writes a CSR for it (`node.csr.pem`), which is
    /// all that goes to the authority. Returns the CSR.
    pub fn request(dir: impl AsRef<Path>) -> Result<String, IdentityError> {
        let dir = dir.as_ref();
        create_private_dir(dir)?;
        let key_path = dir.join(Self::KEY_FILE);
        let key = if key_path.exists() {
            let pem = read_string(&key_path)?;
            KeyPair::from_pem(&pem).map_err(|source| TlsError::Rcgen {
                context: "reading the node key",
                source,
            })?
        } else {
            let key = new_key()?;
            write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            key
        };
        let csr = csr_pem(CertificateParams::default(), &key)?;
        write_atomic(&dir.join(Self::CSR_FILE), csr.as_bytes(), 0o644)?;
        Ok(csr)
    }

    /// The authority side's answer to a CSR: writes the node certificate chain and the trust
    /// bundle into `dir` (the key is not touched). If `dir` holds the node key, the chain must
    /// belong to it; nothing is written otherwise.
    pub fn write_signed(
        dir: impl AsRef<Path>,
        chain_pem: &str,
        bundle_pem: &str,
    ) -> Result<(), IdentityError> {
        let dir = dir.as_ref();
        let key_path = dir.join(Self::KEY_FILE);
        if key_path.exists() {
            let key_pem = read_string(&key_path)?;
            certified_key(certs_from_pem(chain_pem, "node certificate")?, &key_pem)?;
        }
        create_private_dir(dir)?;
        write_atomic(&dir.join(Self::CERT_FILE), chain_pem.as_bytes(), 0o644)?;
        write_atomic(&dir.join(Self::BUNDLE_FILE), bundle_pem.as_bytes(), 0o644)?;
        Ok(())
    }

    /// Reads them back; the node identity comes from the certificate's URI SAN.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, IdentityError> {
        let dir = dir.as_ref();
        let chain_pem = read_string(&dir.join(Self::CERT_FILE))?;
        let key_pem = read_string(&dir.join(Self::KEY_FILE))?;
        let bundle_pem = read_string(&dir.join(Self::BUNDLE_FILE))?;
        let chain = certs_from_pem(&chain_pem, "node certificate")?;
        let node = node_id_of(&chain)?;
        // Fails early if the key does not belong to the certificate.
        certified_key(chain, &key_pem)?;
        Ok(Self {
            node,
            chain_pem,
            key_pem,
            bundle_pem,
        })
    }
}
