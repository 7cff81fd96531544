//! Certificates as the mesh handles them: serial numbers, issued workload certificates
//! (X.509-SVIDs) with their keys, and the few facts read out of a DER certificate.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::SecureRandom;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};

use super::spiffe::{NodeId, PeerId, SpiffeId};
use super::{provider, TlsError};

/// A certificate serial number: big-endian bytes without leading zeros, shown as lower-case hex.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Serial(Vec<u8>);

impl Serial {
    /// From the raw bytes of a DER INTEGER (leading zero bytes are dropped).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        let mut v = bytes[start..].to_vec();
        if v.is_empty() {
            v.push(0);
        }
        Self(v)
    }

    /// 126 random bits, positive, first byte non-zero (so that DER and hex agree exactly).
    pub fn random() -> Result<Self, TlsError> {
        let mut bytes = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| TlsError::Random)?;
        bytes[0] = (bytes[0] & 0x7f) | 0x40;
        Ok(Self(bytes.to_vec()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

impl FromStr for Serial {
    type Err = TlsError;
    /// Hex digits, optionally separated by ':' (as openssl prints them); case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits: String = s.chars().filter(|c| *c != ':').collect();
        let bad = || TlsError::InvalidSerial {
            input: s.chars().take(80).collect(),
        };
        if digits.is_empty() || digits.len() > 80 || !digits.chars().all(|c| c.is_ascii_hexdigit())
        {
            return Err(bad());
        }
        let padded = if digits.len() % 2 == 1 {
            format!("0{digits}")
        } else {
            digits
        };
        let bytes = (0..padded.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&padded[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| bad())?;
        Ok(Self::from_bytes(&bytes))
    }
}

impl TryFrom<String> for Serial {
    type Error = TlsError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Serial> for String {
    fn from(s: Serial) -> String {
        s.to_string()
    }
}

/// The facts the mesh reads from a certificate.
#[derive(Clone, Debug)]
pub(crate) struct CertInfo {
    pub serial: Serial,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub uri_sans: Vec<String>,
    /// The subjectPublicKey BIT STRING contents (e.g. the uncompressed EC point).
    pub public_key: Vec<u8>,
    pub is_ca: bool,
}

impl CertInfo {
    pub fn parse(der: &[u8]) -> Result<Self, TlsError> {
        let (rest, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::InvalidCertificate {
                reason: format!("not an X.509 certificate: {e}"),
            })?;
        if !rest.is_empty() {
            return Err(TlsError::InvalidCertificate {
                reason: "trailing bytes after the certificate".into(),
            });
        }
        let uri_sans = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => {
                return Err(TlsError::InvalidCertificate {
                    reason: format!("unreadable subjectAltName: {e}"),
                })
            }
        };
        Ok(Self {
            serial: Serial::from_bytes(cert.raw_serial()),
            not_before: unix_to_system(cert.validity().not_before.timestamp()),
            not_after: unix_to_system(cert.validity().not_after.timestamp()),
            uri_sans,
            public_key: cert.public_key().subject_public_key.data.to_vec(),
            is_ca: cert.is_ca(),
        })
    }

    /// The certificate's identity: exactly one URI SAN, which must be a mesh SPIFFE ID.
    pub fn peer_id(&self) -> Result<PeerId, TlsError> {
        match self.uri_sans.as_slice() {
            [uri] => Ok(PeerId::parse(uri)?),
            [] => Err(TlsError::InvalidCertificate {
                reason: "no URI SAN (a SPIFFE ID is required)".into(),
            }),
            many => Err(TlsError::InvalidCertificate {
                reason: format!("{} URI SANs, exactly one is required", many.len()),
            }),
        }
    }
}

fn unix_to_system(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// All certificates in a PEM text, in order; at least one.
pub(crate) fn certs_from_pem(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            detail: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

pub(crate) fn key_from_pem(
    pem: &str,
    what: &'static str,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        what,
        detail: e.to_string(),
    })
}

/// An issued workload certificate (X.509-SVID) with its private key, ready for rustls.
///
/// The chain is leaf first, then the issuing certificate(s); the root is not included (peers
/// have it in their trust bundle). `Debug` never prints the key.
#[derive(Clone)]
pub struct WorkloadCert {
    identity: SpiffeId,
    chain_pem: String,
    key_pem: String,
    serial: Serial,
    not_before: SystemTime,
    not_after: SystemTime,
    /// When this process built it (≈ when it was issued).
    received: SystemTime,
    certified: Arc<CertifiedKey>,
}

impl WorkloadCert {
    /// Checks the pair: the leaf carries exactly one URI SAN which is a workload SPIFFE ID, it
    /// is not a CA, and the key matches the leaf's public key.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let chain = certs_from_pem(chain_pem, "certificate chain")?;
        let info = CertInfo::parse(&chain[0])?;
        if info.is_ca {
            return Err(TlsError::InvalidCertificate {
                reason: "workload certificate is a CA".into(),
            });
        }
        let identity = match info.peer_id()? {
            PeerId::Workload(id) => id,
            other => {
                return Err(TlsError::InvalidCertificate {
                    reason: format!("{other} is not a workload identity"),
                })
            }
        };
        let certified = certified_key(chain, key_pem)?;
        Ok(Self {
            identity,
            chain_pem: chain_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            serial: info.serial,
            not_before: info.not_before,
            not_after: info.not_after,
            received: SystemTime::now(),
            certified,
        })
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// Leaf first, then the issuing certificate.
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// PKCS#8 PEM. Treat as secret.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    pub fn serial(&self) -> &Serial {
        &self.serial
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Time left until expiry (zero once expired), by the system clock.
    pub fn remaining(&self) -> Duration {
        self.remaining_at(SystemTime::now())
    }

    pub fn remaining_at(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or(Duration::ZERO)
    }

    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// Half-way through the usable lifetime: when a replacement should be requested.
    ///
    /// The lifetime counts from when the certificate was received, or from `notBefore` if
    /// that is later: the authority back-dates `notBefore` by a few minutes for clock skew,
    /// and counting from it would make short-lived certificates due as soon as they arrive.
    pub fn rotation_due_at(&self) -> SystemTime {
        let start = self.not_before.max(self.received);
        let total = self
            .not_after
            .duration_since(start)
            .unwrap_or(Duration::ZERO);
        start + total / 2
    }

    /// The chain and key in rustls form (parsed once, when the certificate was built).
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Chain + key → rustls `CertifiedKey`, checking that the key belongs to the leaf.
pub(crate) fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key_pem: &str,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let key = key_from_pem(key_pem, "private key")?;
    let ck =
        CertifiedKey::from_der(chain, key, &provider()).map_err(|source| TlsError::Rustls {
            context: "loading certificate and key",
            source,
        })?;
    ck.keys_match().map_err(|source| TlsError::Rustls {
        context: "key does not match certificate",
        source,
    })?;
    Ok(Arc::new(ck))
}

/// Certificate (or CSR) parameters naming `uri` (a SPIFFE ID) and nothing else: an empty
/// subject, the identity as the only URI SAN (which rcgen then marks critical).
pub(crate) fn identity_params(uri: &str) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(uri.to_owned().try_into().map_err(
        |source| TlsError::Rcgen {
            context: "encoding the URI SAN",
            source,
        },
    )?)];
    Ok(params)
}

