//! A workload added to the mesh state while every agent runs is meshed at once, with no
//! restart: pod b3 exists on n2 but is not in the registry (a1→b3 is not captured, and b3 is
//! not enrolled). The registry at the authority gains b3; once both agents applied the new
//! version, a1's first connection to b3 goes through HBONE mTLS (the flow record says so, and
//! a capture on the link between the nodes never sees the payload), b3's own connection to a1
//! is captured on n2 and carried with b3's identity, and plaintext from outside the mesh to
//! b3 is refused (STRICT). The agents' processes are the same throughout.

use std::time::Duration;

use mesh_tests::{
    capture::{contains, Capture},
    require_privileges, ClientRequest, Host,
};

use crate::{assert_via_agent, cluster};

#[test]
fn workload_added_is_meshed_without_restart() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(1, "b1")
        .add_unregistered_pod(1, "b3")
        .build();
    let agents = cluster.start_agents();
    let pids: Vec<_> = agents.iter().map(|a| a.pid()).collect();
    let (a1, b1, b3) = (cluster.pod("a1"), cluster.pod("b1"), cluster.pod("b3"));
    let _servers = (a1.serve(&[8080]), b3.serve(&[8080]));
    let before = cluster.node(1).metric("mesh_state_version") as u64;
    assert!(before >= 1, "agents start from the authority's state");

    let mut entries = cluster.registry_entries();
    entries.push(b3.registry_entry());
    let version = cluster.publish_state(&entries, cluster.services());
    assert!(version > before);
    cluster.wait_state_applied(&[0, 1], version);

    let capture = Capture::start(cluster.bridge_netns());
    let sent = "b3-first-payload-9d1e-never-in-clear";
    let run = a1.client(&ClientRequest::new(b3.addr4(8080)).send(sent));
    let flow = assert_via_agent(&agents[0], a1, b3, run.single(), sent);
    assert_eq!(flow.raw["transport"], "hbone", "{:?}", flow.raw);
    assert_eq!(
        flow.raw["dst_identity"], "spiffe://cluster.local/ns/default/sa/sa-b3",
        "{:?}",
        flow.raw
    );
    // b3 is enrolled on n2: its own connections are captured and carried with its identity.
    let back = "b3-outbound-payload-4c2a";
    let run = b3.client(&ClientRequest::new(a1.addr4(8080)).send(back));
    let flow = assert_via_agent(&agents[1], b3, a1, run.single(), back);
    assert_eq!(flow.raw["src_workload"], "default/b3", "{:?}", flow.raw);
    let frames = capture.stop();
    for f in &frames {
        assert!(
            !contains(f, sent.as_bytes()) && !contains(f, back.as_bytes()),
            "a payload to or from the new workload crossed the link in plaintext"
        );
    }
    // Plaintext to b3 from outside the mesh (node n1's own namespace: not a pod, not n2's
    // agent) is refused: b3 is STRICT from the moment it is enrolled.
    let outsider = cluster.node(0).client(
        &ClientRequest::new(b3.addr4(8080))
            .send("outsider")
            .io_timeout(Duration::from_secs(2)),
    );
    assert!(
        outsider
            .results
            .iter()
            .all(|r| r.hello.is_none() && !r.echo_ok),
        "plaintext from outside the mesh reached the new STRICT workload: {:?}",
        outsider.results
    );
    let _ = b1;
    let now: Vec<_> = agents.iter().map(|a| a.pid()).collect();
    assert_eq!(pids, now, "no agent restarted");
}
