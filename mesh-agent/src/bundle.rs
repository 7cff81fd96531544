//! Signed configuration bundles: the mesh's configuration as one immutable, versioned,
//! digested and signed artifact (issue 12).
//!
//! A [`Bundle`] carries the registry text (nodes, workloads, services) and the policy files
//! (Istio `AuthorizationPolicy` / `PeerAuthentication`) exactly as they were read from a
//! source directory ([`Bundle::build`]), with a version (≥ 1, rising), a creation time, an
//! optional source revision and a digest over a canonical encoding ([`canonical`]). A
//! [`SignedBundle`] adds Ed25519 signatures over `"mesh-config-bundle/v1\n" + digest`, each
//! naming its key by [`KeyId`] (the first 16 bytes of SHA-256 of the public key). A node pins
//! the keys it trusts in a [`SignerSet`] (`pending` → `active` → `retired`).
//!
//! What a node does before it applies anything: [`parse_signed`] (bounded, strict JSON), then
//! [`verify`] — structure, digest, signatures, version — which answers the bundle or a
//! [`Rejection`] whose [`Rejection::reason`] is one of a fixed set of labels (metrics, audit).
//! [`Bundle::check_content`] then parses the registry and compiles the policies from the
//! bundle's own texts (never from files read again).
//!
//! The file format (JSON, written compact and without a trailing newline, so that a byte
//! changed anywhere in a file changes what it says or breaks it — the one exception is the
//! case of a hex digit in a `\u00XX` escape, which serde_json writes for control characters
//! only, and which spells the same character):
//!
//! ```json
//! {"bundle":{"schema":1,"kind":"mesh-config-bundle","version":7,"created":"2026-01-02T03:04:05Z",
//!   "sourceRevision":"3f2a…","registry":"nodes: …","policies":[{"name":"a.yaml","text":"…"}],
//!   "rollout":{"activateAt":"…","canaryNodes":["n1"],"canaryWindowSecs":60},
//!   "digest":"sha256:…"},
//!  "signatures":[{"keyId":"<32 hex>","sig":"<128 hex>"}]}
//! ```
//!
//! `rollout` is optional ([`rollout`]). An unsigned bundle file is the inner object alone. Readers accept any key order and
//! whitespace: the digest covers the decoded values, not their JSON spelling.

pub mod build;
pub mod canonical;
pub mod diff;
pub mod hex;
pub mod rollout;
pub mod signers;

#[cfg(test)]
mod tests;

use std::fmt;

use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Deserializer, Serialize};

pub use build::{BuildError, CheckOptions, Content, ContentError};
pub use rollout::Rollout;
pub use signers::{KeyError, KeyId, Signer, SignerError, SignerSet, SignerState};

/// The bundle format this build reads and writes.
pub const SCHEMA: u32 = 1;
/// The `kind` of every bundle.
pub const KIND: &str = "mesh-config-bundle";
/// Largest bundle file accepted (signed or not), in bytes.
pub const MAX_BUNDLE_BYTES: usize = 64 * 1024 * 1024;
/// Most policy files in one bundle.
pub const MAX_POLICY_FILES: usize = 10_000;
/// Most signatures on one bundle (each costs a verification).
pub const MAX_SIGNATURES: usize = 16;
/// Longest policy file name (bytes).
pub const MAX_NAME_BYTES: usize = 255;
/// Longest source revision (bytes).
pub const MAX_REVISION_BYTES: usize = 1024;
/// What a signature signs, before the digest string: the key signs nothing else by accident.
pub const SIGNING_CONTEXT: &[u8] = b"mesh-config-bundle/v1\n";

/// How an oversized list announces itself inside a serde error (mapped to
/// [`Rejection::Oversized`] by [`parse_signed`]).
const OVERSIZED_MARK: &str = "oversized: ";

/// The configuration of the mesh at one version. Immutable: built by [`Bundle::build`] or
/// [`Bundle::new`] (which compute the digest), or read by [`parse_signed`] /
/// [`parse_unsigned`] (whose digest [`verify`] checks).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Bundle {
    schema: u32,
    kind: String,
    version: u64,
    /// RFC 3339.
    created: String,
    source_revision: Option<String>,
    /// The registry file's text (nodes, workloads, services).
    registry: String,
    /// Sorted by name, names unique.
    #[serde(deserialize_with = "bounded_policies")]
    policies: Vec<PolicyFile>,
    /// When and to whom the authority releases it first ([`rollout`]); absent: to every
    /// node at once. Covered by the digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rollout: Option<Rollout>,
    /// `sha256:<hex>` of [`canonical::encode`].
    digest: String,
}

