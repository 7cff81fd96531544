//! A pod's connection to another pod on the same node is caught and carried
//! by that node's agent, and reaches the pod it was addressed to.

use mesh_tests::{require_privileges, ClientRequest, Host};

use crate::{assert_via_agent, cluster};

#[test]
fn same_node_pod_to_pod_goes_through_agent() {
    require_privileges();
    let cluster = cluster().nodes(1).add_pod(0, "a1").add_pod(0, "a2").build();
    let agent = cluster.start_agent(0);
    let (a1, a2) = (cluster.pod("a1"), cluster.pod("a2"));
    let _server = a2.serve(&[8080]);

    let sent = "same-node hello";
    let run = a1.client(&ClientRequest::new(a2.addr4(8080)).send(sent));
    assert_via_agent(&agent, a1, a2, run.single(), sent);
}
