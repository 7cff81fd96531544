//! `mesh-agent policy lint|apply|show|check`: check a policy directory, write it to a node's
//! pinned maps (the running agent picks the new generation up within a second,
//! AuthorizationPolicy and PeerAuthentication alike), show the active generation, decide one
//! request as the destination agent would ([`crate::policy::check`]).
//!
//! Exit codes: 0 success, 2 bad input (the policy, the registry, a capacity refusal: nothing
//! was changed), 1 runtime failure (the pinned maps could not be opened or written; the
//! active generation stays). `check`: 0 allow, 3 deny, 2 bad input, 1 runtime failure.

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use clap::{Args, Subcommand};
use mesh_common::policy::{POL_ALLOW, POL_DENY, POL_L7};
use serde::Serialize;
use tracing::info;

use super::{print, with_stderr_logs, OutputFormat};
use crate::error_chain;
use crate::{
    identity::{IdentityError, NodeCredentials},
    policy::{
        check::{self, CheckError, CheckRequest, HttpRequest, PolicySource, RequestSource},
        compile::{compile_with, CompileError},
        maps::{MapsError, PolicyMaps},
        source::{load_dir, ApplyError, CompileContext, LoadError},
    },
    registry::{Registry, RegistryError},
};

/// Default mesh-wide policy namespace.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
/// Default trust domain of principals.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Check, apply and show authorization policy.
#[derive(Args, Debug)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub command: PolicyCommand,
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Parse a policy directory (and, with --registry, compile it against the registry).
    Lint(LintArgs),
    /// Compile a policy directory and write it to the pinned maps of this node as a new
    /// generation (atomic swap).
    Apply(ApplyArgs),
    /// Show the active generation of the pinned maps.
    Show(ShowArgs),
    /// Decide one connection or HTTP request as the destination agent would (the same
    /// compiled maps and decision code). Exit code 0 allow, 3 deny, 2 bad input.
    Check(CheckArgs),
}

/// What compiling needs besides the directory.
#[derive(Args, Debug)]
pub struct CompileArgs {
    /// The mesh-wide policy namespace.
    #[arg(long, default_value = DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,
    /// The trust domain principals are in. Default: the node certificate's in
    /// --identity-dir (as the agent compiles), else `cluster.local`.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// The node's credentials (`node.pem`, from `authority join`): principals are compiled in
    /// its certificate's trust domain, unless --trust-domain overrides it.
    #[arg(long, env = "MESH_IDENTITY_DIR")]
    pub identity_dir: Option<PathBuf>,
    /// A trust domain treated as the mesh's own in principals (Istio's
    /// `trustDomainAliases`); repeatable, as the agent's `run --trust-domain-alias`.
    #[arg(long = "trust-domain-alias", value_delimiter = ',')]
    pub trust_domain_aliases: Vec<String>,
}

impl CompileArgs {
    /// --trust-domain, else the trust domain of the node certificate in --identity-dir, else
    /// [`DEFAULT_TRUST_DOMAIN`].
    pub fn trust_domain(&self) -> Result<String, OperatorError> {
        if let Some(td) = &self.trust_domain {
            return Ok(td.clone());
        }
        let Some(dir) = &self.identity_dir else {
            return Ok(DEFAULT_TRUST_DOMAIN.to_owned());
        };
        let creds = NodeCredentials::load(dir).map_err(|source| OperatorError::Credentials {
            dir: dir.clone(),
            source: Box::new(source),
        })?;
        Ok(creds.node.trust_domain().to_string())
    }
}

#[derive(Args, Debug)]
pub struct LintArgs {
    /// The policy directory (`*.yaml`, `*.yml`).
    pub dir: PathBuf,
    /// The workload registry: also compile, and check the capacities.
    #[arg(long)]
    pub registry: Option<PathBuf>,
    #[command(flatten)]
    pub compile: CompileArgs,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// The policy directory.
    pub dir: PathBuf,
    /// The workload registry (its ids are positions: use it only on nodes whose agent reads
    /// the same file with `--registry`).
    #[arg(
        long,
        required_unless_present = "state_dir",
        conflicts_with = "state_dir"
    )]
    pub registry: Option<PathBuf>,
    /// The node agent's state directory: compile against the mesh state the agent applied
    /// (the ids its maps carry). What to use on a node that follows the authority.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The node agent's pin directory.
    #[arg(long, default_value = mesh_common::names::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    #[command(flatten)]
    pub compile: CompileArgs,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// The node agent's pin directory.
    #[arg(long, default_value = mesh_common::names::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// The workload registry, to name workloads.
    #[arg(long)]
    pub registry: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("policy").required(true).args(["policy_dir", "pin_dir"])))]
