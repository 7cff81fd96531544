//! `mesh-agent uninstall`: take the mesh off a node. Detaches every pinned program link and
//! removes every pin under `--pin-dir`. The only command that opens a node's mesh: an agent
//! exiting for any reason (crash, SIGKILL, SIGTERM, upgrade) leaves the programs attached.
//! Run it after the agent is gone for good (the DaemonSet deleted), never on a restart.

use std::{path::PathBuf, process::ExitCode};

use super::{print, with_stderr_logs, OutputFormat};
use crate::error_chain;

/// Arguments of `mesh-agent uninstall`.
#[derive(clap::Args, Debug)]
pub struct UninstallArgs {
    /// bpffs directory of the node's pins (the agent's `--pin-dir`).
    #[arg(long, env = "MESH_PIN_DIR", default_value = mesh_common::names::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// How to print what was removed.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// Exit codes: 0 removed (or nothing was installed), 1 something could not be removed (the
/// error names it; what was removed stays removed, run it again).
pub fn main(args: UninstallArgs) -> ExitCode {
    let result = with_stderr_logs(|| crate::bpf::uninstall(&args.pin_dir));
    match result {
        Ok(done) => {
            let text = if done.dir_removed {
                format!(
                    "uninstalled from {}: {} links detached ({}), {} map pins removed\n",
                    args.pin_dir.display(),
                    done.links.len(),
                    done.links.join(", "),
                    done.maps.len()
                )
            } else {
                format!("nothing installed at {}\n", args.pin_dir.display())
            };
            match print(args.output, &done, &text) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: writing the result: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
