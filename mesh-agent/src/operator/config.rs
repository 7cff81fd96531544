//! `mesh-agent config keygen|bundle|sign|verify|diff|signers`: signed configuration bundles,
//! offline — what an operator or a CI pipeline runs (see [`crate::bundle`]).
//!
//! Exit codes:
//! - `verify`: 0 valid, 1 refused (the reason printed; JSON `{"valid":false,"reason":…}`),
//!   2 bad input (an unreadable file, a bad signer set, a bad argument);
//! - `diff`: 0 identical, 1 different, 2 trouble (like diff(1));
//! - the others: 0 done, 2 bad input (nothing written), 1 a file could not be written.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Subcommand};
use serde::Serialize;

use super::{print, with_stderr_logs, OutputFormat};
use crate::{
    bundle::{
        self,
        diff::{self, Changes, Diff},
        hex,
        signers::{self, read_bounded},
        Bundle, CheckOptions, KeyId, Rejection, SignedBundle, SignerSet, MAX_BUNDLE_BYTES,
    },
    error_chain,
    files::{self, FileError},
};

/// Exit code: done / valid / identical.
pub const EXIT_OK: u8 = 0;
/// Exit code: `verify` refused the bundle; `diff` found differences; otherwise a write failed.
pub const EXIT_REFUSED: u8 = 1;
/// Exit code: bad input.
pub const EXIT_ERROR: u8 = 2;

/// Default trust domain of principals (as `policy lint`).
const DEFAULT_TRUST_DOMAIN: &str = super::policy::DEFAULT_TRUST_DOMAIN;
/// Default mesh-wide policy namespace (as `policy lint`).
const DEFAULT_ROOT_NAMESPACE: &str = super::policy::DEFAULT_ROOT_NAMESPACE;

#[derive(Args, Debug)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Generate a signing key: KEY (PKCS#8, 0600) and KEY.pub (hex). Never overwrites.
    Keygen(KeygenArgs),
    /// Build a bundle from DIR (registry.yaml, policies/*.yaml): refused (exit 2) unless the
    /// registry parses strictly and the policies compile against it.
    Bundle(BundleArgs),
    /// Sign a bundle (a signed one gets one more signature).
    Sign(SignArgs),
    /// Verify a signed bundle against a signer set. Exit 0 valid, 1 refused, 2 bad input.
    Verify(VerifyArgs),
    /// What changes from OLD to NEW, and for which workloads. Exit 0 identical, 1 different,
    /// 2 trouble.
    Diff(DiffArgs),
    /// The signer keys a node trusts: list, add (pending), activate, retire.
    Signers(SignersArgs),
    /// At the authority (`--dir`): the intended version and every node's active version,
    /// when it last asked, and drift; the rollout and why it halted. Exit 0 no drift,
    /// 1 drift, 2 no record, 3 rollout halted.
    Status(crate::operator::state::AgentsArgs),
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// The private key file to create (its public key goes to `<KEY>.pub`).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("ver").required(true).args(["version", "previous"])))]
pub struct BundleArgs {
    /// The source directory: `registry.yaml` and `policies/*.yaml|*.yml`.
    pub dir: PathBuf,
    /// The bundle's version (≥ 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub version: Option<u64>,
    /// The previous bundle (signed or not): this one gets its version + 1.
    #[arg(long)]
    pub previous: Option<PathBuf>,
    /// The source revision (e.g. the Git commit of DIR).
    #[arg(long)]
    pub source_revision: Option<String>,
    /// Where to write the (unsigned) bundle.
    #[arg(long)]
    pub out: PathBuf,
    /// Rollout: the authority releases the bundle to nobody before this time (RFC 3339, UTC:
    /// `2026-01-02T03:04:05Z`).
    #[arg(long)]
    pub activate_at: Option<String>,
    /// Rollout: the nodes that receive the bundle first (comma-separated names, or prefix
    /// patterns ending in `*`); needs --canary-window-secs.
    #[arg(long, value_delimiter = ',')]
    pub canary_nodes: Vec<String>,
    /// Rollout: how long only the canaries run it; the rest receive it after the window if
    /// every canary reported it active, else the rollout stops.
    #[arg(long)]
    pub canary_window_secs: Option<u64>,
    /// The mesh's trust domain, for compiling principals.
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Istio's trustDomainAliases (comma-separated or repeated).
    #[arg(long = "trust-domain-alias", value_delimiter = ',')]
    pub trust_domain_aliases: Vec<String>,
    /// The mesh-wide policy namespace.
    #[arg(long, default_value = DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct SignArgs {
    /// The bundle (unsigned, or signed already).
    pub bundle: PathBuf,
    /// The signing key (PKCS#8 DER or PEM, mode 0600).
    #[arg(long)]
    pub key: PathBuf,
    /// Where to write the signed bundle (may be BUNDLE itself).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The signed bundle.
    pub signed: PathBuf,
    /// The signer set to verify against (what the node pins).
    #[arg(long)]
    pub signers: PathBuf,
    /// The version the node runs: a bundle not above it is refused (rollback).
    #[arg(long)]
    pub active_version: Option<u64>,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    /// The old bundle (signed or not).
    pub old: PathBuf,
    /// The new bundle (signed or not).
    pub new: PathBuf,
    /// The mesh-wide policy namespace (its policies select workloads of every namespace).
    #[arg(long, default_value = DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct SignersArgs {
    #[command(subcommand)]
    pub action: SignersAction,
    /// The signer set file (`add` creates it).
    #[arg(long, global = true)]
    pub file: Option<PathBuf>,
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Subcommand, Debug)]
pub enum SignersAction {
    /// List the signers.
    List,
    /// Add a public key (hex file, as `config keygen` writes it), pending: its signatures
    /// count once it is activated.
    Add {
        /// The public key file.
        public_key: PathBuf,
    },
    /// Activate a signer: its signatures count.
    Activate {
        /// The key id (32 hex digits, see `signers list`).
        key_id: String,
    },
    /// Retire a signer: its signatures never count again.
    Retire {
        /// The key id (32 hex digits, see `signers list`).
        key_id: String,
    },
}

