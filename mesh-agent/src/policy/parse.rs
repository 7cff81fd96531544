//! Istio YAML → [`PolicyBundle`] (docs/CONTRACTS.md, issue 4).
//!
//! Strict by design: a policy this project cannot enforce exactly is refused, never dropped
//! or widened. Every refusal is a [`PolicyError`] that names `file:line`, the policy
//! (`namespace/name`) when it is known, and the field path (`spec.rules[0].when`).
//!
//! Accepted objects: `security.istio.io/v1` (or `v1beta1`) `AuthorizationPolicy` and
//! `PeerAuthentication`, one per YAML document (`---` separates them). `metadata` needs
//! `name` (a DNS-1123 subdomain, as Kubernetes object names) and `namespace` (a DNS-1123
//! label); of its other fields only the annotation `istio.io/dry-run` means anything, the rest
//! (labels, other annotations, uid, …) is ignored.
//!
//! Validation follows Istio's (istio/istio `pkg/config/validation/validation.go`,
//! `ValidateAuthorizationPolicy`, `ValidatePeerAuthentication`, `checkDryRunAnnotation`, and
//! `pkg/config/security/security.go`); each check cites where it comes from.
//! Normalisations, none of which changes what a policy matches: an empty
//! `selector.matchLabels` is stored as `None` (both select every workload in scope), and
//! `hosts`/`notHosts` patterns are stored lowercase (hosts compare case-insensitively).

use std::{
    collections::{BTreeMap, HashMap},
    fmt, fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{de::IgnoredAny, Deserialize};
use serde_saphyr::{budget::BudgetBreach, Spanned};

use super::model::{
    is_path_template, is_template_char, Action, AuthorizationPolicy, Condition, IpNet, MtlsMode,
    Operation, Origin, PeerAuthentication, PolicyBundle, Rule, ServiceAccount, Source, StringMatch,
    MATCH_ANY, MATCH_ONE,
};
use crate::names::{is_dns_label, is_dns_subdomain};
use crate::yaml::{self, line_of, to_line};

/// The largest policy file read (bytes).
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// The most objects (YAML documents) in one file or one directory.
pub const MAX_OBJECTS: usize = 100_000;

/// The API groups/versions accepted.
const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];
/// The annotation that makes a policy dry-run.
const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Why policies were refused. Displays as `<file>:<line>: [policy <ns/name>: ][<field>: ]<problem>`
/// (the line 1-based), except when the file cannot be read at all.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A file or directory could not be read.
    #[error("{}: reading policies: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file is larger than [`MAX_FILE_BYTES`].
    #[error("{}: {size} bytes is more than a policy file may have ({max})", path.display())]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    /// More than [`MAX_OBJECTS`] objects in a file or in a directory.
    #[error("{}:{line}: more than {max} policy objects", path.display())]
    TooManyObjects {
        path: PathBuf,
        line: usize,
        max: usize,
    },
    /// Not valid YAML, or not the shape of a supported object: an unknown field, a duplicate
    /// key, a value of the wrong type.
    #[error("{}:{line}: {}{message} (column {column})", path.display(), Context(policy, field))]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        /// `namespace/name` of the object, when it could be read.
        policy: Option<String>,
        /// The field path, when it could be told.
        field: Option<String>,
        message: String,
    },
    /// Well-formed, but not a policy this project accepts.
    #[error("{}:{line}: {}{problem}", path.display(), Context(policy, &Some(field.clone())))]
    Invalid {
        path: PathBuf,
        line: usize,
        /// `namespace/name` of the object, when known.
        policy: Option<String>,
        /// The field path (`spec.rules[0].from[0].source.ipBlocks[1]`).
        field: String,
        /// Boxed to keep the parser's `Result`s small.
        #[source]
        problem: Box<Problem>,
    },
}

impl PolicyError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Io { path, .. }
            | Self::TooLarge { path, .. }
            | Self::TooManyObjects { path, .. }
            | Self::Syntax { path, .. }
            | Self::Invalid { path, .. } => path,
        }
    }

    /// The 1-based line the error names, if it names one.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Io { .. } | Self::TooLarge { .. } => None,
            Self::TooManyObjects { line, .. }
            | Self::Syntax { line, .. }
            | Self::Invalid { line, .. } => Some(*line),
        }
    }

    /// The policy (`namespace/name`) the error is about, when known.
    pub fn policy(&self) -> Option<&str> {
        match self {
            Self::Syntax { policy, .. } | Self::Invalid { policy, .. } => policy.as_deref(),
            _ => None,
        }
    }

    /// The field path the error is about, when known.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Syntax { field, .. } => field.as_deref(),
            Self::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }

    /// What is wrong, for a well-formed but refused object.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            Self::Invalid { problem, .. } => Some(problem),
            _ => None,
        }
    }
}

/// `policy ns/name: field: ` (each part only when known).
struct Context<'a>(&'a Option<String>, &'a Option<String>);

impl fmt::Display for Context<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(policy) = self.0 {
            write!(f, "policy {policy}: ")?;
        }
        if let Some(field) = self.1 {
            write!(f, "{field}: ")?;
        }
        Ok(())
    }
}

