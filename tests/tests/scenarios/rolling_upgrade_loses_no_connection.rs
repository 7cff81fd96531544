//! A rolling upgrade loses no connection. Clients in a1 open about 100 connections per second
//! each, same-node (a1 → a2) and cross-node (a1 → b1), while the agent of n1 and then the
//! agent of n2 are upgraded in place: each new agent takes the listening sockets from the
//! running one over the handoff socket, and only once it serves does the old one stop
//! accepting, drain and exit. Every connection succeeds through the mesh, and a capture on
//! the bridge never sees the payload in clear.

use std::time::Duration;

use mesh_tests::{
    capture::{self, Capture},
    require_privileges, ClientRequest, Host,
};

use crate::cluster;

#[test]
fn rolling_upgrade_loses_no_connection() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(0, "a2")
        .add_pod(1, "b1")
        .build();
    let mut agents = cluster.start_agents();
    let (a1, a2, b1) = (cluster.pod("a1"), cluster.pod("a2"), cluster.pod("b1"));
    let _sa2 = a2.serve(&[8080]);
    let _sb1 = b1.serve(&[8080]);
    let marker = "rolling-upgrade-payload-5d1c";
    let bridge = Capture::start(cluster.bridge_netns());
    let clients: Vec<_> = [a2.addr4(8080), b1.addr4(8080)]
        .into_iter()
        .map(|dst| {
            a1.spawn_client(
                &ClientRequest::new(dst)
                    .send(marker)
                    .count(500)
                    .interval(Duration::from_millis(10))
                    .io_timeout(Duration::from_secs(5)),
            )
        })
        .collect();
    for c in &clients {
        c.wait_results(20, mesh_tests::DEFAULT_TIMEOUT);
    }
    for (i, agent) in agents.iter_mut().enumerate() {
        let old = agent.upgrade(Duration::from_secs(5));
        assert_eq!(
            old.code(),
            Some(0),
            "old agent of n{} exited with {old}",
            i + 1
        );
        let handed = agent
            .log_lines()
            .into_iter()
            .any(|l| l["message"] == "took over the listening sockets of the running agent");
        assert!(
            handed,
            "n{}: the new agent bound afresh instead of taking over",
            i + 1
        );
    }
    let runs: Vec<_> = clients.into_iter().map(|c| c.wait()).collect();
    let frames = bridge.stop();
    for run in &runs {
        let failed: Vec<_> = run
            .results
            .iter()
            .filter(|r| !r.echo_ok || r.error.is_some())
            .collect();
        assert_eq!(
            run.results.len(),
            500,
            "{}: {} results",
            run.request.connect,
            run.results.len()
        );
        assert!(
            failed.is_empty(),
            "{}: {} of 500 connections failed across the upgrade: {:?}",
            run.request.connect,
            failed.len(),
            failed.iter().take(5).collect::<Vec<_>>()
        );
        assert!(
            run.results.iter().all(|r| r
                .hello
                .as_deref()
                .is_some_and(|h| h.ends_with(&run.request.connect.to_string()))),
            "a connection reached the wrong place"
        );
    }
    let clear = frames
        .iter()
        .filter(|f| capture::contains(f, marker.as_bytes()))
        .count();
    assert_eq!(
        clear, 0,
        "payload seen in clear on the bridge during the upgrade"
    );
}
