//! Policy follows the mesh state: a DENY selects `tier: locked`; no workload has that label,
//! so a1→b1 is allowed. The authority's registry gives b1 `tier: locked`: once the agents
//! applied it, they recompile their policy against the new labels without a restart — the
//! kernel on n1 refuses a1→b1 at connect(), and n2 closes the connection a1 held open to b1.
//! The label removed again, a1→b1 is allowed again. The policy files never changed.

use std::time::Duration;

use mesh_tests::{require_privileges, wait_for, Host, DEFAULT_TIMEOUT};

use crate::{
    cluster,
    scenarios::policy_common::{expect_allowed, expect_denied},
};

const LOCK: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  \
    name: lock\n  namespace: default\nspec:\n  selector:\n    matchLabels: {tier: locked}\n  \
    action: DENY\n  rules:\n  - {}\n";

#[test]
fn workload_labels_changed_policy_follows() {
    require_privileges();
    let cluster = cluster().nodes(2).add_pod(0, "a1").add_pod(1, "b1").build();
    let dir = cluster.write_policy_dir("lock", &[("lock.yaml", LOCK)]);
    let agents = [
        cluster.start_agent_with_policy(0, &dir),
        cluster.start_agent_with_policy(1, &dir),
    ];
    let (a1, b1) = (cluster.pod("a1"), cluster.pod("b1"));
    let _server = b1.serve(&[8080]);
    let dst = b1.addr4(8080);
    expect_allowed(a1, dst);
    let held = a1.hold(dst, Duration::from_secs(60));
    wait_for(DEFAULT_TIMEOUT, "held connection established", || {
        held.established()
    });

    let generation = |i: usize| cluster.node(i).metric("mesh_policy_generation") as u64;
    let before = (generation(0), generation(1));
    let locked: Vec<_> = cluster
        .registry_entries()
        .into_iter()
        .map(|mut e| {
            if e.name == "b1" {
                e.labels.push(("tier".into(), "locked".into()));
            }
            e
        })
        .collect();
    let version = cluster.publish_state(&locked, cluster.services());
    cluster.wait_state_applied(&[0, 1], version);
    // Both agents recompiled (a new generation each) against the new labels.
    wait_for(DEFAULT_TIMEOUT, "policy recompiled on both nodes", || {
        (generation(0) > before.0 && generation(1) > before.1).then_some(())
    });
    wait_for(DEFAULT_TIMEOUT, "held connection closed by n2", || {
        held.closed()
    });
    expect_denied(a1, dst);

    let unlocked = cluster.registry_entries();
    let version = cluster.publish_state(&unlocked, cluster.services());
    cluster.wait_state_applied(&[0, 1], version);
    // The recompiled generation lands a moment after the state: bounded wait for it.
    wait_for(DEFAULT_TIMEOUT, "a1→b1 allowed again", || {
        expect_allowed_quiet(a1, dst)
    });
    expect_allowed(a1, dst);
    drop(agents);
}

/// `Some(())` once a1→dst works (the recompiled generation may land a moment after the state).
fn expect_allowed_quiet(a1: &mesh_tests::Pod, dst: std::net::SocketAddr) -> Option<()> {
    let run = a1.client(
        &mesh_tests::ClientRequest::new(dst)
            .send("allowed?")
            .io_timeout(Duration::from_secs(2)),
    );
    run.results.first().is_some_and(|r| r.echo_ok).then_some(())
}
