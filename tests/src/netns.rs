//! Network namespace and veth guards (iproute2).

use std::{path::PathBuf, process::Command, time::Duration};

use crate::{
    process::{self, Target},
    sys,
};

/// Where `ip netns add` puts the namespace files.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// A named network namespace (`ip netns add`), deleted on drop
/// (`ip netns del`). Its loopback is up.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name`; panics if it exists or cannot be made.
    #[track_caller]
    pub fn create(name: &str) -> Self {
        // The first `ip netns add` on a host makes /var/run/netns a shared
        // mount; two doing it at once can stack mounts. Serialise them.
        static ADD: std::sync::Mutex<()> = std::sync::Mutex::new(());
        {
            let _one_at_a_time = ADD
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            sys::run_ok("ip", ["netns", "add", name]);
        }
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file, for `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_RUN_DIR).join(&self.name)
    }

    /// Runs `ip -n <ns> <args>`; panics on failure. Returns stdout.
    #[track_caller]
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        sys::run_ok("ip", all)
    }

    /// Sets sysctls (`net.ipv4.ip_forward=1` …) inside this namespace, by
    /// running `sysctl -w` in it (`/proc/sys/net` is per namespace).
    #[track_caller]
    pub fn sysctl(&self, settings: &[&str], scratch: &std::path::Path) {
        let mut cmd = Command::new("sysctl");
        cmd.arg("-qw").args(settings);
        let target = Target {
            netns: Some(self.path()),
            cgroup: None,
        };
        let base = scratch.join(format!("sysctl-{}", self.name));
        let out =
            process::spawn(cmd, &target, "sysctl", &base).wait_output(Duration::from_secs(10));
        if !out.status.success() {
            panic!(
                "sysctl {settings:?} in netns {} failed: {}",
                self.name,
                out.stderr.trim()
            );
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = sys::run_quiet("ip", ["netns", "del", self.name.as_str()]) {
            eprintln!("mesh-tests: {e}");
        }
    }
}

/// A veth pair created directly in two namespaces (so its names only need to
/// be unique inside them), deleted on drop.
#[derive(Debug)]
pub struct Veth {
    ns_a: String,
    name_a: String,
}

impl Veth {
    /// `ip -n <a> link add <name_a> type veth peer name <name_b> netns <b>`,
    /// both ends up.
    #[track_caller]
    pub fn create(a: &Netns, name_a: &str, b: &Netns, name_b: &str) -> Self {
        assert!(
            name_a.len() <= 15 && name_b.len() <= 15,
            "interface names are at most 15 bytes: {name_a}, {name_b}"
        );
        a.ip(&[
            "link",
            "add",
            name_a,
            "type",
            "veth",
            "peer",
            "name",
            name_b,
            "netns",
            b.name(),
        ]);
        let veth = Veth {
            ns_a: a.name().to_owned(),
            name_a: name_a.to_owned(),
        };
        a.ip(&["link", "set", name_a, "up"]);
        b.ip(&["link", "set", name_b, "up"]);
        veth
    }

    pub fn name(&self) -> &str {
        &self.name_a
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Deleting one end deletes the pair. Gone already if its namespace was
        // deleted first; that is fine.
        let netns_file = PathBuf::from(NETNS_RUN_DIR).join(&self.ns_a);
        if netns_file.exists() {
            let _ = sys::run_quiet(
                "ip",
                [
                    "-n",
                    self.ns_a.as_str(),
                    "link",
                    "del",
                    self.name_a.as_str(),
                ],
            );
        }
    }
}

/// Runs `f` on a new thread that has joined the network namespace at `ns`
/// (`setns` moves only the calling thread), and returns its result. Used to
/// reach listeners inside a namespace (an agent's admin port) from the test
/// process without moving the test process itself.
#[track_caller]
pub fn in_netns<T: Send + 'static>(
    ns: &std::path::Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let file = std::fs::File::open(ns)
        .unwrap_or_else(|e| panic!("opening network namespace {}: {e}", ns.display()));
    let handle = std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid, open namespace fd; it affects only this thread,
        // which exits when `f` returns.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    });
    match handle.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}
