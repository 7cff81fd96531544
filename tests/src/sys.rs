//! Host facts (mounts, privileges) and running helper commands.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

/// One line of `/proc/self/mountinfo` that matters here.
struct Mount {
    mount_point: PathBuf,
    fs_type: String,
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo paths.
fn unescape_mount_path(s: &str) -> PathBuf {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = u16::from(bytes[i + 1] - b'0') * 64
                + u16::from(bytes[i + 2] - b'0') * 8
                + u16::from(bytes[i + 3] - b'0');
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

fn mounts() -> Vec<Mount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_else(|e| panic!("reading /proc/self/mountinfo: {e}"));
    text.lines()
        .filter_map(|line| {
            // id parent maj:min root mount_point options [optional...] - fstype source superopts
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let fs_type = right.split(' ').next()?;
            Some(Mount {
                mount_point: unescape_mount_path(mount_point),
                fs_type: fs_type.to_owned(),
            })
        })
        .collect()
}

/// The cgroup2 mount point, found in `/proc/self/mountinfo` (never assumed):
/// `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones.
/// Panics if there is none.
pub fn cgroup2_mount() -> PathBuf {
    try_cgroup2_mount().unwrap_or_else(|| {
        panic!("no cgroup2 filesystem in /proc/self/mountinfo: the mesh needs cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup)")
    })
}

fn try_cgroup2_mount() -> Option<PathBuf> {
    let all = mounts();
    // Prefer the conventional places when several exist (bind mounts).
    let cg2: Vec<_> = all.iter().filter(|m| m.fs_type == "cgroup2").collect();
    cg2.iter()
        .find(|m| m.mount_point == Path::new("/sys/fs/cgroup"))
        .or_else(|| {
            cg2.iter()
                .find(|m| m.mount_point == Path::new("/sys/fs/cgroup/unified"))
        })
        .or_else(|| cg2.first())
        .map(|m| m.mount_point.clone())
}

/// The bpffs mount used for pins: `/sys/fs/bpf`. Panics if it is not a bpffs.
pub fn bpffs_mount() -> PathBuf {
    let p = PathBuf::from("/sys/fs/bpf");
    if !mounts()
        .iter()
        .any(|m| m.fs_type == "bpf" && m.mount_point == p)
    {
        panic!("/sys/fs/bpf is not a bpffs mount: run `mount -t bpf bpf /sys/fs/bpf` (or `cargo xtask setup`)");
    }
    p
}

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// Fails the test, with a message saying what is missing, unless this process
/// runs as root with a cgroup2 mount, a bpffs at `/sys/fs/bpf`, and the `ip`
/// and `bpftool` tools. Every scenario calls this first: a scenario that
/// cannot run fails, it never "passes" by skipping.
#[track_caller]
pub fn require_privileges() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        panic!(
            "mesh integration tests need root (euid is {euid}): they create network namespaces, \
             cgroups and load eBPF programs; run them with `cargo xtask test` or as root"
        );
    }
    if try_cgroup2_mount().is_none() {
        panic!("mesh integration tests need a cgroup2 mount (none in /proc/self/mountinfo)");
    }
    bpffs_mount();
    for tool in ["ip", "bpftool"] {
        if !in_path(tool) {
            panic!("mesh integration tests need `{tool}` in PATH (apt-get install iproute2 bpftool, or `cargo xtask setup`)");
        }
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short name unique on this host for the life of this process:
/// `mt<pid>x<counter>`. Used as the prefix of every namespace, cgroup and pin.
pub fn unique_id() -> String {
    format!(
        "mt{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command to completion; panics with its stderr if it fails.
/// Returns its stdout.
#[track_caller]
pub fn run_ok<I, S>(program: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    let desc = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {desc}: {e}"));
    if !out.status.success() {
        panic!(
            "{desc} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command to completion and reports failure instead of panicking
/// (for teardown, where a panic would abort).
pub fn run_quiet<I, S>(program: &str, args: I) -> Result<(), String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    let desc = format!("{cmd:?}");
    match cmd.output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "{desc} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("running {desc}: {e}")),
    }
}

/// Complete lines of a file that another process is appending to (a trailing
/// partial line is left out). A missing file has no lines.
pub fn read_lines(path: &Path) -> Vec<String> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => return Vec::new(),
    };
    complete.lines().map(str::to_owned).collect()
}

/// The last `n` lines of a file, for failure messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The resident set size of process `pid` now, in KiB (`VmRSS`; 0 if unreadable).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// This process's `RLIMIT_NOFILE` (soft, hard).
pub fn nofile_limit() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return (0, 0);
    }
    (lim.rlim_cur, lim.rlim_max)
}

/// Raises this process's `RLIMIT_NOFILE` soft limit to its hard limit (children inherit it),
/// for tests whose pods hold many connections. Returns the soft limit now.
pub fn raise_nofile() -> u64 {
    let (soft, hard) = nofile_limit();
    if soft < hard {
        let lim = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit only reads the struct passed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
            return hard;
        }
    }
    soft
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mount_path("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape_mount_path("/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape_mount_path("/end\\04"), PathBuf::from("/end\\04"));
    }
}