/// What is wrong with a well-formed object (the field is named by [`PolicyError::Invalid`]).
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// `apiVersion`/`kind` is not one this project reads.
    #[error(
        "unsupported object {api_version}/{kind} (expected security.istio.io/v1 or v1beta1 \
         AuthorizationPolicy or PeerAuthentication)"
    )]
    UnknownKind { api_version: String, kind: String },
    /// A required field is absent or null.
    #[error("missing required field")]
    MissingField,
    /// A field of the Istio API that this project does not enforce.
    #[error("not supported: {reason}")]
    Unsupported { reason: &'static str },
    /// A field that the object's kind does not have.
    #[error("unknown field for {kind}")]
    NotForKind { kind: &'static str },
    /// A value of the Istio API that this project does not enforce.
    #[error("{value:?} is not supported: {reason}")]
    UnsupportedValue { value: String, reason: &'static str },
    /// A value outside the field's set.
    #[error("{value:?} is not one of {expected}")]
    InvalidValue {
        value: String,
        expected: &'static str,
    },
    /// `metadata.namespace` is not a DNS-1123 label.
    #[error(
        "{value:?} is not a DNS-1123 label (1-63 lowercase letters, digits or '-', starting and \
         ending with a letter or digit)"
    )]
    InvalidName { value: String },
    /// `metadata.name` is not a DNS-1123 subdomain (a Kubernetes object name).
    #[error(
        "{value:?} is not a DNS-1123 subdomain (dot-separated DNS-1123 labels, at most 253 \
         characters)"
    )]
    InvalidObjectName { value: String },
    /// A list that is present but empty where Istio requires entries (`from: []`, `to: []`).
    #[error("must not be empty (Istio rejects an empty `{list}`; omit it to match any)")]
    EmptyList { list: &'static str },
    /// A DENY policy without rules (Istio: "DENY action without `rules` is meaningless").
    #[error(
        "a DENY policy needs rules (Istio rejects it: it would never be triggered; add an empty \
         rule `{{}}` to deny every request)"
    )]
    DenyWithoutRules,
    /// The dry-run annotation on a policy whose action is not ALLOW or DENY.
    #[error("the istio.io/dry-run annotation only supports action ALLOW or DENY, found {action}")]
    DryRunAction { action: &'static str },
    /// Fields Istio does not allow together.
    #[error("{reason}")]
    Conflict { reason: &'static str },
    /// A `serviceAccounts` entry that is not `sa` or `ns/sa`.
    #[error("{value:?} is not a service account ({reason})")]
    InvalidServiceAccount { value: String, reason: &'static str },
    /// A path template Istio rejects.
    #[error("invalid path {value:?}: {reason}")]
    InvalidPathTemplate { value: String, reason: &'static str },
    /// A `when` key this project does not know or does not enforce.
    #[error("condition key {key:?} {reason}")]
    ConditionKey { key: String, reason: &'static str },
    /// An empty string where a pattern is expected.
    #[error("empty pattern (use \"*\" to require presence)")]
    EmptyPattern,
    /// A `*` other than one leading or one trailing.
    #[error("pattern {value:?} has a '*' that is neither its first nor its last character")]
    WildcardInMiddle { value: String },
    /// A principal written as a SPIFFE URI.
    #[error("principal {value:?} starts with spiffe:// (write <trust-domain>/ns/<ns>/sa/<sa>)")]
    SpiffePrincipal { value: String },
    /// An `ipBlocks` entry that is not an address or a CIDR block.
    #[error("{value:?} is not an IP address or CIDR block ({reason})")]
    InvalidCidr { value: String, reason: &'static str },
    /// A `ports` entry that is not a port number.
    #[error("{value:?} is not a port number (1-65535)")]
    InvalidPort { value: String },
    /// A `from` entry without a source, or with an empty one.
    #[error("a `from` entry needs a non-empty `source`")]
    EmptySource,
    /// A `to` entry without an operation, or with an empty one.
    #[error("a `to` entry needs a non-empty `operation`")]
    EmptyOperation,
    /// The same kind, namespace and name twice.
    #[error("{kind} {policy} is defined twice (first at {}:{first_line})", first_file.display())]
    Duplicate {
        kind: &'static str,
        policy: String,
        first_file: PathBuf,
        first_line: usize,
    },
}

/// The two kinds read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    AuthorizationPolicy,
    PeerAuthentication,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::AuthorizationPolicy => "AuthorizationPolicy",
            Self::PeerAuthentication => "PeerAuthentication",
        }
    }
}

/// A spanned optional value, the raw shape of almost every field.
type Field<T> = Option<Spanned<T>>;
/// A list of spanned strings.
type Strings = Field<Vec<Spanned<String>>>;

/// One document as written. Required fields are `Option`s so that a missing one is reported
/// with a path and a line rather than a serde message.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawObject {
    api_version: Field<String>,
    kind: Field<String>,
    metadata: Field<RawMetadata>,
    spec: Field<RawSpec>,
    /// Written by a control plane (`kubectl get -o yaml` exports it): not policy, ignored,
    /// so exported objects load as they are.
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<serde::de::IgnoredAny>,
}

/// `metadata`: unknown fields are accepted and ignored (they cannot widen a policy).
#[derive(Deserialize)]
struct RawMetadata {
    name: Field<String>,
    namespace: Field<String>,
    annotations: Option<BTreeMap<String, Spanned<String>>>,
}

/// The `spec` of either kind; fields that are not the object's kind's are refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSpec {
    selector: Field<RawSelector>,
    // AuthorizationPolicy
    action: Field<String>,
    rules: Field<Vec<Spanned<RawRule>>>,
    provider: Field<IgnoredAny>,
    // Both (recent Istio): workload selection by Gateway API reference.
    target_ref: Field<IgnoredAny>,
    target_refs: Field<IgnoredAny>,
    // PeerAuthentication
    mtls: Field<RawMtls>,
    port_level_mtls: Field<BTreeMap<RawPort, Spanned<RawMtls>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSelector {
    match_labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMtls {
    mode: Field<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    from: Field<Vec<Spanned<RawFrom>>>,
    to: Field<Vec<Spanned<RawTo>>>,
    when: Field<Vec<Spanned<RawCondition>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCondition {
    key: Field<String>,
    values: Strings,
    not_values: Strings,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrom {
    source: Field<RawSource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTo {
    operation: Field<RawOperation>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSource {
    principals: Strings,
    not_principals: Strings,
    request_principals: Field<IgnoredAny>,
    not_request_principals: Field<IgnoredAny>,
    namespaces: Strings,
    not_namespaces: Strings,
    ip_blocks: Strings,
    not_ip_blocks: Strings,
    service_accounts: Strings,
    not_service_accounts: Strings,
    trust_domains: Strings,
    not_trust_domains: Strings,
    remote_ip_blocks: Field<IgnoredAny>,
    not_remote_ip_blocks: Field<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOperation {
    hosts: Strings,
    not_hosts: Strings,
    ports: Field<Vec<Spanned<RawPort>>>,
    not_ports: Field<Vec<Spanned<RawPort>>>,
    methods: Strings,
    not_methods: Strings,
    paths: Strings,
    not_paths: Strings,
}

/// A port as written: Istio's are strings (`"8080"`), integers are accepted too.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct RawPort(String);

impl<'de> Deserialize<'de> for RawPort {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RawPort;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number (1-65535), as a string or an integer")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawPort, E> {
                Ok(RawPort(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawPort, E> {
                Ok(RawPort(v.to_string()))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawPort, E> {
                Ok(RawPort(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Reads the policies of one file (any number of `---`-separated documents).
pub fn load_file(path: &Path) -> Result<PolicyBundle, PolicyError> {
    let mut loader = Loader::default();
    loader.file(path)?;
    Ok(loader.bundle)
}

/// Reads the policies of every `*.yaml` and `*.yml` file directly in `dir`, in file name
/// order (sub-directories are not read). Names are unique across the whole directory.
pub fn load_dir(dir: &Path) -> Result<PolicyBundle, PolicyError> {
    let io_err = |source| PolicyError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err)? {
        let path = entry.map_err(io_err)?.path();
        let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        // `fs::metadata` follows symbolic links (ConfigMap mounts are links).
        if yaml && fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort();
    let mut loader = Loader::default();
    for path in &files {
        loader.file(path)?;
    }
    Ok(loader.bundle)
}

/// Loads policy files given as `(name, text)` (a configuration bundle's): the same checks as
/// [`load_dir`] across all of them (duplicates, the object budget), in name order.
pub fn load_texts(files: &[(&str, &str)]) -> Result<PolicyBundle, PolicyError> {
    let mut sorted: Vec<&(&str, &str)> = files.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut loader = Loader::default();
    for (name, text) in sorted {
        loader.text(text, Path::new(name))?;
    }
    Ok(loader.bundle)
}

/// Parses policy `text`; `path` only names the file in errors and origins.
pub fn parse_str(text: &str, path: &Path) -> Result<PolicyBundle, PolicyError> {
    let mut loader = Loader::default();
    loader.text(text, path)?;
    Ok(loader.bundle)
}

/// Loading state across the files of a directory.
#[derive(Default)]
struct Loader {
    bundle: PolicyBundle,
    /// (kind, namespace, name) → where it was first defined.
    seen: HashMap<(Kind, String, String), Origin>,
    objects: usize,
}

impl Loader {
    fn file(&mut self, path: &Path) -> Result<(), PolicyError> {
        let io_err = |source| PolicyError::Io {
            path: path.to_owned(),
            source,
        };
        let file = fs::File::open(path).map_err(io_err)?;
        let size = file.metadata().map_err(io_err)?.len();
        if size > MAX_FILE_BYTES {
            return Err(too_large(path, size));
        }
        // The size may change between the check and the read: read at most one byte more.
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut io::Read::take(file, MAX_FILE_BYTES + 1), &mut bytes)
            .map_err(io_err)?;
        let text = String::from_utf8(bytes)
            .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidData, e.utf8_error())))?;
        self.text(&text, path)
    }

    fn text(&mut self, text: &str, path: &Path) -> Result<(), PolicyError> {
        let size = u64::try_from(text.len()).unwrap_or(u64::MAX);
        if size > MAX_FILE_BYTES {
            return Err(too_large(path, size));
        }
        let docs: Vec<Spanned<RawObject>> =
            yaml::from_multiple(text, MAX_OBJECTS).map_err(|e| syntax_error(text, path, &e))?;
        for doc in docs {
            let origin = Origin {
                file: path.to_owned(),
                line: line_of(&doc, 1),
            };
            self.objects += 1;
            if self.objects > MAX_OBJECTS {
                return Err(PolicyError::TooManyObjects {
                    path: path.to_owned(),
                    line: origin.line,
                    max: MAX_OBJECTS,
                });
            }
            self.object(doc.value, origin)?;
        }
        Ok(())
    }

    /// Validates one object that starts at `origin`.
    fn object(&mut self, raw: RawObject, origin: Origin) -> Result<(), PolicyError> {
        let mut at = At {
            origin: &origin,
            policy: None,
        };
        let line = origin.line;
        let api_version = raw
            .api_version
            .ok_or_else(|| at.err(line, "apiVersion", Problem::MissingField))?;
        let kind_raw = raw
            .kind
            .ok_or_else(|| at.err(line, "kind", Problem::MissingField))?;
        let kind = match kind_raw.value.as_str() {
            _ if !API_VERSIONS.contains(&api_version.value.as_str()) => None,
            "AuthorizationPolicy" => Some(Kind::AuthorizationPolicy),
            "PeerAuthentication" => Some(Kind::PeerAuthentication),
            _ => None,
        };
        let Some(kind) = kind else {
            return Err(at.err(
                line_of(&kind_raw, line),
                "kind",
                Problem::UnknownKind {
                    api_version: api_version.value,
                    kind: kind_raw.value,
                },
            ));
        };

        let metadata = raw
            .metadata
            .ok_or_else(|| at.err(line, "metadata", Problem::MissingField))?;
        let meta_line = line_of(&metadata, line);
        let metadata = metadata.value;
        let label = |field: &'static str, v: Field<String>| {
            let v = v.ok_or_else(|| at.err(meta_line, field, Problem::MissingField))?;
            if !is_dns_label(&v.value) {
                return Err(at.err(
                    line_of(&v, meta_line),
                    field,
                    Problem::InvalidName { value: v.value },
                ));
            }
            Ok(v.value)
        };
        let namespace = label("metadata.namespace", metadata.namespace)?;
        // Object names are DNS-1123 subdomains in Kubernetes (and in Istio's examples:
        // `service-httpbin.default.svc.cluster.local`); namespaces are labels.
        let name = metadata
            .name
            .ok_or_else(|| at.err(meta_line, "metadata.name", Problem::MissingField))?;
        if !is_dns_subdomain(&name.value) {
            return Err(at.err(
                line_of(&name, meta_line),
                "metadata.name",
                Problem::InvalidObjectName { value: name.value },
            ));
        }
        let name = name.value;
        let key = format!("{namespace}/{name}");
        at.policy = Some(key.clone());

        // istio/istio `pkg/config/validation/validation.go`, `checkDryRunAnnotation`: the value
        // is read with Go's `strconv.ParseBool`; the action is checked with the spec.
        let mut dry_run = None;
        if let Some(v) = metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DRY_RUN_ANNOTATION))
        {
            let parsed = match v.value.as_str() {
                "1" | "t" | "T" | "TRUE" | "true" | "True" => true,
                "0" | "f" | "F" | "FALSE" | "false" | "False" => false,
                _ => {
                    return Err(at.err(
                        line_of(v, meta_line),
                        "metadata.annotations[istio.io/dry-run]",
                        Problem::InvalidValue {
                            value: v.value.clone(),
                            expected:
                                "a boolean (true, false, 1, 0, t, f, True, False, TRUE, FALSE)",
                        },
                    ))
                }
            };
            dry_run = Some((parsed, line_of(v, meta_line)));
        }

        let seen_key = (kind, namespace.clone(), name.clone());
        if let Some(first) = self.seen.get(&seen_key) {
            return Err(at.err(
                line,
                "metadata.name",
                Problem::Duplicate {
                    kind: kind.name(),
                    policy: key,
                    first_file: first.file.clone(),
                    first_line: first.line,
                },
            ));
        }

        let spec_line = raw.spec.as_ref().map_or(line, |s| line_of(s, line));
        let spec = raw.spec.map(|s| s.value);
        match kind {
            Kind::AuthorizationPolicy => {
                let p = authorization_policy(&at, spec, spec_line, namespace, name, dry_run)?;
                self.bundle.authz.push(p);
            }
            Kind::PeerAuthentication => {
                if dry_run.is_some() {
                    return Err(at.err(
                        meta_line,
                        "metadata.annotations[istio.io/dry-run]",
                        Problem::Unsupported {
                            reason: "dry-run applies to AuthorizationPolicy only",
                        },
                    ));
                }
                let p = peer_authentication(&at, spec, spec_line, namespace, name)?;
                self.bundle.peer_authn.push(p);
            }
        }
        self.seen.insert(seen_key, origin.clone());
        Ok(())
    }
}

/// The context of errors inside one object.
struct At<'a> {
    origin: &'a Origin,
    policy: Option<String>,
}

impl At<'_> {
    fn err(&self, line: usize, field: impl Into<String>, problem: Problem) -> PolicyError {
        PolicyError::Invalid {
            path: self.origin.file.clone(),
            line,
            policy: self.policy.clone(),
            field: field.into(),
            problem: Box::new(problem),
        }
    }
}

fn authorization_policy(
    at: &At<'_>,
    spec: Option<RawSpec>,
    spec_line: usize,
    namespace: String,
    name: String,
    dry_run: Option<(bool, usize)>,
) -> Result<AuthorizationPolicy, PolicyError> {
    let mut policy = AuthorizationPolicy {
        namespace,
        name,
        origin: at.origin.clone(),
        selector: None,
        action: Action::Allow,
        rules: None,
        dry_run: dry_run.is_some_and(|(d, _)| d),
    };
    // `spec` absent or empty: an ALLOW policy without rules (allows nothing).
    let Some(spec) = spec else {
        return Ok(policy);
    };
    let kind = Kind::AuthorizationPolicy;
    not_for_kind(at, kind, &spec.mtls, spec_line, "spec.mtls")?;
    not_for_kind(
        at,
        kind,
        &spec.port_level_mtls,
        spec_line,
        "spec.portLevelMtls",
    )?;
    unsupported(
        at,
        &spec.provider,
        spec_line,
        "spec.provider",
        "CUSTOM authorization providers",
    )?;
    no_target_refs(at, &spec, spec_line)?;
    policy.selector = selector(spec.selector);
    if let Some(action) = spec.action {
        policy.action = match action.value.as_str() {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            "AUDIT" => Action::Audit,
            "CUSTOM" => {
                return Err(at.err(
                    line_of(&action, spec_line),
                    "spec.action",
                    Problem::UnsupportedValue {
                        value: action.value,
                        reason: "external authorization (CUSTOM) is not enforced by this mesh",
                    },
                ))
            }
            _ => {
                return Err(at.err(
                    line_of(&action, spec_line),
                    "spec.action",
                    Problem::InvalidValue {
                        value: action.value,
                        expected: "ALLOW, DENY, AUDIT",
                    },
                ))
            }
        };
    }
    if let Some((_, line)) = dry_run {
        if policy.action == Action::Audit {
            return Err(at.err(
                line,
                "metadata.annotations[istio.io/dry-run]",
                Problem::DryRunAction { action: "AUDIT" },
            ));
        }
    }
    let rules_line = spec
        .rules
        .as_ref()
        .map_or(spec_line, |r| line_of(r, spec_line));
    if spec.rules.is_some() {
        let ns = policy.namespace.clone();
        let rules = each(spec.rules, spec_line, |i, line, r| {
            rule(at, r, line, &format!("spec.rules[{i}]"), &ns)
        })?;
        policy.rules = Some(rules);
    }
    // istio/istio `pkg/config/validation/validation.go`, `ValidateAuthorizationPolicy`: "DENY
    // action without `rules` is meaningless". `rules: []` is refused too: it never triggers
    // either (stricter than Istio, which may read it as absent).
    if policy.action == Action::Deny && policy.rules.as_ref().is_none_or(Vec::is_empty) {
        return Err(at.err(rules_line, "spec.rules", Problem::DenyWithoutRules));
    }
    Ok(policy)
}

fn peer_authentication(
    at: &At<'_>,
    spec: Option<RawSpec>,
    spec_line: usize,
    namespace: String,
    name: String,
) -> Result<PeerAuthentication, PolicyError> {
    let Some(spec) = spec else {
        return Err(at.err(spec_line, "spec.mtls.mode", Problem::MissingField));
    };
    let kind = Kind::PeerAuthentication;
    not_for_kind(at, kind, &spec.action, spec_line, "spec.action")?;
    not_for_kind(at, kind, &spec.rules, spec_line, "spec.rules")?;
    not_for_kind(at, kind, &spec.provider, spec_line, "spec.provider")?;
    no_target_refs(at, &spec, spec_line)?;
    // `mtls` or its `mode` absent: UNSET, inherited from the parent scope (Istio's
    // `isMtlsModeUnset`, pilot/pkg/security/authn/policy_applier.go).
    let mode = match spec.mtls {
        None => MtlsMode::Unset,
        Some(mtls) => {
            let line = line_of(&mtls, spec_line);
            mtls_mode(at, mtls.value, line, "spec.mtls.mode")?
        }
    };
    let selector = selector(spec.selector);
    let mut port_level = BTreeMap::new();
    if let Some(ports) = spec.port_level_mtls {
        let line = line_of(&ports, spec_line);
        // istio/istio `pkg/config/validation/validation.go`, `ValidatePeerAuthentication`.
        if selector.is_none() {
            return Err(at.err(
                line,
                "spec.portLevelMtls",
                Problem::Conflict {
                    reason: "mesh/namespace peer authentication cannot have port level mTLS \
                             (add a selector)",
                },
            ));
        }
        if ports.value.is_empty() {
            return Err(at.err(
                line,
                "spec.portLevelMtls",
                Problem::EmptyList {
                    list: "portLevelMtls",
                },
            ));
        }
        for (RawPort(text), mtls) in ports.value {
            let field = format!("spec.portLevelMtls[{text}]");
            let port = parse_port(&text).ok_or_else(|| {
                at.err(line, field.as_str(), Problem::InvalidPort { value: text })
            })?;
            let m_line = line_of(&mtls, line);
            let mode = mtls_mode(at, mtls.value, m_line, &format!("{field}.mode"))?;
            port_level.insert(port, mode);
        }
    }
    Ok(PeerAuthentication {
        namespace,
        name,
        origin: at.origin.clone(),
        selector,
        mode,
        port_level,
    })
}

/// `mode` of `mtls` (absent: UNSET).
fn mtls_mode(
    at: &At<'_>,
    mtls: RawMtls,
    line: usize,
    field: &str,
) -> Result<MtlsMode, PolicyError> {
    let Some(mode) = mtls.mode else {
        return Ok(MtlsMode::Unset);
    };
    let mode_line = line_of(&mode, line);
    Ok(match mode.value.as_str() {
        "UNSET" => MtlsMode::Unset,
        "STRICT" => MtlsMode::Strict,
        "PERMISSIVE" => MtlsMode::Permissive,
        "DISABLE" => MtlsMode::Disable,
        _ => {
            return Err(at.err(
                mode_line,
                field,
                Problem::InvalidValue {
                    value: mode.value,
                    expected: "UNSET, STRICT, PERMISSIVE, DISABLE",
                },
            ))
        }
    })
}

/// `Err(Unsupported)` if the field is present.
fn unsupported(
    at: &At<'_>,
    f: &Field<IgnoredAny>,
    fallback: usize,
    field: &str,
    reason: &'static str,
) -> Result<(), PolicyError> {
    match f {
        None => Ok(()),
        Some(v) => Err(at.err(line_of(v, fallback), field, Problem::Unsupported { reason })),
    }
}

/// `Err(NotForKind)` if the field, which belongs to the other kind, is present.
fn not_for_kind<T>(
    at: &At<'_>,
    kind: Kind,
    f: &Field<T>,
    fallback: usize,
    field: &str,
) -> Result<(), PolicyError> {
    match f {
        None => Ok(()),
        Some(v) => Err(at.err(
            line_of(v, fallback),
            field,
            Problem::NotForKind { kind: kind.name() },
        )),
    }
}

/// `targetRef` and `targetRefs`, refused by both kinds.
fn no_target_refs(at: &At<'_>, spec: &RawSpec, spec_line: usize) -> Result<(), PolicyError> {
    let reason = "select workloads with `selector`";
    unsupported(at, &spec.target_ref, spec_line, "spec.targetRef", reason)?;
    unsupported(at, &spec.target_refs, spec_line, "spec.targetRefs", reason)
}

/// Converts each item of an optional list with `f(index, line, value)`; an absent list is
/// empty.
fn each<T, U>(
    raw: Field<Vec<Spanned<T>>>,
    fallback: usize,
    mut f: impl FnMut(usize, usize, T) -> Result<U, PolicyError>,
) -> Result<Vec<U>, PolicyError> {
    let Some(list) = raw else {
        return Ok(Vec::new());
    };
    let list_line = line_of(&list, fallback);
    let mut out = Vec::with_capacity(list.value.len());
    for (i, v) in list.value.into_iter().enumerate() {
        let line = line_of(&v, list_line);
        out.push(f(i, line, v.value)?);
    }
    Ok(out)
}

/// `matchLabels`; an empty one is `None` (both select every workload in scope).
fn selector(raw: Field<RawSelector>) -> Option<BTreeMap<String, String>> {
    raw.and_then(|s| s.value.match_labels)
        .filter(|labels| !labels.is_empty())
}

fn rule(
    at: &At<'_>,
    raw: RawRule,
    line: usize,
    path: &str,
    policy_ns: &str,
) -> Result<Rule, PolicyError> {
    // istio/istio `pkg/config/validation/validation.go`, `ValidateAuthorizationPolicy`:
    // "`from` must not be empty", "`to` must not be empty" — a present but empty list is an
    // error, never "any" (which would widen an ALLOW).
    let from_state = raw
        .from
        .as_ref()
        .map(|l| (l.value.is_empty(), line_of(l, line)));
    let to_state = raw
        .to
        .as_ref()
        .map(|l| (l.value.is_empty(), line_of(l, line)));
    for (state, name) in [(from_state, "from"), (to_state, "to")] {
        if let Some((true, l)) = state {
            return Err(at.err(
                l,
                format!("{path}.{name}"),
                Problem::EmptyList { list: name },
            ));
        }
    }
    let from = each(raw.from, line, |i, f_line, f| {
        let path = format!("{path}.from[{i}].source");
        let src = f
            .source
            .ok_or_else(|| at.err(f_line, path.as_str(), Problem::EmptySource))?;
        let src_line = line_of(&src, f_line);
        source(at, src.value, src_line, &path, policy_ns)
    })?;
    let to = each(raw.to, line, |i, t_line, t| {
        let path = format!("{path}.to[{i}].operation");
        let op = t
            .operation
            .ok_or_else(|| at.err(t_line, path.as_str(), Problem::EmptyOperation))?;
        let op_line = line_of(&op, t_line);
        operation(at, op.value, op_line, &path)
    })?;
    let when = each(raw.when, line, |i, c_line, c| {
        condition(at, c, c_line, &format!("{path}.when[{i}]"), policy_ns)
    })?;
    Ok(Rule { from, to, when })
}

/// One `when` entry. Keys and value checks: istio/istio `pkg/config/security/security.go`,
/// `ValidateAttribute`; meanings: `pilot/pkg/security/authz/model/model.go`, `New`.
fn condition(
    at: &At<'_>,
    raw: RawCondition,
    line: usize,
    path: &str,
    policy_ns: &str,
) -> Result<Condition, PolicyError> {
    let key = raw
        .key
        .ok_or_else(|| at.err(line, format!("{path}.key"), Problem::MissingField))?;
    let key_line = line_of(&key, line);
    let key = key.value;
    let key_err = |reason| {
        at.err(
            key_line,
            format!("{path}.key"),
            Problem::ConditionKey {
                key: key.clone(),
                reason,
            },
        )
    };
    if key.is_empty() {
        return Err(at.err(key_line, format!("{path}.key"), Problem::MissingField));
    }
    let empty = |v: &Strings| v.as_ref().is_none_or(|l| l.value.is_empty());
    if empty(&raw.values) && empty(&raw.not_values) {
        return Err(at.err(
            line,
            format!("{path}.values"),
            Problem::Conflict {
                reason: "at least one of `values` or `notValues` must be set",
            },
        ));
    }
    let (values_path, not_path) = (format!("{path}.values"), format!("{path}.notValues"));
    let strings = |kind| -> Result<_, PolicyError> {
        Ok((
            patterns(at, raw.values.clone(), line, &values_path, kind)?,
            patterns(at, raw.not_values.clone(), line, &not_path, kind)?,
        ))
    };
    let ips = || -> Result<_, PolicyError> {
        Ok((
            cidrs(at, raw.values.clone(), line, &values_path)?,
            cidrs(at, raw.not_values.clone(), line, &not_path)?,
        ))
    };
    Ok(match key.as_str() {
        "source.ip" | "remote.ip" => {
            let (values, not_values) = ips()?;
            Condition::SourceIp { values, not_values }
        }
        "destination.ip" => {
            let (values, not_values) = ips()?;
            Condition::DestinationIp { values, not_values }
        }
        "source.namespace" => {
            let (values, not_values) = strings(PatternKind::Plain)?;
            Condition::SourceNamespace { values, not_values }
        }
        "source.principal" => {
            let (values, not_values) = strings(PatternKind::Principal)?;
            Condition::SourcePrincipal { values, not_values }
        }
        "source.serviceAccount" => Condition::SourceServiceAccount {
            values: service_accounts(at, raw.values.clone(), line, &values_path, policy_ns)?,
            not_values: service_accounts(at, raw.not_values.clone(), line, &not_path, policy_ns)?,
        },
        "destination.port" => Condition::DestinationPort {
            values: string_ports(at, raw.values.clone(), line, &values_path)?,
            not_values: string_ports(at, raw.not_values.clone(), line, &not_path)?,
        },
        k if k.starts_with("request.headers") => {
            // `request.headers[<name>]` (Istio's `validateMapKey`: `a[b]`, `b` non-empty).
            let name = k
                .strip_prefix("request.headers[")
                .and_then(|r| r.strip_suffix(']'))
                .filter(|n| !n.is_empty() && n.bytes().all(is_header_name_char))
                .ok_or_else(|| key_err("is not of the form request.headers[<header name>]"))?;
            let name = name.to_ascii_lowercase();
            let (values, not_values) = strings(PatternKind::Plain)?;
            Condition::RequestHeader {
                name,
                values,
                not_values,
            }
        }
        k if k.starts_with("request.auth.") => {
            return Err(key_err(
                "is not supported: request authentication (JWT) is not enforced by this mesh; \
                 it authenticates peers by mTLS only",
            ))
        }
        "connection.sni" => {
            return Err(key_err(
                "is not supported: connections here carry no per-service SNI (mTLS is the \
                 agents' HBONE with identity-derived server names, same-node traffic has no \
                 TLS), so it could not mean what it means in Istio",
            ))
        }
        "source.trustDomain" => {
            return Err(key_err(
                "is not supported; match the trust domain with `source.principal`",
            ))
        }
        k if k.starts_with("experimental.envoy.filters.") => {
            return Err(key_err(
                "is not supported: Envoy metadata does not exist here",
            ))
        }
        "destination.namespace" => {
            return Err(key_err(
                "is replaced by the policy's metadata.namespace (Istio rejects it)",
            ))
        }
        k if k.starts_with("destination.labels") => {
            return Err(key_err(
                "is replaced by the workload selector (Istio rejects it)",
            ))
        }
        "destination.name" | "destination.user" => {
            return Err(key_err(
                "is deprecated: only supported in v1alpha1 (Istio rejects it)",
            ))
        }
        _ => return Err(key_err("is not a known attribute")),
    })
}

/// RFC 9110 `tchar`: the characters of a header name.
fn is_header_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `destination.port` values: port numbers as strings (Istio's `ValidatePorts`: 0-65535;
/// 0 never matches a connection and is refused here like in `ports`).
fn string_ports(
    at: &At<'_>,
    raw: Strings,
    fallback: usize,
    path: &str,
) -> Result<Vec<u16>, PolicyError> {
    each(raw, fallback, |i, line, text| {
        parse_port(&text).ok_or_else(|| {
            at.err(
                line,
                format!("{path}[{i}]"),
                Problem::InvalidPort { value: text },
            )
        })
    })
}

/// `serviceAccounts` entries (istio/istio `pkg/config/security/security.go`,
/// `CheckServiceAccount`): at most 16, no `*`, `sa` or `ns/sa` with both parts non-empty,
/// at most 320 characters; a bare `sa` is in the policy's namespace (`serviceAccountRegex`).
fn service_accounts(
    at: &At<'_>,
    raw: Strings,
    fallback: usize,
    path: &str,
    policy_ns: &str,
) -> Result<Vec<ServiceAccount>, PolicyError> {
    if let Some(list) = &raw {
        if list.value.len() > 16 {
            return Err(at.err(
                line_of(list, fallback),
                path,
                Problem::Conflict {
                    reason: "may not have more than 16 values",
                },
            ));
        }
    }
    each(raw, fallback, |i, line, value| {
        let bad = |reason| {
            at.err(
                line,
                format!("{path}[{i}]"),
                Problem::InvalidServiceAccount {
                    value: value.clone(),
                    reason,
                },
            )
        };
        if value.is_empty() {
            return Err(bad("empty"));
        }
        if value.contains('*') {
            return Err(bad("wildcards are not allowed"));
        }
        if value.len() > 320 {
            return Err(bad("longer than 320 characters"));
        }
        let (ns, sa) = match value.split_once('/') {
            Some((ns, sa)) => (ns, sa),
            None => (policy_ns, value.as_str()),
        };
        if sa.contains('/') {
            return Err(bad(
                "expected 'serviceAccount' or 'namespace/serviceAccount'",
            ));
        }
        if ns.is_empty() || sa.is_empty() {
            return Err(bad(
                "expected 'serviceAccount' or 'namespace/serviceAccount'",
            ));
        }
        Ok(ServiceAccount {
            namespace: ns.to_owned(),
            name: sa.to_owned(),
        })
    })
}

fn source(
    at: &At<'_>,
    raw: RawSource,
    line: usize,
    path: &str,
    policy_ns: &str,
) -> Result<Source, PolicyError> {
    let request = "request principals (JWT); this mesh authenticates peers by mTLS only";
    let remote = "remote IP blocks (X-Forwarded-For); use ipBlocks";
    unsupported(
        at,
        &raw.request_principals,
        line,
        &format!("{path}.requestPrincipals"),
        request,
    )?;
    unsupported(
        at,
        &raw.not_request_principals,
        line,
        &format!("{path}.notRequestPrincipals"),
        request,
    )?;
    unsupported(
        at,
        &raw.remote_ip_blocks,
        line,
        &format!("{path}.remoteIpBlocks"),
        remote,
    )?;
    unsupported(
        at,
        &raw.not_remote_ip_blocks,
        line,
        &format!("{path}.notRemoteIpBlocks"),
        remote,
    )?;
    let pats = |raw: Strings, field: &str, check: PatternKind| {
        patterns(at, raw, line, &format!("{path}.{field}"), check)
    };
    let sas = |raw: Strings, field: &str| {
        service_accounts(at, raw, line, &format!("{path}.{field}"), policy_ns)
    };
    let src = Source {
        principals: pats(raw.principals, "principals", PatternKind::Principal)?,
        not_principals: pats(raw.not_principals, "notPrincipals", PatternKind::Principal)?,
        namespaces: pats(raw.namespaces, "namespaces", PatternKind::Plain)?,
        not_namespaces: pats(raw.not_namespaces, "notNamespaces", PatternKind::Plain)?,
        ip_blocks: cidrs(at, raw.ip_blocks, line, &format!("{path}.ipBlocks"))?,
        not_ip_blocks: cidrs(at, raw.not_ip_blocks, line, &format!("{path}.notIpBlocks"))?,
        service_accounts: sas(raw.service_accounts, "serviceAccounts")?,
        not_service_accounts: sas(raw.not_service_accounts, "notServiceAccounts")?,
        trust_domains: pats(raw.trust_domains, "trustDomains", PatternKind::Plain)?,
        not_trust_domains: pats(raw.not_trust_domains, "notTrustDomains", PatternKind::Plain)?,
    };
    if src == Source::default() {
        return Err(at.err(line, path, Problem::EmptySource));
    }
    // istio/istio `pkg/config/validation/validation.go`: "cannot set serviceAccounts with
    // namespaces or principals".
    let identity = !(src.principals.is_empty()
        && src.not_principals.is_empty()
        && src.namespaces.is_empty()
        && src.not_namespaces.is_empty());
    if identity && !(src.service_accounts.is_empty() && src.not_service_accounts.is_empty()) {
        return Err(at.err(
            line,
            format!("{path}.serviceAccounts"),
            Problem::Conflict {
                reason: "cannot set serviceAccounts with namespaces or principals",
            },
        ));
    }
    Ok(src)
}

fn operation(
    at: &At<'_>,
    raw: RawOperation,
    line: usize,
    path: &str,
) -> Result<Operation, PolicyError> {
    let pats = |raw: Strings, field: &str, check: PatternKind| {
        patterns(at, raw, line, &format!("{path}.{field}"), check)
    };
    let op = Operation {
        hosts: pats(raw.hosts, "hosts", PatternKind::Host)?,
        not_hosts: pats(raw.not_hosts, "notHosts", PatternKind::Host)?,
        methods: pats(raw.methods, "methods", PatternKind::Plain)?,
        not_methods: pats(raw.not_methods, "notMethods", PatternKind::Plain)?,
        paths: pats(raw.paths, "paths", PatternKind::Path)?,
        not_paths: pats(raw.not_paths, "notPaths", PatternKind::Path)?,
        ports: ports(at, raw.ports, line, &format!("{path}.ports"))?,
        not_ports: ports(at, raw.not_ports, line, &format!("{path}.notPorts"))?,
    };
    if op == Operation::default() {
        return Err(at.err(line, path, Problem::EmptyOperation));
    }
    Ok(op)
}

/// istio/istio `pkg/config/security/security.go`, `CheckValidPathTemplate`: the path without
/// its leading and trailing `/` is split into segments; `{*}` and `{**}` are whole segments,
/// nothing follows `{**}` but literal segments, no other segment has `{` or `}`, and in a
/// template every literal segment is non-empty RFC 3986 `pchar`s.
fn check_path_template(value: &str) -> Result<(), &'static str> {
    let template = is_path_template(value);
    let mut found_any = false;
    for glob in value.trim_matches('/').split('/') {
        if glob == MATCH_ONE && !found_any {
            continue;
        }
        if glob == MATCH_ANY && !found_any {
            found_any = true;
            continue;
        }
        if glob == MATCH_ANY || glob == MATCH_ONE {
            return Err("{**} is not the last operator");
        }
        if glob.contains(['{', '}']) {
            return Err("contains '{' or '}' beyond a supported path template");
        }
        if template && (glob.is_empty() || !glob.bytes().all(is_template_char)) {
            return Err("contains a segment with an invalid string literal");
        }
    }
    Ok(())
}

/// Extra checks per pattern field.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PatternKind {
    Plain,
    /// Paths: `{*}`/`{**}` templates.
    Path,
    /// No `spiffe://` prefix.
    Principal,
    /// Stored lowercase.
    Host,
}

fn patterns(
    at: &At<'_>,
    raw: Strings,
    fallback: usize,
    path: &str,
    kind: PatternKind,
) -> Result<Vec<StringMatch>, PolicyError> {
    each(raw, fallback, |i, line, value| {
        let err = |problem| at.err(line, format!("{path}[{i}]"), problem);
        if value.is_empty() {
            return Err(err(Problem::EmptyPattern));
        }
        if kind == PatternKind::Principal && value.starts_with("spiffe://") {
            return Err(err(Problem::SpiffePrincipal { value }));
        }
        let value = if kind == PatternKind::Host {
            value.to_ascii_lowercase()
        } else {
            value
        };
        if kind == PatternKind::Path {
            check_path_template(&value).map_err(|reason| {
                err(Problem::InvalidPathTemplate {
                    value: value.clone(),
                    reason,
                })
            })?;
            if is_path_template(&value) {
                return Ok(StringMatch::Template(value));
            }
        }
        let m = StringMatch::from_pattern(&value);
        if let StringMatch::Exact(s) | StringMatch::Prefix(s) | StringMatch::Suffix(s) = &m {
            if s.contains('*') {
                return Err(err(Problem::WildcardInMiddle { value }));
            }
        }
        Ok(m)
    })
}

fn cidrs(
    at: &At<'_>,
    raw: Strings,
    fallback: usize,
    path: &str,
) -> Result<Vec<IpNet>, PolicyError> {
    each(raw, fallback, |i, line, value| {
        parse_cidr(&value).map_err(|reason| {
            at.err(
                line,
                format!("{path}[{i}]"),
                Problem::InvalidCidr { value, reason },
            )
        })
    })
}

/// `addr` or `addr/prefix`, IPv4 or IPv6 (not IPv4-mapped IPv6).
pub fn parse_cidr(s: &str) -> Result<IpNet, &'static str> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| "not an IP address")?;
    if let IpAddr::V6(v6) = addr {
        if v6.to_ipv4_mapped().is_some() {
            return Err("IPv4-mapped IPv6; write it as IPv4");
        }
    }
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse::<u8>().map_err(|_| "prefix length out of range")?
        }
        Some(_) => return Err("prefix length is not a number"),
    };
    if prefix > max {
        return Err("prefix length out of range");
    }
    Ok(IpNet { addr, prefix })
}

fn ports(
    at: &At<'_>,
    raw: Field<Vec<Spanned<RawPort>>>,
    fallback: usize,
    path: &str,
) -> Result<Vec<u16>, PolicyError> {
    each(raw, fallback, |i, line, RawPort(text)| {
        parse_port(&text).ok_or_else(|| {
            at.err(
                line,
                format!("{path}[{i}]"),
                Problem::InvalidPort { value: text },
            )
        })
    })
}

/// A port number 1-65535 written in decimal.
fn parse_port(text: &str) -> Option<u16> {
    (!text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse::<u16>().ok())
        .flatten()
        .filter(|p| *p != 0)
}

fn too_large(path: &Path, size: u64) -> PolicyError {
    PolicyError::TooLarge {
        path: path.to_owned(),
        size,
        max: MAX_FILE_BYTES,
    }
}

/// A serde-saphyr error as [`PolicyError::Syntax`] (or [`PolicyError::TooManyObjects`]),
/// with the policy and field path looked up in a lenient re-parse of `text`.
fn syntax_error(text: &str, path: &Path, e: &serde_saphyr::Error) -> PolicyError {
    let (line, column) = yaml::position(e);
    if let serde_saphyr::Error::Budget {
        breach: BudgetBreach::Documents { .. },
        ..
    } = e.without_snippet()
    {
        return PolicyError::TooManyObjects {
            path: path.to_owned(),
            line,
            max: MAX_OBJECTS,
        };
    }
    let message = yaml::SyntaxError::of(e).message;
    let (policy, field) = locate(text, line, column);
    PolicyError::Syntax {
        path: path.to_owned(),
        line,
        column,
        policy,
        field,
        message,
    }
}

/// Any YAML node, for locating errors only (scalars keep no value but strings').
enum Node {
    Scalar(Option<String>),
    Seq(Vec<Spanned<Node>>),
    Map(Vec<(Spanned<Node>, Spanned<Node>)>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML node")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Scalar(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Scalar(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Scalar(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Scalar(None))
            }
            fn visit_str<E>(self, v: &str) -> Result<Node, E> {
                Ok(Node::Scalar(Some(v.to_owned())))
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Scalar(None))
            }
            fn visit_none<E>(self) -> Result<Node, E> {
                Ok(Node::Scalar(None))
            }
            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                Node::deserialize(d)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = a.next_element::<Spanned<Node>>()? {
                    items.push(item);
                }
                Ok(Node::Seq(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = a.next_entry::<Spanned<Node>, Spanned<Node>>()? {
                    entries.push(entry);
                }
                Ok(Node::Map(entries))
            }
        }
        d.deserialize_any(V)
    }
}

