//! `mesh-agent`: the node daemon and the operator CLI.
#![deny(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use mesh_agent::app;
use mesh_agent::error_chain;

/// jemalloc with background threads: memory freed when connections close goes back to the OS
/// within about 10 s (its decay time). With glibc's malloc the agent's RSS stayed at its peak
/// after 10,000 connections closed (102 MiB, baseline 29); mimalloc returned little and
/// started at 57 MiB (measured with the 10,000-connection scenario, debug build).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Sidecarless service mesh: node agent and operator CLI.
#[derive(Parser, Debug)]
#[command(name = "mesh-agent", version, about)]
struct Cli {
    /// Log format on stdout.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MESH_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, fields flattened (for log pipelines and tests).
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node agent: attach the kernel programs and proxy captured traffic.
    Run(Box<mesh_agent::config::Config>),
    /// Create, run and manage the mesh authority (CA).
    Authority(mesh_agent::operator::authority::AuthorityArgs),
    /// Check, apply and show authorization policy.
    Policy(Box<mesh_agent::operator::policy::PolicyArgs>),
    /// The node side of joining the mesh: `node csr` (the node key stays on the node).
    Node(mesh_agent::operator::node::NodeArgs),
    /// Verify and query a node's tamper-evident audit log.
    Audit(mesh_agent::operator::audit::AuditArgs),
    /// Take the mesh off this node: detach the kernel programs and remove every pin. An agent
    /// that exits (crash, SIGTERM, upgrade) leaves them attached; only this removes them.
    Uninstall(mesh_agent::operator::uninstall::UninstallArgs),
    /// The mesh state: what a node runs (`show`), what every agent runs (`agents`).
    State(mesh_agent::operator::state::StateArgs),
    /// Signed configuration bundles: keygen, bundle, sign, verify, diff, signers.
    Config(mesh_agent::operator::config::ConfigArgs),
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_env("MESH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stdout);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Authority(args) => mesh_agent::operator::authority::main(args),
        Command::Policy(args) => mesh_agent::operator::policy::main(*args),
        Command::Node(args) => mesh_agent::operator::node::main(args),
        Command::Uninstall(args) => mesh_agent::operator::uninstall::main(args),
        Command::State(args) => mesh_agent::operator::state::main(args),
        Command::Audit(args) => mesh_agent::operator::audit::main(args),
        Command::Config(args) => mesh_agent::operator::config::main(args),
        Command::Run(config) => {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: starting the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(app::run(*config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    let chain = error_chain(&e);
                    tracing::error!(error = %chain, "agent failed");
                    eprintln!("error: {chain}");
                    ExitCode::from(if e.is_config() { 2 } else { 1 })
                }
            }
        }
    }
}
