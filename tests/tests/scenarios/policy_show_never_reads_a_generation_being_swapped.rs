//! Generation swaps are consistent for user-space readers of the pinned maps: while
//! `mesh-agent policy apply` swaps two different policies back and forth (write the new
//! generation, flip `policy_gen`, grace period, delete the old one), `mesh-agent policy show`
//! reads the active generation over and over — the same read the agent's policy watcher does.
//! Every read must be one whole generation (exactly the destinations and L4 entries of one of
//! the two policies), never a half-deleted one (no destinations would read as "no policy":
//! allow-all), and the agent keeps publishing the generations it reads.

use std::{
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use mesh_tests::{require_privileges, Host, DEFAULT_TIMEOUT};
use serde_json::Value;

use super::policy_common::{authz, docs};

/// (number of destinations, L4 entries) of a `policy show --output json`.
fn summary(v: &Value) -> (usize, u64) {
    (
        v["destinations"].as_array().map_or(0, Vec::len),
        v["l4_entries"].as_u64().unwrap_or(0),
    )
}

#[test]
fn policy_show_never_reads_a_generation_being_swapped() {
    require_privileges();
    let cluster = crate::cluster()
        .nodes(1)
        .add_pod(0, "a1")
        .add_pod(0, "a2")
        .add_pod(0, "a3")
        .build();
    let _agents = cluster.start_agents();
    // A selects a1 and a2 with rules on several ports; B selects a3 only.
    let many_ports =
        "  rules:\n  - to:\n    - operation: {ports: [\"81\", \"82\", \"83\", \"84\"]}\n";
    let a = docs(&[
        authz("allow-a1", "a1", "ALLOW", many_ports),
        authz("allow-a2", "a2", "ALLOW", many_ports),
    ]);
    let b = docs(&[authz("deny-a3", "a3", "DENY", "  rules:\n  - {}\n")]);
    let dir_a = cluster.write_policy_dir("swap-a", &[("p.yaml", &a)]);
    let dir_b = cluster.write_policy_dir("swap-b", &[("p.yaml", &b)]);

    let show = || -> Value {
        let mut cmd = Command::new(mesh_tests::agent_bin());
        cmd.args(["policy", "show", "--output", "json", "--pin-dir"])
            .arg(cluster.node(0).pin_dir());
        let out = cluster.node(0).run(cmd, "policy-show", DEFAULT_TIMEOUT);
        assert!(out.status.success(), "policy show: {out:?}");
        serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {out:?}"))
    };
    // The two whole generations, as read when nothing is swapping.
    assert_eq!(cluster.policy_apply(0, &dir_a).code, Some(0));
    let want_a = summary(&show());
    assert_eq!(cluster.policy_apply(0, &dir_b).code, Some(0));
    let want_b = summary(&show());
    assert_ne!(want_a, want_b);
    assert!(want_a.0 > 0 && want_b.0 > 0, "{want_a:?} {want_b:?}");

    let done = AtomicBool::new(false);
    let (reads, generations) = std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..30 {
                let dir = if i % 2 == 0 { &dir_a } else { &dir_b };
                let applied = cluster.policy_apply(0, dir);
                assert_eq!(applied.code, Some(0), "{applied:?}");
            }
            done.store(true, Ordering::SeqCst);
        });
        let mut reads = 0;
        let mut generations = std::collections::BTreeSet::new();
        while !done.load(Ordering::SeqCst) {
            let v = show();
            let got = summary(&v);
            assert!(
                got == want_a || got == want_b,
                "generation {} read torn: {got:?}, expected {want_a:?} or {want_b:?}: {v}",
                v["generation"]
            );
            generations.insert(v["generation"].as_u64().unwrap_or(0));
            reads += 1;
        }
        (reads, generations)
    });
    assert!(reads > 0, "no read overlapped the swaps");
    assert!(
        generations.len() > 1,
        "reads saw one generation only: {generations:?}"
    );
}