impl Node {
    fn get(&self, key: &str) -> Option<&Spanned<Node>> {
        match self {
            Self::Map(entries) => entries
                .iter()
                .find(|(k, _)| matches!(&k.value, Self::Scalar(Some(s)) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    fn str(&self) -> Option<&str> {
        match self {
            Self::Scalar(Some(s)) => Some(s),
            _ => None,
        }
    }
}

/// The policy (`namespace/name`) and the field path at `line`:`column` of `text`, as far as a
/// lenient parse can tell.
fn locate(text: &str, line: usize, column: usize) -> (Option<String>, Option<String>) {
    let Ok(docs) = yaml::from_multiple::<Spanned<Node>>(text, MAX_OBJECTS) else {
        return (None, None);
    };
    let at = (line, column);
    let Some(doc) = docs.iter().rev().find(|d| pos(d) <= at) else {
        return (None, None);
    };
    let policy = doc.value.get("metadata").and_then(|m| {
        let ns = m.value.get("namespace")?.value.str()?;
        let name = m.value.get("name")?.value.str()?;
        Some(format!("{ns}/{name}"))
    });
    let mut best = None;
    deepest(&doc.value, String::new(), at, &mut best);
    (policy, best.filter(|p: &String| !p.is_empty()))
}

/// The position of a spanned node.
fn pos<T>(n: &Spanned<T>) -> (usize, usize) {
    (to_line(n.referenced.line()), to_line(n.referenced.column()))
}

/// Walks `node` (at `path`) in document order, keeping in `best` the path of the last node
/// that starts at or before `at`.
fn deepest(node: &Node, path: String, at: (usize, usize), best: &mut Option<String>) {
    match node {
        Node::Scalar(_) => {}
        Node::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                if pos(item) > at {
                    break;
                }
                let p = format!("{path}[{i}]");
                *best = Some(p.clone());
                deepest(&item.value, p, at, best);
            }
        }
        Node::Map(entries) => {
            for (k, v) in entries {
                if pos(k) > at {
                    break;
                }
                let key = k.value.str().unwrap_or("?");
                let p = if path.is_empty() {
                    key.to_owned()
                } else {
                    format!("{path}.{key}")
                };
                *best = Some(p.clone());
                if pos(v) <= at {
                    deepest(&v.value, p, at, best);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::cgroup::tests::TempDir;
    use crate::policy::model::{Condition, ServiceAccount};

    const FILE: &str = "/etc/mesh/policies/p.yaml";

    fn parse(text: &str) -> Result<PolicyBundle, PolicyError> {
        parse_str(text, Path::new(FILE))
    }

    /// An AuthorizationPolicy `ns/p`; `spec` (indented by the caller) starts on line 7.
    fn authz(spec: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  \
             name: p\n  namespace: ns\nspec:\n{spec}"
        )
    }

    /// A PeerAuthentication `ns/pa`; `spec` starts on line 7.
    fn peer_authn(spec: &str) -> String {
        authz(spec)
            .replace("AuthorizationPolicy", "PeerAuthentication")
            .replace("name: p\n", "name: pa\n")
    }

    /// Parses `text`, expects a refusal on `line` whose message names `policy` and `field`.
    fn refused(text: &str, line: usize, policy: Option<&str>, field: &str) -> PolicyError {
        let e = parse(text).expect_err(text);
        let msg = e.to_string();
        assert_eq!(e.line(), Some(line), "{msg}");
        assert!(msg.starts_with(&format!("{FILE}:{line}: ")), "{msg}");
        assert_eq!(e.policy(), policy, "{msg}");
        if let Some(p) = policy {
            assert!(msg.contains(&format!("policy {p}: ")), "{msg}");
        }
        assert_eq!(e.field(), Some(field), "{msg}");
        assert!(msg.contains(&format!("{field}: ")), "{msg}");
        e
    }

    /// A rule with one `from` source whose body is `source`, from line 7.
    fn with_source(source: &str) -> String {
        authz(&format!(
            "  rules:\n  - from:\n    - source:\n        {source}\n"
        ))
    }

    /// A rule with one `to` operation whose body is `operation`, from line 7.
    fn with_operation(operation: &str) -> String {
        authz(&format!(
            "  rules:\n  - to:\n    - operation:\n        {operation}\n"
        ))
    }

    /// Builds a policy around a source or operation body.
    type Builder = fn(&str) -> String;

    const SRC: &str = "spec.rules[0].from[0].source";
    const OP: &str = "spec.rules[0].to[0].operation";

    const REALISTIC: &str = r#"# Policies of the shop namespace.
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-frontend
  namespace: shop
  uid: 8d1f6a0e-0000-4000-8000-000000000001
  resourceVersion: "1234"
  creationTimestamp: "2024-01-01T00:00:00Z"
  labels:
    team: payments
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: "{}"
spec:
  selector:
    matchLabels:
      app: cart
      version: 1
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/frontend", "cluster.local/ns/shop/sa/admin-*"]
        notNamespaces: [kube-system]
    - source:
        ipBlocks: ["10.8.0.0/16", "fd00:8::1"]
        notIpBlocks: [10.8.1.0/24]
    to:
    - operation:
        ports: ["8080", 9090]
        methods: ["GET", "HEAD"]
        paths: ["/api/*", "*/health", "/"]
        notPaths: ["/api/admin*"]
        hosts: ["Cart.Shop.svc.cluster.local", "*"]
  - {}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: deny-legacy
  namespace: shop
  annotations:
    istio.io/dry-run: "true"
spec:
  action: DENY
  rules:
  - from:
    - source:
        namespaces: ["legacy"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: shop}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-all, namespace: istio-system}
spec:
  action: AUDIT
  rules: []
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: cart-permissive, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  mtls: {mode: PERMISSIVE}
---
"#;

    #[test]
    fn realistic_multi_document_file() {
        let b = parse(REALISTIC).unwrap();
        assert_eq!(b.authz.len(), 4);
        assert_eq!(b.peer_authn.len(), 2);
        let p = &b.authz[0];
        assert_eq!(p.key(), "shop/allow-frontend");
        assert_eq!(p.origin.line, 3);
        assert_eq!(p.origin.file, Path::new(FILE));
        assert_eq!(p.action, Action::Allow);
        assert!(!p.dry_run);
        let sel = p.selector.as_ref().unwrap();
        assert_eq!(sel.get("app").map(String::as_str), Some("cart"));
        assert_eq!(sel.get("version").map(String::as_str), Some("1"));
        let rules = p.rules.as_ref().unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[1], Rule::default());
        let r = &rules[0];
        assert_eq!(r.from.len(), 2);
        assert_eq!(
            r.from[0].principals,
            vec![
                StringMatch::Exact("cluster.local/ns/shop/sa/frontend".into()),
                StringMatch::Prefix("cluster.local/ns/shop/sa/admin-".into()),
            ]
        );
        assert_eq!(
            r.from[0].not_namespaces,
            vec![StringMatch::Exact("kube-system".into())]
        );
        assert_eq!(
            r.from[1].ip_blocks,
            vec![
                parse_cidr("10.8.0.0/16").unwrap(),
                parse_cidr("fd00:8::1/128").unwrap()
            ]
        );
        assert_eq!(
            r.from[1].not_ip_blocks,
            vec![parse_cidr("10.8.1.0/24").unwrap()]
        );
        let op = &r.to[0];
        assert_eq!(op.ports, vec![8080, 9090]);
        assert_eq!(op.methods.len(), 2);
        assert_eq!(
            op.paths,
            vec![
                StringMatch::Prefix("/api/".into()),
                StringMatch::Suffix("/health".into()),
                StringMatch::Exact("/".into()),
            ]
        );
        assert_eq!(op.not_paths, vec![StringMatch::Prefix("/api/admin".into())]);
        // Hosts are stored lowercase.
        assert_eq!(
            op.hosts,
            vec![
                StringMatch::Exact("cart.shop.svc.cluster.local".into()),
                StringMatch::Presence
            ]
        );

        let d = &b.authz[1];
        assert_eq!(
            (d.key().as_str(), d.action, d.dry_run),
            ("shop/deny-legacy", Action::Deny, true)
        );
        assert_eq!(d.origin.line, 38);
        let n = &b.authz[2];
        assert_eq!(
            (n.action, &n.rules, &n.selector),
            (Action::Allow, &None, &None)
        );
        let a = &b.authz[3];
        assert_eq!((a.action, &a.rules), (Action::Audit, &Some(vec![])));

        assert_eq!(
            b.peer_authn[0].key_for_test(),
            ("istio-system", "default", MtlsMode::Strict)
        );
        assert_eq!(b.peer_authn[0].selector, None);
        assert_eq!(b.peer_authn[1].mode, MtlsMode::Permissive);
        assert!(b.peer_authn[1].selector.is_some());
    }

    impl PeerAuthentication {
        fn key_for_test(&self) -> (&str, &str, MtlsMode) {
            (&self.namespace, &self.name, self.mode)
        }
    }

    #[test]
    fn empty_inputs_are_empty_bundles() {
        for text in ["", "---\n", "# nothing\n", "---\n---\n"] {
            assert_eq!(parse(text).unwrap(), PolicyBundle::default(), "{text:?}");
        }
    }

    #[test]
    fn rules_forms() {
        let absent = parse(&authz("  action: ALLOW\n")).unwrap();
        assert_eq!(absent.authz[0].rules, None);
        let empty = parse(&authz("  rules: []\n")).unwrap();
        assert_eq!(empty.authz[0].rules, Some(vec![]));
        let any = parse(&authz("  rules: [{}]\n")).unwrap();
        assert_eq!(any.authz[0].rules, Some(vec![Rule::default()]));
        // `when: []` adds no condition (Istio has no check for it).
        let no_when = parse(&authz("  rules: [{when: []}]\n")).unwrap();
        assert_eq!(no_when.authz[0].rules, Some(vec![Rule::default()]));
        let no_spec = parse(&authz("").replace("spec:\n", "")).unwrap();
        assert_eq!(no_spec.authz[0].rules, None);
        assert_eq!(no_spec.authz[0].action, Action::Allow);
        // An empty selector selects everything: stored as none.
        let sel = parse(&authz("  selector: {matchLabels: {}}\n")).unwrap();
        assert_eq!(sel.authz[0].selector, None);
    }

    #[test]
    fn ports_as_strings_and_integers() {
        let b = parse(&with_operation(
            "ports: [\"1\", 65535, \"08080\"]\n        notPorts: [22]",
        ))
        .unwrap();
        let op = &b.authz[0].rules.as_ref().unwrap()[0].to[0];
        assert_eq!(op.ports, vec![1, 65535, 8080]);
        assert_eq!(op.not_ports, vec![22]);
    }

    #[test]
    fn bad_ports() {
        for bad in [
            "\"0\"",
            "0",
            "\"65536\"",
            "70000",
            "-1",
            "\"80-90\"",
            "\"\"",
            "\"http\"",
            "\" 80\"",
            "8.5",
            "true",
        ] {
            for field in ["ports", "notPorts"] {
                let text = with_operation(&format!("{field}: [{bad}]"));
                let e = parse(&text).expect_err(&text);
                let msg = e.to_string();
                assert!(msg.starts_with(&format!("{FILE}:10: ")), "{bad}: {msg}");
                assert_eq!(e.policy(), Some("ns/p"), "{msg}");
                let want = format!("{OP}.{field}");
                assert!(
                    e.field().is_some_and(|f| f.starts_with(&want)),
                    "{bad}: {msg}"
                );
            }
        }
        let e = refused(
            &with_operation("ports: [\"99999\"]"),
            10,
            Some("ns/p"),
            &format!("{OP}.ports[0]"),
        );
        assert!(matches!(e.problem(), Some(Problem::InvalidPort { value }) if value == "99999"));
    }

    #[test]
    fn bad_cidrs() {
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/a",
            "10.0.0.0/+8",
            "fd00::/129",
            "::ffff:10.0.0.0/104",
            " 10.0.0.1",
            "10.0.0.0/8/8",
            "*",
            "",
        ] {
            for field in ["ipBlocks", "notIpBlocks"] {
                let text = with_source(&format!("{field}: [\"10.1.0.0/16\", \"{bad}\"]"));
                let e = refused(&text, 10, Some("ns/p"), &format!("{SRC}.{field}[1]"));
                assert!(
                    matches!(e.problem(), Some(Problem::InvalidCidr { .. })),
                    "{bad}: {e}"
                );
            }
        }
        assert_eq!(parse_cidr("0.0.0.0/0").unwrap().prefix, 0);
        assert_eq!(parse_cidr("::/0").unwrap().prefix, 0);
        assert_eq!(parse_cidr("10.0.0.1").unwrap().prefix, 32);
    }

    #[test]
    fn bad_patterns_in_every_string_field() {
        let fields: [(&str, Builder, &str); 12] = [
            ("principals", with_source, SRC),
            ("notPrincipals", with_source, SRC),
            ("namespaces", with_source, SRC),
            ("notNamespaces", with_source, SRC),
            ("methods", with_operation, OP),
            ("notMethods", with_operation, OP),
            ("paths", with_operation, OP),
            ("notPaths", with_operation, OP),
            ("hosts", with_operation, OP),
            ("notHosts", with_operation, OP),
            // Multi-line lists name the entry's own line.
            (
                "principals",
                |s| {
                    with_source(
                        &s.replace(": [\"ok\", ", ":\n        - ok\n        - ")
                            .replace("]", ""),
                    )
                },
                SRC,
            ),
            (
                "paths",
                |s| {
                    with_operation(
                        &s.replace(": [\"ok\", ", ":\n        - ok\n        - ")
                            .replace("]", ""),
                    )
                },
                OP,
            ),
        ];
        for (i, (field, build, prefix)) in fields.into_iter().enumerate() {
            let line = if i >= 10 { 12 } else { 10 };
            let text = build(&format!("{field}: [\"ok\", \"\"]"));
            let e = refused(&text, line, Some("ns/p"), &format!("{prefix}.{field}[1]"));
            assert!(matches!(e.problem(), Some(Problem::EmptyPattern)), "{e}");
            for bad in ["a*b", "*a*", "**", "a**"] {
                let text = build(&format!("{field}: [\"ok\", \"{bad}\"]"));
                let e = refused(&text, line, Some("ns/p"), &format!("{prefix}.{field}[1]"));
                assert!(
                    matches!(e.problem(), Some(Problem::WildcardInMiddle { .. })),
                    "{bad}: {e}"
                );
            }
        }
        let e = refused(
            &with_source("principals: [\"spiffe://cluster.local/ns/a/sa/b\"]"),
            10,
            Some("ns/p"),
            &format!("{SRC}.principals[0]"),
        );
        assert!(
            matches!(e.problem(), Some(Problem::SpiffePrincipal { .. })),
            "{e}"
        );
    }

    #[test]
    fn unsupported_fields() {
        let cases: &[(&str, usize, &str)] = &[
            (
                "  rules:\n  - when:\n    - key: request.auth.claims[iss]\n      values: [\"a\"]\n",
                9,
                "spec.rules[0].when[0].key",
            ),
            (
                "  rules:\n  - {}\n  - when: [{key: a, values: [b]}]\n",
                9,
                "spec.rules[1].when[0].key",
            ),
            (
                "  action: CUSTOM\n  provider: {name: ext}\n",
                8,
                "spec.provider",
            ),
            (
                "  targetRef: {kind: Gateway, name: gw}\n",
                7,
                "spec.targetRef",
            ),
            (
                "  targetRefs: [{kind: Gateway, name: gw}]\n",
                7,
                "spec.targetRefs",
            ),
            ("  action: CUSTOM\n", 7, "spec.action"),
            ("  mtls: {mode: STRICT}\n", 7, "spec.mtls"),
        ];
        for &(spec, line, field) in cases {
            refused(&authz(spec), line, Some("ns/p"), field);
        }
        for field in [
            "requestPrincipals",
            "notRequestPrincipals",
            "remoteIpBlocks",
            "notRemoteIpBlocks",
        ] {
            let e = refused(
                &with_source(&format!("{field}: [\"*\"]")),
                10,
                Some("ns/p"),
                &format!("{SRC}.{field}"),
            );
            assert!(
                matches!(e.problem(), Some(Problem::Unsupported { .. })),
                "{e}"
            );
        }
        let e = parse(&authz("  rules:\n  - when: [{key: a, values: [b]}]\n")).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{FILE}:8: policy ns/p: spec.rules[0].when[0].key: condition key \"a\" is not a \
                 known attribute"
            )
        );
        // Never dropped: even alongside supported fields.
        refused(
            &with_source("principals: [\"a\"]\n        requestPrincipals: [\"*\"]"),
            11,
            Some("ns/p"),
            &format!("{SRC}.requestPrincipals"),
        );
    }

