//! `mesh-agent authority …`: create, run and manage the mesh authority (CA).
//!
//! Exit codes: 0 success (for `serve`: stopped by SIGTERM/SIGINT), 2 bad input or
//! configuration (the message names the problem; nothing was changed), 1 runtime failure.
//!
//! `serve` re-reads the authority directory and the registry every
//! [`RELOAD_INTERVAL`]: changes made by `revoke` and `roots` (other processes) are applied
//! within a second; an invalid file is logged and the state in memory kept.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use super::{print, with_stderr_logs, OutputFormat};
use crate::authority::ca::{MAX_WORKLOAD_LIFETIME, MIN_WORKLOAD_LIFETIME};
use crate::authority::custody::{self, Custody, CustodyError};
use crate::authority::{serve_with, Authority, AuthorityError, RootId, ServeConfig};
use crate::error_chain;
use crate::files::FileError;
use crate::identity::IdentityError;
use crate::registry::{Registry, RegistryError};
use crate::state::{
    ids::IdAllocator,
    publish::{Publisher, RefreshError, SourceWatch},
};
use crate::tls::{Serial, SpiffeId, SpiffeIdError, TlsError, TrustDomain};

/// How often `serve` looks for changes to the authority directory and the registry.
pub const RELOAD_INTERVAL: Duration = Duration::from_millis(250);

/// How often `serve` looks at the registry (a stat per tick; read only when it changed).
pub const STATE_POLL: Duration = Duration::from_millis(50);

/// Create, run and manage the mesh authority (the CA that signs workload certificates).
#[derive(Args, Debug)]
pub struct AuthorityArgs {
    #[command(subcommand)]
    pub command: AuthorityCommand,
}

#[derive(Subcommand, Debug)]
pub enum AuthorityCommand {
    /// Create a new authority in --dir: a root and an issuing key pair. Refuses to overwrite.
    Init(InitArgs),
    /// Join a node: sign its CSR (`--csr`, from `mesh-agent node csr`: the node key never
    /// leaves the node) and write node.pem + bundle.pem into --out; without `--csr`, generate
    /// the node key here too (node.pem, node.key.pem, bundle.pem).
    Join(JoinArgs),
    /// Serve certificate signing over mTLS to the node agents.
    Serve(ServeArgs),
    /// Revoke a certificate by serial (a running `serve` picks it up within a second).
    Revoke(RevokeArgs),
    /// List and rotate the roots of the trust bundle.
    Roots(RootsArgs),
    /// Register a node's audit public key (`<state-dir>/audit/audit-key.pub` on the node):
    /// the authority then keeps only checkpoints signed by it. Without this, the first
    /// checkpoint the node sends registers its key (trust on first use). A different key is
    /// refused unless --replace (re-keying; the node's checkpoint copy starts afresh).
    AuditKey(AuditKeyArgs),
}