pub fn main(args: ConfigArgs) -> ExitCode {
    with_stderr_logs(|| {
        let result = match args.command {
            ConfigCommand::Keygen(a) => keygen(&a),
            ConfigCommand::Bundle(a) => build(&a),
            ConfigCommand::Sign(a) => sign(&a),
            ConfigCommand::Verify(a) => verify(&a),
            ConfigCommand::Diff(a) => diff(&a),
            ConfigCommand::Signers(a) => signers_main(a),
            ConfigCommand::Status(a) => return crate::operator::state::agents(a),
        };
        match result {
            Ok(code) => ExitCode::from(code),
            Err(f) => {
                eprintln!("error: {}", f.message);
                ExitCode::from(f.code)
            }
        }
    })
}

/// A command that failed: the message for stderr and the exit code.
struct Failure {
    message: String,
    code: u8,
}

impl Failure {
    fn input(what: impl std::fmt::Display, e: &dyn std::error::Error) -> Self {
        Self {
            message: format!("{what}: {}", error_chain(e)),
            code: EXIT_ERROR,
        }
    }

    fn usage(message: String) -> Self {
        Self {
            message,
            code: EXIT_ERROR,
        }
    }

    fn write(e: &dyn std::error::Error) -> Self {
        Self {
            message: error_chain(e),
            code: EXIT_REFUSED,
        }
    }
}

type Outcome = Result<u8, Failure>;

fn output(format: OutputFormat, value: &impl Serialize, text: &str) -> Outcome {
    print(format, value, text).map_err(|e| Failure::write(&e))?;
    Ok(EXIT_OK)
}

/// Reads a bundle file of at most [`MAX_BUNDLE_BYTES`]: `Ok(Err(..))` when it is larger (a
/// refusal, not an I/O error).
fn read_bundle_file(path: &Path) -> Result<Result<Vec<u8>, Rejection>, Failure> {
    let bytes = read_bounded(path, MAX_BUNDLE_BYTES as u64).map_err(|source| {
        Failure::input(
            "reading",
            &FileError {
                op: "reading",
                path: path.to_owned(),
                source,
            },
        )
    })?;
    Ok(bytes.map_err(|size| Rejection::Oversized {
        detail: format!("{size} bytes (at most {MAX_BUNDLE_BYTES})"),
    }))
}