/// One policy file of a bundle: its plain file name and its text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub name: String,
    pub text: String,
}

/// A bundle and its signatures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedBundle {
    pub bundle: Bundle,
    #[serde(deserialize_with = "bounded_signatures")]
    pub signatures: Vec<Signature>,
}

/// One Ed25519 signature over [`SIGNING_CONTEXT`] + the bundle's digest.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Signature {
    pub key_id: KeyId,
    #[serde(with = "hex::serde_array")]
    pub sig: [u8; 64],
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}, {})", self.key_id, hex::encode(&self.sig))
    }
}

/// Why a bundle was refused. [`Rejection::reason`] is the label for metrics and audit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// Not JSON, or not the shape of a bundle (an unknown or duplicate field, a wrong type,
    /// bad hex, two signatures by one key).
    #[error("malformed bundle: {detail}")]
    Malformed { detail: String },
    /// Over a size or count limit.
    #[error("oversized bundle: {detail}")]
    Oversized { detail: String },
    /// Well-formed, but not a bundle this build accepts (schema, kind, version 0, a bad time,
    /// policy file names).
    #[error("unsupported bundle: {detail}")]
    Schema { detail: String },
    #[error("bundle version {version}: digest {claimed} does not match its content ({computed})")]
    DigestMismatch {
        version: u64,
        claimed: String,
        computed: String,
    },
    #[error("bundle version {version} carries no signature")]
    MissingSignature { version: u64 },
    /// A signature by a trusted (active) key that does not verify: a forgery or a change
    /// after signing. Refused even when another signature verifies.
    #[error("bundle version {version}: the signature by key {key_id} does not verify")]
    BadSignature { version: u64, key_id: KeyId },
    #[error("bundle version {version}: no signature by an active signer (keys {}: unknown or not yet activated)", KeyList(key_ids))]
    UnknownSigner { version: u64, key_ids: Vec<KeyId> },
    #[error(
        "bundle version {version}: no signature by an active signer (keys {}: retired)",
        KeyList(key_ids)
    )]
    RetiredSigner { version: u64, key_ids: Vec<KeyId> },
    #[error("bundle version {version} is not above the active version {active} (rollback)")]
    Rollback { version: u64, active: u64 },
}

/// Every label [`Rejection::reason`] can answer (metrics pre-register them).
pub const REASONS: [&str; 9] = [
    "malformed",
    "oversized",
    "schema",
    "digest_mismatch",
    "missing_signature",
    "bad_signature",
    "unknown_signer",
    "retired_signer",
    "rollback",
];

impl Rejection {
    /// The label of the refusal, one of [`REASONS`].
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed { .. } => "malformed",
            Self::Oversized { .. } => "oversized",
            Self::Schema { .. } => "schema",
            Self::DigestMismatch { .. } => "digest_mismatch",
            Self::MissingSignature { .. } => "missing_signature",
            Self::BadSignature { .. } => "bad_signature",
            Self::UnknownSigner { .. } => "unknown_signer",
            Self::RetiredSigner { .. } => "retired_signer",
            Self::Rollback { .. } => "rollback",
        }
    }

    fn malformed(detail: impl Into<String>) -> Self {
        Self::Malformed {
            detail: detail.into(),
        }
    }

    fn oversized(detail: impl Into<String>) -> Self {
        Self::Oversized {
            detail: detail.into(),
        }
    }

    fn schema(detail: impl Into<String>) -> Self {
        Self::Schema {
            detail: detail.into(),
        }
    }
}

struct KeyList<'a>(&'a [KeyId]);

impl fmt::Display for KeyList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, k) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{k}")?;
        }
        Ok(())
    }
}

impl Bundle {
    /// A bundle of `registry` and `policies` (sorted here by name) at `version`, created at
    /// `created` (RFC 3339); computes the digest. Checks the structure ([`Bundle::check`]),
    /// not the content (see [`Bundle::check_content`]).
    pub fn new(
        version: u64,
        created: String,
        source_revision: Option<String>,
        registry: String,
        mut policies: Vec<PolicyFile>,
    ) -> Result<Self, Rejection> {
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        let mut bundle = Self {
            schema: SCHEMA,
            kind: KIND.to_owned(),
            version,
            created,
            source_revision,
            registry,
            policies,
            rollout: None,
            digest: String::new(),
        };
        bundle.check()?;
        bundle.digest = bundle.compute_digest();
        Ok(bundle)
    }