#[derive(Args, Debug)]
pub struct AuditKeyArgs {
    /// The authority directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// The node's name (as in the registry's `node:` fields).
    #[arg(long)]
    pub node: String,
    /// The node's audit public key file (64 hex digits, one line).
    #[arg(long)]
    pub key: PathBuf,
    /// Replace a registered key (re-keying after a lost or compromised node key).
    #[arg(long)]
    pub replace: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// The authority directory (created, mode 0700, if missing).
    #[arg(long)]
    pub dir: PathBuf,
    /// The trust domain, e.g. `cluster.local`: IDs are `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    #[arg(long)]
    pub trust_domain: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct JoinArgs {
    /// The authority directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// The node's name (as in the registry's `node:` fields).
    #[arg(long)]
    pub node: String,
    /// Where to write the node's credentials (created, mode 0700, if missing; existing
    /// credentials are replaced, e.g. to re-issue them under a new root).
    #[arg(long)]
    pub out: PathBuf,
    /// The node's CSR (`node.csr.pem` from `mesh-agent node csr`): only the certificate and
    /// the bundle are written; if --out holds the node key, the certificate must match it.
    #[arg(long)]
    pub csr: Option<PathBuf>,
    /// Also register the node's audit public key (as `authority audit-key`, without
    /// --replace): a node already holding another key is refused.
    #[arg(long)]
    pub audit_key: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The authority directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// Address to serve on, `ip:port`.
    #[arg(long)]
    pub listen: SocketAddr,
    /// The workload registry (nodes, workloads, services), followed and published to the
    /// agents as the mesh state; a node may obtain certificates only for the identities of
    /// the workloads it places on that node.
    #[arg(long, required_unless_present = "bundle", conflicts_with = "bundle")]
    pub registry: Option<PathBuf>,
    /// Instead of `--registry`: a signed configuration bundle (`mesh-agent config sign`),
    /// followed like the registry. Only a bundle signed by an active signer of
    /// `<dir>/signers.json`, and not below the version published before, is published.
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// A node that reports it runs another configuration than the published one for longer
    /// than this gets no new workload certificates until it catches up. Default 120 with
    /// `--bundle`; not enforced with `--registry` unless given.
    #[arg(long)]
    pub stale_config_grace_secs: Option<u64>,
    /// Longest workload certificate lifetime handed out (longer requests are shortened);
    /// 60 to 2592000 (30 days), the default.
    #[arg(long)]
    pub max_lifetime_secs: Option<u64>,
    /// The authority's own audit log: certificates issued, refused requests, nodes' audit
    /// checkpoints accepted or refused. [default: <dir>/audit]
    #[arg(long)]
    pub audit_dir: Option<PathBuf>,
    /// The authority's audit signing key (Ed25519 PKCS#8, generated at first start, 0600).
    /// [default: <dir>/audit-key.pk8]
    #[arg(long)]
    pub audit_key: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// The authority directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// The certificate's serial number, hex (colons allowed, as openssl prints it).
    #[arg(long)]
    pub serial: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct RootsArgs {
    /// The authority directory.
    #[arg(long, global = true)]
    pub dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, global = true, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    #[command(subcommand)]
    pub action: RootsAction,
}

/// Root rotation: `add` a new root (nodes start trusting it), `activate` it (new certificates
/// are issued under it; agents re-issue theirs promptly), re-`join` the nodes, then `retire`
/// the old root.
#[derive(Subcommand, Debug)]
pub enum RootsAction {
    /// List the roots of the bundle.
    List,
    /// Add a new root to the bundle (issuance stays on the active root).
    Add,
    /// Issue new certificates under root ID from now on.
    Activate {
        /// The root's id (16 hex digits, from `roots list`).
        id: String,
    },
    /// Remove root ID from the bundle and delete its keys (not the active root).
    Retire {
        /// The root's id (16 hex digits, from `roots list`).
        id: String,
    },
}

/// Why an authority command failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("--dir is required")]
    MissingDir,
    #[error("--node {input:?}: not a node name (a DNS-1123 subdomain: lower-case letters, digits, '-' and '.')")]
    BadNodeName { input: String },
    #[error("--dir {}: no authority there (create one with `mesh-agent authority init`)", dir.display())]
    NotInitialised { dir: PathBuf },
    #[error("--trust-domain {input:?}: {source}")]
    BadTrustDomain {
        input: String,
        #[source]
        source: SpiffeIdError,
    },
    #[error(
        "--serial {input:?}: not a certificate serial (hex digits, optionally separated by ':')"
    )]
    BadSerial { input: String },
    #[error("root id {input:?}: not a root id (16 lower-case hex digits, see `roots list`)")]
    BadRootId { input: String },
    #[error("--max-lifetime-secs {got}: must be between {min} and {max}")]
    BadMaxLifetime { got: u64, min: u64, max: u64 },
    #[error("{action}: {source}")]
    Authority {
        action: &'static str,
        /// Boxed to keep the `Result`s small.
        #[source]
        source: Box<AuthorityError>,
    },
    #[error("{action}: {source}")]
    Credentials {
        action: &'static str,
        /// Boxed to keep the `Result`s small.
        #[source]
        source: Box<IdentityError>,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("the mesh state: {0}")]
    State(#[source] Box<RefreshError>),
    #[error("configuration signers {}: {detail}", path.display())]
    Signers { path: PathBuf, detail: String },
    #[error("give --registry or --bundle")]
    MissingSource,
    #[error("--listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("--csr {}: {source}", path.display())]
    ReadCsr {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("audit public key {}: {source}", path.display())]
    ReadAuditKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not an audit public key (64 hex digits)", path.display())]
    BadAuditKey { path: PathBuf },
    #[error("registering the audit key: {0}")]
    Custody(#[source] CustodyError),
    #[error("the authority's audit log: {0}")]
    Audit(#[source] crate::audit::AuditError),
    #[error("starting the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("writing the output: {0}")]
    Output(#[source] std::io::Error),
}

impl OperatorError {
    /// Bad input or configuration (exit code 2) versus runtime failures (1).
    pub fn is_config(&self) -> bool {
        match self {
            Self::MissingDir
            | Self::BadNodeName { .. }
            | Self::NotInitialised { .. }
            | Self::BadTrustDomain { .. }
            | Self::BadSerial { .. }
            | Self::BadRootId { .. }
            | Self::BadMaxLifetime { .. }
            | Self::ReadCsr { .. }
            | Self::ReadAuditKey { .. }
            | Self::BadAuditKey { .. }
            | Self::Signers { .. }
            | Self::Registry(_) => true,
            Self::State(e) => matches!(**e, RefreshError::Registry(_) | RefreshError::Bundle(_)),
            Self::MissingSource => true,
            Self::Custody(e) => !matches!(e, CustodyError::Io { .. }),
            Self::Audit(_) => false,
            Self::Credentials { source, .. } => match &**source {
                IdentityError::Tls(e) => is_bad_input(e),
                IdentityError::File(FileError { op, .. }) => *op == "reading",
                _ => false,
            },
            Self::Authority { source, .. } => {
                matches!(
                    **source,
                    AuthorityError::AlreadyInitialised { .. }
                        | AuthorityError::BadState { .. }
                        | AuthorityError::UnknownRoot { .. }
                        | AuthorityError::RetireActiveRoot { .. }
                        | AuthorityError::SpiffeId(_)
                        | AuthorityError::InvalidCsr { .. }
                        | AuthorityError::File(FileError { op: "reading", .. })
                ) || matches!(&**source, AuthorityError::Tls(e) if is_bad_input(e))
            }
            Self::Bind { .. } | Self::Signals(_) | Self::Runtime(_) | Self::Output(_) => false,
        }
    }
}

/// A certificate, key or identity that the operator handed in is unusable.
fn is_bad_input(e: &TlsError) -> bool {
    matches!(
        e,
        TlsError::SpiffeId(_)
            | TlsError::InvalidSerial { .. }
            | TlsError::Pem { .. }
            | TlsError::InvalidCertificate { .. }
            | TlsError::Rustls { .. }
    )
}

fn credentials_err(action: &'static str) -> impl FnOnce(IdentityError) -> OperatorError {
    move |source| OperatorError::Credentials {
        action,
        source: Box::new(source),
    }
}

fn authority_err(action: &'static str) -> impl FnOnce(AuthorityError) -> OperatorError {
    move |source| OperatorError::Authority {
        action,
        source: Box::new(source),
    }
}

/// Runs an `authority` command and maps the outcome to the process exit code.
pub fn main(args: AuthorityArgs) -> ExitCode {
    let result = match args.command {
        AuthorityCommand::Serve(a) => run_serve(a),
        other => with_stderr_logs(|| run_once(other)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain = error_chain(&e);
            eprintln!("error: {chain}");
            ExitCode::from(if e.is_config() { 2 } else { 1 })
        }
    }
}

fn run_once(command: AuthorityCommand) -> Result<(), OperatorError> {
    match command {
        AuthorityCommand::Init(a) => init(a),
        AuthorityCommand::Join(a) => join(a),
        AuthorityCommand::Revoke(a) => revoke(a),
        AuthorityCommand::Roots(a) => roots(a),
        AuthorityCommand::AuditKey(a) => audit_key(a),
        AuthorityCommand::Serve(a) => run_serve(a),
    }
}

/// Loads the authority in `dir`, telling an uninitialised directory apart from a broken one.
fn load(dir: &Path) -> Result<Authority, OperatorError> {
    if !Authority::exists(dir) {
        return Err(OperatorError::NotInitialised {
            dir: dir.to_path_buf(),
        });
    }
    Authority::load(dir).map_err(authority_err("loading the authority"))
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

#[derive(Serialize)]
struct InitOutput<'a> {
    dir: &'a Path,
    trust_domain: String,
    root: String,
}

fn init(a: InitArgs) -> Result<(), OperatorError> {
    let td = TrustDomain::new(a.trust_domain.clone()).map_err(|source| {
        OperatorError::BadTrustDomain {
            input: a.trust_domain.clone(),
            source,
        }
    })?;
    let authority = Authority::init(&a.dir, td).map_err(authority_err("creating the authority"))?;
    let out = InitOutput {
        dir: &a.dir,
        trust_domain: authority.trust_domain().to_string(),
        root: authority.active_root().to_string(),
    };
    let text = format!(
        "authority for trust domain {} created in {} (root {})",
        out.trust_domain,
        a.dir.display(),
        out.root
    );
    print(a.output, &out, &text).map_err(OperatorError::Output)
}

#[derive(Serialize)]
struct JoinOutput<'a> {
    node: String,
    out: &'a Path,
    files: Vec<&'static str>,
    /// Whether the node key was generated by the node (CSR) rather than here.
    from_csr: bool,
}

fn join(a: JoinArgs) -> Result<(), OperatorError> {
    if !crate::names::is_dns_subdomain(&a.node) {
        return Err(OperatorError::BadNodeName {
            input: a.node.chars().take(260).collect(),
        });
    }
    use crate::identity::NodeCredentials;
    let authority = load(&a.dir)?;
    // The signers and the audit key first: a refused one leaves no credentials behind.
    let signers = load_signers(&a.dir)?;
    if let Some(key) = &a.audit_key {
        register_audit_key(&authority, &a.node, key, false)?;
    }
    let out = match &a.csr {
        Some(csr_path) => {
            let csr =
                std::fs::read_to_string(csr_path).map_err(|source| OperatorError::ReadCsr {
                    path: csr_path.clone(),
                    source,
                })?;
            let chain = authority
                .sign_node_csr(&a.node, &csr)
                .map_err(authority_err("signing the node CSR"))?;
            NodeCredentials::write_signed(&a.out, &chain, &authority.bundle_pem())
                .map_err(credentials_err("writing the node certificate"))?;
            JoinOutput {
                node: format!("spiffe://{}/node/{}", authority.trust_domain(), a.node),
                out: &a.out,
                files: vec![NodeCredentials::CERT_FILE, NodeCredentials::BUNDLE_FILE],
                from_csr: true,
            }
        }
        None => {
            let creds = authority
                .node_credentials(&a.node)
                .map_err(authority_err("issuing the node certificate"))?;
            creds
                .write_to(&a.out)
                .map_err(credentials_err("writing the node credentials"))?;
            JoinOutput {
                node: creds.node.to_string(),
                out: &a.out,
                files: vec![
                    NodeCredentials::CERT_FILE,
                    NodeCredentials::KEY_FILE,
                    NodeCredentials::BUNDLE_FILE,
                ],
                from_csr: false,
            }
        }
    };
    let mut out = out;
    if let Some(set) = signers {
        pin_signers(&set, &a.out)?;
        out.files.push(SIGNERS_FILE);
    }
    let text = format!(
        "credentials of {} written to {} ({})",
        out.node,
        a.out.display(),
        out.files.join(", ")
    );
    print(a.output, &out, &text).map_err(OperatorError::Output)
}

/// The signer set's file name, at the authority and beside a node's trust bundle.
const SIGNERS_FILE: &str = "signers.json";

/// The authority's configuration signers (`<dir>/signers.json`), checked; `None` when it has
/// none (its nodes run unsigned configuration).
fn load_signers(dir: &Path) -> Result<Option<crate::bundle::SignerSet>, OperatorError> {
    let from = dir.join(SIGNERS_FILE);
    if !from.exists() {
        return Ok(None);
    }
    crate::bundle::SignerSet::load(&from)
        .map(Some)
        .map_err(|e| OperatorError::Signers {
            path: from,
            detail: crate::error_chain(&e),
        })
}

/// Pins `set` on a joining node as `<out>/signers.json`, beside its trust bundle, where the
/// agent reads it (`--signers`) and follows its changes: re-joining a node pins a rotated set.
fn pin_signers(set: &crate::bundle::SignerSet, out: &Path) -> Result<(), OperatorError> {
    let to = out.join(SIGNERS_FILE);
    set.save(&to).map_err(|e| OperatorError::Signers {
        path: to,
        detail: crate::error_chain(&e),
    })
}

#[derive(Serialize)]
struct AuditKeyOutput {
    node: String,
    key: String,
    /// False if this key was already registered.
    changed: bool,
    replaced: bool,
}

/// Registers the audit public key in `path` for `node`; returns it and whether it changed.
fn register_audit_key(
    authority: &Authority,
    node: &str,
    path: &Path,
    replace: bool,
) -> Result<([u8; 32], bool), OperatorError> {
    let custody = Custody::new(authority.dir());
    custody
        .node_dir(node)
        .map_err(|_| OperatorError::BadNodeName {
            input: node.chars().take(260).collect(),
        })?;
    let text = std::fs::read_to_string(path).map_err(|source| OperatorError::ReadAuditKey {
        path: path.to_owned(),
        source,
    })?;
    let key = custody::parse_key(&text).ok_or_else(|| OperatorError::BadAuditKey {
        path: path.to_owned(),
    })?;
    let changed = custody
        .register(node, key, replace)
        .map_err(OperatorError::Custody)?;
    Ok((key, changed))
}

fn audit_key(a: AuditKeyArgs) -> Result<(), OperatorError> {
    let authority = load(&a.dir)?;
    let (key, changed) = register_audit_key(&authority, &a.node, &a.key, a.replace)?;
    let out = AuditKeyOutput {
        node: a.node.clone(),
        key: crate::audit::record::hex(&key),
        changed,
        replaced: a.replace && changed,
    };
    let text = match (changed, a.replace) {
        (false, _) => format!(
            "audit key {} of node {} was already registered",
            out.key, a.node
        ),
        (true, true) => format!(
            "audit key of node {} replaced by {} (its checkpoint copy starts afresh)",
            a.node, out.key
        ),
        (true, false) => format!("audit key {} registered for node {}", out.key, a.node),
    };
    print(a.output, &out, &text).map_err(OperatorError::Output)
}

#[derive(Serialize)]
struct RevokeOutput {
    serial: String,
    /// False if it was already revoked.
    newly_revoked: bool,
}

fn revoke(a: RevokeArgs) -> Result<(), OperatorError> {
    let serial: Serial = a.serial.parse().map_err(|_| OperatorError::BadSerial {
        input: a.serial.chars().take(80).collect(),
    })?;
    let authority = load(&a.dir)?;
    let newly_revoked = authority
        .revoke(serial.clone())
        .map_err(authority_err("revoking"))?;
    let out = RevokeOutput {
        serial: serial.to_string(),
        newly_revoked,
    };
    let text = if newly_revoked {
        format!("certificate {serial} revoked")
    } else {
        format!("certificate {serial} was already revoked")
    };
    print(a.output, &out, &text).map_err(OperatorError::Output)
}

#[derive(Serialize)]
struct RootOutput {
    id: String,
    active: bool,
    not_after_unix: u64,
}

#[derive(Serialize)]
struct RootChange {
    action: &'static str,
    root: String,
    roots: Vec<RootOutput>,
}

fn roots(a: RootsArgs) -> Result<(), OperatorError> {
    let Some(dir) = a.dir else {
        return Err(OperatorError::MissingDir);
    };
    let parse_id = |id: &str| {
        id.parse::<RootId>().map_err(|_| OperatorError::BadRootId {
            input: id.chars().take(80).collect(),
        })
    };
    // Validate the input before touching anything.
    let target = match &a.action {
        RootsAction::Activate { id } | RootsAction::Retire { id } => Some(parse_id(id)?),
        RootsAction::List | RootsAction::Add => None,
    };
    let authority = load(&dir)?;
    let (action, root) = match (a.action, target) {
        (RootsAction::List, _) => ("list", None),
        (RootsAction::Add, _) => (
            "add",
            Some(
                authority
                    .add_root()
                    .map_err(authority_err("adding a root"))?,
            ),
        ),
        (RootsAction::Activate { .. }, Some(id)) => {
            authority
                .activate_root(&id)
                .map_err(authority_err("activating the root"))?;
            ("activate", Some(id))
        }
        (RootsAction::Retire { .. }, Some(id)) => {
            authority
                .retire_root(&id)
                .map_err(authority_err("retiring the root"))?;
            ("retire", Some(id))
        }
        (RootsAction::Activate { .. } | RootsAction::Retire { .. }, None) => {
            unreachable!("parsed above")
        }
    };
    let roots: Vec<RootOutput> = authority
        .roots()
        .into_iter()
        .map(|r| RootOutput {
            id: r.id.to_string(),
            active: r.active,
            not_after_unix: unix_secs(r.not_after),
        })
        .collect();
    let mut text = String::new();
    if let Some(root) = &root {
        text.push_str(&format!("{action}: root {root}\n"));
    }
    text.push_str("ROOT              ACTIVE  NOT_AFTER_UNIX\n");
    for r in &roots {
        text.push_str(&format!(
            "{:<16}  {:<6}  {}\n",
            r.id,
            if r.active { "yes" } else { "no" },
            r.not_after_unix
        ));
    }
    match root {
        None => print(a.output, &roots, &text),
        Some(root) => print(
            a.output,
            &RootChange {
                action,
                root: root.to_string(),
                roots,
            },
            &text,
        ),
    }
    .map_err(OperatorError::Output)
}

/// Identity → nodes hosting a workload with it, from the registry.
type HostIndex = HashMap<(String, String), Vec<String>>;

fn host_index(registry: &Registry) -> HostIndex {
    let mut index: HostIndex = HashMap::new();
    for w in &registry.workloads {
        let nodes = index
            .entry((w.namespace.clone(), w.service_account.clone()))
            .or_default();
        if !nodes.contains(&w.node) {
            nodes.push(w.node.clone());
        }
    }
    index
}

fn run_serve(a: ServeArgs) -> Result<(), OperatorError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(OperatorError::Runtime)?;
    rt.block_on(serve(a))
}

/// `authority serve`: validate everything, bind, log `authority ready`, serve until
/// SIGTERM/SIGINT.
pub async fn serve(a: ServeArgs) -> Result<(), OperatorError> {
    let max = MAX_WORKLOAD_LIFETIME.as_secs();
    let min = MIN_WORKLOAD_LIFETIME.as_secs();
    let max_lifetime = match a.max_lifetime_secs {
        None => MAX_WORKLOAD_LIFETIME,
        Some(got) if (min..=max).contains(&got) => Duration::from_secs(got),
        Some(got) => return Err(OperatorError::BadMaxLifetime { got, min, max }),
    };
    let authority = Arc::new(load(&a.dir)?);
    // The mesh state: the registry, validated entry by entry, with stable ids; a source that
    // cannot be read at all refuses the start (exit 2).
    let index = Arc::new(RwLock::new(Arc::new(HostIndex::new())));
    let (publisher, feed) = Publisher::new(Some(&a.dir));
    let (registry_path, signed) = match (&a.registry, &a.bundle) {
        (Some(r), _) => (r.clone(), false),
        (None, Some(b)) => (b.clone(), true),
        (None, None) => return Err(OperatorError::MissingSource),
    };
    let mut source = SourceWatch {
        registry_path,
        signers: signed.then(|| a.dir.join("signers.json")),
        ids: IdAllocator::open(&a.dir).map_err(|e| OperatorError::State(Box::new(e.into())))?,
        sink: Arc::new(publisher),
        on_registry: {
            let index = index.clone();
            Box::new(move |registry: &Registry| {
                *index.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(host_index(registry));
            })
        },
    };
    source
        .refresh(crate::state::now_unix_ms())
        .map_err(|e| OperatorError::State(Box::new(e)))?;
    let workloads = index
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .map(Vec::len)
        .sum::<usize>();
    let listener = TcpListener::bind(a.listen)
        .await
        .map_err(|source| OperatorError::Bind {
            addr: a.listen,
            source,
        })?;
    let listen = listener.local_addr().unwrap_or(a.listen);
    let mut term = signal(SignalKind::terminate()).map_err(OperatorError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(OperatorError::Signals)?;

    let audit = crate::audit::AuditLog::start(crate::audit::AuditConfig {
        dir: a.audit_dir.clone().unwrap_or_else(|| a.dir.join("audit")),
        key: a
            .audit_key
            .clone()
            .unwrap_or_else(|| a.dir.join("audit-key.pk8")),
        ..crate::audit::AuditConfig::new("authority", &a.dir)
    })
    .map_err(OperatorError::Audit)?;
    feed.set_audit(audit.clone());
    let watcher = tokio::spawn(watch_files(authority.clone(), audit.clone()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let state_watcher = tokio::spawn(source.run(STATE_POLL, stop_rx));
    let lookup = {
        let index = index.clone();
        move |id: &SpiffeId| -> Vec<String> {
            let current = index.read().unwrap_or_else(|p| p.into_inner()).clone();
            current
                .get(&(id.namespace().to_owned(), id.service_account().to_owned()))
                .cloned()
                .unwrap_or_default()
        }
    };
    let stale_config_grace = match (a.stale_config_grace_secs, signed) {
        (Some(secs), _) => Some(Duration::from_secs(secs)),
        (None, true) => Some(Duration::from_secs(120)),
        (None, false) => None,
    };
    let config = ServeConfig {
        max_lifetime,
        audit: Some(audit.clone()),
        state: Some(feed),
        stale_config_grace,
        ..ServeConfig::default()
    };
    info!(listen = %listen, trust_domain = %authority.trust_domain(),
          registry = ?a.registry, bundle = ?a.bundle, workloads, max_lifetime_secs = max_lifetime.as_secs(),
          dir = %a.dir.display(), "authority ready");
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!(signal = "SIGTERM", "authority stopping"),
            _ = int.recv() => info!(signal = "SIGINT", "authority stopping"),
        }
    };
    let result = serve_with(listener, authority, lookup, config, shutdown).await;
    watcher.abort();
    let _ = stop_tx.send(true);
    let _ = state_watcher.await;
    audit.shutdown("stopped").await;
    result.map_err(|e| {
        error!(error = %e, "authority failed");
        authority_err("serving")(e)
    })
}

/// Applies changes to the authority directory (roots, revocations), all or nothing.
async fn watch_files(authority: Arc<Authority>, audit: crate::audit::AuditLog) {
    // Revocations are recorded in the authority's audit log as the running service picks
    // them up (`authority revoke` is another process).
    let mut revoked: std::collections::BTreeSet<Serial> =
        authority.revocations().into_iter().collect();
    let mut tick = tokio::time::interval(RELOAD_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut authority_error: Option<String> = None;
    loop {
        tick.tick().await;
        let a = authority.clone();
        // File reads and key parsing: off the async workers.
        let reloaded = tokio::task::spawn_blocking(move || a.reload()).await;
        match reloaded {
            Ok(Ok(outcome)) => {
                if outcome.revocations_changed {
                    let now: std::collections::BTreeSet<Serial> =
                        authority.revocations().into_iter().collect();
                    for serial in now.difference(&revoked) {
                        audit.cert_event("revoked", &serial.to_string(), None);
                    }
                    revoked = now;
                }
                if authority_error.take().is_some() {
                    info!(dir = %authority.dir().display(), "authority state valid again");
                }
            }
            Ok(Err(e)) => {
                let text = e.to_string();
                if authority_error.as_deref() != Some(&text) {
                    warn!(dir = %authority.dir().display(), error = %text,
                          "authority state on disk is invalid, keeping the current state");
                    authority_error = Some(text);
                }
            }
            Err(e) => warn!(error = %e, "authority reload task failed"),
        }
    }
}