    #[test]
    fn bad_actions_and_modes() {
        let e = refused(&authz("  action: allow\n"), 7, Some("ns/p"), "spec.action");
        assert!(matches!(e.problem(), Some(Problem::InvalidValue { .. })));
        for (mode, want) in [("UNSET", MtlsMode::Unset), ("DISABLE", MtlsMode::Disable)] {
            let b = parse(&peer_authn(&format!("  mtls:\n    mode: {mode}\n"))).unwrap();
            assert_eq!(b.peer_authn[0].mode, want);
        }
        refused(
            &peer_authn("  mtls: {mode: strict}\n"),
            7,
            Some("ns/pa"),
            "spec.mtls.mode",
        );
        // `mtls` or `mode` absent: UNSET (inherited), as in Istio.
        for spec in ["  selector: {matchLabels: {app: a}}\n", "  mtls: {}\n"] {
            let b = parse(&peer_authn(spec)).unwrap();
            assert_eq!(b.peer_authn[0].mode, MtlsMode::Unset, "{spec}");
        }
        refused(
            &peer_authn("").replace("spec:\n", ""),
            1,
            Some("ns/pa"),
            "spec.mtls.mode",
        );
        // portLevelMtls: only with a selector, not empty, ports 1-65535 (Istio's
        // ValidatePeerAuthentication).
        refused(
            &peer_authn("  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: DISABLE}\n"),
            9,
            Some("ns/pa"),
            "spec.portLevelMtls",
        );
        let sel = "  selector: {matchLabels: {app: a}}\n  mtls: {mode: STRICT}\n";
        let b = parse(&peer_authn(&format!(
            "{sel}  portLevelMtls:\n    8080: {{mode: DISABLE}}\n    \"9090\": {{mode: UNSET}}\n    \"22\": {{}}\n"
        )))
        .unwrap();
        assert_eq!(
            b.peer_authn[0].port_level,
            BTreeMap::from([
                (22, MtlsMode::Unset),
                (8080, MtlsMode::Disable),
                (9090, MtlsMode::Unset)
            ])
        );
        refused(
            &peer_authn(&format!("{sel}  portLevelMtls: {{}}\n")),
            9,
            Some("ns/pa"),
            "spec.portLevelMtls",
        );
        for bad in ["0", "65536", "\"x\""] {
            let e = parse(&peer_authn(&format!(
                "{sel}  portLevelMtls:\n    {bad}: {{mode: STRICT}}\n"
            )))
            .unwrap_err();
            assert!(
                e.field()
                    .is_some_and(|f| f.starts_with("spec.portLevelMtls")),
                "{bad}: {e}"
            );
        }
        refused(
            &peer_authn(&format!(
                "{sel}  portLevelMtls:\n    80: {{mode: strict}}\n"
            )),
            10,
            Some("ns/pa"),
            "spec.portLevelMtls[80].mode",
        );
        refused(
            &peer_authn("  mtls: {mode: STRICT}\n  action: DENY\n"),
            8,
            Some("ns/pa"),
            "spec.action",
        );
        refused(
            &peer_authn("  mtls: {mode: STRICT}\n  rules: [{}]\n"),
            8,
            Some("ns/pa"),
            "spec.rules",
        );
        refused(
            &peer_authn("  mtls: {mode: STRICT}\n  targetRef: {name: x}\n"),
            8,
            Some("ns/pa"),
            "spec.targetRef",
        );
        let text = peer_authn("  mtls: {mode: STRICT}\n").replace(
            "metadata:\n",
            "metadata:\n  annotations: {istio.io/dry-run: \"true\"}\n",
        );
        refused(
            &text,
            4,
            Some("ns/pa"),
            "metadata.annotations[istio.io/dry-run]",
        );
    }