    /// This bundle with `rollout` (checked; the digest recomputed).
    pub fn with_rollout(mut self, rollout: Option<Rollout>) -> Result<Self, Rejection> {
        self.rollout = rollout;
        self.check()?;
        self.digest = self.compute_digest();
        Ok(self)
    }

    pub fn schema(&self) -> u32 {
        self.schema
    }

    /// The rollout (activation time, canaries), if any.
    pub fn rollout(&self) -> Option<&Rollout> {
        self.rollout.as_ref()
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// When it was built (RFC 3339).
    pub fn created(&self) -> &str {
        &self.created
    }

    /// The source revision given at build (e.g. a Git commit).
    pub fn source_revision(&self) -> Option<&str> {
        self.source_revision.as_deref()
    }

    /// The registry file's text.
    pub fn registry_text(&self) -> &str {
        &self.registry
    }

    /// The policy files, sorted by name.
    pub fn policies(&self) -> &[PolicyFile] {
        &self.policies
    }

    /// The digest as carried (`sha256:<hex>`); [`verify`] checks it against the content.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The first 12 hex digits of the digest, for logs.
    pub fn short_digest(&self) -> &str {
        let hex = self.digest.strip_prefix("sha256:").unwrap_or(&self.digest);
        hex.get(..12).unwrap_or(hex)
    }

    /// The digest of the content (what `digest` must be).
    pub fn compute_digest(&self) -> String {
        canonical::digest(self)
    }

    /// Checks everything but the digest and the content: schema, kind, version ≥ 1, the
    /// creation time, the source revision, policy names (plain file names, sorted, unique),
    /// sizes and counts.
    pub fn check(&self) -> Result<(), Rejection> {
        if self.schema != SCHEMA {
            return Err(Rejection::schema(format!(
                "schema {} (this build reads {SCHEMA})",
                self.schema
            )));
        }
        if self.kind != KIND {
            return Err(Rejection::schema(format!(
                "kind {:?} is not {KIND:?}",
                truncated(&self.kind)
            )));
        }
        if self.version == 0 {
            return Err(Rejection::schema("version 0 (versions start at 1)"));
        }
        if time::OffsetDateTime::parse(
            &self.created,
            &time::format_description::well_known::Rfc3339,
        )
        .is_err()
        {
            return Err(Rejection::schema(format!(
                "created {:?} is not an RFC 3339 time",
                truncated(&self.created)
            )));
        }
        if let Some(rev) = &self.source_revision {
            if rev.len() > MAX_REVISION_BYTES {
                return Err(Rejection::oversized(format!(
                    "source revision of {} bytes (at most {MAX_REVISION_BYTES})",
                    rev.len()
                )));
            }
            if rev.is_empty() || rev.chars().any(char::is_control) {
                return Err(Rejection::schema(format!(
                    "source revision {:?}: empty or with control characters",
                    truncated(rev)
                )));
            }
        }
        if let Some(r) = &self.rollout {
            r.check()?;
        }
        if self.policies.len() > MAX_POLICY_FILES {
            return Err(Rejection::oversized(format!(
                "{} policy files (at most {MAX_POLICY_FILES})",
                self.policies.len()
            )));
        }
        let mut size = self.registry.len();
        for (i, p) in self.policies.iter().enumerate() {
            if let Err(problem) = check_policy_name(&p.name) {
                return Err(Rejection::schema(format!(
                    "policy file name {:?}: {problem}",
                    truncated(&p.name)
                )));
            }
            if i > 0 && self.policies[i - 1].name >= p.name {
                return Err(Rejection::schema(format!(
                    "policy files are not sorted by name or not unique at {:?}",
                    p.name
                )));
            }
            if p.text.len() as u64 > crate::policy::parse::MAX_FILE_BYTES {
                return Err(Rejection::oversized(format!(
                    "policy file {} has {} bytes (at most {})",
                    p.name,
                    p.text.len(),
                    crate::policy::parse::MAX_FILE_BYTES
                )));
            }
            size = size.saturating_add(p.text.len());
        }
        if size > MAX_BUNDLE_BYTES {
            return Err(Rejection::oversized(format!(
                "content of {size} bytes (at most {MAX_BUNDLE_BYTES})"
            )));
        }
        Ok(())
    }

    /// The bundle as written to a file: compact JSON, no trailing newline.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings, integers and a list: serializing cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Whether `name` may name a policy file in a bundle: a plain file name (no `/`, `\`, NUL,
/// control character, no `..`, not starting with `.`: a policy directory loader skips
/// hidden files) ending in `.yaml` or `.yml`.
pub fn check_policy_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err("empty or longer than 255 bytes");
    }
    if name.contains(['/', '\\']) || name.chars().any(char::is_control) {
        return Err("not a plain file name");
    }
    if name.contains("..") || name.starts_with('.') {
        return Err("contains `..` or starts with `.`");
    }
    if !(name.ends_with(".yaml") || name.ends_with(".yml")) {
        return Err("does not end in .yaml or .yml");
    }
    Ok(())
}

