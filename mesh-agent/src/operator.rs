//! The operator CLI: commands that manage the mesh rather than run the data path.
//!
//! - [`audit`]: `mesh-agent audit verify|query` (the node's audit log);
//! - [`authority`]: `mesh-agent authority init|join|serve|revoke|roots` (the CA);
//! - [`config`]: `mesh-agent config keygen|bundle|sign|verify|diff|signers` (signed
//!   configuration bundles, offline);
//! - [`node`]: `mesh-agent node csr` (the node side of a CSR-based join);
//! - [`policy`]: `mesh-agent policy lint|apply|show`;
//! - [`state`]: `mesh-agent state show|agents` (the mesh state a node runs; what each agent
//!   runs, at the authority);
//! - [`uninstall`]: `mesh-agent uninstall` (detach and unpin: take the mesh off the node).
//!
//! Commands that print data take `--output text|json`; their logs go to stderr (level from
//! `MESH_LOG`, default `warn`) so that stdout carries only the data. Long-running commands
//! (`authority serve`) log to stdout like the agent.

pub mod audit;
pub mod authority;
pub mod config;
pub mod node;
pub mod policy;
pub mod state;
pub mod uninstall;

use std::io::Write;

use serde::Serialize;

/// How a command prints its result.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON document.
    Json,
}

/// Prints `value` as JSON, or `text` for humans, on stdout.
fn print<T: Serialize>(format: OutputFormat, value: &T, text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut out, value).map_err(std::io::Error::other)?;
            writeln!(out)
        }
        OutputFormat::Text => {
            out.write_all(text.as_bytes())?;
            if !text.ends_with('\n') {
                writeln!(out)?;
            }
            Ok(())
        }
    }
}

/// Runs `f` with logs going to stderr (one-shot commands: stdout is for data).
fn with_stderr_logs<R>(f: impl FnOnce() -> R) -> R {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_env("MESH_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let subscriber = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .finish();
    tracing::subscriber::with_default(subscriber, f)
}
