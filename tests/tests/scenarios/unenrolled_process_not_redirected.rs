//! Only enrolled workloads are redirected. A process in the node's network
//! namespace (outside the pod cgroups) and a process in a pod cgroup that is
//! under the node's pod-cgroup parent but not in the registry both reach the
//! destination pod directly (the server sees their own address), and the
//! agent logs no flow for them; an enrolled pod's connection to the same
//! destination, made afterwards, is carried by the agent. The destination is
//! PERMISSIVE: a STRICT one would refuse the plaintext (see
//! `plaintext_strict_refused_permissive_flagged`).

use mesh_tests::{require_privileges, ClientRequest, Host};

use crate::{assert_direct, assert_no_flow, assert_via_agent, cluster};

#[test]
fn unenrolled_process_not_redirected() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_unregistered_pod(0, "x1")
        .add_pod(1, "b1")
        .permissive("b1")
        .build();
    let agents = cluster.start_agents();
    let (a1, x1, b1) = (cluster.pod("a1"), cluster.pod("x1"), cluster.pod("b1"));
    let server = b1.serve(&[8080]);

    let mut direct = Vec::new();
    for dst in [b1.addr4(8080), b1.addr6(8080)] {
        let req = ClientRequest::new(dst).send("not enrolled");
        let from_node = cluster.node(0).client(&req).single().clone();
        assert_direct(&server, "b1", &from_node);
        let from_x1 = x1.client(&req).single().clone();
        assert_direct(&server, "b1", &from_x1);
        direct.extend([from_node, from_x1]);
    }

    // Control: an enrolled pod, same destination, is redirected. Once its
    // flow is logged, the earlier connections would have been too.
    let sent = "enrolled";
    let run = a1.client(&ClientRequest::new(b1.addr4(8080)).send(sent));
    assert_via_agent(&agents[0], a1, b1, run.single(), sent);
    for r in &direct {
        assert_no_flow(&agents, r);
    }
}