    #[test]
    fn unknown_fields_name_policy_and_path() {
        let e = refused(&authz("  colour: blue\n"), 7, Some("ns/p"), "spec.colour");
        assert!(e.to_string().contains("unknown field `colour`"), "{e}");
        assert!(matches!(e, PolicyError::Syntax { column: 3, .. }), "{e:?}");
        refused(
            &with_source("principal: [\"a\"]"),
            10,
            Some("ns/p"),
            &format!("{SRC}.principal"),
        );
        refused(
            &with_operation("port: [\"80\"]"),
            10,
            Some("ns/p"),
            &format!("{OP}.port"),
        );
        refused(
            &authz("  rules:\n  - fromm: []\n"),
            8,
            Some("ns/p"),
            "spec.rules[0].fromm",
        );
        refused(
            &authz("  selector: {labels: {a: b}}\n"),
            7,
            Some("ns/p"),
            "spec.selector.labels",
        );
        // `status` (control-plane output) is accepted and ignored.
        assert_eq!(
            parse(&authz("  rules: [{}]\nstatus: {validationMessages: []}\n"))
                .unwrap()
                .authz
                .len(),
            1
        );
        // A value of the wrong type.
        refused(
            &with_source("principals: \"a\""),
            10,
            Some("ns/p"),
            &format!("{SRC}.principals"),
        );
        // A duplicate key.
        let e = parse(&authz("  action: DENY\n  action: ALLOW\n")).unwrap_err();
        assert_eq!(e.line(), Some(8), "{e}");
        // In the second document: named by that document.
        let text = format!(
            "{}---\n{}",
            authz("  rules: [{}]\n"),
            authz("  actoin: DENY\n").replace("name: p\n", "name: q\n")
        );
        refused(&text, 15, Some("ns/q"), "spec.actoin");
    }

