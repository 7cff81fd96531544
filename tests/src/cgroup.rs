//! cgroup v2 directory guard.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{poll::eventually, sys};

/// How long teardown waits for a cgroup to empty and go away.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// A cgroup2 directory created by the harness, removed on drop. Only the
/// harness puts processes into it; any still there at drop are killed by pid
/// (SIGKILL) before the directory is removed.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates the cgroup at the absolute path `path` (its parent must exist).
    #[track_caller]
    pub fn create(path: &Path) -> Self {
        std::fs::create_dir(path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        Cgroup {
            path: path.to_owned(),
        }
    }

    /// Absolute path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path relative to the cgroup2 mount, as the registry and the agent's
    /// `--pod-cgroup` want it.
    pub fn relative(&self) -> PathBuf {
        relative_to_mount(&self.path)
    }

    /// The cgroup id (the directory's inode number), as in `bpftool link`.
    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path)
            .map(|m| m.ino())
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.path.display()))
    }

    /// Pids in this cgroup (not in its children).
    pub fn pids(&self) -> Vec<i32> {
        pids_of(&self.path)
    }
}

/// `path` relative to the cgroup2 mount; panics if it is outside it.
pub fn relative_to_mount(path: &Path) -> PathBuf {
    let mount = sys::cgroup2_mount();
    path.strip_prefix(&mount)
        .unwrap_or_else(|_| {
            panic!(
                "{} is not under the cgroup2 mount {}",
                path.display(),
                mount.display()
            )
        })
        .to_owned()
}

fn pids_of(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if !self.path.exists() {
            return;
        }
        // Kill what is left (processes of ours that outlived their guards), until empty.
        let emptied = eventually(TEARDOWN_TIMEOUT, || {
            let pids = pids_of(&self.path);
            for &pid in &pids {
                // SAFETY: kill has no memory-safety preconditions. The pid is
                // in a cgroup this harness created and only it fills.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            pids.is_empty().then_some(())
        });
        if emptied.is_none() {
            eprintln!(
                "mesh-tests: pids {:?} still in {}",
                pids_of(&self.path),
                self.path.display()
            );
        }
        // rmdir can briefly fail with EBUSY while the last task is exiting.
        let removed = eventually(TEARDOWN_TIMEOUT, || match std::fs::remove_dir(&self.path) {
            Ok(()) => Some(Ok(())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(Ok(())),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => None,
            Err(e) => Some(Err(e)),
        });
        match removed {
            Some(Ok(())) => {}
            Some(Err(e)) => eprintln!("mesh-tests: removing cgroup {}: {e}", self.path.display()),
            None => eprintln!("mesh-tests: cgroup {} stayed busy", self.path.display()),
        }
    }
}