/// At most 80 characters of `s` (errors quote untrusted values).
pub(crate) fn truncated(s: &str) -> String {
    s.chars().take(80).collect()
}

impl SignedBundle {
    pub fn new(bundle: Bundle, signatures: Vec<Signature>) -> Self {
        Self { bundle, signatures }
    }

    /// The signed bundle as written to a file: compact JSON, no trailing newline.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Adds `sig`, replacing none: a second signature by the same key is refused (`false`).
    pub fn add_signature(&mut self, sig: Signature) -> bool {
        if self.signatures.iter().any(|s| s.key_id == sig.key_id) {
            return false;
        }
        self.signatures.push(sig);
        true
    }

    /// The structure of the bundle and of the signature list (count, one per key).
    pub fn check(&self) -> Result<(), Rejection> {
        self.bundle.check()?;
        if self.signatures.len() > MAX_SIGNATURES {
            return Err(Rejection::oversized(format!(
                "{} signatures (at most {MAX_SIGNATURES})",
                self.signatures.len()
            )));
        }
        for (i, s) in self.signatures.iter().enumerate() {
            if self.signatures[..i].iter().any(|t| t.key_id == s.key_id) {
                return Err(Rejection::malformed(format!(
                    "two signatures by key {}",
                    s.key_id
                )));
            }
        }
        Ok(())
    }
}

/// The message a signature covers.
pub fn signed_message(digest: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_CONTEXT.len() + digest.len());
    m.extend_from_slice(SIGNING_CONTEXT);
    m.extend_from_slice(digest.as_bytes());
    m
}

/// Signs `bundle` (its carried digest) with `key`.
pub fn sign(bundle: &Bundle, key: &Ed25519KeyPair) -> Signature {
    let sig = key.sign(&signed_message(&bundle.digest));
    let mut bytes = [0u8; 64];
    bytes.copy_from_slice(sig.as_ref());
    Signature {
        key_id: KeyId::of(key.public_key().as_ref()),
        sig: bytes,
    }
}

/// Reads a signed bundle: at most [`MAX_BUNDLE_BYTES`], strict JSON (unknown or duplicate
/// fields refused), at most [`MAX_POLICY_FILES`] policies and [`MAX_SIGNATURES`]
/// signatures, and the structure checked ([`SignedBundle::check`]). The digest and the
/// signatures are [`verify`]'s.
pub fn parse_signed(bytes: &[u8]) -> Result<SignedBundle, Rejection> {
    let signed: SignedBundle = parse_json(bytes)?;
    signed.check()?;
    Ok(signed)
}

/// Reads an unsigned bundle (the inner object), like [`parse_signed`]; the digest is checked
/// too (nothing else would).
pub fn parse_unsigned(bytes: &[u8]) -> Result<Bundle, Rejection> {
    let bundle: Bundle = parse_json(bytes)?;
    bundle.check()?;
    check_digest(&bundle)?;
    Ok(bundle)
}

/// Reads a bundle file, signed or not: the bundle and its signatures (none for an unsigned
/// one). A signed file's digest is checked too.
pub fn parse_any(bytes: &[u8]) -> Result<SignedBundle, Rejection> {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(default)]
        bundle: Option<serde::de::IgnoredAny>,
    }
    check_size(bytes)?;
    // A signed file is an object with a `bundle` key; a bundle has none.
    let signed = serde_json::from_slice::<Probe>(bytes).is_ok_and(|p| p.bundle.is_some());
    if signed {
        let s = parse_signed(bytes)?;
        check_digest(&s.bundle)?;
        Ok(s)
    } else {
        parse_unsigned(bytes).map(|b| SignedBundle::new(b, Vec::new()))
    }
}

