//! The node agent (`mesh-agent run`) as a guard, and its JSON log records.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Duration,
};

use serde::Deserialize;
use serde_json::Value;

use crate::{
    poll,
    process::{self, Proc, Target},
    sys,
};

/// How long an agent may take to log `agent ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an agent may take to exit after SIGTERM (it drains connections).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The `mesh-agent` binary: `$MESH_AGENT_BIN`, else
/// `<workspace>/target/debug/mesh-agent`. Panics if it does not exist.
#[track_caller]
pub fn agent_bin() -> PathBuf {
    let path = match std::env::var_os("MESH_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/mesh-agent"),
    };
    if !path.is_file() {
        panic!(
            "mesh-agent binary not found at {}: build it with `cargo build -p mesh-agent` \
             (or point MESH_AGENT_BIN at it)",
            path.display()
        );
    }
    path
}

/// Everything `mesh-agent run` is started with (docs/CONTRACTS.md).
#[derive(Clone, Debug)]
pub struct AgentSpec {
    pub node: String,
    /// The node's network namespace file; the agent runs there, outside the
    /// pod cgroups.
    pub netns: PathBuf,
    /// `--registry` (standalone: the agent follows this file); `None`: the agent follows the
    /// authority's state stream, as in production.
    pub registry: Option<PathBuf>,
    /// `--pod-cgroup`: relative to the cgroup2 mount.
    pub pod_cgroup: PathBuf,
    /// The same cgroup, absolute (for inspection).
    pub pod_cgroup_abs: PathBuf,
    pub outbound: SocketAddr,
    pub outbound6: Option<SocketAddr>,
    pub pin_dir: PathBuf,
    /// Where stdout/stderr files go.
    pub log_dir: PathBuf,
    /// `--identity-dir`: the node's credentials (`node csr` + `authority join --csr`).
    pub identity_dir: PathBuf,
    /// `--authority`.
    pub authority: SocketAddr,
    /// `--admin` (metrics).
    pub admin: SocketAddr,
    /// `--cert-lifetime-secs` (the agent's default when `None`).
    pub cert_lifetime_secs: Option<u64>,
    /// `--policy-dir` (none when `None`).
    pub policy_dir: Option<PathBuf>,
    pub extra_args: Vec<String>,
    /// `RLIMIT_NOFILE` (soft, hard) the agent starts under (the test process's when `None`).
    pub nofile: Option<(u64, u64)>,
}

impl AgentSpec {
    /// `--handoff-socket`: per node, in this run's log directory.
    pub fn handoff_socket(&self) -> PathBuf {
        self.log_dir
            .join(format!("handoff-{}", self.node))
            .join("handoff.sock")
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(agent_bin());
        cmd.arg("run")
            .arg("--node")
            .arg(&self.node)
            .arg("--pod-cgroup")
            .arg(&self.pod_cgroup)
            .arg("--outbound")
            .arg(self.outbound.to_string());
        if let Some(o6) = self.outbound6 {
            cmd.arg("--outbound6").arg(o6.to_string());
        }
        if let Some(r) = &self.registry {
            cmd.arg("--registry").arg(r);
        }
        cmd.arg("--identity-dir")
            .arg(&self.identity_dir)
            .arg("--authority")
            .arg(self.authority.to_string())
            .arg("--admin")
            .arg(self.admin.to_string());
        if let Some(secs) = self.cert_lifetime_secs {
            cmd.arg("--cert-lifetime-secs").arg(secs.to_string());
        }
        if let Some(dir) = &self.policy_dir {
            cmd.arg("--policy-dir").arg(dir);
        }
        cmd.arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--handoff-socket")
            .arg(self.handoff_socket())
            .arg("--log-format")
            .arg("json")
            .args(&self.extra_args);
        if let Some((soft, hard)) = self.nofile {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: runs in the forked child before exec; setrlimit is async-signal-safe and
            // only reads `lim`, a plain value moved into the closure.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // The agent's clap arguments also read MESH_* variables: only the
        // command line counts here.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("MESH_") {
                cmd.env_remove(k);
            }
        }
        cmd
    }

    /// Spawns the agent; its output goes to `agent-<node>.<run>.std{out,err}`.
    fn spawn(&self, run: &str) -> Proc {
        let target = Target {
            netns: Some(self.netns.clone()),
            cgroup: None,
        };
        let label = format!("agent-{}", self.node);
        let base = self.log_dir.join(format!("agent-{}.{run}", self.node));
        process::spawn(self.command(), &target, &label, &base)
    }
}