/// A bundle file, signed or not, whose structure and digest check (inputs of `bundle
/// --previous`, `sign` and `diff`).
fn read_any(path: &Path) -> Result<SignedBundle, Failure> {
    read_bundle_file(path)?
        .and_then(|bytes| bundle::parse_any(&bytes))
        .map_err(|e| Failure::input(path.display(), &e))
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Failure> {
    files::write_atomic(path, bytes, mode).map_err(|e| Failure::write(&e))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KeygenOutput {
    key_id: String,
    public_key: String,
    key: PathBuf,
    public_key_file: PathBuf,
}

fn keygen(a: &KeygenArgs) -> Outcome {
    use ring::signature::KeyPair as _;
    let pair = signers::generate_key(&a.out).map_err(|e| Failure::input("keygen", &e))?;
    let public = pair.public_key().as_ref();
    let out = KeygenOutput {
        key_id: KeyId::of(public).to_string(),
        public_key: hex::encode(public),
        key: a.out.clone(),
        public_key_file: signers::public_key_path(&a.out),
    };
    let text = format!(
        "key {} written to {} (0600), public key to {}\n",
        out.key_id,
        out.key.display(),
        out.public_key_file.display()
    );
    output(a.output, &out, &text)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BundleOutput {
    out: PathBuf,
    version: u64,
    digest: String,
    created: String,
    source_revision: Option<String>,
    policy_files: usize,
    authorization_policies: usize,
    peer_authentications: usize,
    nodes: usize,
    workloads: usize,
    services: usize,
    bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    rollout: Option<bundle::Rollout>,
}

fn build(a: &BundleArgs) -> Outcome {
    let version = match (a.version, &a.previous) {
        (Some(v), _) => v,
        (None, Some(prev)) => {
            let old = read_any(prev)?;
            old.bundle.version().checked_add(1).ok_or_else(|| {
                Failure::usage(format!(
                    "{}: version {} has no successor",
                    prev.display(),
                    old.bundle.version()
                ))
            })?
        }
        (None, None) => return Err(Failure::usage("--version or --previous is needed".into())),
    };
    let options = CheckOptions {
        trust_domain: a.trust_domain.clone(),
        root_namespace: a.root_namespace.clone(),
        trust_domain_aliases: a.trust_domain_aliases.clone(),
    };
    let rollout =
        (a.activate_at.is_some() || !a.canary_nodes.is_empty() || a.canary_window_secs.is_some())
            .then(|| bundle::Rollout {
                activate_at: a.activate_at.clone(),
                canary_nodes: a.canary_nodes.clone(),
                canary_window_secs: a.canary_window_secs,
            });
    if let Some(r) = &rollout {
        r.check()
            .map_err(|e| Failure::input("the rollout flags", &e))?;
    }
    let (b, content) = Bundle::build_with(&a.dir, version, a.source_revision.clone(), &options)
        .map_err(|e| Failure::input(format!("bundle {}", a.dir.display()), &e))?;
    let b = b
        .with_rollout(rollout)
        .map_err(|e| Failure::input("the rollout flags", &e))?;
    let json = b.to_json();
    write_file(&a.out, &json, 0o644)?;
    let out = BundleOutput {
        out: a.out.clone(),
        version: b.version(),
        digest: b.digest().to_owned(),
        created: b.created().to_owned(),
        source_revision: b.source_revision().map(str::to_owned),
        policy_files: b.policies().len(),
        authorization_policies: content.policies.authz.len(),
        peer_authentications: content.policies.peer_authn.len(),
        nodes: content.registry.nodes.len(),
        workloads: content.registry.workloads.len(),
        services: content.registry.services.services.len(),
        bytes: json.len(),
        rollout: b.rollout().cloned(),
    };
    let mut text = format!(
        "bundle version {} ({}) written to {}: {} nodes, {} workloads, {} services, {} policy files ({} AuthorizationPolicy, {} PeerAuthentication)\n",
        out.version,
        out.digest,
        out.out.display(),
        out.nodes,
        out.workloads,
        out.services,
        out.policy_files,
        out.authorization_policies,
        out.peer_authentications
    );
    if let Some(r) = &out.rollout {
        text.push_str(&format!("rollout: {}\n", r.describe()));
    }
    output(a.output, &out, &text)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SignOutput {
    out: PathBuf,
    version: u64,
    digest: String,
    key_id: String,
    signatures: Vec<String>,
}

fn sign(a: &SignArgs) -> Outcome {
    let mut signed = read_any(&a.bundle)?;
    let key = signers::load_key(&a.key).map_err(|e| Failure::input("signing key", &e))?;
    let sig = bundle::sign(&signed.bundle, &key);
    if !signed.add_signature(sig) {
        return Err(Failure::usage(format!(
            "{}: already signed by key {}",
            a.bundle.display(),
            sig.key_id
        )));
    }
    // The signature count limit: refused here rather than by every node.
    signed
        .check()
        .map_err(|e| Failure::input(a.bundle.display(), &e))?;
    write_file(&a.out, &signed.to_json(), 0o644)?;
    let out = SignOutput {
        out: a.out.clone(),
        version: signed.bundle.version(),
        digest: signed.bundle.digest().to_owned(),
        key_id: sig.key_id.to_string(),
        signatures: signed
            .signatures
            .iter()
            .map(|s| s.key_id.to_string())
            .collect(),
    };
    let text = format!(
        "bundle version {} signed by {} ({} signature{}), written to {}\n",
        out.version,
        out.key_id,
        out.signatures.len(),
        if out.signatures.len() == 1 { "" } else { "s" },
        out.out.display()
    );
    output(a.output, &out, &text)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VerifyOutput {
    valid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_revision: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    signed_by: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rollout: Option<bundle::Rollout>,
}

fn verify(a: &VerifyArgs) -> Outcome {
    let set = SignerSet::load(&a.signers).map_err(|e| Failure::input("signers", &e))?;
    let read = read_bundle_file(&a.signed)?;
    let parsed = read.and_then(|bytes| bundle::parse_signed(&bytes));
    let result = parsed.as_ref().map_err(Clone::clone).and_then(|signed| {
        bundle::verify_signed_by(signed, &set, a.active_version)
            .map(|v| (v.bundle, v.signed_by.iter().map(KeyId::to_string).collect()))
    });
    let (out, text) = match result {
        Ok((b, signed_by)) => {
            let out = VerifyOutput {
                valid: true,
                reason: None,
                detail: None,
                version: Some(b.version()),
                digest: Some(b.digest().to_owned()),
                created: Some(b.created().to_owned()),
                source_revision: b.source_revision().map(str::to_owned),
                signed_by,
                rollout: b.rollout().cloned(),
            };
            let mut text = format!(
                "valid: bundle version {} ({}), created {}, signed by {}\n",
                b.version(),
                b.digest(),
                b.created(),
                out.signed_by.join(", ")
            );
            if let Some(r) = b.rollout() {
                text.push_str(&format!("rollout: {}\n", r.describe()));
            }
            (out, text)
        }
        Err(r) => {
            let out = VerifyOutput {
                valid: false,
                reason: Some(r.reason()),
                detail: Some(r.to_string()),
                version: parsed.as_ref().ok().map(|s| s.bundle.version()),
                digest: None,
                created: None,
                source_revision: None,
                signed_by: Vec::new(),
                rollout: None,
            };
            let text = format!("REFUSED ({}): {r}\n", r.reason());
            (out, text)
        }
    };
    output(a.output, &out, &text)?;
    Ok(if out.valid { EXIT_OK } else { EXIT_REFUSED })
}

fn diff(a: &DiffArgs) -> Outcome {
    let old = read_any(&a.old)?;
    let new = read_any(&a.new)?;
    let d = diff::diff(&old.bundle, &new.bundle, &a.root_namespace)
        .map_err(|e| Failure::input("diff", &e))?;
    output(a.output, &d, &diff_text(&d))?;
    Ok(if d.identical { EXIT_OK } else { EXIT_REFUSED })
}

fn diff_text(d: &Diff) -> String {
    let mut s = format!(
        "version {} → {} ({} → {})\n",
        d.old.version, d.new.version, d.old.digest, d.new.digest
    );
    if d.old.rollout != d.new.rollout {
        let show = |r: &Option<bundle::Rollout>| {
            r.as_ref()
                .map_or_else(|| "none (all nodes at once)".to_owned(), |r| r.describe())
        };
        s.push_str(&format!(
            "rollout: {} → {}\n",
            show(&d.old.rollout),
            show(&d.new.rollout)
        ));
    } else if let Some(r) = &d.new.rollout {
        s.push_str(&format!("rollout: {}\n", r.describe()));
    }
    if d.identical {
        s.push_str("identical: no node, workload, service or policy differs\n");
        return s;
    }
    let mut kind = |title: &str, c: &Changes| {
        if c.is_empty() {
            return;
        }
        s.push_str(&format!("{title}:\n"));
        for n in &c.added {
            s.push_str(&format!("  + {n}\n"));
        }
        for n in &c.removed {
            s.push_str(&format!("  - {n}\n"));
        }
        for ch in &c.changed {
            s.push_str(&format!("  ~ {} ({})\n", ch.name, ch.fields.join(", ")));
        }
    };
    kind("nodes", &d.nodes);
    kind("workloads", &d.workloads);
    kind("services", &d.services);
    let p = &d.policies;
    if !p.is_empty() {
        s.push_str("policies:\n");
        let list = |w: &[String]| {
            if w.is_empty() {
                "no workload".to_owned()
            } else {
                w.join(", ")
            }
        };
        for (sign, verb, list_of) in [("+", "selects", &p.added), ("-", "selected", &p.removed)] {
            for e in list_of {
                s.push_str(&format!(
                    "  {sign} {} {} ({verb} {})\n",
                    e.kind,
                    e.policy,
                    list(&e.workloads)
                ));
            }
        }
        for c in &p.changed {
            let fields = if c.fields.is_empty() {
                "selection only".to_owned()
            } else {
                c.fields.join(", ")
            };
            s.push_str(&format!(
                "  ~ {} {} ({fields}): selected {}; now selects {}\n",
                c.kind,
                c.policy,
                list(&c.workloads_before),
                list(&c.workloads_after)
            ));
        }
    }
    s
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SignerOutput {
    key_id: String,
    public_key: String,
    state: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SignersChange {
    action: &'static str,
    key_id: String,
    signers: Vec<SignerOutput>,
    /// No signer is active: every bundle is refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    warning: Option<&'static str>,
}

const NO_ACTIVE_SIGNER: &str = "no signer is active: every bundle will be refused";

fn signers_main(a: SignersArgs) -> Outcome {
    let Some(file) = a.file else {
        return Err(Failure::usage("--file is needed (the signer set)".into()));
    };
    let (action, key_id, set) = match a.action {
        SignersAction::List => {
            let set = SignerSet::load(&file).map_err(|e| Failure::input("signers", &e))?;
            let list = signer_outputs(&set);
            let mut text = signers_table(&list);
            if set.active().next().is_none() {
                text.push_str(&format!("warning: {NO_ACTIVE_SIGNER}\n"));
            }
            return output(a.output, &list, &text);
        }
        SignersAction::Add { public_key } => {
            let key = signers::read_public_key(&public_key)
                .map_err(|e| Failure::input("public key", &e))?;
            let mut set =
                SignerSet::load_or_empty(&file).map_err(|e| Failure::input("signers", &e))?;
            let id = set
                .add(key)
                .map_err(|e| Failure::input("adding the signer", &e))?;
            set.save(&file).map_err(|e| Failure::write(&e))?;
            ("add", id, set)
        }
        SignersAction::Activate { key_id } => {
            rotate(&file, "activate", &key_id, SignerSet::activate)?
        }
        SignersAction::Retire { key_id } => rotate(&file, "retire", &key_id, SignerSet::retire)?,
    };
    let signers = signer_outputs(&set);
    let warning = set.active().next().is_none().then_some(NO_ACTIVE_SIGNER);
    let mut text = format!("{action}: signer {key_id}\n{}", signers_table(&signers));
    if let Some(w) = warning {
        text.push_str(&format!("warning: {w}\n"));
    }
    let out = SignersChange {
        action,
        key_id: key_id.to_string(),
        signers,
        warning,
    };
    output(a.output, &out, &text)
}

/// `activate` or `retire` `key_id` in the set at `file`, saved.
fn rotate(
    file: &Path,
    action: &'static str,
    key_id: &str,
    op: fn(&mut SignerSet, &KeyId) -> Result<(), bundle::SignerError>,
) -> Result<(&'static str, KeyId, SignerSet), Failure> {
    let id = key_id
        .parse::<KeyId>()
        .map_err(|e| Failure::usage(e.to_string()))?;
    let mut set = SignerSet::load(file).map_err(|e| Failure::input("signers", &e))?;
    op(&mut set, &id).map_err(|e| Failure::input(format!("{action} {id}"), &e))?;
    set.save(file).map_err(|e| Failure::write(&e))?;
    Ok((action, id, set))
}

fn signer_outputs(set: &SignerSet) -> Vec<SignerOutput> {
    set.signers()
        .iter()
        .map(|s| SignerOutput {
            key_id: s.key_id.to_string(),
            public_key: hex::encode(&s.public_key),
            state: s.state.as_str(),
        })
        .collect()
}

fn signers_table(list: &[SignerOutput]) -> String {
    let mut text = String::from("KEY ID                            STATE\n");
    for s in list {
        text.push_str(&format!("{:<32}  {}\n", s.key_id, s.state));
    }
    text
}