fn check_size(bytes: &[u8]) -> Result<(), Rejection> {
    if bytes.len() > MAX_BUNDLE_BYTES {
        return Err(Rejection::oversized(format!(
            "{} bytes (at most {MAX_BUNDLE_BYTES})",
            bytes.len()
        )));
    }
    Ok(())
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Rejection> {
    check_size(bytes)?;
    serde_json::from_slice(bytes).map_err(|e| {
        // The parser quotes what it read (an unknown field's name): keep logs short.
        let mut text = e.to_string();
        if text.len() > 300 {
            text = format!("{}…", text.chars().take(300).collect::<String>());
        }
        match text.strip_prefix(OVERSIZED_MARK) {
            Some(rest) => Rejection::oversized(rest),
            None => Rejection::malformed(text),
        }
    })
}

fn check_digest(bundle: &Bundle) -> Result<(), Rejection> {
    let computed = bundle.compute_digest();
    if computed != bundle.digest {
        return Err(Rejection::DigestMismatch {
            version: bundle.version,
            claimed: truncated(&bundle.digest),
            computed,
        });
    }
    Ok(())
}

/// A verified bundle and the active signers whose signatures verified.
#[derive(Debug)]
pub struct Verified<'a> {
    pub bundle: &'a Bundle,
    pub signed_by: Vec<KeyId>,
}

/// Checks `signed` before anything of it is used, in this order: structure
/// ([`SignedBundle::check`]); digest against the content; signatures — at least one by an
/// active signer of `signers` must verify, and any signature by an active signer that does
/// not verify refuses the bundle (`bad_signature`); signatures by unknown, pending or retired
/// keys do not count (refused `retired_signer` when a retired key signed and no active one
/// did, else `unknown_signer`); then the version: refused (`rollback`) unless above
/// `active_version`.
pub fn verify<'a>(
    signed: &'a SignedBundle,
    signers: &SignerSet,
    active_version: Option<u64>,
) -> Result<&'a Bundle, Rejection> {
    verify_signed_by(signed, signers, active_version).map(|v| v.bundle)
}

/// [`verify`], also answering which active signers signed.
pub fn verify_signed_by<'a>(
    signed: &'a SignedBundle,
    signers: &SignerSet,
    active_version: Option<u64>,
) -> Result<Verified<'a>, Rejection> {
    signed.check()?;
    let bundle = &signed.bundle;
    check_digest(bundle)?;
    let version = bundle.version;
    if signed.signatures.is_empty() {
        return Err(Rejection::MissingSignature { version });
    }
    let message = signed_message(&bundle.digest);
    let (mut signed_by, mut retired, mut unknown) = (Vec::new(), Vec::new(), Vec::new());
    for s in &signed.signatures {
        match signers.get(&s.key_id) {
            Some(signer) if signer.state == SignerState::Active => {
                UnparsedPublicKey::new(&ED25519, &signer.public_key)
                    .verify(&message, &s.sig)
                    .map_err(|_| Rejection::BadSignature {
                        version,
                        key_id: s.key_id,
                    })?;
                signed_by.push(s.key_id);
            }
            Some(signer) if signer.state == SignerState::Retired => retired.push(s.key_id),
            _ => unknown.push(s.key_id),
        }
    }
    if signed_by.is_empty() {
        return Err(if retired.is_empty() {
            Rejection::UnknownSigner {
                version,
                key_ids: unknown,
            }
        } else {
            Rejection::RetiredSigner {
                version,
                key_ids: retired,
            }
        });
    }
    if let Some(active) = active_version {
        if version <= active {
            return Err(Rejection::Rollback { version, active });
        }
    }
    Ok(Verified { bundle, signed_by })
}

/// `policies`, refusing more than [`MAX_POLICY_FILES`] while reading (not after: a list of
/// millions of tiny entries must not be allocated first).
fn bounded_policies<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PolicyFile>, D::Error> {
    bounded_vec(d, MAX_POLICY_FILES, "policy files")
}

fn bounded_signatures<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Signature>, D::Error> {
    bounded_vec(d, MAX_SIGNATURES, "signatures")
}

pub(crate) fn bounded_vec<'de, D, T>(
    d: D,
    max: usize,
    what: &'static str,
) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Bounded<T> {
        max: usize,
        what: &'static str,
        _t: std::marker::PhantomData<T>,
    }
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Bounded<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a list of at most {} {}", self.max, self.what)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            while let Some(item) = seq.next_element()? {
                if out.len() == self.max {
                    return Err(serde::de::Error::custom(format!(
                        "{OVERSIZED_MARK}more than {} {}",
                        self.max, self.what
                    )));
                }
                out.push(item);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Bounded {
        max,
        what,
        _t: std::marker::PhantomData,
    })
}
