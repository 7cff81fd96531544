//! An enrolled pod's connections to destinations outside the mesh pass
//! untouched: a pod that is not in the registry, and a node's own address.
//! They reach the server directly (it sees the pod's own address) and the
//! agent logs no flow; a connection to a mesh pod made afterwards is carried.

use mesh_tests::{require_privileges, ClientRequest, Host};

use crate::{assert_direct, assert_no_flow, assert_via_agent, cluster};

#[test]
fn non_mesh_destination_not_redirected() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(1, "b1")
        .add_unregistered_pod(1, "x2")
        .build();
    let agents = cluster.start_agents();
    let (a1, b1, x2) = (cluster.pod("a1"), cluster.pod("b1"), cluster.pod("x2"));
    let n2 = cluster.node(1);
    let outside_pod = x2.serve(&[8080]);
    let node_server = n2.serve(&[8080]);
    let _mesh_server = b1.serve(&[8080]);

    let mut direct = Vec::new();
    for (server, name, dst) in [
        (&outside_pod, "x2", x2.addr4(8080)),
        (&outside_pod, "x2", x2.addr6(8080)),
        (&node_server, "n2", n2.addr4(8080)),
        (&node_server, "n2", n2.addr6(8080)),
    ] {
        let r = a1
            .client(&ClientRequest::new(dst).send("outside the mesh"))
            .single()
            .clone();
        assert_direct(server, name, &r);
        direct.push(r);
    }

    let sent = "inside the mesh";
    let run = a1.client(&ClientRequest::new(b1.addr4(8080)).send(sent));
    assert_via_agent(&agents[0], a1, b1, run.single(), sent);
    for r in &direct {
        assert_no_flow(&agents, r);
    }
}