#[command(group(clap::ArgGroup::new("source").required(true).args(["from", "from_ip"])))]
pub struct CheckArgs {
    /// The mesh's path normalization, as the agents run with (`--path-normalization`).
    #[arg(long, value_enum, ignore_case = true,
          default_value_t = crate::proxy::l7::normalize::PathNormalization::default())]
    pub path_normalization: crate::proxy::l7::normalize::PathNormalization,
    /// The policy directory to compile (as `policy apply` and the agent compile it).
    #[arg(long)]
    pub policy_dir: Option<PathBuf>,
    /// Instead of --policy-dir: a node agent's pin directory, to check against its live
    /// generation.
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// The workload registry.
    #[arg(long)]
    pub registry: PathBuf,
    /// The source workload, `namespace/name` as in the registry.
    #[arg(long)]
    pub from: Option<String>,
    /// The source address: a workload's, or with --plaintext any address.
    #[arg(long)]
    pub from_ip: Option<std::net::IpAddr>,
    /// The connection is plaintext (no principal, no namespace), not mTLS.
    #[arg(long)]
    pub plaintext: bool,
    /// The destination workload (`namespace/name`) or address.
    #[arg(long)]
    pub to: String,
    /// The destination port.
    #[arg(long)]
    pub port: u16,
    /// HTTP method (on an HTTP port; default GET).
    #[arg(long)]
    pub method: Option<String>,
    /// HTTP request target as sent, raw (on an HTTP port; default `/`).
    #[arg(long)]
    pub path: Option<String>,
    /// HTTP `Host` / `:authority` (default: none).
    #[arg(long)]
    pub host: Option<String>,
    /// Another HTTP header field, `NAME:VALUE`; repeatable (for `when request.headers[...]`).
    #[arg(long = "header", value_parser = crate::policy::check::parse_header)]
    pub headers: Vec<(String, String)>,
    #[command(flatten)]
    pub compile: CompileArgs,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// Why a policy command failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("loading {}: {source}", dir.display())]
    Load {
        dir: PathBuf,
        #[source]
        source: Box<LoadError>,
    },
    #[error("compiling: {0}")]
    Compile(#[from] CompileError),
    #[error("node credentials in {}: {source}", dir.display())]
    Credentials {
        dir: PathBuf,
        #[source]
        source: Box<IdentityError>,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("writing the output: {0}")]
    Output(#[source] std::io::Error),
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error("the node's mesh state in {}: {detail}", dir.display())]
    State { dir: PathBuf, detail: String },
}

impl OperatorError {
    fn is_config(&self) -> bool {
        matches!(
            self,
            Self::Registry(_)
                | Self::Load { .. }
                | Self::Compile(_)
                | Self::Credentials { .. }
                | Self::State { .. }
        ) || matches!(self, Self::Check(e) if e.is_bad_input())
    }
}

impl From<ApplyError> for OperatorError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Load { dir, source } => Self::Load { dir, source },
            ApplyError::Compile(e) => Self::Compile(e),
            ApplyError::Maps(e) => Self::Maps(e),
        }
    }
}

/// Runs a `policy` command; logs go to stderr.
pub fn main(args: PolicyArgs) -> ExitCode {
    match with_stderr_logs(|| run(args.command)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(if e.is_config() { 2 } else { 1 })
        }
    }
}

/// Runs one command; returns the exit code of a completed command.
fn run(command: PolicyCommand) -> Result<u8, OperatorError> {
    match command {
        PolicyCommand::Lint(a) => lint(a).map(|()| 0),
        PolicyCommand::Apply(a) => apply(a).map(|()| 0),
        PolicyCommand::Show(a) => show(a).map(|()| 0),
        PolicyCommand::Check(a) => check(a),
    }
}

