//! The agent does not need the authority to start. With the authority stopped, node n1's agent
//! is killed and started again: it restores the workload certificates it persisted, is ready
//! at once (no 30 s wait, no exit) and carries mTLS traffic cross-node; an upgrade (listener
//! handoff) in that state works too, and traffic keeps flowing when the authority returns.

use std::time::{Duration, Instant};

use mesh_tests::{require_privileges, Host};

use crate::{assert_carried, cluster};

#[test]
fn agent_starts_while_authority_down() {
    require_privileges();
    let cluster = cluster().nodes(2).add_pod(0, "a1").add_pod(1, "b1").build();
    let mut agents = cluster.start_agents();
    let (a1, b1) = (cluster.pod("a1"), cluster.pod("b1"));
    let _server = b1.serve(&[8080]);
    assert_carried(&agents[0], a1, b1, "before");

    cluster.authority().stop();
    agents[0].kill_sigkill();
    let started = Instant::now();
    agents[0].restart();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "ready only after {:?} with the authority down",
        started.elapsed()
    );
    let restored = agents[0]
        .log_lines()
        .into_iter()
        .filter(|l| l["message"] == "workload certificate restored")
        .count();
    assert_eq!(restored, 1, "{}", agents[0].tail_stdout(20));
    assert_carried(&agents[0], a1, b1, "authority down");

    // An upgrade with the authority still down.
    let old = agents[0].upgrade(Duration::from_secs(5));
    assert_eq!(old.code(), Some(0), "old agent exit: {old}");
    assert_carried(&agents[0], a1, b1, "after upgrade");

    cluster.authority().start();
    assert_carried(&agents[0], a1, b1, "authority back");
}