    #[test]
    fn kinds_and_versions() {
        for (api, kind) in [
            ("security.istio.io/v2", "AuthorizationPolicy"),
            ("networking.istio.io/v1", "AuthorizationPolicy"),
            ("security.istio.io/v1", "RequestAuthentication"),
            ("v1", "ConfigMap"),
        ] {
            let text = authz("  rules: [{}]\n")
                .replace("security.istio.io/v1", api)
                .replace("AuthorizationPolicy", kind);
            let e = refused(&text, 2, None, "kind");
            assert!(
                matches!(e.problem(), Some(Problem::UnknownKind { .. })),
                "{e}"
            );
        }
        let b = parse(&authz("  rules: [{}]\n").replace("/v1\n", "/v1beta1\n")).unwrap();
        assert_eq!(b.authz.len(), 1);
        refused(
            &authz("").replacen("apiVersion: security.istio.io/v1\n", "", 1),
            1,
            None,
            "apiVersion",
        );
        refused(
            &authz("").replacen("kind: AuthorizationPolicy\n", "", 1),
            1,
            None,
            "kind",
        );
        let e = parse("- a\n- b\n").unwrap_err();
        assert!(matches!(e, PolicyError::Syntax { line: 1, .. }), "{e}");
        let e = parse("just a string\n").unwrap_err();
        assert!(matches!(e, PolicyError::Syntax { line: 1, .. }), "{e}");
    }

