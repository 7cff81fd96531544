//! Running child processes: echo the command, check the status, stream
//! output while keeping a copy, forward termination signals.

use std::{
    io::{Read as _, Write as _},
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    process::{Command, ExitCode, ExitStatus, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// `VAR=value program arg…`, for echoing and error messages.
pub fn display(cmd: &Command) -> String {
    let mut out = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            out.push_str(&format!("{}={} ", k.to_string_lossy(), v.to_string_lossy()));
        }
    }
    out.push_str(&cmd.get_program().to_string_lossy());
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains(char::is_whitespace) {
            out.push_str(&format!(" '{arg}'"));
        } else {
            out.push(' ');
            out.push_str(&arg);
        }
    }
    out
}

/// Echo `$ cmd` on stderr.
pub fn echo(cmd: &Command) {
    eprintln!("$ {}", display(cmd));
}

/// Run to completion with inherited stdio; fail unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    echo(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("starting `{}`", display(cmd)))?;
    check(cmd, status)
}

/// Fail with the command line unless `status` is success.
pub fn check(cmd: &Command, status: ExitStatus) -> Result<()> {
    if !status.success() {
        bail!("`{}` failed: {}", display(cmd), describe(status));
    }
    Ok(())
}

/// Run quietly and return stdout; `None` when the program is not found.
pub fn output(cmd: &mut Command) -> Result<Option<std::process::Output>> {
    match cmd.stdin(Stdio::null()).output() {
        Ok(out) => Ok(Some(out)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("running `{}`", display(cmd))),
    }
}

/// Run with stdout both streamed to ours (as it arrives) and captured;
/// stderr is inherited.
pub fn run_tee(cmd: &mut Command) -> Result<(ExitStatus, String)> {
    echo(cmd);
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{}`", display(cmd)))?;
    let mut pipe = child.stdout.take().context("child stdout")?;
    let mut captured = Vec::new();
    let mut buf = [0u8; 8192];
    let stdout = std::io::stdout();
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading child stdout"),
        };
        let mut out = stdout.lock();
        // A closed stdout of ours must not stop the child's run.
        let _ = out.write_all(&buf[..n]).and_then(|()| out.flush());
        captured.extend_from_slice(&buf[..n]);
    }
    let status = child.wait().context("waiting for child")?;
    Ok((status, String::from_utf8_lossy(&captured).into_owned()))
}

/// Replace this process with `cmd` (signals then reach it directly).
pub fn exec(cmd: &mut Command) -> Result<ExitCode> {
    echo(cmd);
    let err = cmd.exec();
    Err(err).with_context(|| format!("exec `{}`", display(cmd)))
}

/// Run `cmd` and wait for it, forwarding SIGINT/SIGTERM/SIGHUP sent to
/// xtask so the child can tear down cleanly (xtask itself never dies first).
/// A Ctrl-C from the terminal already reaches the child (same process group),
/// so kernel-generated signals are not forwarded a second time.
pub fn run_forwarding_signals(cmd: &mut Command) -> Result<ExitCode> {
    echo(cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting `{}`", display(cmd)))?;
    let pid = child.id() as libc::pid_t;
    // Block the signals in this thread before creating the forwarder, which
    // inherits the mask and takes them with sigwaitinfo. The child was
    // already exec'd by spawn() and keeps default dispositions.
    let set = termination_sigset();
    // SAFETY: `set` is an initialised sigset_t; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        let _ = child.kill();
        bail!("pthread_sigmask: {}", std::io::Error::from_raw_os_error(rc));
    }
    std::thread::spawn(move || loop {
        // SAFETY: zeroed siginfo_t is a valid out-parameter.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` and `info` are valid for the duration of the call.
        let sig = unsafe { libc::sigwaitinfo(&set, &mut info) };
        if sig < 0 || info.si_code == libc::SI_KERNEL {
            continue;
        }
        eprintln!("xtask: forwarding signal {sig} to {pid}");
        // SAFETY: plain kill(2) on the child we spawned (not yet reaped:
        // the main thread reaps it only after it exits).
        unsafe { libc::kill(pid, sig) };
    });
    let status = child.wait().context("waiting for child")?;
    if status.success() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("xtask: `{}` {}", display(cmd), describe(status));
        Ok(exit_code(status))
    }
}

fn termination_sigset() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset with valid signals.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// "exited with 3" / "killed by signal 9".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// The shell convention: the exit code, or 128 + signal.
pub fn exit_code(status: ExitStatus) -> ExitCode {
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
