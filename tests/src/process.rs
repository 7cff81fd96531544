//! Processes spawned into a network namespace and/or a cgroup, and their guard.

use std::{
    fs::{File, OpenOptions},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use crate::{poll::eventually, sys};

/// Grace between SIGTERM and SIGKILL when a guard is dropped.
pub const TERM_GRACE: Duration = Duration::from_secs(3);

/// Where a process goes: a network namespace (a file such as
/// `/var/run/netns/<name>`), a cgroup directory, both or neither.
#[derive(Clone, Debug, Default)]
pub struct Target {
    pub netns: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
}

/// Spawns `cmd` with stdin closed and stdout/stderr to `<log_base>.stdout`
/// and `<log_base>.stderr` (appended to the name, never replacing a suffix). Between fork and exec the child joins `target`'s
/// cgroup (writes `0` to its `cgroup.procs`) and network namespace (setns);
/// the test process itself never moves. The child also gets SIGKILL if the
/// thread that spawned it dies (PR_SET_PDEATHSIG), so nothing outlives a
/// killed test binary.
#[track_caller]
pub fn spawn(mut cmd: Command, target: &Target, label: &str, log_base: &Path) -> Proc {
    let with_suffix = |suffix: &str| {
        let mut s = log_base.as_os_str().to_owned();
        s.push(suffix);
        PathBuf::from(s)
    };
    let stdout_path = with_suffix(".stdout");
    let stderr_path = with_suffix(".stderr");
    let create =
        |p: &Path| File::create(p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
    cmd.stdin(Stdio::null())
        .stdout(create(&stdout_path))
        .stderr(create(&stderr_path));

    // Opened here, in the parent: the child only calls async-signal-safe
    // functions on raw fds. Both files are O_CLOEXEC and close at exec.
    let netns = target
        .netns
        .as_ref()
        .map(|p| File::open(p).unwrap_or_else(|e| panic!("opening netns {}: {e}", p.display())));
    let procs = target.cgroup.as_ref().map(|p| {
        let f = p.join("cgroup.procs");
        OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap_or_else(|e| panic!("opening {}: {e}", f.display()))
    });
    let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (prctl, write, setns) on fds that stay
    // open in the parent until `spawn` returns; it allocates nothing
    // (`io::Error::last_os_error` is a plain errno value).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = procs_fd {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(fd) = netns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let desc = format!("{cmd:?}");
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {label} ({desc}) into {target:?}: {e}"));
    drop((netns, procs));
    Proc {
        child,
        label: label.to_owned(),
        stdout: stdout_path,
        stderr: stderr_path,
        status: None,
    }
}

/// The result of a process that ran to completion.
#[derive(Clone, Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// A spawned process. Dropping it sends SIGTERM, waits a little, then sends
/// SIGKILL, always by its own pid and only while it is unreaped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    label: String,
    stdout: PathBuf,
    stderr: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn stdout_path(&self) -> &Path {
        &self.stdout
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Complete stdout lines so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        sys::read_lines(&self.stdout)
    }

    /// The exit status if the process has exited (reaping it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            match self.child.try_wait() {
                Ok(s) => self.status = s,
                Err(e) => panic!("waiting for {} (pid {}): {e}", self.label, self.pid()),
            }
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Sends `signal` to this process, if it has not been reaped yet.
    pub fn signal(&mut self, signal: libc::c_int) {
        if self.try_status().is_none() {
            let pid = self.pid() as libc::pid_t;
            // SAFETY: kill has no memory-safety preconditions; the pid is our
            // own unreaped child, so it cannot have been reused.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Waits at most `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        eventually(timeout, || self.try_status())
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        match self.wait_timeout(Duration::from_secs(10)) {
            Some(s) => s,
            None => panic!(
                "{} (pid {}) survived SIGKILL for 10 s",
                self.label,
                self.pid()
            ),
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_timeout(grace) {
            Some(s) => s,
            None => self.kill(),
        }
    }

    /// Waits for the process to finish on its own; after `timeout` it is
    /// killed and this panics with its output.
    #[track_caller]
    pub fn wait_output(mut self, timeout: Duration) -> Output {
        match self.wait_timeout(timeout) {
            Some(status) => Output {
                status,
                stdout: self.stdout(),
                stderr: self.stderr(),
            },
            None => {
                self.kill();
                panic!(
                    "{} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.label,
                    sys::tail(&self.stdout, 30),
                    sys::tail(&self.stderr, 30)
                );
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        self.signal(libc::SIGTERM);
        if self.wait_timeout(TERM_GRACE).is_none() {
            self.signal(libc::SIGKILL);
            if self.wait_timeout(Duration::from_secs(5)).is_none() {
                eprintln!(
                    "mesh-tests: {} (pid {}) survived SIGKILL",
                    self.label,
                    self.pid()
                );
            }
        }
    }
}