/// `policy check`: 0 allow, 3 deny.
fn check(a: CheckArgs) -> Result<u8, OperatorError> {
    let registry = Arc::new(Registry::load_all(&a.registry)?);
    let trust_domain = a.compile.trust_domain()?;
    let source = match (a.policy_dir, a.pin_dir) {
        (Some(dir), _) => PolicySource::Dir(dir),
        (None, Some(pin)) => PolicySource::Pinned(pin),
        // clap requires one of them.
        (None, None) => PolicySource::Dir(PathBuf::from(".")),
    };
    let view = source.view(
        Arc::clone(&registry),
        &a.compile.root_namespace,
        &trust_domain,
    )?;
    let from = match (a.from, a.from_ip) {
        (Some(name), _) => RequestSource::Workload(name),
        (None, Some(ip)) => RequestSource::Ip(ip),
        (None, None) => RequestSource::Workload(String::new()),
    };
    let req = CheckRequest {
        from,
        plaintext: a.plaintext,
        to: a.to,
        port: a.port,
        http: HttpRequest {
            method: a.method,
            path: a.path,
            host: a.host,
            headers: a.headers,
        },
        path_normalization: a.path_normalization,
    };
    let report = check::check(Arc::new(view), &registry, &trust_domain, &req)?;
    print(a.output, &report, &report.text()).map_err(OperatorError::Output)?;
    Ok(report.exit_code())
}

#[derive(Serialize)]
struct LintOutput {
    ok: bool,
    policies: usize,
    peer_authentications: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    l4_entries: Option<usize>,
}

fn lint(a: LintArgs) -> Result<(), OperatorError> {
    let bundle = load_dir(&a.dir).map_err(|source| OperatorError::Load {
        dir: a.dir.clone(),
        source: Box::new(source),
    })?;
    let mut out = LintOutput {
        ok: true,
        policies: bundle.authz.len(),
        peer_authentications: bundle.peer_authn.len(),
        l4_entries: None,
    };
    if let Some(path) = &a.registry {
        let registry = Registry::load_all(path)?;
        let tds = crate::policy::model::TrustDomains::new(
            a.compile.trust_domain()?,
            a.compile.trust_domain_aliases.clone(),
        );
        let c = compile_with(&bundle, &registry, &a.compile.root_namespace, &tds)?;
        out.l4_entries = Some(c.l4.len());
    }
    let text = format!(
        "ok: {} authorization policies, {} peer authentications{}",
        out.policies,
        out.peer_authentications,
        out.l4_entries
            .map(|n| format!(", {n} L4 entries"))
            .unwrap_or_default()
    );
    print(a.output, &out, &text).map_err(OperatorError::Output)
}

/// The registry of the mesh state a node's agent applied (persisted in its state directory).
fn applied_registry(dir: &std::path::Path) -> Result<Registry, OperatorError> {
    let state = |detail: String| OperatorError::State {
        dir: dir.to_owned(),
        detail,
    };
    let snapshot = crate::state::Snapshot::load(dir)
        .map_err(|e| state(crate::error_chain(&e)))?
        .ok_or_else(|| state("none yet (has the agent received one?)".to_owned()))?;
    let parsed = snapshot
        .parse_registry(
            &dir.join(crate::state::PERSISTED),
            None,
            std::path::Path::new("/"),
        )
        .map_err(|e| state(crate::error_chain(&e)))?;
    Ok(parsed.registry)
}

#[derive(Serialize)]
struct ApplyOutput {
    generation: u32,
    policies: usize,
    l4_entries: usize,
}

fn apply(a: ApplyArgs) -> Result<(), OperatorError> {
    let registry = Arc::new(match (&a.registry, &a.state_dir) {
        (Some(path), _) => Registry::load_all(path)?,
        (None, Some(dir)) => applied_registry(dir)?,
        (None, None) => {
            return Err(OperatorError::State {
                dir: PathBuf::new(),
                detail: "give --registry or --state-dir".to_owned(),
            })
        }
    });
    let trust_domain = a.compile.trust_domain()?;
    let ctx = CompileContext {
        registry,
        root_ns: a.compile.root_namespace.clone(),
        trust_domain: trust_domain.clone(),
        trust_domain_aliases: a.compile.trust_domain_aliases.clone(),
    };
    // Compiled before the maps are touched: a bad directory changes nothing.
    let (bundle, compiled) = ctx.load_and_compile(&a.dir)?;
    let mut maps = PolicyMaps::open(&a.pin_dir)?;
    let generation = maps.apply(&compiled)?;
    let l4_entries = compiled.l4.len();
    info!(
        generation,
        policies = compiled.policies,
        l4_entries,
        trust_domain = %trust_domain,
        "policy applied"
    );
    let out = ApplyOutput {
        generation,
        policies: bundle.authz.len(),
        l4_entries,
    };
    let text = format!(
        "applied generation {generation}: {} policies, {l4_entries} L4 entries",
        out.policies
    );
    print(a.output, &out, &text).map_err(OperatorError::Output)
}