pub(crate) fn new_key() -> Result<KeyPair, TlsError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| TlsError::Rcgen {
        context: "generating a P-256 key",
        source,
    })
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A PEM certificate signing request for `params`, signed with `key`.
pub(crate) fn csr_pem(params: CertificateParams, key: &KeyPair) -> Result<String, TlsError> {
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(|source| TlsError::Rcgen {
            context: "creating a CSR",
            source,
        })
}

/// The node identity a node certificate chain names (its leaf's only URI SAN).
pub(crate) fn node_id_of(chain: &[CertificateDer<'_>]) -> Result<NodeId, TlsError> {
    let leaf = chain.first().ok_or_else(|| TlsError::InvalidCertificate {
        reason: "empty certificate chain".into(),
    })?;
    match CertInfo::parse(leaf)?.peer_id()? {
        PeerId::Node(id) => Ok(id),
        other => Err(TlsError::WrongPeerKind {
            expected: "node",
            got: other.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_hex_roundtrip_and_normalisation() {
        let s = Serial::from_bytes(&[0, 0, 0x4a, 0x01]);
        assert_eq!(s.to_string(), "4a01");
        assert_eq!("4A:01".parse::<Serial>().unwrap(), s);
        assert_eq!("004a01".parse::<Serial>().unwrap(), s);
        assert_eq!("a01".parse::<Serial>().unwrap().to_string(), "0a01");
        assert!("".parse::<Serial>().is_err());
        assert!("xyz".parse::<Serial>().is_err());
        let r = Serial::random().unwrap();
        assert_eq!(r.as_bytes().len(), 16);
        assert_eq!(r.to_string().parse::<Serial>().unwrap(), r);
        assert_ne!(r, Serial::random().unwrap());
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"4a01\"");
        assert_eq!(serde_json::from_str::<Serial>(&json).unwrap(), s);
    }
}
