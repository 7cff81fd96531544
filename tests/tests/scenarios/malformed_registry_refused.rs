//! A malformed or inconsistent registry is refused before anything is
//! attached: the agent exits with status 2, its stderr names the file, the
//! line of the offending workload and the problem, nothing is attached to the
//! pod-cgroup parent and no pin directory is left. Cases: an unknown field, a
//! duplicate IP, a local workload without `cgroup:`, one whose cgroup does
//! not exist, a `peerAuthentication` that is neither STRICT nor PERMISSIVE,
//! and a workload on a node that `nodes:` does not list. The same cluster with a valid registry starts (control).

use std::{ops::RangeInclusive, path::Path, time::Duration};

use mesh_tests::{require_privileges, Agent, Cluster, WorkloadEntry};

use crate::cluster;

struct Case {
    name: &'static str,
    /// Turns the valid entries (a1, a2 on n1; b1 on n2) into malformed ones.
    mutate: fn(&mut Vec<WorkloadEntry>),
    /// Indices of the entries whose lines the error may name.
    culprits: &'static [usize],
    /// Words (all of them, case-insensitive) that name the problem.
    problem: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        name: "unknown-field",
        mutate: |e| e[1].extra_lines.push("colour: blue".into()),
        culprits: &[1],
        problem: &["colour"],
    },
    Case {
        name: "duplicate-ip",
        mutate: |e| e[2].ips[0] = e[0].ips[0],
        culprits: &[0, 2],
        problem: &["10.1.0.2"],
    },
    Case {
        name: "missing-cgroup-field",
        mutate: |e| e[1].cgroup = None,
        culprits: &[1],
        problem: &["cgroup"],
    },
    Case {
        name: "nonexistent-cgroup",
        mutate: |e| {
            let cg = e[1].cgroup.as_mut().expect("valid entries have a cgroup");
            cg.push_str("-does-not-exist");
        },
        culprits: &[1],
        problem: &["cgroup", "does-not-exist"],
    },
    Case {
        name: "bad-peer-authentication",
        mutate: |e| e[1].peer_authentication = Some("LENIENT".into()),
        culprits: &[1],
        problem: &["peerAuthentication", "LENIENT"],
    },
    Case {
        name: "unlisted-node",
        mutate: |e| e[2].node = "n9".into(),
        culprits: &[2],
        problem: &["n9", "nodes"],
    },
];

#[test]
fn malformed_registry_refused() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(0, "a2")
        .add_pod(1, "b1")
        .build();
    let node = cluster.node(0);

    // Control: the valid registry is accepted.
    {
        let mut agent = cluster.start_agent(0);
        assert_eq!(
            node.attached_progs().len(),
            mesh_common::names::ALL_PROGS.len()
        );
        assert_eq!(agent.stop().code(), Some(0));
    }

    let failures: Vec<String> = CASES
        .iter()
        .filter_map(|case| check_case(&cluster, case).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n\n")
    );
}

fn check_case(cluster: &Cluster, case: &Case) -> Result<(), String> {
    let node = cluster.node(0);
    let mut entries = cluster.registry_entries();
    assert_eq!(
        entries.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["a1", "a2", "b1"]
    );
    (case.mutate)(&mut entries);
    let file = format!("registry-{}.yaml", case.name);
    let (path, rendered) = cluster.write_registry_file(&file, &entries);
    let mut spec = cluster.agent_spec(0);
    spec.registry = path.clone();
    let exit = Agent::run_to_exit(spec, Duration::from_secs(20));

    let mut problems = Vec::new();
    if exit.status.code() != Some(2) {
        problems.push(format!("exit status {} (want 2)", exit.status));
    }
    let lines: Vec<&RangeInclusive<usize>> = case
        .culprits
        .iter()
        .map(|&i| &rendered.entry_lines[i])
        .collect();
    match named_line(&exit.stderr, &path) {
        None => problems.push(format!("stderr does not name `{}:<line>`", path.display())),
        Some(l) if !lines.iter().any(|r| r.contains(&l)) => problems.push(format!(
            "stderr names line {l}, the offending workload is on lines {lines:?}"
        )),
        Some(_) => {}
    }
    let lower = exit.stderr.to_lowercase();
    if !case
        .problem
        .iter()
        .all(|w| lower.contains(&w.to_lowercase()))
    {
        problems.push(format!(
            "stderr does not name the problem (not all of {:?})",
            case.problem
        ));
    }
    if exit.stdout.contains("agent ready") {
        problems.push("the agent logged `agent ready`".into());
    }
    let attached = node.attached_progs();
    if !attached.is_empty() {
        problems.push(format!("programs left attached: {attached:?}"));
    }
    if node.pin_dir().exists() {
        problems.push(format!("pin dir {} left", node.pin_dir().display()));
        mesh_tests::agent::remove_pin_dir(node.pin_dir());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "case {}: {}\n--- registry ---\n{}--- stderr ---\n{}",
            case.name,
            problems.join("; "),
            rendered.text,
            exit.stderr.trim_end()
        ))
    }
}

/// The line number in the first `<path>:<line>` of `stderr`.
fn named_line(stderr: &str, path: &Path) -> Option<usize> {
    let p = path.to_string_lossy();
    let file = path.file_name()?.to_string_lossy();
    // Accept the path as given or just the file name.
    for needle in [format!("{p}:"), format!("{file}:")] {
        if let Some(i) = stderr.find(&needle) {
            let digits: String = stderr[i + needle.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if let Ok(n) = digits.parse() {
                return Some(n);
            }
        }
    }
    None
}