#[derive(Serialize)]
struct ShowOutput {
    generation: u32,
    destinations: Vec<ShowDestination>,
    l4_entries: usize,
    /// Workloads that are PERMISSIVE in this generation (names with --registry, else `#id`).
    permissive: Vec<String>,
}

#[derive(Serialize)]
struct ShowDestination {
    workload_id: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    workload: Option<String>,
    set_id: u32,
}

fn show(a: ShowArgs) -> Result<(), OperatorError> {
    let registry = a.registry.as_deref().map(Registry::load_all).transpose()?;
    let maps = PolicyMaps::open(&a.pin_dir)?;
    let view = maps.read_active_view()?;
    let generation = view.generation();
    let destinations: Vec<ShowDestination> = view
        .destinations()
        .into_iter()
        .map(|(id, set_id)| ShowDestination {
            workload_id: id,
            workload: registry.as_ref().and_then(|r| r.by_id(id)).map(|w| w.key()),
            set_id,
        })
        .collect();
    let name = |id: u32| {
        registry
            .as_ref()
            .and_then(|r| r.by_id(id))
            .map_or_else(|| format!("#{id}"), |w| w.key())
    };
    let out = ShowOutput {
        generation,
        l4_entries: view.l4_entries(),
        destinations,
        permissive: view.permissive_workloads().into_iter().map(name).collect(),
    };
    let mut text = format!(
        "generation {generation}{}: {} L4 entries\n",
        if generation == 0 { " (no policy)" } else { "" },
        out.l4_entries
    );
    for d in &out.destinations {
        text.push_str(&format!(
            "  destination {} → set {}\n",
            d.workload
                .clone()
                .unwrap_or_else(|| format!("#{}", d.workload_id)),
            d.set_id
        ));
    }
    if !out.permissive.is_empty() {
        text.push_str(&format!("  PERMISSIVE: {}\n", out.permissive.join(", ")));
    }
    text.push_str(&format!(
        "verdicts: {POL_ALLOW} allow, {POL_DENY} deny, {POL_L7} per request \
         (bpftool map dump pinned {}/mesh_pol_l4)",
        a.pin_dir.display()
    ));
    print(a.output, &out, &text).map_err(OperatorError::Output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::{ca::tests::TempDir, Authority};
    use crate::tls::TrustDomain;

    fn args(trust_domain: Option<&str>, identity_dir: Option<PathBuf>) -> CompileArgs {
        CompileArgs {
            root_namespace: DEFAULT_ROOT_NAMESPACE.into(),
            trust_domain_aliases: Vec::new(),
            trust_domain: trust_domain.map(str::to_owned),
            identity_dir,
        }
    }

    #[test]
    fn trust_domain_defaults_to_the_node_credentials() {
        let ca = TempDir::new("policy-td-ca");
        let node = TempDir::new("policy-td-node");
        let authority = Authority::init(&ca.0, TrustDomain::new("example.org").unwrap()).unwrap();
        authority
            .node_credentials("n1")
            .unwrap()
            .write_to(&node.0)
            .unwrap();

        assert_eq!(
            args(None, None).trust_domain().unwrap(),
            DEFAULT_TRUST_DOMAIN
        );
        assert_eq!(
            args(None, Some(node.0.clone())).trust_domain().unwrap(),
            "example.org"
        );
        // --trust-domain overrides.
        assert_eq!(
            args(Some("other.td"), Some(node.0.clone()))
                .trust_domain()
                .unwrap(),
            "other.td"
        );
        // Unreadable credentials are a configuration error (exit 2).
        let e = args(None, Some(node.0.join("missing")))
            .trust_domain()
            .unwrap_err();
        assert!(e.is_config(), "{e}");
    }
}
