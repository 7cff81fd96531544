//! The mesh authority (CA) of a mini-cluster: created with `mesh-agent authority init`, each
//! node joined with `authority join`, served by `authority serve` from its own network
//! namespace on the cluster's bridge (`10.0.0.250:15012`). Stopped (by pid) on drop.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;

use crate::{
    agent::agent_bin,
    netns::{Netns, Veth},
    poll,
    process::{self, Proc, Target},
    sys,
};

/// The trust domain of every test cluster.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// Where the authority listens, on the bridge.
pub const AUTHORITY_IP4: &str = "10.0.0.250";
pub const AUTHORITY_PORT: u16 = 15012;
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The authority's state directory, its network namespace and (while running) its process.
#[derive(Debug)]
pub struct Authority {
    // Field order is teardown order: the process first, then its namespace.
    proc: Option<Proc>,
    dir: PathBuf,
    registry: PathBuf,
    /// Set: the authority follows this signed configuration bundle instead of `registry`.
    bundle: Option<PathBuf>,
    /// More `authority serve` arguments.
    extra_args: Vec<String>,
    log_dir: PathBuf,
    runs: usize,
    _link: Veth,
    netns: Netns,
}

impl Authority {
    /// `mesh-agent authority init` in `<tmp>/ca`, and a namespace `<id>-ca` on the bridge.
    #[track_caller]
    pub fn create(id: &str, bridge: &Netns, tmp: &Path, registry: &Path) -> Self {
        let dir = tmp.join("ca");
        run_cli(&[
            "authority",
            "init",
            "--dir",
            &dir.to_string_lossy(),
            "--trust-domain",
            TRUST_DOMAIN,
        ]);
        let netns = Netns::create(&format!("{id}-ca"));
        let link = Veth::create(bridge, "pca", &netns, "eth0");
        bridge.ip(&["link", "set", "pca", "master", "br0"]);
        netns.ip(&["addr", "add", &format!("{AUTHORITY_IP4}/24"), "dev", "eth0"]);
        Self {
            proc: None,
            dir,
            registry: registry.to_owned(),
            bundle: None,
            extra_args: Vec::new(),
            log_dir: tmp.to_owned(),
            runs: 0,
            _link: link,
            netns,
        }
    }

    /// The address agents are given as `--authority`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(
            AUTHORITY_IP4.parse().expect("constant address"),
            AUTHORITY_PORT,
        )
    }

    /// The state directory (`--dir` of the authority commands).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Joins `node` the way a real node does: `mesh-agent node csr` generates the node key in
    /// the node's credentials directory (it never leaves it), `authority join --csr` signs the
    /// CSR and writes the certificate and bundle. Returns the directory (`--identity-dir`).
    #[track_caller]
    pub fn join(&self, node: &str) -> PathBuf {
        let out = self.log_dir.join(format!("identity-{node}"));
        if !out.join("node.pem").exists() {
            let out_s = out.to_string_lossy();
            run_cli(&["node", "csr", "--dir", &out_s]);
            let csr = out.join("node.csr.pem");
            run_cli(&[
                "authority",
                "join",
                "--dir",
                &self.dir.to_string_lossy(),
                "--node",
                node,
                "--csr",
                &csr.to_string_lossy(),
                "--out",
                &out_s,
            ]);
        }
        out
    }

    /// Starts `authority serve` (if not running) and waits for `authority ready`.
    #[track_caller]
    pub fn start(&mut self) {
        if self.proc.as_mut().is_some_and(Proc::is_running) {
            return;
        }
        self.runs += 1;
        let mut cmd = Command::new(agent_bin());
        cmd.args(["--log-format", "json", "authority", "serve", "--dir"])
            .arg(&self.dir)
            .arg("--listen")
            .arg(self.addr().to_string());
        match &self.bundle {
            Some(b) => cmd.arg("--bundle").arg(b),
            None => cmd.arg("--registry").arg(&self.registry),
        };
        cmd.args(&self.extra_args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("MESH_") {
                cmd.env_remove(k);
            }
        }
        let target = Target {
            netns: Some(self.netns.path()),
            cgroup: None,
        };
        let base = self.log_dir.join(format!("authority.{}", self.runs));
        let mut proc = process::spawn(cmd, &target, "authority", &base);
        let ready = poll::eventually(READY_TIMEOUT, || {
            if lines(&proc)
                .iter()
                .any(|v| v.get("message").and_then(Value::as_str) == Some("authority ready"))
            {
                return Some(true);
            }
            proc.try_status().map(|_| false)
        });
        if ready != Some(true) {
            let stdout = sys::tail(proc.stdout_path(), 30);
            let stderr = sys::tail(proc.stderr_path(), 30);
            proc.kill();
            panic!("authority did not become ready\nstdout:\n{stdout}\nstderr:\n{stderr}");
        }
        self.proc = Some(proc);
    }

    /// From the next start, `authority serve` also gets `args`.
    pub fn set_extra_args(&mut self, args: &[&str]) {
        self.extra_args = args.iter().map(|a| (*a).to_owned()).collect();
    }

    /// From the next start, the authority follows the signed configuration bundle `path`
    /// (`--bundle`) instead of the registry.
    pub fn follow_bundle(&mut self, path: &Path) {
        self.bundle = Some(path.to_owned());
    }

    /// Stops the authority process (SIGTERM, then SIGKILL), by its pid.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(STOP_TIMEOUT);
        }
    }

    /// `authority revoke --serial <hex>` (the running authority picks it up).
    #[track_caller]
    pub fn revoke(&self, serial: &str) {
        run_cli(&[
            "authority",
            "revoke",
            "--dir",
            &self.dir.to_string_lossy(),
            "--serial",
            serial,
        ]);
    }

    /// The running authority's process id.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Every JSON line the current authority process logged.
    pub fn log_lines(&self) -> Vec<Value> {
        self.proc.as_ref().map(lines).unwrap_or_default()
    }

    /// The last `n` lines the current authority process logged (for failure messages).
    pub fn log_tail(&self, n: usize) -> String {
        let lines = self
            .proc
            .as_ref()
            .map(|p| p.stdout_lines())
            .unwrap_or_default();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Authority {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lines(proc: &Proc) -> Vec<Value> {
    proc.stdout_lines()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Runs an operator command of `mesh-agent` to completion: its exit code and stdout (whatever
/// the code; for commands whose code is an answer, like `config status`).
pub fn run_cli_status(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(agent_bin())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running mesh-agent {args:?}: {e}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Runs an operator command of `mesh-agent` to completion; panics with its output on failure.
#[track_caller]
pub fn run_cli(args: &[&str]) -> String {
    let out = Command::new(agent_bin())
        .args(args)
        .env_remove("MESH_LOG_FORMAT")
        .output()
        .unwrap_or_else(|e| panic!("running mesh-agent {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "mesh-agent {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}
