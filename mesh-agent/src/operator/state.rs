//! `mesh-agent state show`: the mesh state a node runs (the last version its agent verified,
//! applied and persisted), and `mesh-agent state agents`: at the authority, the version it
//! publishes and the version each agent last reported.

use std::{path::PathBuf, process::ExitCode};

use serde::Serialize;

use super::{print, with_stderr_logs, OutputFormat};
use crate::{
    error_chain,
    state::{
        publish::{AgentReport, PublishedRecord, AGENTS_FILE, PUBLISHED_FILE},
        rollout::{RolloutRecord, VersionRef, ROLLOUT_FILE},
        Snapshot,
    },
};

#[derive(clap::Args, Debug)]
pub struct StateArgs {
    #[command(subcommand)]
    pub command: StateCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum StateCommand {
    /// The state this node's agent applied: version, digest, source, and the node's workloads
    /// (enrolled or waiting for their cgroup).
    Show(ShowArgs),
    /// At the authority: the intended (published) version and what each agent runs; exit 0
    /// no drift, 1 drift, 2 no record. Same as `config status`.
    Agents(AgentsArgs),
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// The agent's state directory (its `--state-dir`; default `<identity-dir>/state`).
    #[arg(long, env = "MESH_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// The agent's identity directory (its state directory is `state/` inside).
    #[arg(long, env = "MESH_IDENTITY_DIR")]
    pub identity_dir: Option<PathBuf>,
    /// Lists this node's workloads.
    #[arg(long, env = "MESH_NODE")]
    pub node: Option<String>,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(clap::Args, Debug)]
pub struct AgentsArgs {
    /// The authority directory.
    #[arg(long, env = "MESH_AUTHORITY_DIR")]
    pub dir: PathBuf,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Shown {
    version: u64,
    digest: String,
    source: String,
    changed_unix_ms: u64,
    nodes: usize,
    workloads: usize,
    services: usize,
    refused: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    local: Option<Vec<LocalWorkload>>,
}

#[derive(Serialize)]
struct LocalWorkload {
    id: u32,
    workload: String,
    identity: String,
    ips: Vec<std::net::IpAddr>,
    cgroup: Option<PathBuf>,
    /// Whether its cgroup exists now (the agent enrols it once it does).
    cgroup_exists: bool,
}

/// Exit codes: 0 shown, 1 no state (or unreadable), 2 bad arguments.
pub fn main(args: StateArgs) -> ExitCode {
    match args.command {
        StateCommand::Show(a) => with_stderr_logs(|| show(a)),
        StateCommand::Agents(a) => with_stderr_logs(|| agents(a)),
    }
}

fn show(a: ShowArgs) -> ExitCode {
    let Some(dir) = a
        .state_dir
        .clone()
        .or_else(|| a.identity_dir.as_ref().map(|d| d.join("state")))
    else {
        eprintln!("error: give --state-dir or --identity-dir");
        return ExitCode::from(2);
    };
    let snapshot = match Snapshot::load(&dir) {
        Ok(Some(s)) => s,
        Ok(None) => {
            eprintln!(
                "error: no mesh state in {} (the agent has not received one yet)",
                dir.display()
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let parsed = match snapshot.parse_registry(
        &dir.join(crate::state::PERSISTED),
        None,
        std::path::Path::new("/"),
    ) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let cgroup_root = crate::cgroup::cgroup2_mount().ok();
    let registry = parsed.registry;
    let local = a.node.as_deref().map(|node| {
        registry
            .local(node)
            .map(|w| LocalWorkload {
                id: w.id,
                workload: w.key(),
                identity: format!("ns/{}/sa/{}", w.namespace, w.service_account),
                ips: w.ips.clone(),
                cgroup: w.cgroup.clone(),
                cgroup_exists: match (&cgroup_root, &w.cgroup) {
                    (Some(root), Some(cg)) => crate::cgroup::resolve(root, cg).is_ok(),
                    _ => false,
                },
            })
            .collect::<Vec<_>>()
    });
    let shown = Shown {
        version: snapshot.version,
        digest: snapshot.digest.clone(),
        source: snapshot.source.clone(),
        changed_unix_ms: snapshot.changed_unix_ms,
        nodes: registry.nodes.len(),
        workloads: registry.workloads.len(),
        services: registry.services.services.len(),
        refused: snapshot.refused.clone(),
        local,
    };
    let mut text = format!(
        "version {}  digest {}\nsource {}\n{} nodes, {} workloads, {} services",
        shown.version, shown.digest, shown.source, shown.nodes, shown.workloads, shown.services
    );
    if !shown.refused.is_empty() {
        text.push_str(&format!(
            "\n{} entries refused at the source:",
            shown.refused.len()
        ));
        for r in &shown.refused {
            text.push_str(&format!("\n  {r}"));
        }
    }
    if let (Some(node), Some(local)) = (&a.node, &shown.local) {
        text.push_str(&format!("\nworkloads on {node}:"));
        for w in local {
            text.push_str(&format!(
                "\n  #{} {} {} {} {}",
                w.id,
                w.workload,
                w.identity,
                w.ips
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                if w.cgroup_exists {
                    "enrolled"
                } else {
                    "pending (no cgroup yet)"
                }
            ));
        }
    }
    text.push('\n');
    finish(print(a.output, &shown, &text))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AgentsShown {
    /// The version the authority publishes (intended), its digest and source.
    intended: PublishedRecord,
    agents: Vec<AgentShown>,
    /// Nodes whose active version is not the one meant for them.
    drift: Vec<String>,
    /// The rollout of the newest version (`state/rollout.json`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    rollout: Option<crate::state::rollout::RolloutRecord>,
    /// The rollout is halted: the newest version reaches no other node.
    halted: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AgentShown {
    node: String,
    /// The version the agent last received.
    received: u64,
    /// The version it applied and enforces, and its digest.
    active_version: u64,
    active_digest: String,
    /// When it last asked (Unix milliseconds).
    seen_unix_ms: u64,
    /// The version meant for this node (during a rollout, not always the newest).
    intended_version: u64,
    drift: bool,
    /// The last version it refused to apply, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    refused: Option<crate::authority::protocol::Refused>,
}

/// `state agents` / `config status`: exit 0 every agent runs the version meant for it, 1 some
/// do not (drift), 2 the authority directory has no record, 3 the rollout is halted.
pub fn agents(a: AgentsArgs) -> ExitCode {
    let read = |name: &str| std::fs::read_to_string(a.dir.join(name));
    let intended: PublishedRecord = match read(PUBLISHED_FILE).map(|t| serde_json::from_str(&t)) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            eprintln!("error: {}: {e}", a.dir.join(PUBLISHED_FILE).display());
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!(
                "error: {}: {e} (has this authority published a state?)",
                a.dir.join(PUBLISHED_FILE).display()
            );
            return ExitCode::from(2);
        }
    };
    let reports: std::collections::BTreeMap<String, AgentReport> = match read(AGENTS_FILE) {
        Ok(text) => match serde_json::from_str(&text) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {}: {e}", a.dir.join(AGENTS_FILE).display());
                return ExitCode::from(2);
            }
        },
        Err(_) => Default::default(),
    };
    let rollout: Option<RolloutRecord> = match read(ROLLOUT_FILE) {
        Ok(text) => match serde_json::from_str(&text) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("error: {}: {e}", a.dir.join(ROLLOUT_FILE).display());
                return ExitCode::from(2);
            }
        },
        Err(_) => None,
    };
    let agents: Vec<AgentShown> = reports
        .into_iter()
        .map(|(node, r)| {
            // During a rollout each node has its own intended version.
            let meant = match &rollout {
                Some(record) => record.intended(&node).cloned(),
                None => Some(VersionRef {
                    version: intended.version,
                    digest: intended.digest.clone(),
                }),
            };
            AgentShown {
                drift: meant
                    .as_ref()
                    .is_some_and(|m| r.active_version != m.version || r.active_digest != m.digest),
                intended_version: meant.map_or(0, |m| m.version),
                node,
                received: r.version,
                active_version: r.active_version,
                active_digest: r.active_digest,
                seen_unix_ms: r.seen_unix_ms,
                refused: r.refused,
            }
        })
        .collect();
    let drift: Vec<String> = agents
        .iter()
        .filter(|a| a.drift)
        .map(|a| a.node.clone())
        .collect();
    let mut text = format!(
        "intended version {} {} ({})\n",
        intended.version, intended.digest, intended.source
    );
    let halted = rollout.as_ref().is_some_and(RolloutRecord::halted);
    if let Some(r) = &rollout {
        text.push_str(&format!(
            "rollout of version {}: {}",
            r.target.version,
            r.phase.as_str()
        ));
        if !r.canaries.is_empty() {
            text.push_str(&format!(
                " (canaries {}; active on {})",
                r.canaries.iter().cloned().collect::<Vec<_>>().join(", "),
                r.canaries_active.len()
            ));
        }
        text.push('\n');
        if let Some(h) = &r.halt {
            text.push_str(&format!(
                "  HALTED: canary {}: {}\n",
                h.node.as_deref().unwrap_or("-"),
                h.reason
            ));
        }
    }
    for g in &agents {
        text.push_str(&format!(
            "  {}: intended {} active {} received {}{}\n",
            g.node,
            g.intended_version,
            g.active_version,
            g.received,
            if g.drift { "  DRIFT" } else { "" }
        ));
        if let Some(f) = &g.refused {
            text.push_str(&format!(
                "    refused version {}: {}\n",
                f.version, f.reason
            ));
        }
    }
    let code = if halted {
        3
    } else if drift.is_empty() {
        0
    } else {
        1
    };
    let shown = AgentsShown {
        intended,
        agents,
        drift,
        rollout,
        halted,
    };
    match print(a.output, &shown, &text) {
        Ok(()) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: writing the result: {e}");
            ExitCode::from(2)
        }
    }
}

fn finish(r: std::io::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: writing the result: {e}");
            ExitCode::FAILURE
        }
    }
}