    #[test]
    fn metadata() {
        refused(
            &authz("").replace("  name: p\n", ""),
            4,
            None,
            "metadata.name",
        );
        refused(
            &authz("").replace("  namespace: ns\n", ""),
            4,
            None,
            "metadata.namespace",
        );
        refused(
            &authz("").replace("metadata:\n  name: p\n  namespace: ns\n", ""),
            1,
            None,
            "metadata",
        );
        let long = format!("{}.b", "a".repeat(252));
        for bad in [
            "My_Policy",
            "-p",
            "p..q",
            ".p",
            "p.",
            "p.-q",
            "\"\"",
            long.as_str(),
        ] {
            let e = refused(
                &authz("").replace("name: p\n", &format!("name: {bad}\n")),
                4,
                None,
                "metadata.name",
            );
            assert!(
                matches!(e.problem(), Some(Problem::InvalidObjectName { .. })),
                "{e}"
            );
        }
        // Names are DNS-1123 subdomains (Kubernetes object names), as Istio's examples use.
        let max = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        );
        for good in [
            "service-httpbin.default.svc.cluster.local",
            "p.q",
            "1.2",
            max.as_str(),
        ] {
            let b = parse(&authz("").replace("name: p\n", &format!("name: {good}\n"))).unwrap();
            assert_eq!(b.authz[0].name, good);
        }
        // Namespaces stay labels.
        refused(
            &authz("").replace("namespace: ns\n", "namespace: a.b\n"),
            5,
            None,
            "metadata.namespace",
        );
        refused(
            &authz("").replace("namespace: ns\n", "namespace: Shop\n"),
            5,
            None,
            "metadata.namespace",
        );
        // Other metadata is ignored, including other annotations.
        let text = authz("  rules: [{}]\n").replace(
            "metadata:\n",
            "metadata:\n  labels: {a: b}\n  uid: x\n  generation: 3\n  annotations:\n    a.b/c: d\n    istio.io/dry-run: \"false\"\n  finalizers: [x]\n",
        );
        assert!(!parse(&text).unwrap().authz[0].dry_run);
        let text = authz("").replace(
            "metadata:\n",
            "metadata:\n  annotations: {istio.io/dry-run: \"true\"}\n",
        );
        assert!(parse(&text).unwrap().authz[0].dry_run);
        let text = authz("").replace(
            "metadata:\n",
            "metadata:\n  annotations:\n    istio.io/dry-run: \"yes\"\n",
        );
        refused(
            &text,
            5,
            Some("ns/p"),
            "metadata.annotations[istio.io/dry-run]",
        );
        // Go's strconv.ParseBool, as Istio's checkDryRunAnnotation reads it.
        let dry = |value: &str, spec: &str| {
            parse(&authz(spec).replace(
                "metadata:\n",
                &format!("metadata:\n  annotations: {{istio.io/dry-run: \"{value}\"}}\n"),
            ))
        };
        for (v, want) in [
            ("1", true),
            ("t", true),
            ("T", true),
            ("TRUE", true),
            ("true", true),
            ("True", true),
            ("0", false),
            ("f", false),
            ("F", false),
            ("FALSE", false),
            ("false", false),
            ("False", false),
        ] {
            assert_eq!(dry(v, "").unwrap().authz[0].dry_run, want, "{v}");
        }
        for v in ["yes", "tRUE", " true", "2", "", "truee"] {
            assert!(dry(v, "").is_err(), "{v}");
        }
        // Only ALLOW and DENY take the annotation, whatever its value.
        for v in ["true", "false"] {
            let e = dry(v, "  action: AUDIT\n  rules: [{}]\n").unwrap_err();
            assert_eq!(
                e.field(),
                Some("metadata.annotations[istio.io/dry-run]"),
                "{e}"
            );
            assert!(
                matches!(e.problem(), Some(Problem::DryRunAction { .. })),
                "{e}"
            );
        }
        assert!(
            dry("true", "  action: DENY\n  rules: [{}]\n")
                .unwrap()
                .authz[0]
                .dry_run
        );
    }

    #[test]
    fn istio_validation_refusals() {
        // A DENY without rules (or with none): never triggers, Istio rejects it.
        for spec in ["  action: DENY\n", "  action: DENY\n  rules: []\n"] {
            let e = parse(&authz(spec)).unwrap_err();
            assert_eq!(e.field(), Some("spec.rules"), "{e}");
            assert!(
                matches!(e.problem(), Some(Problem::DenyWithoutRules)),
                "{e}"
            );
            assert_eq!(e.policy(), Some("ns/p"));
        }
        // A present but empty `from`/`to` is an error, never "any".
        for (rule, field) in [
            ("{from: []}", "spec.rules[0].from"),
            ("{to: []}", "spec.rules[0].to"),
            (
                "{from: [], to: [{operation: {ports: [\"80\"]}}]}",
                "spec.rules[0].from",
            ),
        ] {
            for action in ["ALLOW", "DENY", "AUDIT"] {
                let e = refused(
                    &authz(&format!("  action: {action}\n  rules: [{rule}]\n")),
                    8,
                    Some("ns/p"),
                    field,
                );
                assert!(
                    matches!(e.problem(), Some(Problem::EmptyList { .. })),
                    "{e}"
                );
            }
        }
        // serviceAccounts: not with principals or namespaces; `sa` or `ns/sa`, no wildcard.
        for other in ["principals: [a]", "namespaces: [x]", "notNamespaces: [x]"] {
            let e = parse(&with_source(&format!(
                "serviceAccounts: [sa]\n        {other}"
            )))
            .unwrap_err();
            assert!(
                matches!(e.problem(), Some(Problem::Conflict { .. })),
                "{other}: {e}"
            );
        }
        for bad in ["\"\"", "\"ns/*\"", "\"*\"", "a/b/c", "/sa", "ns/", "\"a/\""] {
            let e = parse(&with_source(&format!("serviceAccounts: [{bad}]"))).unwrap_err();
            assert!(
                matches!(e.problem(), Some(Problem::InvalidServiceAccount { .. })),
                "{bad}: {e}"
            );
            assert_eq!(
                e.field(),
                Some(format!("{SRC}.serviceAccounts[0]").as_str())
            );
        }
        let seventeen = vec!["a"; 17].join(", ");
        assert!(parse(&with_source(&format!("serviceAccounts: [{seventeen}]"))).is_err());
        let b = parse(&with_source(
            "serviceAccounts: [web, other/db]\n        notServiceAccounts: [x]",
        ))
        .unwrap();
        let src = &b.authz[0].rules.as_ref().unwrap()[0].from[0];
        assert_eq!(
            src.service_accounts,
            vec![
                ServiceAccount {
                    namespace: "ns".into(),
                    name: "web".into()
                },
                ServiceAccount {
                    namespace: "other".into(),
                    name: "db".into()
                },
            ]
        );
        assert_eq!(src.not_service_accounts[0].namespace, "ns");
    }

    #[test]
    fn path_templates_as_istio_validates_them() {
        // istio/istio pkg/config/security CheckValidPathTemplate and its tests.
        for good in [
            "/foo/{*}",
            "/foo/{**}",
            "/foo/{*}/bar/{**}",
            "/{*}/{*}/{**}",
            "/foo/{**}/",
            "/{**}",
            "/foo/{**}/bar",
            "/a-b._~%20!$&'()+,;:@=/{*}",
        ] {
            let b = parse(&with_operation(&format!("paths: [\"{good}\"]"))).unwrap();
            let op = &b.authz[0].rules.as_ref().unwrap()[0].to[0];
            assert_eq!(op.paths, vec![StringMatch::Template(good.into())], "{good}");
        }
        for bad in [
            "/{**}/foo/{*}",
            "/{**}/{**}",
            "/foo/{*}.txt",
            "/foo/{*}{*}",
            "/*/baz/{*}",
            "/**/baz/{*}",
            "/foo//{*}",
            "/foo/{x}",
            "/a{b",
            "/a}",
            "/foo/{*}/a b",
            "/foo/{*}?x",
        ] {
            for field in ["paths", "notPaths"] {
                let e = parse(&with_operation(&format!("{field}: [\"{bad}\"]"))).unwrap_err();
                assert!(
                    matches!(e.problem(), Some(Problem::InvalidPathTemplate { .. })),
                    "{bad}: {e}"
                );
                assert_eq!(e.field(), Some(format!("{OP}.{field}[0]").as_str()));
            }
        }
        // Without a template, prefix/suffix stay as they were.
        let b = parse(&with_operation("paths: [\"/api/*\"]")).unwrap();
        assert_eq!(
            b.authz[0].rules.as_ref().unwrap()[0].to[0].paths,
            vec![StringMatch::Prefix("/api/".into())]
        );
    }

    #[test]
    fn conditions() {
        let when = |c: &str| authz(&format!("  rules:\n  - when:\n    - {c}\n"));
        let cond = |c: &str| -> Condition {
            parse(&when(c)).unwrap().authz[0].rules.as_ref().unwrap()[0].when[0].clone()
        };
        assert_eq!(
            cond("{key: source.ip, values: [10.0.0.0/8], notValues: [10.1.0.0/16]}"),
            Condition::SourceIp {
                values: vec![parse_cidr("10.0.0.0/8").unwrap()],
                not_values: vec![parse_cidr("10.1.0.0/16").unwrap()],
            }
        );
        assert!(matches!(
            cond("{key: remote.ip, values: [\"fd00::1\"]}"),
            Condition::SourceIp { .. }
        ));
        assert!(matches!(
            cond("{key: destination.ip, notValues: [10.0.0.1]}"),
            Condition::DestinationIp { .. }
        ));
        assert_eq!(
            cond("{key: destination.port, values: [\"8080\"]}"),
            Condition::DestinationPort {
                values: vec![8080],
                not_values: vec![]
            }
        );
        assert_eq!(
            cond("{key: \"request.headers[X-Token]\", values: [\"a*\"], notValues: [\"*\"]}"),
            Condition::RequestHeader {
                name: "x-token".into(),
                values: vec![StringMatch::Prefix("a".into())],
                not_values: vec![StringMatch::Presence],
            }
        );
        assert!(matches!(
            cond("{key: source.namespace, values: [\"a*\"]}"),
            Condition::SourceNamespace { .. }
        ));
        assert!(matches!(
            cond("{key: source.principal, values: [\"*\"]}"),
            Condition::SourcePrincipal { .. }
        ));
        assert_eq!(
            cond("{key: source.serviceAccount, values: [web]}"),
            Condition::SourceServiceAccount {
                values: vec![ServiceAccount {
                    namespace: "ns".into(),
                    name: "web".into()
                }],
                not_values: vec![],
            }
        );
        // Refused, naming policy and field.
        for (c, field) in [
            (
                "{key: source.ip, values: []}",
                "spec.rules[0].when[0].values",
            ),
            ("{key: source.ip}", "spec.rules[0].when[0].values"),
            ("{values: [a]}", "spec.rules[0].when[0].key"),
            ("{key: \"\", values: [a]}", "spec.rules[0].when[0].key"),
            (
                "{key: source.ip, values: [10.0.0.300]}",
                "spec.rules[0].when[0].values[0]",
            ),
            (
                "{key: destination.ip, notValues: [x]}",
                "spec.rules[0].when[0].notValues[0]",
            ),
            (
                "{key: destination.port, values: [\"99999\"]}",
                "spec.rules[0].when[0].values[0]",
            ),
            (
                "{key: destination.port, values: [http]}",
                "spec.rules[0].when[0].values[0]",
            ),
            (
                "{key: source.namespace, values: [\"\"]}",
                "spec.rules[0].when[0].values[0]",
            ),
            (
                "{key: source.principal, values: [\"spiffe://td/ns/a/sa/b\"]}",
                "spec.rules[0].when[0].values[0]",
            ),
            (
                "{key: \"request.headers[]\", values: [a]}",
                "spec.rules[0].when[0].key",
            ),
            (
                "{key: \"request.headers[a b]\", values: [a]}",
                "spec.rules[0].when[0].key",
            ),
            (
                "{key: request.headers, values: [a]}",
                "spec.rules[0].when[0].key",
            ),
            (
                "{key: \"request.headers[x\", values: [a]}",
                "spec.rules[0].when[0].key",
            ),
            (
                "{key: request.auth.principal, values: [a]}",
                "spec.rules[0].when[0].key",
            ),
            (
                "{key: \"request.auth.claims[iss]\", values: [a]}",
                "spec.rules[0].when[0].key",
            ),
            (
                "{key: connection.sni, values: [a]}",
                "spec.rules[0].when[0].key",
            ),
            (
                "{key: source.trustDomain, values: [a]}",
                "spec.rules[0].when[0].key",
            ),
            (
                "{key: destination.namespace, values: [a]}",
                "spec.rules[0].when[0].key",
            ),
            (
                "{key: \"destination.labels[app]\", values: [a]}",
                "spec.rules[0].when[0].key",
            ),
            (
                "{key: destination.user, values: [a]}",
                "spec.rules[0].when[0].key",
            ),
            (
                "{key: \"experimental.envoy.filters.a[b]\", values: [a]}",
                "spec.rules[0].when[0].key",
            ),
            (
                "{key: source.serviceAccount, values: [\"a/*\"]}",
                "spec.rules[0].when[0].values[0]",
            ),
            (
                "{key: source.ip, values: [a], other: b}",
                "spec.rules[0].when[0].other",
            ),
        ] {
            let e = parse(&when(c)).expect_err(c);
            assert_eq!(e.policy(), Some("ns/p"), "{c}: {e}");
            assert_eq!(e.field(), Some(field), "{c}: {e}");
        }
    }

    #[test]
    fn empty_sources_and_operations() {
        let e = refused(
            &authz("  rules:\n  - from:\n    - {}\n"),
            9,
            Some("ns/p"),
            "spec.rules[0].from[0].source",
        );
        assert!(matches!(e.problem(), Some(Problem::EmptySource)));
        refused(
            &authz("  rules:\n  - from:\n    - source: {}\n"),
            9,
            Some("ns/p"),
            "spec.rules[0].from[0].source",
        );
        refused(
            &authz("  rules:\n  - from:\n    - source: {principals: []}\n"),
            9,
            Some("ns/p"),
            "spec.rules[0].from[0].source",
        );
        let e = refused(
            &authz("  rules:\n  - to:\n    - {}\n"),
            9,
            Some("ns/p"),
            "spec.rules[0].to[0].operation",
        );
        assert!(matches!(e.problem(), Some(Problem::EmptyOperation)));
        refused(
            &authz("  rules:\n  - to:\n    - operation: {}\n"),
            9,
            Some("ns/p"),
            "spec.rules[0].to[0].operation",
        );
    }

    #[test]
    fn duplicates() {
        let one = authz("  rules: [{}]\n");
        let text = format!("{one}---\n{one}");
        let e = refused(&text, 9, Some("ns/p"), "metadata.name");
        assert_eq!(
            e.to_string(),
            format!("{FILE}:9: policy ns/p: metadata.name: AuthorizationPolicy ns/p is defined twice (first at {FILE}:1)")
        );
        // Another kind, namespace or name is another object.
        let pa = peer_authn("  mtls: {mode: STRICT}\n").replace("name: pa\n", "name: p\n");
        let other_ns = one.replace("namespace: ns", "namespace: ns2");
        assert!(parse(&format!("{one}---\n{pa}---\n{other_ns}")).is_ok());
    }

    #[test]
    fn directories() {
        let dir = TempDir::new("policy-dir");
        let a = authz("  rules: [{}]\n").replace("name: p\n", "name: a\n");
        let b = authz("  rules: [{}]\n").replace("name: p\n", "name: b\n");
        fs::write(dir.0.join("20-b.yml"), &b).unwrap();
        fs::write(dir.0.join("10-a.yaml"), &a).unwrap();
        fs::write(dir.0.join("30-c.txt"), "not yaml: [").unwrap();
        fs::write(dir.0.join("README"), "ignored").unwrap();
        fs::create_dir(dir.0.join("sub.yaml")).unwrap();
        fs::write(dir.0.join("sub.yaml/x.yaml"), "broken: [").unwrap();
        let bundle = load_dir(&dir.0).unwrap();
        let names: Vec<_> = bundle
            .authz
            .iter()
            .map(|p| (p.name.as_str(), p.origin.file.clone()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("a", dir.0.join("10-a.yaml")),
                ("b", dir.0.join("20-b.yml"))
            ]
        );
        assert_eq!(load_file(&dir.0.join("10-a.yaml")).unwrap().authz.len(), 1);

        // Names are unique across files; the error names both.
        fs::write(dir.0.join("40-dup.yaml"), format!("# again\n{a}")).unwrap();
        let e = load_dir(&dir.0).unwrap_err();
        let dup = dir.0.join("40-dup.yaml");
        assert_eq!(e.path(), dup);
        assert_eq!(e.line(), Some(2));
        assert!(
            e.to_string()
                .contains(&format!("first at {}:1", dir.0.join("10-a.yaml").display())),
            "{e}"
        );

        fs::write(&dup, "kind: [").unwrap();
        let e = load_dir(&dir.0).unwrap_err();
        assert!(
            e.to_string().starts_with(&format!("{}:1: ", dup.display())),
            "{e}"
        );

        let e = load_dir(&dir.0.join("absent")).unwrap_err();
        assert!(matches!(e, PolicyError::Io { .. }), "{e}");
        assert_eq!(e.line(), None);
        let e = load_file(&dir.0.join("absent.yaml")).unwrap_err();
        assert!(matches!(e, PolicyError::Io { .. }), "{e}");
        fs::write(&dup, [0xff, 0xfe, b'a']).unwrap();
        assert!(matches!(
            load_file(&dup).unwrap_err(),
            PolicyError::Io { .. }
        ));
    }

    #[test]
    fn bounded_input() {
        let big = format!(
            "# {}\n",
            "x".repeat(usize::try_from(MAX_FILE_BYTES).unwrap())
        );
        let e = parse(&big).unwrap_err();
        assert!(matches!(e, PolicyError::TooLarge { .. }), "{e}");
        let dir = TempDir::new("policy-big");
        let file = dir.0.join("big.yaml");
        fs::write(&file, &big).unwrap();
        let e = load_file(&file).unwrap_err();
        assert!(
            matches!(e, PolicyError::TooLarge { size, .. } if size > MAX_FILE_BYTES),
            "{e}"
        );
        assert!(
            e.to_string().contains("more than a policy file may have"),
            "{e}"
        );

        // Too many documents in one file: refused by the parser's budget.
        let storm = "---\n{}\n".repeat(MAX_OBJECTS + 1);
        let e = parse(&storm).unwrap_err();
        assert!(matches!(e, PolicyError::TooManyObjects { .. }), "{e}");
        assert!(
            e.to_string().contains("more than 100000 policy objects"),
            "{e}"
        );

        // Too many across the files of a directory.
        let mut loader = Loader {
            objects: MAX_OBJECTS,
            ..Loader::default()
        };
        let e = loader
            .text(&authz("  rules: [{}]\n"), Path::new(FILE))
            .unwrap_err();
        assert!(
            matches!(e, PolicyError::TooManyObjects { line: 1, .. }),
            "{e}"
        );
    }

    #[test]
    fn truncated_input_never_panics() {
        for end in 0..=REALISTIC.len() {
            if let Some(prefix) = REALISTIC.get(..end) {
                let _ = parse(prefix);
            }
        }
        for garbage in [
            "\0",
            "{",
            "[[[[",
            "&a [*a, *a]",
            "? : :",
            "!!binary x",
            "--- !!map\n",
            "%YAML 1.2\n",
            "a: &x [*x]",
            "\u{feff}kind: x",
            "'",
            "key: \"\\u0000\"",
            "- - - - -",
        ] {
            let _ = parse(garbage);
        }
        let deep = "[".repeat(10_000);
        assert!(parse(&deep).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_text_never_panics(text in any::<String>()) {
            let _ = parse(&text);
        }

        #[test]
        fn mutated_policies_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<char>()), 1..8)
        ) {
            let mut chars: Vec<char> = REALISTIC.chars().collect();
            for (at, c) in edits {
                let i = at.index(chars.len());
                chars[i] = c;
            }
            let text: String = chars.into_iter().collect();
            if let Err(e) = parse(&text) {
                // Every refusal names the file and a line.
                let prefix = format!("{FILE}:");
                prop_assert!(e.to_string().starts_with(&prefix), "{}", e);
                prop_assert!(e.line().is_some());
            }
        }
    }
}
