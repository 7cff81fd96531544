//! `cargo xtask test`: unit tests, the privileged `mesh-tests` targets (every
//! test target of the package: `kernel` — the kernel programs without a cluster
//! — and `mesh`, the mini-cluster scenarios), then a check that the run left
//! nothing of ours behind in the kernel or on the host. Ends with one line,
//! `N passed, N failed`.

use std::{
    collections::BTreeSet,
    path::Path,
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::{
    build::{self, cargo, Workspace},
    proc,
    setup::{self, Scope, Verbosity},
};

/// Kernel objects of ours are named `mesh_…` (mesh-common `names`).
const PROG_PREFIX: &str = "mesh_";
/// Host objects the harness creates: cgroups `mesh-<id>`, pins
/// `mesh-<id>-<node>`, temp dirs `mesh-<id>`; network namespaces are
/// `<id>-<node>` where `<id>` is `mt<pid>x<n>` (mesh-tests `unique_id`).
const HOST_PREFIX: &str = "mesh";

/// `mesh…`, or `mt<digits>x<digits>-…` (a harness id).
fn host_name_is_ours(name: &str) -> bool {
    if name.starts_with(HOST_PREFIX) {
        return true;
    }
    let Some(rest) = name.strip_prefix("mt") else {
        return false;
    };
    let Some((id, _)) = rest.split_once('-') else {
        return false;
    };
    let Some((pid, n)) = id.split_once('x') else {
        return false;
    };
    [pid, n]
        .iter()
        .all(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
}
/// How long leftovers may take to disappear (detaching is asynchronous for
/// a just-exited process; another run on this host may be finishing).
const LEFTOVER_GRACE: Duration = Duration::from_secs(10);

#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
struct Tally {
    passed: u64,
    failed: u64,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.passed += other.passed;
        self.failed += other.failed;
    }
}

/// Sum of the `test result:` lines libtest prints, one per test binary.
fn parse_results(output: &str) -> Tally {
    let mut t = Tally::default();
    for line in output.lines() {
        let Some((_, rest)) = line.split_once("test result:") else {
            continue;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => t.passed += n,
                "failed" => t.failed += n,
                _ => {}
            }
        }
    }
    t
}

/// Run one `cargo test …`, streaming its output; a non-zero exit that no
/// failed test explains (build error, crashed test binary) counts as one
/// failure.
fn cargo_test(ws: &Workspace, configure: impl FnOnce(&mut Command)) -> Result<Tally> {
    let mut cmd = cargo();
    cmd.current_dir(&ws.root).arg("test");
    configure(&mut cmd);
    let (status, out) = proc::run_tee(&mut cmd)?;
    let mut t = parse_results(&out);
    if !status.success() && t.failed == 0 {
        eprintln!(
            "xtask: `{}` {} without a failed test: counted as 1 failure",
            proc::display(&cmd),
            proc::describe(status)
        );
        t.failed += 1;
    }
    Ok(t)
}