/// One `flow` log line of the agent (docs/CONTRACTS.md).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct FlowRecord {
    pub conn_id: Option<u64>,
    pub src_workload: Option<String>,
    pub src_addr: Option<String>,
    pub orig_dst: Option<String>,
    pub dst_workload: Option<String>,
    pub bytes_sent: Option<u64>,
    pub bytes_received: Option<u64>,
    pub duration_ms: Option<u64>,
    pub outcome: Option<String>,
    /// The whole line.
    #[serde(skip)]
    pub raw: Value,
}

impl FlowRecord {
    pub fn src_addr(&self) -> Option<SocketAddr> {
        self.src_addr.as_deref()?.parse().ok()
    }
    pub fn orig_dst(&self) -> Option<SocketAddr> {
        self.orig_dst.as_deref()?.parse().ok()
    }
}

/// How an agent that was expected to refuse to start ended.
#[derive(Clone, Debug)]
pub struct AgentExit {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// A running `mesh-agent run` in a node's network namespace; stopped (SIGTERM,
/// then SIGKILL) on drop, and any pin directory it leaves is removed.
#[derive(Debug)]
pub struct Agent {
    spec: AgentSpec,
    proc: Option<Proc>,
    generation: usize,
}

impl Agent {
    /// Starts the agent and waits (bounded) for its `agent ready` line.
    #[track_caller]
    pub fn start(spec: AgentSpec) -> Agent {
        let mut agent = Agent {
            spec,
            proc: None,
            generation: 0,
        };
        agent.launch();
        agent
    }

    /// Runs an agent that is expected to refuse to start: waits (bounded) for
    /// it to exit and returns how. If it becomes ready instead, it is stopped
    /// and this panics.
    #[track_caller]
    pub fn run_to_exit(spec: AgentSpec, timeout: Duration) -> AgentExit {
        let stem = spec
            .registry
            .as_deref()
            .and_then(|r| r.file_stem())
            .map(|s| s.to_string_lossy().into_owned());
        let mut proc = spec.spawn(&format!("refused-{}", stem.unwrap_or_default()));
        let status = poll::eventually(timeout, || {
            if let Some(s) = proc.try_status() {
                return Some(Ok(s));
            }
            if ready_line(&proc).is_some() {
                return Some(Err(()));
            }
            None
        });
        match status {
            Some(Ok(status)) => AgentExit {
                status,
                stdout: proc.stdout(),
                stderr: proc.stderr(),
            },
            Some(Err(())) => {
                let status = proc.terminate(STOP_TIMEOUT);
                remove_pin_dir(&spec.pin_dir);
                panic!(
                    "agent {} became ready although it should have refused to start (then {status})\nstdout:\n{}\nstderr:\n{}",
                    spec.node,
                    sys::tail(proc.stdout_path(), 20),
                    sys::tail(proc.stderr_path(), 20)
                );
            }
            None => {
                proc.kill();
                remove_pin_dir(&spec.pin_dir);
                panic!(
                    "agent {} neither exited nor became ready within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    spec.node,
                    sys::tail(proc.stdout_path(), 20),
                    sys::tail(proc.stderr_path(), 20)
                );
            }
        }
    }

    #[track_caller]
    fn launch(&mut self) {
        self.generation += 1;
        let proc = self.spec.spawn(&self.generation.to_string());
        self.proc = Some(proc);
        let proc = self.proc.as_mut().expect("just set");
        let ready = poll::eventually(READY_TIMEOUT, || {
            if ready_line(proc).is_some() {
                return Some(true);
            }
            proc.try_status().map(|_| false)
        });
        if ready != Some(true) {
            let what = match proc.try_status() {
                Some(s) => format!("exited ({s})"),
                None => format!("was not ready within {READY_TIMEOUT:?}"),
            };
            panic!(
                "agent {} {what}\ncommand: {:?}\nstdout:\n{}\nstderr:\n{}",
                self.spec.node,
                self.spec.command(),
                sys::tail(proc.stdout_path(), 30),
                sys::tail(proc.stderr_path(), 30)
            );
        }
    }

