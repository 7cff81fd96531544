//! `mesh-agent node csr`: the node side of a CSR-based join. The node key is generated on the
//! node (or kept, if it exists) and only the CSR goes to the authority
//! (`mesh-agent authority join --csr`), which answers with the node certificate and the bundle.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand};
use serde::Serialize;

use super::{print, OutputFormat};
use crate::identity::{IdentityError, NodeCredentials};
use crate::tls::TlsError;

#[derive(Args, Debug)]
pub struct NodeArgs {
    #[command(subcommand)]
    pub command: NodeCommand,
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Make sure --dir holds a node key (node.key.pem, 0600; generated if absent) and write a
    /// CSR for it (node.csr.pem) to hand to `mesh-agent authority join --csr`.
    Csr(CsrArgs),
}

#[derive(Args, Debug)]
pub struct CsrArgs {
    /// The node's credentials directory (the agent's --identity-dir; created 0700 if missing).
    #[arg(long)]
    pub dir: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Serialize)]
struct CsrOutput {
    csr: PathBuf,
    key: PathBuf,
}

/// Runs a `node` command; exit 0, 2 for bad input (an unreadable key), 1 otherwise.
pub fn main(args: NodeArgs) -> ExitCode {
    let NodeCommand::Csr(a) = args.command;
    match NodeCredentials::request(&a.dir) {
        Ok(_) => {
            let out = CsrOutput {
                csr: a.dir.join(NodeCredentials::CSR_FILE),
                key: a.dir.join(NodeCredentials::KEY_FILE),
            };
            let text = format!(
                "node key {} (kept on this node); CSR written to {}",
                out.key.display(),
                out.csr.display()
            );
            match print(a.output, &out, &text) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: writing the output: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("error: {}: {e}", a.dir.display());
            let bad_input = matches!(
                e,
                IdentityError::Tls(TlsError::Rcgen { .. } | TlsError::Pem { .. })
            );
            ExitCode::from(if bad_input { 2 } else { 1 })
        }
    }
}
