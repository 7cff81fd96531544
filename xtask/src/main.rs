//! `cargo xtask`: the project's developer tasks (alias in `.cargo/config.toml`).
//!
//! `setup` installs the toolchain and host prerequisites idempotently; every
//! other task runs the same checks first and installs only what is missing.
//! The kernel programs build with Debian's `rustc-web` and a `bpf-linker` linked to the same
//! LLVM, so no nightly Rust is needed (see `setup`).

mod build;
mod proc;
mod setup;
mod test;

use std::{path::PathBuf, process::ExitCode};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use crate::setup::Scope;

/// Developer tasks for the mesh workspace.
#[derive(Parser, Debug)]
#[command(name = "cargo xtask", about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Install every prerequisite that is missing (apt packages, bpf-linker
    /// 0.13.0 linked to LLVM 22, the bpffs mount) and check the cgroup2 mount.
    /// Idempotent: says what it did, or that everything was already there.
    Setup,
    /// Build the agent (which embeds the kernel programs) and the test binaries.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build, then exec `mesh-agent` on this host with the given arguments
    /// (as root), e.g. `cargo xtask run -- run --node n1 --registry r.yaml …`.
    Run {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
        /// Arguments passed to `mesh-agent` unchanged.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, run the unit tests and the privileged integration tests,
    /// then check that nothing of ours (programs, attachments, maps, pins,
    /// namespaces, cgroups) was left behind. Prints `N passed, N failed`.
    Test {
        /// Extra arguments for the integration-test run (`cargo test -p
        /// mesh-tests -- <ARGS>`), e.g. a test-name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build and start a two-node mesh with pods on this host, send traffic
    /// between them and show what happened. Runs until Ctrl-C or `--duration`.
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long, value_name = "SECS")]
        duration: Option<u64>,
    },
    /// Benchmark direct vs through-the-mesh pod→pod traffic (release build);
    /// prints a table and writes JSON.
    Bench {
        /// JSON output (default: `<target dir>/bench/bench.json`).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Shorter measurements (3 s per throughput/rate figure instead of 10 s).
        #[arg(long)]
        quick: bool,
        /// Repetitions of each configuration (at least 3).
        #[arg(long, default_value_t = 3)]
        reps: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<ExitCode> {
    let ws = build::Workspace::discover()?;
    match command {
        Command::Setup => {
            setup::ensure(Scope::Everything, setup::Verbosity::Report)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Build { release } => {
            setup::ensure(Scope::Toolchain, setup::Verbosity::Quiet)?;
            let bins = ws.build(build::Profile::from_release(release))?;
            for (name, path) in &bins.executables {
                println!("built {name}: {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { release, args } => {
            setup::require_root("cargo xtask run")?;
            setup::ensure(Scope::Everything, setup::Verbosity::Quiet)?;
            let bins = ws.build(build::Profile::from_release(release))?;
            let agent = bins.get(build::AGENT_BIN)?;
            proc::exec(std::process::Command::new(agent).args(&args))
        }
        Command::Test { args } => test::run(&ws, &args),
        Command::Demo { duration } => {
            setup::require_root("cargo xtask demo")?;
            setup::ensure(Scope::Everything, setup::Verbosity::Quiet)?;
            let bins = ws.build(build::Profile::Debug)?;
            let mut cmd = std::process::Command::new(bins.get(build::DEMO_BIN)?);
            cmd.env(build::AGENT_BIN_ENV, bins.get(build::AGENT_BIN)?);
            if let Some(secs) = duration {
                cmd.arg("--duration").arg(secs.to_string());
            }
            proc::run_forwarding_signals(&mut cmd)
        }
        Command::Bench { out, quick, reps } => {
            if reps < 3 {
                bail!("--reps must be at least 3 (medians of fewer repetitions mean little)");
            }
            setup::require_root("cargo xtask bench")?;
            setup::ensure(Scope::Everything, setup::Verbosity::Quiet)?;
            let bins = ws.build(build::Profile::Release)?;
            let out = out.unwrap_or_else(|| ws.target_dir.join("bench").join("bench.json"));
            let mut cmd = std::process::Command::new(bins.get(build::BENCH_BIN)?);
            cmd.env(build::AGENT_BIN_ENV, bins.get(build::AGENT_BIN)?)
                .arg("--out")
                .arg(&out)
                .arg("--reps")
                .arg(reps.to_string());
            if quick {
                cmd.arg("--quick");
            }
            proc::run_forwarding_signals(&mut cmd)
        }
    }
}