    pub fn spec(&self) -> &AgentSpec {
        &self.spec
    }

    /// How the next [`Agent::restart`] starts it.
    pub fn spec_mut(&mut self) -> &mut AgentSpec {
        &mut self.spec
    }

    pub fn pin_dir(&self) -> &Path {
        &self.spec.pin_dir
    }

    /// How many times it was started.
    pub fn generation(&self) -> usize {
        self.generation
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// The agent's resident set size now, in KiB (`VmRSS`; 0 when it is not running).
    pub fn rss_kib(&self) -> u64 {
        self.pid().map_or(0, crate::sys::rss_kib)
    }

    /// Descriptors the agent has open now.
    pub fn open_fds(&self) -> usize {
        self.pid().map_or(0, |pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
        })
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    /// The file the current run's stdout (its JSON log) goes to.
    pub fn stdout_path(&self) -> Option<&Path> {
        self.proc.as_ref().map(Proc::stdout_path)
    }

    /// stdout of the current run so far.
    pub fn stdout(&self) -> String {
        self.proc.as_ref().map(Proc::stdout).unwrap_or_default()
    }

    /// stderr of the current run so far.
    pub fn stderr(&self) -> String {
        self.proc.as_ref().map(Proc::stderr).unwrap_or_default()
    }

    /// Parsed JSON log lines of the current run (non-JSON lines skipped).
    pub fn log_lines(&self) -> Vec<Value> {
        self.proc.as_ref().map(json_lines).unwrap_or_default()
    }

    /// The `flow` records of the current run so far. A flow line that does
    /// not fit the contract's types fails the test.
    #[track_caller]
    pub fn flows(&self) -> Vec<FlowRecord> {
        self.log_lines()
            .into_iter()
            .filter(|v| v.get("message").and_then(Value::as_str) == Some("flow"))
            .map(|v| {
                let mut rec: FlowRecord = serde_json::from_value(v.clone()).unwrap_or_else(|e| {
                    panic!(
                        "agent {}: flow record does not fit the contract ({e}): {v}",
                        self.spec.node
                    )
                });
                rec.raw = v;
                rec
            })
            .collect()
    }

    /// The flow record whose `src_addr` is `client` (the client socket's
    /// local address), waiting for it (bounded).
    #[track_caller]
    pub fn wait_flow_from(&self, client: SocketAddr) -> FlowRecord {
        poll::eventually(poll::DEFAULT_TIMEOUT, || self.flow_from(client)).unwrap_or_else(|| {
            panic!(
                "agent {} logged no flow from {client} within {:?} (its log is printed below)",
                self.spec.node,
                poll::DEFAULT_TIMEOUT
            )
        })
    }

    /// The flow record whose `src_addr` is `client`, if logged yet.
    pub fn flow_from(&self, client: SocketAddr) -> Option<FlowRecord> {
        self.flows()
            .into_iter()
            .find(|f| f.src_addr() == Some(client))
    }

    pub fn tail_stdout(&self, n: usize) -> String {
        self.proc
            .as_ref()
            .map(|p| sys::tail(p.stdout_path(), n))
            .unwrap_or_default()
    }

    /// SIGKILL: the agent gets no chance to clean up.
    pub fn kill_sigkill(&mut self) -> ExitStatus {
        self.proc.as_mut().expect("agent was started").kill()
    }

    /// SIGTERM and wait (bounded; SIGKILL after [`STOP_TIMEOUT`], which fails
    /// the test). Returns the exit status.
    #[track_caller]
    pub fn stop(&mut self) -> ExitStatus {
        let proc = self.proc.as_mut().expect("agent was started");
        if let Some(s) = proc.try_status() {
            return s;
        }
        proc.signal(libc::SIGTERM);
        match proc.wait_timeout(STOP_TIMEOUT) {
            Some(s) => s,
            None => {
                proc.kill();
                panic!(
                    "agent {} did not exit within {STOP_TIMEOUT:?} of SIGTERM",
                    self.spec.node
                );
            }
        }
    }

    /// Starts the agent again with the same arguments (stopping it first
    /// with SIGTERM if it still runs) and waits until it is ready. Its log
    /// starts afresh: [`Agent::flows`] then shows only the new run.
    #[track_caller]
    pub fn restart(&mut self) {
        if self.is_running() {
            self.stop();
        }
        self.launch();
    }

    /// An upgrade in place: starts a second agent with the same arguments while this one
    /// runs; the new one takes the listening sockets over the handoff socket and, once it is
    /// ready, the old one drains and exits (bounded: it must exit within `drain` plus
    /// [`STOP_TIMEOUT`]). Returns the old process's exit status.
    #[track_caller]
    pub fn upgrade(&mut self, drain: Duration) -> ExitStatus {
        let mut old = self.proc.take().expect("agent was started");
        self.launch();
        match old.wait_timeout(drain + STOP_TIMEOUT) {
            Some(s) => s,
            None => {
                let tail = sys::tail(old.stdout_path(), 30);
                old.kill();
                panic!(
                    "old agent {} did not exit after the handoff
{tail}",
                    self.spec.node
                );
            }
        }
    }

    /// Runs `mesh-agent uninstall --pin-dir <this node's>` and returns its output.
    pub fn uninstall(&self) -> std::process::Output {
        Command::new(agent_bin())
            .arg("uninstall")
            .arg("--pin-dir")
            .arg(&self.spec.pin_dir)
            .arg("--output")
            .arg("json")
            .output()
            .expect("running mesh-agent uninstall")
    }

    fn dump_on_panic(&self) {
        if std::thread::panicking() {
            if let Some(p) = &self.proc {
                eprintln!(
                    "---- agent {} (run {}) stdout (tail) ----\n{}\n---- stderr (tail) ----\n{}",
                    self.spec.node,
                    self.generation,
                    sys::tail(p.stdout_path(), 40),
                    sys::tail(p.stderr_path(), 40)
                );
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.dump_on_panic();
        if let Some(p) = self.proc.as_mut() {
            if p.try_status().is_none() {
                p.terminate(STOP_TIMEOUT);
            }
        }
        remove_pin_dir(&self.spec.pin_dir);
    }
}

fn json_lines(proc: &Proc) -> Vec<Value> {
    proc.stdout_lines()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn ready_line(proc: &Proc) -> Option<Value> {
    json_lines(proc)
        .into_iter()
        .find(|v| v.get("message").and_then(Value::as_str) == Some("agent ready"))
}

/// Removes an agent's pin directory if it is still there (after SIGKILL).
/// Only ever called on `mesh-<id>-<node>` directories this harness named.
pub fn remove_pin_dir(dir: &Path) {
    if !dir.exists() {
        return;
    }
    // As an operator takes the mesh off a node (an agent's exit leaves it attached):
    // `mesh-agent uninstall`, then whatever it could not remove.
    let bin = match std::env::var_os("MESH_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/mesh-agent"),
    };
    if bin.is_file() {
        match Command::new(&bin)
            .arg("uninstall")
            .arg("--pin-dir")
            .arg(dir)
            .output()
        {
            Ok(out) if !out.status.success() => eprintln!(
                "mesh-tests: mesh-agent uninstall --pin-dir {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Ok(_) => {}
            Err(e) => eprintln!("mesh-tests: running {}: {e}", bin.display()),
        }
    }
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            eprintln!("mesh-tests: removing pins {}: {e}", dir.display());
        }
    }
}

/// Every file below `dir`, relative to it, sorted (e.g. the pinned maps).
pub fn list_pins(dir: &Path) -> Vec<PathBuf> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>, depth: usize) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && depth < 8 {
                walk(base, &p, out, depth + 1);
            } else if let Ok(rel) = p.strip_prefix(base) {
                out.push(rel.to_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out, 0);
    out.sort();
    out
}
