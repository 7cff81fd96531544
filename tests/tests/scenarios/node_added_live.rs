//! A node joins the mesh live. The state starts with nodes n1 and n2 only; n3's agent runs
//! (it has its credentials) but is not in the state, so it enrols nothing. The authority's
//! registry then gains n3 and its pod c1: n3's agent enrols c1, n1's agent learns n3's HBONE
//! address, and a1→c1 and c1→a1 are carried over HBONE mTLS — with no agent restarted.

use mesh_tests::{require_privileges, ClientRequest, Host, NodeEntry};

use crate::{assert_via_agent, cluster};

#[test]
fn node_added_live() {
    require_privileges();
    let cluster = cluster()
        .nodes(3)
        .add_pod(0, "a1")
        .add_pod(1, "b1")
        .add_unregistered_pod(2, "c1")
        .build();
    let two: Vec<NodeEntry> = cluster.registry_nodes().into_iter().take(2).collect();
    let initial = cluster.publish_state_with(&two, &cluster.registry_entries(), &[]);
    let agents = cluster.start_agents();
    cluster.wait_state_applied(&[0, 1, 2], initial);
    let pids: Vec<_> = agents.iter().map(|a| a.pid()).collect();
    assert!(
        agents[2].log_lines().iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("not (yet) in the mesh state's nodes"))),
        "n3's agent should say it is not in the state yet: {}",
        agents[2].tail_stdout(20)
    );
    let (a1, c1) = (cluster.pod("a1"), cluster.pod("c1"));
    let _servers = (a1.serve(&[8080]), c1.serve(&[8080]));

    let mut entries = cluster.registry_entries();
    entries.push(c1.registry_entry());
    let version = cluster.publish_state(&entries, &[]);
    cluster.wait_state_applied(&[0, 1, 2], version);

    let run = a1.client(&ClientRequest::new(c1.addr4(8080)).send("to-the-new-node"));
    let flow = assert_via_agent(&agents[0], a1, c1, run.single(), "to-the-new-node");
    assert_eq!(flow.raw["transport"], "hbone", "{:?}", flow.raw);
    let run = c1.client(&ClientRequest::new(a1.addr4(8080)).send("from-the-new-node"));
    let flow = assert_via_agent(&agents[2], c1, a1, run.single(), "from-the-new-node");
    assert_eq!(flow.raw["transport"], "hbone", "{:?}", flow.raw);
    let now: Vec<_> = agents.iter().map(|a| a.pid()).collect();
    assert_eq!(pids, now, "no agent restarted");
}
