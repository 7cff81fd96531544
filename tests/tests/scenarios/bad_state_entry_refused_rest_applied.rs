//! One bad entry in the mesh state refuses that entry, never the whole state, never an agent.
//! Each case makes one entry of the authority's registry bad while the same version adds a
//! good workload (a3): the authority logs the refusal with the file, the line of the bad entry
//! and the problem, publishes everything else, and the running agents apply it (a3 is meshed,
//! the other workloads stay meshed). Cases at the authority: an unknown field, a duplicate IP,
//! a `peerAuthentication` that is neither STRICT nor PERMISSIVE, a workload on a node `nodes:`
//! does not list. At the agent (only the node can tell): a workload of n1 without `cgroup:`,
//! and one whose cgroup is another workload's — refused by n1 (logged, counted in
//! `mesh_state_entries_refused_total`), the rest applied. A registry that is not YAML at all
//! changes nothing: the published version stays.

use mesh_tests::{require_privileges, wait_for, Cluster, Host, WorkloadEntry, DEFAULT_TIMEOUT};

use crate::{assert_carried, cluster};

struct Case {
    name: &'static str,
    /// Makes one of the entries (a1, a2 on n1; b1 on n2; a3 on n1, new) bad.
    mutate: fn(&mut Vec<WorkloadEntry>),
    /// The entry that is refused.
    culprit: usize,
    /// Words (all of them, case-insensitive) that name the problem.
    problem: &'static [&'static str],
    /// Refused by the agent of n1 rather than the authority.
    at_agent: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "unknown-field",
        mutate: |e| e[1].extra_lines.push("colour: blue".into()),
        culprit: 1,
        problem: &["colour"],
        at_agent: false,
    },
    Case {
        name: "duplicate-ip",
        mutate: |e| e[1].ips[0] = e[0].ips[0],
        culprit: 1,
        problem: &["10.1.0.2"],
        at_agent: false,
    },
    Case {
        name: "bad-peer-authentication",
        mutate: |e| e[1].peer_authentication = Some("LENIENT".into()),
        culprit: 1,
        problem: &["peerAuthentication", "LENIENT"],
        at_agent: false,
    },
    Case {
        name: "unlisted-node",
        mutate: |e| e[1].node = "n9".into(),
        culprit: 1,
        problem: &["n9", "nodes"],
        at_agent: false,
    },
    Case {
        name: "missing-cgroup-field",
        mutate: |e| e[1].cgroup = None,
        culprit: 1,
        problem: &["cgroup"],
        at_agent: true,
    },
    Case {
        name: "duplicate-cgroup",
        mutate: |e| e[1].cgroup = e[0].cgroup.clone(),
        culprit: 1,
        problem: &["cgroup", "a1"],
        at_agent: true,
    },
];

#[test]
fn bad_state_entry_refused_rest_applied() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(0, "a2")
        .add_pod(1, "b1")
        .add_unregistered_pod(0, "a3")
        .build();
    let agents = cluster.start_agents();
    let (a1, b1, a3) = (cluster.pod("a1"), cluster.pod("b1"), cluster.pod("a3"));
    let _servers = (b1.serve(&[8080]), a3.serve(&[8080]));
    assert_carried(&agents[0], a1, b1, "before");

    let mut failures = Vec::new();
    for case in CASES {
        if let Err(e) = check_case(&cluster, &agents, case) {
            failures.push(e);
        }
        // Back to the good state before the next case.
        let v = cluster.publish_state(&cluster.registry_entries(), cluster.services());
        cluster.wait_state_applied(&[0, 1], v);
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n\n")
    );

    // Not YAML at all: nothing is published, the agents keep what they run.
    let before = cluster.published_version();
    std::fs::write(
        cluster.tmp_dir().join("registry.yaml"),
        "workloads: [\n  - {{\n",
    )
    .expect("write");
    wait_for(
        DEFAULT_TIMEOUT,
        "the authority refuses the whole file",
        || {
            cluster.authority().log_lines().into_iter().find(|l| {
                l["message"] == "state source refused as a whole; the published version stays"
            })
        },
    );
    assert_eq!(cluster.published_version(), before);
    assert_carried(&agents[0], a1, b1, "after an unreadable registry");
    for a in &agents {
        assert!(a
            .log_lines()
            .iter()
            .all(|l| l["level"] != "ERROR" || l["message"] != "agent failed"));
    }
}

fn check_case(cluster: &Cluster, agents: &[mesh_tests::Agent], case: &Case) -> Result<(), String> {
    let mut entries = cluster.registry_entries();
    entries.push(cluster.pod("a3").registry_entry());
    (case.mutate)(&mut entries);
    let refused_before = cluster.node(0).metric("mesh_state_entries_refused_total");
    let rendered = mesh_tests::registry::render_with_services(
        &cluster.registry_nodes(),
        &entries,
        cluster.services(),
    );
    let version = cluster.publish_state_text(&rendered.text);
    cluster.wait_state_applied(&[0, 1], version);
    let mut problems = Vec::new();
    let lines = &rendered.entry_lines[case.culprit];
    // Where the refusal is logged: the authority (names registry.yaml:<line>) or n1's agent
    // (names the state version; the line is the entry's line in the published text).
    let refusal =
        if case.at_agent {
            agents[0]
                .log_lines()
                .into_iter()
                .rev()
                .find(|l| l["message"] == "state entry refused; the rest is applied")
        } else {
            cluster.authority().log_lines().into_iter().rev().find(|l| {
                l["message"] == "state entry refused at the source; the rest is published"
            })
        };
    match refusal {
        None => problems.push("no refusal logged".to_owned()),
        Some(l) => {
            let error = l["error"].as_str().unwrap_or_default().to_lowercase();
            if !case
                .problem
                .iter()
                .all(|w| error.contains(&w.to_lowercase()))
            {
                problems.push(format!("the refusal does not name the problem: {error}"));
            }
            if !case.at_agent {
                let named = error
                    .split("registry.yaml:")
                    .nth(1)
                    .and_then(|r| r.split(':').next())
                    .and_then(|n| n.parse::<usize>().ok());
                match named {
                    Some(n) if lines.contains(&n) => {}
                    other => problems.push(format!(
                        "the refusal names line {other:?}, the entry is on lines {lines:?}: {error}"
                    )),
                }
            }
        }
    }
    if case.at_agent && cluster.node(0).metric("mesh_state_entries_refused_total") <= refused_before
    {
        problems.push("mesh_state_entries_refused_total did not grow on n1".to_owned());
    }
    // The rest was applied: a3 (new, good) is meshed, a1 still is.
    let (a1, b1, a3) = (cluster.pod("a1"), cluster.pod("b1"), cluster.pod("a3"));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_carried(&agents[0], a1, b1, "unrelated");
        assert_carried(&agents[0], a1, a3, "new entry");
    }));
    if caught.is_err() {
        problems.push("the good entries were not applied".to_owned());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "case {}: {}\n--- registry ---\n{}",
            case.name,
            problems.join("; "),
            rendered.text
        ))
    }
}