pub fn run(ws: &Workspace, integration_args: &[String]) -> Result<ExitCode> {
    setup::require_root("cargo xtask test")?;
    setup::ensure(Scope::Everything, Verbosity::Quiet)?;
    if !ws.has_member(build::TESTS_PKG) {
        bail!(
            "`{}` is not a workspace member: nothing to run the integration tests with",
            build::TESTS_PKG
        );
    }
    // A build that fails is a failed run, reported like one.
    let agent = match ws
        .build(build::Profile::Debug)
        .and_then(|bins| Ok(bins.get(build::AGENT_BIN)?.to_owned()))
    {
        Ok(agent) => agent,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            println!("0 passed, 1 failed");
            return Ok(ExitCode::FAILURE);
        }
    };
    let cgroup_root = setup::cgroup2_mount()?;
    let before = Leftovers::snapshot(cgroup_root.as_deref())?;
    if !before.items.is_empty() {
        eprintln!(
            "xtask: warning: present before this run, so not counted against it:\n  {}",
            before
                .items
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }

    let mut total = Tally::default();
    eprintln!("xtask: unit tests");
    total.add(cargo_test(ws, |c| {
        c.args([
            "--workspace",
            "--exclude",
            build::TESTS_PKG,
            "--no-fail-fast",
        ]);
    })?);
    eprintln!(
        "xtask: kernel-program tests and integration scenarios (privileged), {}={}",
        build::AGENT_BIN_ENV,
        agent.display()
    );
    total.add(cargo_test(ws, |c| {
        c.args(["-p", build::TESTS_PKG, "--no-fail-fast"])
            .env(build::AGENT_BIN_ENV, &agent);
        if !integration_args.is_empty() {
            c.arg("--").args(integration_args);
        }
    })?);

    eprintln!("xtask: checking for leftovers (bpftool prog/map/cgroup, pins, netns, cgroups)");
    match Leftovers::new_since(&before, cgroup_root.as_deref())? {
        None => println!("leftover check: clean"),
        Some(left) => {
            println!("leftover check: FAILED, left behind by this run:");
            for item in &left.items {
                println!("  {item}");
            }
            total.failed += 1;
        }
    }
    println!("{} passed, {} failed", total.passed, total.failed);
    Ok(if total.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Things of ours visible on the host, one readable line each.
#[derive(Debug, Default)]
struct Leftovers {
    items: BTreeSet<String>,
}

impl Leftovers {
    fn snapshot(cgroup_root: Option<&Path>) -> Result<Self> {
        let mut items = BTreeSet::new();
        for prog in bpftool_json(&["prog", "show"])?
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(name) = ours(&prog["name"]) {
                items.insert(format!(
                    "bpf prog id {} {name} ({})",
                    prog["id"],
                    prog["type"].as_str().unwrap_or("?")
                ));
            }
        }
        for map in bpftool_json(&["map", "show"])?
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(name) = ours(&map["name"]) {
                items.insert(format!("bpf map id {} {name}", map["id"]));
            }
        }
        // [{"cgroup": "/sys/fs/cgroup/…", "programs": [{"id", "attach_type", "name", …}]}]
        for cg in bpftool_json(&["cgroup", "tree"])?
            .as_array()
            .into_iter()
            .flatten()
        {
            for prog in cg["programs"].as_array().into_iter().flatten() {
                if let Some(name) = ours(&prog["name"]) {
                    items.insert(format!(
                        "cgroup attachment {} {} {name} (prog id {})",
                        cg["cgroup"].as_str().unwrap_or("?"),
                        prog["attach_type"].as_str().unwrap_or("?"),
                        prog["id"]
                    ));
                }
            }
        }
        let mut ip = Command::new("ip");
        ip.args(["netns", "list"]);
        let out = proc::output(&mut ip)?.context("`ip` (iproute2) not found")?;
        proc::check(&ip, out.status)?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line
                .split_whitespace()
                .next()
                .filter(|n| host_name_is_ours(n))
            {
                items.insert(format!("netns {name}"));
            }
        }
        // Temp dirs are kept on purpose with MESH_TEST_KEEP_TMP=1.
        let keep_tmp = std::env::var_os("MESH_TEST_KEEP_TMP").is_some_and(|v| v == "1");
        let tmp = (!keep_tmp).then(std::env::temp_dir);
        for dir in [Some(Path::new("/sys/fs/bpf")), cgroup_root, tmp.as_deref()]
            .into_iter()
            .flatten()
        {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if host_name_is_ours(&entry.file_name().to_string_lossy()) {
                    items.insert(format!("path {}", entry.path().display()));
                }
            }
        }
        Ok(Self { items })
    }

    /// What exists now and did not before, once it has had `LEFTOVER_GRACE`
    /// to go away; `None` when nothing is left.
    fn new_since(before: &Self, cgroup_root: Option<&Path>) -> Result<Option<Self>> {
        let deadline = Instant::now() + LEFTOVER_GRACE;
        loop {
            let now = Self::snapshot(cgroup_root)?;
            let items: BTreeSet<String> = now.items.difference(&before.items).cloned().collect();
            if items.is_empty() {
                return Ok(None);
            }
            if Instant::now() >= deadline {
                return Ok(Some(Self { items }));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn ours(name: &Value) -> Option<&str> {
    name.as_str().filter(|n| n.starts_with(PROG_PREFIX))
}

fn bpftool_json(args: &[&str]) -> Result<Value> {
    let mut cmd = Command::new("bpftool");
    cmd.arg("-j").args(args);
    let out = proc::output(&mut cmd)?.context("bpftool not found (run `cargo xtask setup`)")?;
    proc::check(&cmd, out.status)?;
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing `{}` output", proc::display(&cmd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_summed() {
        let out = "running 2 tests\n\
            test a ... ok\n\
            test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s\n\
            test result: FAILED. 5 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.20s\n\
            noise 7 passed\n";
        assert_eq!(
            parse_results(out),
            Tally {
                passed: 7,
                failed: 3
            }
        );
    }

    #[test]
    fn host_names() {
        assert!(host_name_is_ours("mesh-mt12x0"));
        assert!(host_name_is_ours("mt12x3-n1"));
        assert!(!host_name_is_ours("mtab-n1"));
        assert!(!host_name_is_ours("mt12x-n1"));
        assert!(!host_name_is_ours("other"));
    }
}
