//! The agent does not need the authority to start. With the authority stopped, node n1's agent
//! is killed and started again: it starts from the mesh state it verified and persisted (same
//! version and digest), restores the workload certificates it persisted, is ready at once (no
//! 30 s wait, no exit) and carries mTLS traffic cross-node; an upgrade (listener handoff) in
//! that state works too. While the authority is down the registry changes (pod a3 added); when
//! the authority returns, the agent catches up to the latest version and meshes a3.

use std::time::{Duration, Instant};

use mesh_tests::{require_privileges, Host};

use crate::{assert_carried, cluster};

#[test]
fn agent_starts_with_authority_down_from_persisted_state() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(1, "b1")
        .add_unregistered_pod(0, "a3")
        .build();
    let mut agents = cluster.start_agents();
    let (a1, b1, a3) = (cluster.pod("a1"), cluster.pod("b1"), cluster.pod("a3"));
    let _server = b1.serve(&[8080]);
    assert_carried(&agents[0], a1, b1, "before");
    let version = cluster.node(0).metric("mesh_state_version") as u64;
    assert!(version >= 1, "the agent runs the authority's state");

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
    let from = agents[0]
        .log_lines()
        .into_iter()
        .find(|l| l["message"] == "starting from the persisted state")
        .unwrap_or_else(|| panic!("no persisted start: {}", agents[0].tail_stdout(30)));
    assert_eq!(from["version"].as_u64(), Some(version), "{from}");
    assert_eq!(
        cluster.node(0).metric("mesh_state_version") as u64,
        version,
        "the persisted version is the applied one"
    );
    assert_carried(&agents[0], a1, b1, "authority down");

    // An upgrade with the authority still down.
    let old = agents[0].upgrade(Duration::from_secs(5));
    assert_eq!(old.code(), Some(0), "old agent exit: {old}");
    assert_carried(&agents[0], a1, b1, "after upgrade");

    // The registry changes while the authority is down (a3 added); the authority publishes it
    // when it returns, and the agent catches up.
    let mut entries = cluster.registry_entries();
    entries.push(a3.registry_entry());
    cluster.write_registry_file("registry.yaml", &entries);
    cluster.authority().start();
    let latest = mesh_tests::wait_for(
        mesh_tests::DEFAULT_TIMEOUT,
        "the authority publishes the change",
        || {
            let v = cluster.published_version();
            (v > version).then_some(v)
        },
    );
    cluster.wait_state_applied(&[0, 1], latest);
    assert_carried(&agents[0], a1, b1, "authority back");
    let _server3 = a3.serve(&[8080]);
    assert_carried(&agents[0], a1, a3, "a3 meshed after the catch-up");
}
