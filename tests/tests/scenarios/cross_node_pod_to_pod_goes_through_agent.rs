//! A pod's connection to a pod on another node is caught in the kernel and
//! carried by the SOURCE node's agent: the agent's flow record names the
//! source workload and the original destination, and the reply comes from
//! the destination pod at the address the client asked for.

use mesh_tests::{require_privileges, ClientRequest, Host};

use crate::{assert_via_agent, cluster};

#[test]
fn cross_node_pod_to_pod_goes_through_agent() {
    require_privileges();
    let cluster = cluster().nodes(2).add_pod(0, "a1").add_pod(1, "b1").build();
    let agents = cluster.start_agents();
    let (a1, b1) = (cluster.pod("a1"), cluster.pod("b1"));
    let _server = b1.serve(&[8080]);

    let sent = "cross-node hello";
    let run = a1.client(&ClientRequest::new(b1.addr4(8080)).send(sent));
    let flow = assert_via_agent(&agents[0], a1, b1, run.single(), sent);
    assert!(
        flow.conn_id.is_some(),
        "flow without conn_id: {:?}",
        flow.raw
    );
}
