//! `mesh-agent`: the node daemon and the operator CLI.
#![deny(unsafe_code)]

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use mesh_agent::app::{self, AgentOptions};

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
    Run(Box<RunArgs>),
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
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// This node's name (matches `node:` in the registry).
    #[arg(long, env = "MESH_NODE")]
    node: String,
    /// Workload registry (YAML).
    #[arg(long, env = "MESH_REGISTRY")]
    registry: PathBuf,
    /// The node's pod cgroup parent, relative to the cgroup2 mount (found in
    /// /proc/self/mountinfo). The programs attach here.
    #[arg(long, env = "MESH_POD_CGROUP")]
    pod_cgroup: PathBuf,
    /// Outbound listener, IPv4 `ip:port`; the IP must be reachable from pods.
    #[arg(long, env = "MESH_OUTBOUND")]
    outbound: SocketAddr,
    /// IPv6 outbound listener `[ip]:port` (same port). Without it, IPv6
    /// connects of enrolled workloads to mesh destinations are refused.
    #[arg(long, env = "MESH_OUTBOUND6")]
    outbound6: Option<SocketAddr>,
    /// bpffs directory where the maps are pinned.
    #[arg(long, env = "MESH_PIN_DIR", default_value = mesh_common::names::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Seconds in-flight connections may drain on SIGTERM.
    #[arg(long, default_value_t = 5)]
    drain_timeout_secs: u64,
    /// Directory with this node's credentials: node.pem, node.key.pem, bundle.pem
    /// (written by `mesh-agent authority join`).
    #[arg(long, env = "MESH_IDENTITY_DIR")]
    identity_dir: PathBuf,
    /// The authority's service address `ip:port`.
    #[arg(long, env = "MESH_AUTHORITY")]
    authority: SocketAddr,
    /// Inbound HBONE listener `ip:port` [default: <outbound ip>:15008].
    #[arg(long, env = "MESH_HBONE")]
    hbone: Option<SocketAddr>,
    /// Admin listener: Prometheus `/metrics` and `/healthz`.
    #[arg(long, env = "MESH_ADMIN", default_value = "127.0.0.1:15020")]
    admin: SocketAddr,
    /// Networks (CIDR, comma-separated or repeated) allowed to connect to the admin port,
    /// besides the node's own addresses (processes on the host). Pods are refused unless listed:
    /// add the Prometheus scrapers' addresses here.
    #[arg(long, env = "MESH_ADMIN_ALLOW", value_delimiter = ',', default_value = "127.0.0.0/8,::1/128", value_parser = parse_net)]
    admin_allow: Vec<mesh_agent::policy::model::IpNet>,
    /// Requested lifetime of workload certificates, in seconds (at least 60); they are
    /// rotated at half-life.
    #[arg(long, env = "MESH_CERT_LIFETIME_SECS", default_value_t = 86_400)]
    cert_lifetime_secs: u64,
    /// Policy directory (Istio AuthorizationPolicy/PeerAuthentication YAML): applied at start
    /// and on every change (polled every 500 ms); a bad change is refused and logged.
    #[arg(long, env = "MESH_POLICY_DIR")]
    policy_dir: Option<PathBuf>,
    /// The mesh-wide policy namespace: its policies apply to every workload.
    #[arg(long, env = "MESH_ROOT_NAMESPACE", default_value = mesh_agent::operator::policy::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// A trust domain treated as this mesh's own in policy principals (Istio's
    /// `trustDomainAliases`, e.g. the old trust domain during a migration); repeatable.
    #[arg(
        long = "trust-domain-alias",
        env = "MESH_TRUST_DOMAIN_ALIASES",
        value_delimiter = ','
    )]
    trust_domain_aliases: Vec<String>,
    /// Unix socket for upgrades: a starting agent takes the listening sockets of the agent
    /// running here over it (no connection attempt is refused while they change places); the
    /// running agent then drains and exits. Root only.
    /// [default: /run/mesh-agent/<node>/handoff.sock]
    #[arg(long, env = "MESH_HANDOFF_SOCKET")]
    handoff_socket: Option<PathBuf>,
    /// Where the agent persists its workload certificates, keys and trust state, so that it
    /// can start while the authority is unreachable. [default: <identity-dir>/state]
    #[arg(long, env = "MESH_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// After handing over to a successor and draining, exit (true) or stay idle until SIGTERM
    /// (false: a Kubernetes pod would otherwise restart the old container).
    #[arg(long, env = "MESH_EXIT_AFTER_HANDOFF", default_value_t = true, action = clap::ArgAction::Set)]
    exit_after_handoff: bool,
    /// How request paths on HTTP ports are normalized before L7 policy matching; the
    /// normalized path is also what the pod receives. Istio's modes; the default is the
    /// strictest (Istio defaults to BASE). See the README, "Path normalization".
    #[arg(long, env = "MESH_PATH_NORMALIZATION", value_enum, ignore_case = true,
          default_value_t = mesh_agent::proxy::l7::normalize::PathNormalization::default())]
    path_normalization: mesh_agent::proxy::l7::normalize::PathNormalization,
    #[command(flatten)]
    limits: mesh_agent::proxy::limits::LimitOptions,
    #[command(flatten)]
    audit: mesh_agent::audit::AuditOptions,
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
        Command::Audit(args) => mesh_agent::operator::audit::main(args),
        Command::Run(args) => {
            let opts = AgentOptions {
                node: args.node.clone(),
                registry: args.registry,
                pod_cgroup: args.pod_cgroup,
                outbound: args.outbound,
                outbound6: args.outbound6,
                pin_dir: args.pin_dir,
                drain_timeout: Duration::from_secs(args.drain_timeout_secs),
                identity_dir: args.identity_dir.clone(),
                authority: args.authority,
                hbone: args.hbone,
                admin: args.admin,
                admin_allow: args.admin_allow,
                cert_lifetime: Duration::from_secs(args.cert_lifetime_secs),
                policy_dir: args.policy_dir,
                root_namespace: args.root_namespace,
                trust_domain_aliases: args.trust_domain_aliases,
                handoff_socket: args.handoff_socket.unwrap_or_else(|| {
                    PathBuf::from("/run/mesh-agent")
                        .join(&args.node)
                        .join("handoff.sock")
                }),
                exit_after_handoff: args.exit_after_handoff,
                state_dir: args
                    .state_dir
                    .unwrap_or_else(|| args.identity_dir.join("state")),
                path_normalization: args.path_normalization,
                limits: args.limits,
                audit: args.audit,
            };
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
            match rt.block_on(app::run(opts)) {
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

fn parse_net(s: &str) -> Result<mesh_agent::policy::model::IpNet, String> {
    mesh_agent::policy::parse::parse_cidr(s.trim()).map_err(|e| format!("{s:?}: {e}"))
}

/// An error and its sources, `outer: inner: innermost` (kernel errnos live at the bottom).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}
