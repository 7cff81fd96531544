//! Building the workspace's binaries and finding them afterwards.

use std::{
    collections::BTreeMap,
    io::BufRead as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{anyhow, Context as _, Result};
use serde_json::Value;

use crate::proc;

/// The node agent (embeds the kernel programs).
pub const AGENT_PKG: &str = "mesh-agent";
pub const AGENT_BIN: &str = "mesh-agent";
/// Integration tests, their harness, and the demo/bench binaries.
pub const TESTS_PKG: &str = "mesh-tests";
pub const DEMO_BIN: &str = "mesh-demo";
pub const BENCH_BIN: &str = "mesh-bench";
/// How the harness, demo and bench find the agent binary.
pub const AGENT_BIN_ENV: &str = "MESH_AGENT_BIN";

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

impl Profile {
    pub fn from_release(release: bool) -> Self {
        if release {
            Self::Release
        } else {
            Self::Debug
        }
    }
}

/// What `cargo metadata` says about the workspace.
pub struct Workspace {
    pub root: PathBuf,
    pub target_dir: PathBuf,
    members: Vec<String>,
}

/// Executables produced by a build, by target name.
pub struct Bins {
    pub executables: BTreeMap<String, PathBuf>,
}

impl Bins {
    pub fn get(&self, name: &str) -> Result<&Path> {
        self.executables
            .get(name)
            .map(PathBuf::as_path)
            .ok_or_else(|| {
                anyhow!(
                    "the build produced no `{name}` binary (built: {})",
                    self.executables
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }
}

/// The cargo that runs us (rustup's proxy resolves the same toolchain).
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // Variables `cargo run` sets for us that must not leak into a nested
    // cargo's build scripts.
    for var in [
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

impl Workspace {
    pub fn discover() -> Result<Self> {
        let mut cmd = cargo();
        cmd.args(["metadata", "--no-deps", "--format-version", "1"]);
        let out = proc::output(&mut cmd)?.context("cargo not found")?;
        if !out.status.success() {
            anyhow::bail!(
                "`{}` failed: {}",
                proc::display(&cmd),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let meta: Value = serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
        let root = meta["workspace_root"]
            .as_str()
            .context("metadata: workspace_root")?
            .into();
        let target_dir = meta["target_directory"]
            .as_str()
            .context("metadata: target_directory")?
            .into();
        let members = meta["packages"]
            .as_array()
            .context("metadata: packages")?
            .iter()
            .filter_map(|p| p["name"].as_str().map(str::to_owned))
            .collect();
        Ok(Self {
            root,
            target_dir,
            members,
        })
    }

    pub fn has_member(&self, name: &str) -> bool {
        self.members.iter().any(|m| m == name)
    }

    /// `cargo build -p mesh-agent -p mesh-tests --bins`; cargo's progress and
    /// diagnostics go to stderr as usual, the artifact list is parsed.
    pub fn build(&self, profile: Profile) -> Result<Bins> {
        let mut cmd = cargo();
        cmd.current_dir(&self.root).args(["build", "-p", AGENT_PKG]);
        if self.has_member(TESTS_PKG) {
            cmd.args(["-p", TESTS_PKG]);
        } else {
            eprintln!("xtask: note: `{TESTS_PKG}` is not a workspace member yet; building {AGENT_PKG} only");
        }
        cmd.args(["--bins", "--message-format=json-render-diagnostics"]);
        if profile == Profile::Release {
            cmd.arg("--release");
        }
        proc::echo(&cmd);
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting `{}`", proc::display(&cmd)))?;
        let stdout = child.stdout.take().context("cargo stdout")?;
        let mut executables = BTreeMap::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.context("reading cargo output")?;
            let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                println!("{line}");
                continue;
            };
            if msg["reason"] == "compiler-artifact" {
                if let (Some(name), Some(exe)) =
                    (msg["target"]["name"].as_str(), msg["executable"].as_str())
                {
                    executables.insert(name.to_owned(), PathBuf::from(exe));
                }
            }
        }
        let status = child.wait().context("waiting for cargo build")?;
        proc::check(&cmd, status)?;
        Ok(Bins { executables })
    }
}
